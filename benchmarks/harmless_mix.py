"""Does mixing benign instructions into the harmless expert's data stop it refusing everything?

Trains (or reuses) the harmless expert at several ``benign_fraction`` values, same size and
settings otherwise, and measures string-match refusal on HarmBench test behaviours (should stay
high) and on XSTest's safe prompts (over-refusal: should drop as the benign share grows).

Run:  MOCAE_DATA_DIR=../shared/data .venv/bin/python benchmarks/harmless_mix.py [--examples 200]
      ... benchmarks/harmless_mix.py --preset full --examples 2000 --fractions 0.3 0.5 0.7 --n-prompts 64
Writes benchmarks/results/harmless_mix.json (quick preset) or harmless_mix_<preset>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.3, 0.6])
    parser.add_argument("--n-prompts", type=int, default=32)
    parser.add_argument("--preset", default="quick", help="preset whose harmless expert settings are varied")
    args = parser.parse_args()

    import torch
    from peft import PeftModel

    from mocae.backbones import load_backbone
    from mocae.data import load_harmbench, load_xstest
    from mocae.evaluation.refusal import refusal_rate
    from mocae.experts.train import train_expert
    from mocae.generation import generate_batch
    from mocae.pipeline import load_run_config

    base_cfg = load_run_config(args.preset).expert_configs()["harmless"]
    harmful = [e.prompt for e in load_harmbench() if e.meta.get("functional_category") == "standard"][: args.n_prompts]
    safe = [e.prompt for e in load_xstest(label="safe")][: args.n_prompts]
    rows = []
    for fraction in args.fractions:
        cfg = base_cfg.model_copy(update={"benign_fraction": fraction, "max_examples": args.examples})
        path = train_expert(cfg, progress=False)
        model, tok = load_backbone(cfg.backbone)
        model = PeftModel.from_pretrained(model, str(path)).eval()
        gen = dict(max_new_tokens=32, batch_size=16, progress=False)
        rows.append({
            "benign_fraction": fraction,
            "refusal_harmful": refusal_rate(generate_batch(model, tok, harmful, **gen)),
            "over_refusal_xstest_safe": refusal_rate(generate_batch(model, tok, safe, **gen)),
            "expert": str(path),
        })
        print(rows[-1], flush=True)
    result = {
        "preset": args.preset, "rows": rows, "n_harmful": len(harmful), "n_safe": len(safe), "examples": args.examples,
        "metric": "string-match refusal (mocae.evaluation.refusal), greedy, 32 new tokens",
        "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "harmless_mix.json" if args.preset == "quick" else f"harmless_mix_{args.preset}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
