"""Decode speed and memory of MoCaE against the base model and one plain peft adapter.

Systems: base; one peft LoRA adapter (the helpful expert); MoCaE with sequence routing (batch 1
merges the routed update into W0); MoCaE with token routing (per-layer routers, unmerged); peft's
X-LoRA over the same experts, decoded by mocae with a KV cache per pass (``xlora_cached``) and by
peft's own ``generate`` (``xlora_peft``, no cache), with a check that both give the same tokens
(the classifier is untrained here: speed does not depend on its weights).
Each system runs in a fresh child process (so its peak RSS is its own), one after another from
this single command, with the same prompts, greedy decoding and a fixed number of new tokens.
Decode tokens/s = new tokens / (generate time - prefill time), at batch 1 and 16.

Run:  .venv/bin/python benchmarks/mixing_overhead.py --mocae runs/quick-<hash>/mocae [--systems ...]
Writes benchmarks/results/mixing_overhead.json, or --out (with --systems: systems not measured
again keep their earlier rows, each with its own date).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROMPTS = [
    "Explain why the sky is blue.", "How do I make a cup of tea?", "What causes earthquakes?",
    "Write a haiku about autumn.", "Is it safe to eat raw cookie dough?", "Who wrote Hamlet?",
    "Give me three tips for a job interview.", "What happens if you swallow gum?",
]
SYSTEMS = ["base", "peft_adapter", "mocae_sequence", "mocae_token", "xlora_cached", "xlora_peft"]


def load_system(name: str, mocae_dir: Path):
    """(model, tokenizer) for one system."""
    import json as _json

    from mocae.backbones import load_backbone
    from mocae.mixture.model import MoCaEConfig, MoCaEModel

    meta = _json.loads((mocae_dir / "mocae_config.json").read_text())
    backbone = meta["config"]["backbone"]
    if name == "base":
        return load_backbone(backbone)
    if name == "peft_adapter":
        from peft import PeftModel

        model, tok = load_backbone(backbone)
        return PeftModel.from_pretrained(model, str(mocae_dir / meta["config"]["experts"]["helpful"])).eval(), tok
    if name == "mocae_sequence":
        model = MoCaEModel.from_pretrained(mocae_dir)
        return model, model.tokenizer
    experts = {a: str(mocae_dir / rel) for a, rel in meta["config"]["experts"].items()}
    if name.startswith("xlora"):
        from mocae.baselines.peft_routing import build_xlora

        model, tok = build_xlora(backbone, experts)
        if name == "xlora_peft":
            model.generate = model.generate_uncached
        return model, tok
    model = MoCaEModel.build(MoCaEConfig(backbone=backbone, experts=experts, routing="token"))
    return model, model.tokenizer


def tokens_digest(rows: list[list[int]]) -> str:
    """A short fingerprint of generated token ids: equal fingerprints, equal tokens."""
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def measure(name: str, mocae_dir: Path, new_tokens: int, repeats: int) -> dict:
    """Prefill and decode throughput at batch 1 and 16 for one system (run in a child)."""
    import torch

    from mocae.generation import chat_prompt

    from mocae.evaluation.efficiency import peak_rss_mb

    model, tok = load_system(name, mocae_dir)
    tok.padding_side = "left"
    result = {}
    for bs in (1, 16):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(bs)]
        batch = tok([chat_prompt(tok, p) for p in prompts], return_tensors="pt", padding=True,
                    add_special_tokens=False)

        def timed(n):
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=tok.pad_token_id)
            return time.perf_counter() - start

        if bs == 16:  # the tokens themselves, to compare systems that must agree (X-LoRA cached vs peft)
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            result["tokens_bs16_sha256"] = tokens_digest(out[:, batch["input_ids"].shape[1]:].tolist())
        timed(2)  # warm-up
        prefill = min(timed(1) for _ in range(repeats))
        total = min(timed(new_tokens) for _ in range(repeats))
        result[f"bs{bs}"] = {
            "decode_tokens_per_s": round(bs * (new_tokens - 1) / (total - prefill), 2),
            "prefill_tokens_per_s": round(int(batch["attention_mask"].sum()) / prefill, 1),
            "seconds_per_token": round((total - prefill) / (new_tokens - 1), 4),
        }
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)  # VmHWM: ru_maxrss would carry the parent's peak
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mocae", required=True, type=Path, help="a saved MoCaE folder (mocae run output)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=SYSTEMS,
                        help="systems to measure (base is always measured: ratios are against it)")
    parser.add_argument("--out", default="mixing_overhead.json",
                        help="result file in benchmarks/results/ (xlora_decode.json holds the X-LoRA runs)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.mocae, args.new_tokens, args.repeats)))
        return 0

    import torch

    out_path = RESULTS / args.out
    old = json.loads(out_path.read_text()) if out_path.exists() else {}
    systems = {n: {"date": old.get("date"), **row} for n, row in old.get("systems", {}).items()
               if old.get("mocae_dir") == str(args.mocae) and n not in args.systems}
    for name in ["base"] + [n for n in args.systems if n != "base"]:
        out = subprocess.run([sys.executable, __file__, "--mocae", str(args.mocae), "--child", name,
                              "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True)
        systems[name] = {**json.loads(out.stdout.strip().splitlines()[-1]), "date": time.strftime("%Y-%m-%d")}
        print(name, systems[name], flush=True)
    base_bs1 = systems["base"]["bs1"]["seconds_per_token"]
    result = {
        "systems": systems,
        "latency_ratio_vs_base_bs1": {n: round(s["bs1"]["seconds_per_token"] / base_bs1, 3)
                                      for n, s in systems.items()},
        "mocae_sequence_within_1.15x_of_base_bs1": (
            systems["mocae_sequence"]["bs1"]["seconds_per_token"] / base_bs1 <= 1.15
            if "mocae_sequence" in systems else None),
        "xlora_cached_same_tokens_as_peft_bs16": (
            systems["xlora_cached"].get("tokens_bs16_sha256") == systems["xlora_peft"].get("tokens_bs16_sha256")
            if {"xlora_cached", "xlora_peft"} <= set(systems) else None),
        "new_tokens": args.new_tokens,
        "mocae_dir": str(args.mocae),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": "python " + " ".join(sys.argv),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    from mocae.paths import atomic_write_json

    atomic_write_json(out_path, result)
    print(json.dumps(result["latency_ratio_vs_base_bs1"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
