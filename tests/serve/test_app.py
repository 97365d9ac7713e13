"""mocae serve on tiny-random: the official openai client against a real loopback server, batching of
different mixtures, and every bad input answered with a 4xx naming the field."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from mocae.mixture.model import MoCaEConfig, MoCaEModel  # noqa: E402
from mocae.serve.app import ServeConfig, create_app  # noqa: E402
from mocae.serve.batcher import ServedModel  # noqa: E402

MODEL = "tiny-mocae"  # the id the conftest's `serve` fixture gives the model


def test_openai_client_round_trip_plain_and_streaming(mocae, serve):
    mocae.mixer.merge_min_tokens = 1  # the merged batch-1 path even for these short answers
    with serve(mocae) as srv:
        client = srv.client()
        assert [m.id for m in client.models.list().data] == [MODEL]
        resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello there"}],
                                              max_tokens=6, temperature=0)
        choice = resp.choices[0]
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
        assert resp.usage.completion_tokens <= 6
        routing = resp.routing
        assert routing["mode"] == "blend" and set(routing["probabilities"]) == {"helpful", "harmless", "honest"}
        assert sum(routing["probabilities"].values()) == pytest.approx(1, abs=1e-5)

        # the same answer as MoCaE's own generate (greedy), once the worker is done with the model:
        # it answers before it unmerges (the client need not wait for that)
        deadline = time.monotonic() + 30
        while srv.app.state.batcher.active and time.monotonic() < deadline:
            time.sleep(0.01)
        direct = mocae.chat("hello there", max_new_tokens=6)[0]
        assert choice.message.content.strip() == direct["text"]
        assert routing["weights"] == pytest.approx(direct["routing"], abs=1e-5)

        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello there"}],
                                                max_tokens=6, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[0].routing["probabilities"] == pytest.approx(routing["probabilities"])
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == choice.message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
        assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens

        steered = client.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            max_tokens=4, extra_body={"axis_weights": {"honest": 2, "helpful": 2}})
        assert steered.routing == {"mode": "axis_weights", "probabilities": None,
                                   "weights": {"helpful": 0.5, "harmless": 0.0, "honest": 0.5}}
        top1 = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2, extra_body={"routing_mode": "top1",
                                                                        "prior": {"harmless": 100, "helpful": 1,
                                                                                  "honest": 1}})
        assert top1.routing["mode"] == "top1" and sorted(top1.routing["weights"].values()) == [0, 0, 1]

        import httpx2 as httpx  # the HTTP client the openai package ships with here

        health = httpx.get(srv.url + "/health").json()
        assert health["status"] == "ok" and health["model"] == MODEL and health["stats"]["merged_batches"] >= 1
        assert httpx.get(srv.url + f"/v1/models/{MODEL}").json()["axes"] == ["helpful", "harmless", "honest"]


def test_concurrent_mixtures_share_a_batch_and_match_each_alone(mocae, serve):
    prompts = [("tell me about water", {"helpful": 1.0}), ("why is the sky blue", {"harmless": 1, "honest": 3})]
    mocae.mixer.merge_min_tokens = 1  # alone: the merged path, however short the answer
    with serve(mocae, batch_wait_ms=1500) as srv:
        client = srv.client()

        def ask(prompt, weights):
            return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=12, temperature=0,
                                                  extra_body={"axis_weights": weights}).choices[0].message.content

        alone = [ask(*p) for p in prompts]  # one at a time: batch-1, merged fast path
        stats = srv.app.state.batcher.stats
        assert stats["max_batch"] == 1 and stats["merged_batches"] == 2
        results = [None, None]

        def worker(i):
            results[i] = ask(*prompts[i])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert stats["max_batch"] == 2 and stats["merged_batches"] == 2  # decoded together, unmerged
        assert results == alone
        # and the mixtures do differ: the same prompt under the other mixture answers differently
        assert ask(prompts[0][0], prompts[1][1]) != alone[0] or ask(prompts[1][0], prompts[0][1]) != alone[1]


def test_batched_decode_equals_generate_per_row(mocae, serve):
    """The batcher's rows (left-padded, unmerged, rows leaving as they finish) equal MoCaE.generate alone."""
    from mocae.serve.batcher import Batcher, Row

    served = ServedModel(mocae, mocae.tokenizer, MODEL)
    batcher = Batcher(served, max_batch=4)
    tok = mocae.tokenizer
    asks = [("a", [1, 0, 0], 5), ("a much longer question about many things", [0.2, 0.3, 0.5], 9),
            ("hi there", None, 7)]
    rows, events = [], []
    for text, w, n in asks:
        ev = []
        events.append(ev)
        rows.append(Row(prompt_ids=served.encode([{"role": "user", "content": text}]), max_tokens=n,
                        emit=ev.append, axis_weights=w))
    batcher._decode(rows)
    for (text, w, n), row, ev in zip(asks, rows, events):
        ids = torch.tensor([row.prompt_ids])
        out = mocae.generate(ids, axis_weights=w, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        expected = out[0, ids.shape[1]:].tolist()
        assert row.generated == expected[:len(row.generated)]
        assert ev[-1][0] == "done"


def test_full_queue_is_429_and_disconnect_stops_the_row(mocae, serve):
    import httpx2 as httpx

    with serve(mocae, max_queue=0) as srv:
        with pytest.raises(openai.RateLimitError):
            srv.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    with serve(mocae, max_tokens_cap=400, max_prompt_tokens=100) as srv:
        stats = srv.app.state.batcher.stats
        body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 400,
                "stream": True, "temperature": 1.5, "seed": 1}
        original_forward = ServedModel.forward

        def slow_forward(self, *a, **kw):  # slow decoding down so the disconnect lands mid-answer
            time.sleep(0.02)
            return original_forward(self, *a, **kw)

        ServedModel.forward = slow_forward
        try:
            with httpx.Client(timeout=30) as http, http.stream("POST", srv.url + "/v1/chat/completions",
                                                               json=body) as resp:
                assert resp.status_code == 200
                next(resp.iter_lines())  # the routing chunk: decoding has started
            deadline = time.monotonic() + 10
            while stats["cancelled"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert stats["cancelled"] == 1
            assert stats["tokens"] == 0  # the row never finished: its 400 tokens were not decoded
            # a plain (not streamed) request whose client gives up is stopped too
            with httpx.Client(timeout=1.0) as http, pytest.raises(httpx.TimeoutException):
                http.post(srv.url + "/v1/chat/completions", json={**body, "stream": False})
            deadline = time.monotonic() + 10
            while stats["cancelled"] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert stats["cancelled"] == 2 and stats["tokens"] == 0
        finally:
            ServedModel.forward = original_forward


def test_timeout_is_504(mocae, serve):
    with serve(mocae, request_timeout_s=0.05, batch_wait_ms=300) as srv:
        with pytest.raises(openai.APIStatusError) as err:
            srv.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 504


GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD = [  # (body, status, the field the error must name)
    ('{"model": "tiny-mocae", "messages": [', 400, "body"),
    ("[1, 2]", 400, "body"),
    ({"model": MODEL}, 400, "messages"),
    ({**GOOD, "messages": []}, 400, "messages"),
    ({**GOOD, "messages": "hello"}, 400, "messages"),
    ({**GOOD, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ({**GOOD, "messages": [{"content": "x"}]}, 400, "messages[0].role"),
    ({**GOOD, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({**GOOD, "messages": [{"role": "user", "content": "  "}]}, 400, "messages[0].content"),
    ({**GOOD, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({**GOOD, "messages": [{"role": "user", "content": "x" * 2001}]}, 400, "messages[0].content"),
    ({**GOOD, "messages": [{"role": "user", "content": "word " * 390}]}, 400, "messages"),
    ({**GOOD, "axis_weights": {"helpful": -1}}, 400, "axis_weights.helpful"),
    ('{"model": "tiny-mocae", "messages": [{"role": "user", "content": "hi"}], "axis_weights": {"helpful": NaN}}',
     400, "axis_weights.helpful"),
    ('{"model": "tiny-mocae", "messages": [{"role": "user", "content": "hi"}], "axis_weights": {"helpful": 1e999}}',
     400, "axis_weights.helpful"),
    ({**GOOD, "axis_weights": {"funny": 1}}, 400, "axis_weights.funny"),
    ({**GOOD, "axis_weights": {"helpful": 0}}, 400, "axis_weights"),
    ({**GOOD, "axis_weights": {"helpful": "lots"}}, 400, "axis_weights.helpful"),
    ({**GOOD, "axis_weights": [1, 2, 3]}, 400, "axis_weights"),
    ({**GOOD, "prior": {"honest": -2}}, 400, "prior.honest"),
    ({**GOOD, "routing_mode": "vibes"}, 400, "routing_mode"),
    ({**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": -5}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": 65}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": 10 ** 30}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": "many"}, 400, "max_tokens"),
    ({**GOOD, "temperature": 9}, 400, "temperature"),
    ({**GOOD, "n": 3}, 400, "n"),
    ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({**GOOD, "seed": -1}, 400, "seed"),
    ({**GOOD, "stream_options": "yes"}, 400, "stream_options"),
    ({**GOOD, "stop": [1]}, 400, "stop"),
    ("null", 400, "body"),
    ({**GOOD, "model": "gpt-4"}, 404, "model"),
    ({**GOOD, "model": None}, 400, "model"),
]


def test_bad_input_is_4xx_naming_the_field(mocae, serve):
    import httpx2 as httpx

    with serve(mocae) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        for body, status, param in BAD:
            content = body if isinstance(body, str) else json.dumps(body)
            resp = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
            assert resp.status_code == status, (body, resp.text)
            error = resp.json()["error"]
            assert error["param"] == param, (body, error)
            assert error["message"]
        assert http.post("/v1/chat/completions", content=b"x" * (2 << 20)).status_code == 413
        assert http.get("/nowhere").status_code == 404 and "error" in http.get("/nowhere").json()
        assert http.get("/v1/chat/completions").status_code == 405
        # with the openai client: a typed 4xx error, never a 500
        client = srv.client()
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"axis_weights": {"helpful": -1}})
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        chunked = http.post("/v1/chat/completions", content=iter([json.dumps(GOOD).encode()]))
        assert chunked.status_code == 411 and chunked.json()["error"]["param"] == "body"
        plain_text = http.post("/v1/chat/completions", content=json.dumps(GOOD), headers={"content-type": "text/plain"})
        assert 400 <= plain_text.status_code < 500 or plain_text.status_code == 200
        # and the server still answers
        assert http.post("/v1/chat/completions", json=GOOD).status_code == 200
        assert http.post("/v1/chat/completions", json={**GOOD, "temperature": 1e-300}).status_code == 200


def test_random_mutations_never_get_a_5xx(mocae, serve):
    """A bounded fuzz: 80 requests with random fields replaced by random values; every answer < 500."""
    import random

    import httpx2 as httpx

    rng = random.Random(0)
    values = [None, -1, 0, 1, 2.5, 1e308, -1e308, "", "x", "user", [], [1], {}, {"a": 1}, True, 10 ** 20,
              [{"role": "user", "content": "hi"}], {"helpful": 1}, {"helpful": -0.0}]
    fields = ["model", "messages", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed",
              "axis_weights", "prior", "routing_mode", "max_completion_tokens", "stream_options", "ignore_eos"]
    with serve(mocae) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        for _ in range(80):
            body = {**GOOD, "max_tokens": 1}
            for field in rng.sample(fields, rng.randint(1, 3)):
                body[field] = rng.choice(values)
            resp = http.post("/v1/chat/completions", json=body)
            assert resp.status_code < 500, (body, resp.text)
            if resp.status_code != 200:
                assert "error" in resp.json()


def test_base_model_is_served_and_refuses_steering(tiny, loopback):
    model, tok = tiny
    app = create_app(ServedModel(model, tok, "base"), ServeConfig(default_max_tokens=4))
    with loopback(app) as srv:
        client = srv.client()
        resp = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}])
        assert resp.routing is None and resp.usage.completion_tokens <= 4
        with pytest.raises(openai.BadRequestError, match="not a MoCaE"):
            client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"axis_weights": {"helpful": 1}})


def test_load_served_takes_mocae_adapter_and_base(expert_dirs, tmp_path):
    from mocae.export import export_mixture
    from mocae.serve.app import load_served

    path = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs)).save_pretrained(tmp_path / "m")
    served = load_served(str(path))
    assert served.model_id == "m" and served.axes == ["helpful", "harmless", "honest"] and not served.per_token
    export_mixture(path, "helpful=1,honest=1", tmp_path / "exported")
    adapter = load_served(str(tmp_path / "exported"), model_id="mix")
    assert adapter.model_id == "mix" and adapter.axes is None
    assert load_served("base", backbone="tiny-random").model_id == "base"
    with pytest.raises(FileNotFoundError):
        load_served(str(tmp_path / "nothing"))


def test_mocae_serve_command_on_loopback(expert_dirs, tmp_path):
    """`mocae serve` in its own process answers the openai client, then stops on SIGINT."""
    import os
    import signal
    import subprocess
    import sys

    path = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs, router_input="hidden")
                            ).save_pretrained(tmp_path / "served")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from mocae.cli import main; sys.exit(main())",
                             "serve", "--model", str(path), "--port", str(port), "--max-tokens-cap", "16"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        import httpx2 as httpx

        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "mocae serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        resp = client.chat.completions.create(model="served", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, extra_body={"prior": {"honest": 3, "helpful": 1,
                                                                                  "harmless": 1}})
        assert resp.routing["mode"] == "blend"
        with pytest.raises(openai.BadRequestError, match="cap of 16"):
            client.chat.completions.create(model="served", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=17)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_token_routed_model_batches_by_kind(expert_dirs, serve):
    model = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs, routing="token", top_k=2))
    with serve(model, batch_wait_ms=800) as srv:
        client = srv.client()
        results = {}

        def ask(key, extra):
            results[key] = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4, extra_body=extra)

        threads = [threading.Thread(target=ask, args=("routed", {})),
                   threading.Thread(target=ask, args=("fixed", {"axis_weights": {"honest": 1}}))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results["routed"].routing == {"mode": "token", "weights": None, "probabilities": None}
        assert results["fixed"].routing["mode"] == "axis_weights"
        assert srv.app.state.batcher.stats["max_batch"] == 1  # per-token and fixed rows never share a batch
        with pytest.raises(openai.BadRequestError, match="routes per token"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"prior": {"honest": 1}})


LONG = "tell me a long story about the sea and its ships, the sailors, the storms and the harbours they reach"


@pytest.mark.parametrize("first, second", [(LONG, "hi"), ("hi", LONG)])  # joiner's cache shorter / longer
def test_request_arriving_mid_decode_joins_the_batch_and_matches_alone(mocae, first, second):
    """Continuous batching: B joins A's running (merged, batch-1) decode; both equal their solo answers."""
    from mocae.serve.batcher import Batcher, Row

    served = ServedModel(mocae, mocae.tokenizer, MODEL)
    tok = mocae.tokenizer
    mocae.mixer.merge_min_tokens = 1  # a starts alone and merged, whatever its budget
    asks = {"a": (first, [0.7, 0.3, 0.0], 40), "b": (second, [0.0, 0.2, 0.8], 12)}
    solo = {}
    for key, (text, w, n) in asks.items():
        ids = torch.tensor([served.encode([{"role": "user", "content": text}])])
        out = mocae.generate(ids, axis_weights=w, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        solo[key] = out[0, ids.shape[1]:].tolist()
    batcher = Batcher(served, max_batch=4, batch_wait_ms=0)
    events = {k: [] for k in asks}
    started = threading.Event()

    def emit_a(ev):
        events["a"].append(ev)
        if ev[0] == "delta":
            started.set()

    rows = {k: Row(prompt_ids=served.encode([{"role": "user", "content": t}]), max_tokens=n,
                   emit=emit_a if k == "a" else events[k].append, axis_weights=w) for k, (t, w, n) in asks.items()}
    original_forward = served.forward

    def slow_forward(*a, **kw):  # slow decoding so that b lands mid-answer
        time.sleep(0.01)
        return original_forward(*a, **kw)

    served.forward = slow_forward
    batcher.start()
    try:
        batcher.submit(rows["a"])
        assert started.wait(30)
        batcher.submit(rows["b"])
        deadline = time.monotonic() + 60
        while not all(ev and ev[-1][0] == "done" for ev in events.values()):
            assert time.monotonic() < deadline, events
            time.sleep(0.02)
    finally:
        batcher.stop()
    assert batcher.stats["joined"] == 1 and batcher.stats["batches"] == 1 and batcher.stats["max_batch"] == 2
    # a started alone (merged), was unmerged when b joined and merged again once b (12 tokens) had left
    assert batcher.stats["merged_batches"] == 2
    for key in asks:
        got = rows[key].generated
        assert got == solo[key][:len(got)], key


def test_run_systems_are_served(expert_dirs, tmp_path):
    from mocae.serve.app import load_served
    from mocae.serve.batcher import Batcher, Row
    from mocae.systems import RunSystems

    run = RunSystems(backbone="tiny-random", experts=expert_dirs, run_dir=str(tmp_path / "run"))
    run.save()
    for system in ("ties", "expert_honest", "base"):
        served = load_served(run.run_dir, system=system)
        assert served.model_id == system and served.axes is None
        events = []
        row = Row(prompt_ids=served.encode([{"role": "user", "content": "hi"}]), max_tokens=3, emit=events.append)
        Batcher(served)._decode([row])
        assert events[-1][0] == "done" and 1 <= len(row.generated) <= 3
    with pytest.raises(ValueError, match="cannot be served"):
        load_served(run.run_dir, system="mote")


def test_routing_modes_follow_the_models_decision(expert_dirs, serve, monkeypatch):
    """routing_mode picks a decision of mocae.mixture.decide with the model's thresholds; top1's base
    fallback (all-zero weights) is the backbone alone, alone or batched; an unfitted gate is a 400."""
    import mocae.mixture.model as model_module
    from mocae.mixture.decide import DecisionConfig

    monkeypatch.setattr(model_module, "sentence_embeddings",
                        lambda texts: torch.stack([torch.cos(torch.arange(384) * (1 + len(t) % 5)) for t in texts]))
    model = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs,
                                         decision=DecisionConfig(top1_threshold=0.999, top1_fallback="base")))
    tok = model.tokenizer
    with serve(model, batch_wait_ms=800) as srv:
        client = srv.client()
        results = {}

        def ask(key, mode):
            results[key] = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0,
                extra_body={"routing_mode": mode})

        threads = [threading.Thread(target=ask, args=(k, m)) for k, m in (("base", "top1"), ("blend", "blend"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert srv.app.state.batcher.stats["max_batch"] == 2  # a base row and a blended row in one batch
        assert results["base"].routing["mode"] == "top1"
        assert set(results["base"].routing["weights"].values()) == {0.0}  # below 0.999: the base model
        assert results["blend"].routing["weights"] == pytest.approx(results["blend"].routing["probabilities"])
        with model.mixer.weights(None):  # the backbone alone answers as the base row did
            ids = tok(chat_text(tok, "hello"), return_tensors="pt", add_special_tokens=False)
            out = model.peft_model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert results["base"].choices[0].message.content.strip() == \
            tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        ask("alone", "top1")  # batch of one with zero weights: nothing merged
        assert results["alone"].choices[0].message.content == results["base"].choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="no fitted harm gate"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"routing_mode": "harm_gate"})


def chat_text(tok, prompt):
    from mocae.generation import chat_prompt

    return chat_prompt(tok, prompt)


def test_ignore_eos_decodes_the_full_budget(mocae, serve):
    """ignore_eos (vLLM's extension) decodes max_tokens even where the model ends its answer;
    the EOS tokens themselves are not text. Non-boolean values are a 400 naming the field."""
    import httpx2 as httpx

    from mocae.serve.batcher import Batcher, Row

    served = ServedModel(mocae, mocae.tokenizer, MODEL)
    prompt = served.encode([{"role": "user", "content": "hi"}])
    probe = Row(prompt_ids=prompt, max_tokens=4, emit=lambda ev: None, axis_weights=[1, 0, 0])
    Batcher(served)._decode([probe])
    served.eos = {probe.generated[1]}  # make the model "end" its answer at its second token
    events = {}
    for ignore in (False, True):
        events[ignore] = []
        row = Row(prompt_ids=prompt, max_tokens=4, emit=events[ignore].append, axis_weights=[1, 0, 0],
                  ignore_eos=ignore)
        Batcher(served)._decode([row])
        assert row.generated == (probe.generated if ignore else probe.generated[:2])
    assert events[False][-1][1:] == ("stop", {"prompt_tokens": len(prompt), "completion_tokens": 2,
                                              "total_tokens": len(prompt) + 2})
    assert events[True][-1][1] == "length" and events[True][-1][2]["completion_tokens"] == 4
    with serve(mocae) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        ok = http.post("/v1/chat/completions", json={**GOOD, "max_tokens": 5, "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
        for bad in ("yes", 1, [True], None):
            resp = http.post("/v1/chat/completions", json={**GOOD, "ignore_eos": bad})
            assert resp.status_code == 400 and resp.json()["error"]["param"] == "ignore_eos", bad


def test_batch_of_one_merges_only_when_it_pays_and_nobody_waits(mocae):
    """A merge costs many unmerged decode steps: a short answer decodes unmerged, a long one
    merged; rows waiting to join keep it unmerged (a join would unmerge it at once); tokens equal."""
    from mocae.serve.batcher import Batcher, Row

    served = ServedModel(mocae, mocae.tokenizer, MODEL)
    mocae.mixer.merge_min_tokens = 8
    prompt = served.encode([{"role": "user", "content": "tell me about the sea"}])
    got = {}
    for name, budget in (("short", 8), ("long", 12)):
        batcher = Batcher(served, batch_wait_ms=0)
        row = Row(prompt_ids=prompt, max_tokens=budget, emit=lambda ev: None, axis_weights=[0.2, 0.5, 0.3],
                  ignore_eos=True)
        batcher._decode([row])
        got[name] = (row.generated, batcher.stats["merged_batches"])
        assert batcher.stats["merge_s"] >= 0 and batcher.stats["prefill_tokens"] == len(prompt)
        assert batcher.stats["decode_tokens"] == budget - 1 and batcher.stats["decode_s"] > 0
    assert got["short"][1] == 0 and got["long"][1] == 1  # 7 decode steps left: not worth it; 11: merged
    waiting = Batcher(served)
    waiting._pending.append(Row(prompt_ids=prompt, max_tokens=2, emit=lambda ev: None, axis_weights=[0, 1, 0]))
    alone = Row(prompt_ids=prompt, max_tokens=100, emit=lambda ev: None, axis_weights=[0.2, 0.5, 0.3])
    assert not waiting._merge(torch.tensor([[0.2, 0.5, 0.3]]), [alone]) and mocae.mixer._merged is None
    assert got["long"][0][:8] == got["short"][0]


def test_incremental_detokenisation_equals_a_full_decode(mocae):
    """The streamed text (decoded a few tokens at a time) equals the full decode of the ids,
    characters split over several tokens included; a stop string spanning tokens is found."""
    import random

    from mocae.serve.batcher import Batcher, Row

    served = ServedModel(mocae, mocae.tokenizer, MODEL)
    tok = mocae.tokenizer
    batcher = Batcher(served)
    rng = random.Random(0)
    texts = ["héllo wörld, naïve café ☕ 東京 ok", "plain words and more words", "🙂🙃 emoji  double  spaces"]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"] + [rng.randrange(len(tok)) for _ in range(20)]
        row = Row(prompt_ids=[1], max_tokens=99, emit=lambda ev: None)
        for t in ids:
            batcher._advance_text(row, t)
            assert not row.text.endswith("\ufffd")
        full = tok.decode([t for t in ids if t not in served.eos], skip_special_tokens=True)
        assert full.startswith(row.text) and full.rstrip("\ufffd") == row.text
    row = Row(prompt_ids=[1], max_tokens=99, emit=lambda ev: None, stop=["café"])
    hits = []
    for t in tok("a naïve café here", add_special_tokens=False)["input_ids"]:
        batcher._advance_text(row, t)
        hits.append(batcher._hit_stop(row))
    assert hits.count(True) == 1 and "café" in row.text  # found once, on the token that completes it
    assert "café" not in tok.decode(tok("a naïve café here", add_special_tokens=False)["input_ids"][:hits.index(True)])
