"""Does mixing benign instructions into the harmless expert's data stop it refusing everything?

Trains (or reuses) the harmless expert at several ``benign_fraction`` values and benign sources
(``benign_sources``, '+'-joined), same size and settings otherwise, and measures string-match
refusal on HarmBench test behaviours (should stay high) and on XSTest's safe prompts
(over-refusal: should drop as the benign share grows).

Run:  MOCAE_DATA_DIR=../shared/data .venv/bin/python benchmarks/harmless_mix.py [--examples 200]
      ... benchmarks/harmless_mix.py --preset full --examples 2000 --fractions 0.5 \
              --sources alpaca alpaca_nearest truthfulqa+alpaca_nearest --n-prompts 64
Writes benchmarks/results/harmless_mix.json (quick preset) or harmless_mix_<preset>.json. Rows of
an earlier run with other settings are kept (each row carries its own date); a row measured again
replaces the old one.
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
    parser.add_argument("--sources", nargs="+", default=None,
                        help="benign source sets to compare, each '+'-joined (default: the preset's)")
    parser.add_argument("--n-prompts", type=int, default=32,
                        help="harmful (HarmBench standard test) and XSTest safe prompts each; 0 = all")
    parser.add_argument("--base", action="store_true", help="also measure the base model (a row with fraction null)")
    parser.add_argument("--preset", default="quick", help="preset whose harmless expert settings are varied")
    args = parser.parse_args()

    import torch
    from peft import PeftModel

    from mocae.backbones import load_backbone
    from mocae.data import load_harmbench, load_xstest
    from mocae.refusal import refusal_rate
    from mocae.experts.train import train_expert
    from mocae.generation import generate_batch
    from mocae.paths import atomic_write_text
    from mocae.pipeline import load_run_config

    base_cfg = load_run_config(args.preset).expert_configs()["harmless"]
    harmful = [e.prompt for e in load_harmbench() if e.meta.get("functional_category") == "standard"][: args.n_prompts or None]
    safe_rows = load_xstest(label="safe")[: args.n_prompts or None]
    safe = [e.prompt for e in safe_rows]
    source_sets = [s.split("+") for s in args.sources] if args.sources else [base_cfg.benign_sources]
    name = "harmless_mix.json" if args.preset == "quick" else f"harmless_mix_{args.preset}.json"
    old = json.loads((RESULTS / name).read_text()) if (RESULTS / name).exists() else {}
    # rows of earlier runs carry their own eval size and date (older files kept them top-level)
    rows = [{"benign_sources": ["alpaca"], "n_harmful": old.get("n_harmful"), "n_safe": old.get("n_safe"),
             "date": old.get("date"), "command": old.get("command"), **r} for r in old.get("rows", []) if old.get("examples") == args.examples]
    runs = [(f, s) for s in source_sets for f in args.fractions]
    for fraction, sources in ([(None, [])] if args.base else []) + runs:
        model, tok = load_backbone(base_cfg.backbone)
        path = "base model (no expert)"
        if fraction is not None:
            cfg = base_cfg.model_copy(update={"benign_fraction": fraction, "benign_sources": sources,
                                              "max_examples": args.examples})
            path = train_expert(cfg, progress=False)
            model = PeftModel.from_pretrained(model, str(path))
        model.eval()
        gen = dict(max_new_tokens=32, batch_size=16, progress=False)
        key = (fraction, sources, len(harmful), len(safe))
        rows = [r for r in rows if (r["benign_fraction"], r["benign_sources"], r["n_harmful"], r["n_safe"]) != key]
        harmful_out, safe_out = generate_batch(model, tok, harmful, **gen), generate_batch(model, tok, safe, **gen)
        rows.append({
            "benign_fraction": fraction,
            "benign_sources": sources,
            "refusal_harmful": refusal_rate(harmful_out),
            "over_refusal_xstest_safe": refusal_rate(safe_out),
            # the first 64 of each set, comparable with rows an earlier run measured on 64 prompts
            "refusal_harmful_first64": refusal_rate(harmful_out[:64]),
            "over_refusal_xstest_safe_first64": refusal_rate(safe_out[:64]),
            "over_refusal_by_type": {
                t: refusal_rate([a for a, e in zip(safe_out, safe_rows) if e.meta["type"] == t])
                for t in sorted({e.meta["type"] for e in safe_rows})},
            "samples_xstest_safe": [{"prompt": q, "answer": a} for q, a in list(zip(safe, safe_out))[::50]],
            "n_harmful": len(harmful), "n_safe": len(safe),
            "expert": str(path),
            "date": time.strftime("%Y-%m-%d"),
            "command": "python " + " ".join(sys.argv),
        })
        print(rows[-1], flush=True)
        result = {
            "preset": args.preset, "rows": rows, "examples": args.examples,
            "metric": "string-match refusal (mocae.refusal), greedy, 32 new tokens",
            "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        atomic_write_text(RESULTS / name, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
