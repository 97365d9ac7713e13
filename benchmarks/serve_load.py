"""Load, soak and speed test of `mocae serve` on loopback (issue 16, part 4). Bounded in count and time.

Phase 1 (soak): ``--requests`` requests (default 500) at ``--concurrency`` (default 32), each with a
random mixture (axis weights from a flat Dirichlet) and ``--malformed`` of them (default 10%)
malformed in one of several ways. Reports lost requests (no HTTP answer: must be 0), 5xx (must be
0), 4xx for the malformed ones (must all be 4xx), latency p50/p95/p99 of the good ones and
completion tokens/s.

The speed phases compare equal work on both sides: every throughput request sends ``ignore_eos``
so each decodes exactly ``--max-tokens`` tokens (answers that stop at EOS at different times would
mix prefill-dominated short answers with long ones), and A/B runs are interleaved (ABBA order,
``--repeats`` pairs), each ratio the median of the paired ratios. Both servers run side by side.

Phase 2 (throughput at 16): 16 concurrent streamed requests with 16 different mixtures against
the MoCaE server vs the same 16 prompts against a server of the base model. Per side: end-to-end
tokens/s, time to first token (client, median), and the server worker's own split (from /health):
prefill tokens/s (routing included) and decode-forward tokens/s, per wall second and per second
of the worker thread's CPU time (at one thread all of torch's work; on a machine shared with
other jobs the CPU-time rates are far less noisy than the wall-clock ones).
Phase 3 (batch-1 prefill): one prompt at a time, ``max_tokens`` 1, MoCaE routed by its router (the
MiniLM routing encoder included) and steered by fixed weights, vs base on the same prompts; server
time to first token (each measured request right after an unmeasured copy of it, so no side pays
for the other server having run last), and at the model level ``generate(max_new_tokens=1)``.
Phase 4 (batch-1 latency): one request through the server vs a direct ``MoCaEModel.generate`` of
the same prompt, weights and fixed token count.
Phase 5 (model level): decode steps at batch 16 (16 mixtures, unmerged) vs base, interleaved step
by step; and the merge's break-even: merge + exact unmerge time over the batch-1 step time saved
by merging, against ``LoraMixer.merge_min_tokens``.
Phase 6 (anchor): peft's mixed-adapter batch, 16 rows each naming one expert (``adapter_names=``).

Each server is a ``mocae serve`` child process on 127.0.0.1 (a free port), with the thread count
of this run; nothing leaves the machine. The soak stops by itself after ``--soak-seconds`` and the
whole run after ``--max-seconds`` (unfinished requests count as lost; phases not reached are left
out).

Run:  .venv/bin/python benchmarks/serve_load.py --model runs/quick-<hash>/mocae
      .venv/bin/python benchmarks/serve_load.py --random-experts /tmp/mocae-random   # no trained experts
Writes benchmarks/results/serve_load.json (or --out) with the command, machine, model and targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
TARGETS = {  # issue 16: (what, threshold, direction)
    "mixed_mixtures_vs_base_at_16": (0.9, ">="),
    "batch1_prefill_vs_base_server": (0.7, ">="),
    "batch1_prefill_vs_base_model": (0.7, ">="),
    "server_vs_direct_generate_batch1": (1.15, "<="),
}
RANDOM_INFO = "random_experts.json"


def build_random_mocae(out: Path, backbone: str = "smollm2-135m", rank: int = 8, seed: int = 0) -> Path:
    """A MoCaE of three peft LoRA experts with random non-zero B (r=``rank`` on every linear
    projection, the experts' default shapes) and a random router: serving speed depends only on
    the shapes. Built once into ``out``; returns the MoCaE folder."""
    import torch
    from peft import LoraConfig, get_peft_model

    from mocae.backbones import load_backbone
    from mocae.experts.config import ALL_LINEAR
    from mocae.mixture.model import MoCaEConfig, MoCaEModel

    folder = out / "mocae"
    if (folder / RANDOM_INFO).is_file():
        return folder
    gen = torch.Generator().manual_seed(seed)
    experts = {}
    for axis in ("helpful", "harmless", "honest"):
        base, _ = load_backbone(backbone)
        peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(ALL_LINEAR),
                                                     lora_dropout=0.0))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        path = out / "experts" / axis
        peft_model.save_pretrained(path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = backbone
        (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        experts[axis] = str(path)
    model = MoCaEModel.build(MoCaEConfig(backbone=backbone, experts=experts))
    with torch.no_grad():
        for p in model.router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(folder)
    (folder / RANDOM_INFO).write_text(json.dumps({
        "what": f"untrained: 3 peft LoRA experts with random B (std 0.01), r={rank}, alpha={2 * rank}, on "
                f"{', '.join(ALL_LINEAR)}; random sequence router (MiniLM embedding input)",
        "backbone": backbone, "seed": seed}, indent=2))
    return folder


def code_version() -> dict:
    """Which mocae this run measured: the imported package's folder and, in a git checkout, its commit."""
    import mocae

    folder = Path(mocae.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--", "."],
                                    capture_output=True, text=True, timeout=10).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit = dirty = None
    return {"package": str(folder), "commit": commit, "uncommitted_changes": dirty}


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
        "ignore_eos_not_bool": json.dumps({**good, "ignore_eos": "yes"}),
    }
    name = rng.choice(sorted(cases))
    return name, cases[name]


class Server:
    """``mocae serve`` in a child process on a free loopback port (a server sharing this process's GIL
    with the load generator would measure the contention, not the server); stopped with SIGINT."""

    def __init__(self, model: str, cfg, name: str, threads: int, backbone: str | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.cmd = [sys.executable, "-m", "mocae.cli", "serve", "--model", model, "--name", name,
                    "--port", str(self.port), "--max-batch", str(cfg.max_batch), "--max-queue", str(cfg.max_queue),
                    "--max-tokens-cap", str(cfg.max_tokens_cap), "--batch-wait-ms", str(cfg.batch_wait_ms)]
        if backbone:
            self.cmd += ["--backbone", backbone]
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def __enter__(self):
        import httpx2 as httpx

        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env)
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
    """Send every (kind, body) with at most ``concurrency`` in flight; one record per request.
    Streamed bodies record the time of their first token (the first chunk after the routing one)."""
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
            headers = {"content-type": "application/json"}
            try:
                if '"stream": true' not in body:
                    r = await client.post("/v1/chat/completions", content=body, headers=headers, timeout=remaining)
                    rec = {"kind": kind, "status": r.status_code, "latency_s": time.perf_counter() - begin,
                           "lost": False}
                    if r.status_code == 200:
                        rec["tokens"] = r.json()["usage"]["completion_tokens"]
                else:
                    rec = {"kind": kind, "lost": False}
                    async with client.stream("POST", "/v1/chat/completions", content=body, headers=headers,
                                             timeout=remaining) as r:
                        rec["status"] = r.status_code
                        chunks = 0
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            chunks += 1
                            if chunks == 2:  # the first after the routing chunk: the first token is out
                                rec["first_token_s"] = time.perf_counter() - begin
                                rec["first_token_at"] = time.perf_counter()
                            if chunk.get("usage"):
                                rec["tokens"] = chunk["usage"]["completion_tokens"]
                    rec["latency_s"] = time.perf_counter() - begin
                    rec["done_at"] = time.perf_counter()
            except Exception as err:  # no answer at all: lost
                rec = {"kind": kind, "status": None, "lost": True, "error": f"{type(err).__name__}: {err}"}
            records.append(rec)

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        await asyncio.gather(*(one(client, k, b) for k, b in bodies))
    return records


def body(model_id: str, prompt: str, max_tokens: int, weights: dict | None = None, **extra) -> str:
    out = {"model": model_id, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
           "temperature": 0, **extra}
    if weights:
        out["axis_weights"] = weights
    return json.dumps(out)


def random_weights(rng: random.Random, axes) -> dict | None:
    return dict(zip(axes, [rng.expovariate(1.0) for _ in axes])) if axes else None  # flat Dirichlet


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def worker_split(before: dict, after: dict) -> dict:
    """The server worker's prefill and decode-forward rates between two /health snapshots."""
    def diff(key):
        return after[key] - before[key] if key in after and key in before else None  # (servers before the split)

    def rate(tokens, seconds):
        dt = diff(seconds)
        return round(diff(tokens) / dt, 2) if dt else None

    merge_s = diff("merge_s")
    return {"prefill_tokens_per_s": rate("prefill_tokens", "prefill_s"),
            "prefill_tokens_per_cpu_s": rate("prefill_tokens", "prefill_cpu_s"),
            "decode_forward_tokens_per_s": rate("decode_tokens", "decode_s"),
            "decode_forward_tokens_per_cpu_s": rate("decode_tokens", "decode_cpu_s"),
            "merges_s": None if merge_s is None else round(merge_s, 3),
            "merged_batches": diff("merged_batches")}


def throughput(srv: Server, bodies: list[str], stop_at: float) -> dict:
    """One concurrent round of streamed requests: end-to-end tok/s, first-token times, worker split."""
    before = srv.stats()
    begin = time.perf_counter()
    records = asyncio.run(fire(srv.url, [("good", b) for b in bodies], len(bodies), stop_at))
    wall = time.perf_counter() - begin
    tokens = sum(r.get("tokens", 0) for r in records)
    firsts = [r["first_token_s"] for r in records if "first_token_s" in r]
    decoded = sum(r.get("tokens", 1) - 1 for r in records)
    window = (max(r["done_at"] for r in records if "done_at" in r)
              - min(r["first_token_at"] for r in records if "first_token_at" in r)) if firsts else 0
    return {"requests": len(bodies), "ok": sum(r["status"] == 200 for r in records), "tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "time_to_first_token_s": {"median": round(statistics.median(firsts), 3) if firsts else None,
                                      "max": round(max(firsts), 3) if firsts else None},
            "decode_tokens_per_s": round(decoded / window, 2) if window > 0 else None,
            "worker": worker_split(before, srv.stats())}


def paired(pairs: list[tuple[float, float]]) -> float:
    """Median over the repeats of a / b, each pair measured back to back."""
    pairs = [(a, b) for a, b in pairs if a and b]
    return round(statistics.median(a / b for a, b in pairs), 3) if pairs else None


def check_targets(ratios: dict) -> dict:
    out = {}
    for name, (threshold, direction) in TARGETS.items():
        value = ratios.get(name)
        met = None if value is None else (value >= threshold if direction == ">=" else value <= threshold)
        out[name] = {"value": value, "target": f"{direction} {threshold}", "met": met}
    return out


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


def model_level(mocae, base, tok, repeats: int, steps: int, stop_at: float) -> dict:
    """In this process: batch-1 prefill (generate 1 token, MoCaE routed) vs base on the same
    prompts; decode steps at batch 16 (16 mixtures) vs base, interleaved step by step; the merge's
    break-even at batch 1."""
    import torch
    from transformers import DynamicCache

    from mocae.generation import chat_prompt

    out = {}
    prefill = []
    with torch.inference_mode():
        for i in range(repeats * 2):
            if time.monotonic() > stop_at:
                break
            ids = tok([chat_prompt(tok, PROMPTS[i % len(PROMPTS)])], return_tensors="pt", add_special_tokens=False)
            times = {}
            for side in (("mocae", "base") if i % 2 == 0 else ("base", "mocae")):  # ABBA
                model = mocae if side == "mocae" else base
                begin = time.perf_counter()
                model.generate(**ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
                times[side] = time.perf_counter() - begin
            prefill.append((times["mocae"], times["base"], ids["input_ids"].shape[1]))
    if prefill:
        out["batch1_prefill"] = {
            "mocae_routed_s": round(statistics.median(p[0] for p in prefill), 4),
            "base_s": round(statistics.median(p[1] for p in prefill), 4),
            "mocae_tokens_per_s": round(statistics.median(p[2] / p[0] for p in prefill), 1),
            "base_tokens_per_s": round(statistics.median(p[2] / p[1] for p in prefill), 1),
            "ratio_speed_vs_base": paired([(p[1], p[0]) for p in prefill]), "pairs": len(prefill)}

    def start(model, batch, **kw):
        mask = batch["attention_mask"]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos, cache=cache,
                       use_cache=True, logits_to_keep=1, **kw).logits[:, -1]
        return [logits, mask, pos[:, -1:], cache]

    def step(model, state, **kw):
        logits, mask, pos, cache = state
        token = logits.argmax(-1)[:, None]
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        begin = time.perf_counter()
        logits = model(input_ids=token, attention_mask=mask, position_ids=pos + 1, cache=cache, use_cache=True,
                       logits_to_keep=1, **kw).logits[:, -1]
        state[:] = [logits, mask, pos + 1, cache]
        return time.perf_counter() - begin

    rng = random.Random(1)
    weights = torch.tensor([[rng.expovariate(1.0) for _ in mocae.axes] for _ in range(16)])
    weights = weights / weights.sum(-1, keepdim=True)
    batch = tok([chat_prompt(tok, PROMPTS[i % len(PROMPTS)]) for i in range(16)], return_tensors="pt",
                padding=True, add_special_tokens=False)
    with torch.inference_mode():
        if time.monotonic() < stop_at:
            states = {"mocae": start(mocae, batch, routing_weights=weights), "base": start(base, batch)}
            pairs = []
            for _ in range(steps):
                if time.monotonic() > stop_at:
                    break
                pairs.append((step(mocae, states["mocae"], routing_weights=weights), step(base, states["base"])))
            if pairs:
                out["decode_bs16"] = {"mocae_step_s": round(statistics.median(p[0] for p in pairs), 4),
                                      "base_step_s": round(statistics.median(p[1] for p in pairs), 4),
                                      "ratio_speed_vs_base": paired([(b, a) for a, b in pairs]), "steps": len(pairs)}
        if time.monotonic() < stop_at:  # merge break-even: blocks of unmerged and merged steps, one KV cache
            one = tok([chat_prompt(tok, PROMPTS[0])], return_tensors="pt", add_special_tokens=False)
            w = weights[:1]
            state = start(mocae, one, routing_weights=w)
            merge_s, unmerged, merged = [], [], []
            for _ in range(max(2, repeats // 2)):
                unmerged += [step(mocae, state, routing_weights=w) for _ in range(4)]
                begin = time.perf_counter()
                mocae.mixer.merge(w[0])
                split = time.perf_counter()
                merged += [step(mocae, state, routing_weights=w) for _ in range(4)]
                back = time.perf_counter()
                mocae.mixer.unmerge()
                merge_s.append(split - begin + time.perf_counter() - back)
            saved = statistics.median(unmerged) - statistics.median(merged)
            cost = statistics.median(merge_s)
            out["merge_break_even"] = {
                "merge_and_unmerge_s": round(cost, 3),
                "batch1_step_unmerged_s": round(statistics.median(unmerged), 4),
                "batch1_step_merged_s": round(statistics.median(merged), 4),
                "break_even_tokens": round(cost / saved) if saved > 0 else None,
                "merge_min_tokens": getattr(mocae.mixer, "merge_min_tokens", None)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a saved MoCaE folder")
    which.add_argument("--random-experts", metavar="DIR",
                       help="build (once, into DIR) a MoCaE on SmolLM2-135M of three r=8 LoRA experts with random "
                            "non-zero B and serve that: speed depends only on the shapes")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--malformed", type=float, default=0.1)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="A/B pairs per speed phase")
    parser.add_argument("--decode-steps", type=int, default=24, help="model-level paired decode steps at batch 16")
    parser.add_argument("--soak-seconds", type=float, default=720, help="bound of the soak phase")
    parser.add_argument("--max-seconds", type=float, default=1800, help="bound of the whole run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in each server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "serve_load.json"))
    args = parser.parse_args(argv)
    if args.requests > 5000 or args.concurrency > 256 or args.repeats > 50:
        parser.error("bounded by design: at most 5000 requests at concurrency 256, 50 repeats")

    import torch

    from mocae.serve.app import ServeConfig, load_served

    torch.set_num_threads(args.threads)
    stop_at = time.monotonic() + args.max_seconds
    model_dir = str(build_random_mocae(Path(args.random_experts))) if args.random_experts else args.model
    info = Path(model_dir) / RANDOM_INFO
    rng = random.Random(args.seed)
    cfg = ServeConfig(max_batch=args.max_batch, max_queue=args.max_queue, max_tokens_cap=max(args.max_tokens, 64))
    served = load_served(model_dir, model_id="mocae")  # for the direct-generate baseline and the axes
    axes = served.axes
    meta = json.loads((Path(model_dir) / "mocae_config.json").read_text())["config"]
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                          "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
              "model": {"path": str(Path(model_dir).resolve()), "backbone": meta["backbone"], "axes": axes,
                        "experts": json.loads(info.read_text())["what"] if info.is_file() else "trained (see the folder)"},
              "server": cfg.model_dump(), "max_tokens": args.max_tokens, "code": code_version()}
    with Server(model_dir, cfg, "mocae", args.threads) as srv:
        bodies = []
        for _ in range(args.requests):
            if rng.random() < args.malformed:
                bodies.append(malformed(rng, "mocae"))
            else:
                bodies.append(("good", body("mocae", rng.choice(PROMPTS), args.max_tokens, random_weights(rng, axes))))
        begin = time.perf_counter()
        records = asyncio.run(fire(srv.url, bodies, args.concurrency,
                                   min(stop_at, time.monotonic() + args.soak_seconds)))
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
        with Server("base", cfg, "base", args.threads, backbone=meta["backbone"]) as base_srv:
            sides = {"mocae": srv, "base": base_srv}
            # phase 2: 16 concurrent, equal token counts (ignore_eos), interleaved ABBA
            rounds = {"mocae": [], "base": []}
            for i in range(args.repeats):
                for side in (("mocae", "base") if i % 2 == 0 else ("base", "mocae")):
                    if time.monotonic() > stop_at:
                        break
                    bodies = [body(side, PROMPTS[j % len(PROMPTS)], args.max_tokens,
                                   random_weights(rng, axes) if side == "mocae" else None,
                                   ignore_eos=True, stream=True, stream_options={"include_usage": True})
                              for j in range(16)]
                    rounds[side].append(throughput(sides[side], bodies, stop_at))
            n = min(len(rounds["mocae"]), len(rounds["base"]))
            if n:
                result["throughput_16"] = {
                    side: {"rounds": rounds[side][:n],
                           "median": {k: statistics.median(r[k] for r in rounds[side][:n])
                                      for k in ("tokens_per_s", "decode_tokens_per_s", "wall_s")}}
                    for side in rounds}
                pairs = list(zip(rounds["mocae"][:n], rounds["base"][:n]))
                result["throughput_16"]["paired_ratios"] = {
                    "tokens_per_s": paired([(a["tokens_per_s"], b["tokens_per_s"]) for a, b in pairs]),
                    "decode_tokens_per_s": paired([(a["decode_tokens_per_s"], b["decode_tokens_per_s"])
                                                   for a, b in pairs]),
                    "time_to_first_token_mocae_over_base": paired([(a["time_to_first_token_s"]["median"],
                                                    b["time_to_first_token_s"]["median"]) for a, b in pairs]),
                    "worker_prefill_tokens_per_s": paired([(a["worker"]["prefill_tokens_per_s"],
                                                            b["worker"]["prefill_tokens_per_s"]) for a, b in pairs]),
                    **{f"worker_{k}": paired([(a["worker"][k], b["worker"][k]) for a, b in pairs])
                       for k in ("decode_forward_tokens_per_s", "prefill_tokens_per_cpu_s",
                                 "decode_forward_tokens_per_cpu_s")},
                    "pairs": n}
            # phase 3: batch-1 prefill through the server, same prompts, one request at a time
            prefill = []
            for i in range(args.repeats * 2):
                if time.monotonic() > stop_at:
                    break
                prompt = PROMPTS[i % len(PROMPTS)]
                times = {}
                for side in (("mocae", "steered", "base") if i % 2 == 0 else ("base", "steered", "mocae")):
                    s = sides["base" if side == "base" else "mocae"]
                    weights = {axes[0]: 1.0} if side == "steered" else None
                    b = body(s.name, prompt, 1, weights, stream=True)
                    # the same request unmeasured first: each side measured warm, whichever server ran last
                    rec = asyncio.run(fire(s.url, [("good", b), ("good", b)], 1, stop_at))[1]
                    times[side] = rec.get("first_token_s")
                if None not in times.values():
                    prefill.append(times)
            if prefill:
                result["batch1_prefill_server"] = {
                    "time_to_first_token_s": {k: round(statistics.median(p[k] for p in prefill), 4)
                                              for k in ("mocae", "steered", "base")},
                    "routed_speed_vs_base": paired([(p["base"], p["mocae"]) for p in prefill]),
                    "steered_speed_vs_base": paired([(p["base"], p["steered"]) for p in prefill]),
                    "pairs": len(prefill), "note": "mocae: routed by its router (MiniLM encoder + router); steered: "
                                                   "fixed axis_weights, no routing; base: the base model's server"}
        # phase 4: batch-1 latency through the server vs a direct generate (same fixed token count)
        import httpx2 as httpx

        weights = {axes[0]: 1.0}
        one = body("mocae", PROMPTS[0], args.max_tokens, weights, ignore_eos=True)
        ids = torch.tensor([served.encode([{"role": "user", "content": PROMPTS[0]}])])
        pairs = []
        with httpx.Client(base_url=srv.url, timeout=300) as client:  # one kept-alive connection, warmed up
            client.post("/v1/chat/completions", content=one, headers={"content-type": "application/json"})
            served.model.generate(ids, axis_weights=weights, max_new_tokens=args.max_tokens,
                                  min_new_tokens=args.max_tokens, do_sample=False, pad_token_id=served.pad_id)
            for i in range(args.repeats):
                if time.monotonic() > stop_at:
                    break
                times = {}
                for side in (("server", "direct") if i % 2 == 0 else ("direct", "server")):
                    begin = time.perf_counter()
                    if side == "server":
                        r = client.post("/v1/chat/completions", content=one,
                                        headers={"content-type": "application/json"})
                        assert r.json()["usage"]["completion_tokens"] == args.max_tokens
                    else:
                        served.model.generate(ids, axis_weights=weights, max_new_tokens=args.max_tokens,
                                              min_new_tokens=args.max_tokens, do_sample=False,
                                              pad_token_id=served.pad_id)
                    times[side] = time.perf_counter() - begin
                pairs.append((times["server"], times["direct"]))
        if pairs:
            result["latency_batch1"] = {"server_s": round(statistics.median(p[0] for p in pairs), 4),
                                        "direct_generate_s": round(statistics.median(p[1] for p in pairs), 4),
                                        "ratio": paired(pairs), "pairs": len(pairs), "tokens": args.max_tokens}
    # phase 5: model level, in this process (no server running)
    from mocae.backbones import load_backbone

    base_model, base_tok = load_backbone(meta["backbone"])
    result["model_level"] = model_level(served.model, base_model, base_tok, args.repeats, args.decode_steps,
                                        stop_at)
    del base_model
    if time.monotonic() < stop_at:
        result["throughput_peft_adapter_names_16"] = peft_anchor(model_dir, args.max_tokens)
    ratios = {}
    if "throughput_16" in result:
        ratios["mixed_mixtures_vs_base_at_16"] = result["throughput_16"]["paired_ratios"]["tokens_per_s"]
        ratios["mixed_mixtures_decode_vs_base_at_16"] = result["throughput_16"]["paired_ratios"]["decode_tokens_per_s"]
    if "batch1_prefill_server" in result:
        ratios["batch1_prefill_vs_base_server"] = result["batch1_prefill_server"]["routed_speed_vs_base"]
    if "batch1_prefill" in result["model_level"]:
        ratios["batch1_prefill_vs_base_model"] = result["model_level"]["batch1_prefill"]["ratio_speed_vs_base"]
    if "latency_batch1" in result:
        ratios["server_vs_direct_generate_batch1"] = result["latency_batch1"]["ratio"]
    if "decode_bs16" in result["model_level"]:
        ratios["model_decode_vs_base_at_16"] = result["model_level"]["decode_bs16"]["ratio_speed_vs_base"]
    if "throughput_16" in result and "throughput_peft_adapter_names_16" in result:
        ratios["mixed_mixtures_vs_peft_adapter_names_at_16"] = round(
            result["throughput_16"]["mocae"]["median"]["tokens_per_s"]
            / result["throughput_peft_adapter_names_16"]["tokens_per_s"], 3)
    result["ratios"] = ratios
    result["targets"] = check_targets(ratios)
    result["soak_ok"] = result["soak"]["lost"] == 0 and result["soak"]["5xx"] == 0 \
        and result["soak"]["malformed_4xx"] == result["soak"]["malformed"]
    print(json.dumps({k: result[k] for k in ("ratios", "targets")}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if result["soak_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
