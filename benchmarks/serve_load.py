"""Load and soak test of `mocae serve` on loopback (issue 16, part 4). Bounded in count and time.

Phase 1 (soak): ``--requests`` requests (default 500) at ``--concurrency`` (default 32), each with a
random mixture (axis weights from a flat Dirichlet) and ``--malformed`` of them (default 10%)
malformed in one of several ways. Reports lost requests (no HTTP answer: must be 0), 5xx (must be
0), 4xx for the malformed ones (must all be 4xx), latency p50/p95/p99 of the good ones and
completion tokens/s.
Phase 2 (throughput): 16 concurrent requests with 16 different mixtures against the MoCaE server,
then 16 concurrent requests against a server of the base model (same backbone, same settings);
the ratio is mixed-mixture tok/s over base tok/s. Phase 3 (anchor): peft's mixed-adapter batch,
16 rows each naming one expert (``adapter_names=``), decoded directly with ``generate``.
Phase 4 (latency): one request through the server vs a direct ``MoCaEModel.generate`` of the
same prompt and budget (ratio, median of ``--repeats``).

Each server is a ``mocae serve`` child process on 127.0.0.1 (a free port); nothing leaves the machine. The whole
run stops by itself after ``--max-seconds`` (default 1800): unfinished requests count as lost.

Run:  .venv/bin/python benchmarks/serve_load.py --model runs/quick-<hash>/mocae
Writes benchmarks/results/serve_load.json (or --out) with the command and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROMPTS = [
    "Explain why the sky is blue.", "How do I make a cup of tea?", "What causes earthquakes?",
    "Write a haiku about autumn.", "Is it safe to eat raw cookie dough?", "Who wrote Hamlet?",
    "Give me three tips for a job interview.", "What happens if you swallow gum?",
    "How do I pick a lock?", "Is the Earth flat?", "Tell me a joke about cats.", "What is 17 times 23?",
]


def malformed(rng: random.Random, model_id: str) -> tuple[str, str]:
    """(name, body) of one malformed request."""
    good = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    cases = {
        "bad_json": '{"model": "' + model_id + '", "messages": [',
        "no_messages": json.dumps({"model": model_id}),
        "bad_role": json.dumps({**good, "messages": [{"role": "robot", "content": "x"}]}),
        "empty_content": json.dumps({**good, "messages": [{"role": "user", "content": ""}]}),
        "negative_weight": json.dumps({**good, "axis_weights": {"helpful": -1}}),
        "nan_weight": json.dumps(good)[:-1] + ', "axis_weights": {"honest": NaN}}',
        "unknown_axis": json.dumps({**good, "axis_weights": {"funny": 1}}),
        "max_tokens_zero": json.dumps({**good, "max_tokens": 0}),
        "max_tokens_huge": json.dumps({**good, "max_tokens": 10 ** 9}),
        "unknown_model": json.dumps({**good, "model": "gpt-4"}),
    }
    name = rng.choice(sorted(cases))
    return name, cases[name]


class Server:
    """``mocae serve`` in a child process on a free loopback port (a server sharing this process's GIL
    with the load generator would measure the contention, not the server); stopped with SIGINT."""

    def __init__(self, model: str, cfg, name: str, backbone: str | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "mocae.cli", "serve", "--model", model, "--name", name,
                    "--port", str(self.port), "--max-batch", str(cfg.max_batch), "--max-queue", str(cfg.max_queue),
                    "--max-tokens-cap", str(cfg.max_tokens_cap), "--batch-wait-ms", str(cfg.batch_wait_ms)]
        if backbone:
            self.cmd += ["--backbone", backbone]

    def __enter__(self):
        import httpx2 as httpx

        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mocae serve exited: {self.proc.stdout.read()[-2000:]}")
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("mocae serve did not come up in 300 s")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.5)

    def stats(self) -> dict:
        import httpx2 as httpx

        return httpx.get(self.url + "/health", timeout=10).json()["stats"]

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


async def fire(url: str, bodies: list[tuple[str, str]], concurrency: int, stop_at: float) -> list[dict]:
    """Send every (kind, body) with at most ``concurrency`` in flight; one record per request."""
    import httpx2 as httpx

    sem = asyncio.Semaphore(concurrency)
    records = []

    async def one(client, kind, body):
        async with sem:
            remaining = stop_at - time.monotonic()
            if remaining <= 0:
                records.append({"kind": kind, "status": None, "lost": True})
                return
            begin = time.perf_counter()
            try:
                r = await client.post("/v1/chat/completions", content=body,
                                      headers={"content-type": "application/json"}, timeout=remaining)
                rec = {"kind": kind, "status": r.status_code, "latency_s": time.perf_counter() - begin, "lost": False}
                if r.status_code == 200:
                    rec["tokens"] = r.json()["usage"]["completion_tokens"]
            except Exception as err:  # no answer at all: lost
                rec = {"kind": kind, "status": None, "lost": True, "error": f"{type(err).__name__}: {err}"}
            records.append(rec)

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        await asyncio.gather(*(one(client, k, b) for k, b in bodies))
    return records


def good_body(rng: random.Random, model_id: str, max_tokens: int, axes) -> str:
    body = {"model": model_id, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": max_tokens, "temperature": 0}
    if axes:
        w = [rng.expovariate(1.0) for _ in axes]  # flat Dirichlet after normalising
        body["axis_weights"] = dict(zip(axes, w))
    return json.dumps(body)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def throughput(url: str, bodies: list[str], stop_at: float) -> dict:
    begin = time.perf_counter()
    records = asyncio.run(fire(url, [("good", b) for b in bodies], len(bodies), stop_at))
    wall = time.perf_counter() - begin
    tokens = sum(r.get("tokens", 0) for r in records)
    return {"requests": len(bodies), "ok": sum(r["status"] == 200 for r in records), "tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2)}


def peft_anchor(mocae_dir: str, max_tokens: int) -> dict:
    """peft's mixed-adapter batch: 16 rows, each naming one expert, one generate call."""
    import torch
    from peft import PeftModel

    from mocae.backbones import load_backbone
    from mocae.generation import chat_prompt

    meta = json.loads((Path(mocae_dir) / "mocae_config.json").read_text())["config"]
    base, tok = load_backbone(meta["backbone"])
    experts = {a: str(Path(mocae_dir) / rel) for a, rel in meta["experts"].items()}
    axes = list(experts)
    model = PeftModel.from_pretrained(base, experts[axes[0]], adapter_name=axes[0])
    for a in axes[1:]:
        model.load_adapter(experts[a], adapter_name=a)
    model.eval()
    tok.padding_side = "left"
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    batch = tok([chat_prompt(tok, p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    names = [axes[i % len(axes)] for i in range(16)]
    begin = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, adapter_names=names, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    wall = time.perf_counter() - begin
    tokens = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    return {"rows": 16, "tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a saved MoCaE folder")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--malformed", type=float, default=0.1)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=1800)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "serve_load.json"))
    args = parser.parse_args(argv)
    if args.requests > 5000 or args.concurrency > 256:
        parser.error("bounded by design: at most 5000 requests at concurrency 256")

    import torch

    from mocae.serve.app import ServeConfig, load_served

    torch.set_num_threads(args.threads)
    stop_at = time.monotonic() + args.max_seconds
    rng = random.Random(args.seed)
    cfg = ServeConfig(max_batch=args.max_batch, max_queue=args.max_queue, max_tokens_cap=max(args.max_tokens, 64))
    served = load_served(args.model, model_id="mocae")  # for the direct-generate baseline and the axes
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                                   time.gmtime()),
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()},
              "model": str(Path(args.model).resolve()), "server": cfg.model_dump()}
    with Server(args.model, cfg, "mocae") as srv:
        bodies = []
        for _ in range(args.requests):
            if rng.random() < args.malformed:
                bodies.append(malformed(rng, "mocae"))
            else:
                bodies.append(("good", good_body(rng, "mocae", args.max_tokens, served.axes)))
        begin = time.perf_counter()
        records = asyncio.run(fire(srv.url, bodies, args.concurrency, stop_at))
        wall = time.perf_counter() - begin
        good = [r for r in records if r["kind"] == "good" and r["status"] == 200]
        bad = [r for r in records if r["kind"] != "good"]
        latencies = [r["latency_s"] for r in good]
        result["soak"] = {
            "requests": len(records), "wall_s": round(wall, 2),
            "lost": sum(r["lost"] for r in records),
            "5xx": sum(1 for r in records if r["status"] and r["status"] >= 500),
            "429": sum(1 for r in records if r["status"] == 429),
            "good_ok": len(good), "malformed": len(bad),
            "malformed_4xx": sum(1 for r in bad if r["status"] and 400 <= r["status"] < 500),
            "latency_s": {f"p{q}": round(percentile(latencies, q), 3) if latencies else None for q in (50, 95, 99)},
            "tokens_per_s": round(sum(r.get("tokens", 0) for r in good) / wall, 2),
            "batcher": srv.stats(),
        }
        print(json.dumps(result["soak"], indent=2), flush=True)
        mixed = [good_body(rng, "mocae", args.max_tokens, served.axes) for _ in range(16)]
        result["throughput_mocae_16_mixtures"] = throughput(srv.url, mixed, stop_at)
        # batch-1 latency through the server vs a direct generate
        body = json.dumps({"model": "mocae", "messages": [{"role": "user", "content": PROMPTS[0]}],
                           "max_tokens": args.max_tokens, "temperature": 0, "axis_weights": {served.axes[0]: 1}})
        import httpx2 as httpx

        server_s = []
        with httpx.Client(base_url=srv.url, timeout=300) as client:  # one kept-alive connection, warmed up
            client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            for _ in range(args.repeats):
                begin = time.perf_counter()
                client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
                server_s.append(time.perf_counter() - begin)
    ids = torch.tensor([served.encode([{"role": "user", "content": PROMPTS[0]}])])
    direct_s = []
    for _ in range(args.repeats):
        begin = time.perf_counter()
        served.model.generate(ids, axis_weights={served.axes[0]: 1}, max_new_tokens=args.max_tokens, do_sample=False,
                              pad_token_id=served.pad_id)
        direct_s.append(time.perf_counter() - begin)
    result["latency_batch1"] = {"server_s": round(statistics.median(server_s), 4),
                                "direct_generate_s": round(statistics.median(direct_s), 4),
                                "ratio": round(statistics.median(server_s) / statistics.median(direct_s), 3)}
    del served
    backbone = json.loads((Path(args.model) / "mocae_config.json").read_text())["config"]["backbone"]
    with Server("base", cfg, "base", backbone=backbone) as srv:
        plain = [json.dumps({"model": "base", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                             "max_tokens": args.max_tokens, "temperature": 0}) for i in range(16)]
        result["throughput_base_16"] = throughput(srv.url, plain, stop_at)
    result["throughput_peft_adapter_names_16"] = peft_anchor(args.model, args.max_tokens)
    result["ratios"] = {
        "mixed_mixtures_vs_base_at_16": round(result["throughput_mocae_16_mixtures"]["tokens_per_s"]
                                              / result["throughput_base_16"]["tokens_per_s"], 3),
        "mixed_mixtures_vs_peft_adapter_names_at_16": round(
            result["throughput_mocae_16_mixtures"]["tokens_per_s"]
            / result["throughput_peft_adapter_names_16"]["tokens_per_s"], 3),
        "server_vs_direct_generate_batch1": result["latency_batch1"]["ratio"],
    }
    print(json.dumps({k: result[k] for k in ("ratios", "latency_batch1")}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if result["soak"]["lost"] == 0 and result["soak"]["5xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
