"""Does mixing benign instructions into the harmless expert's data stop it refusing everything?

Trains (or reuses) the harmless expert at several ``benign_fraction`` values and benign sources
(``benign_sources``, '+'-joined), same size and settings otherwise, and measures string-match
refusal on the calibration side, never an eval set (a recipe chosen there is chosen on the test):
HarmBench *validation* behaviours (should stay high) and the risky benign calib prompts, Alpaca
instructions nearest those that no measured expert trains on (``mocae.mixture.fit.calib_risky_prompts``;
over-refusal: should drop as the benign share grows). Until 2026-12-07 it read HarmBench test and
XSTest's safe prompts, the eval sets: ``harmless_mix.json`` and ``harmless_mix_full.json`` hold
those rows and the ``full`` preset's harmless recipe was chosen on them.

Run:  MOCAE_DATA_DIR=../shared/data .venv/bin/python benchmarks/harmless_mix.py [--examples 200]
      ... benchmarks/harmless_mix.py --preset full --examples 2000 --fractions 0.5 \
              --sources alpaca alpaca_nearest truthfulqa+alpaca_nearest --n-prompts 64
      ... benchmarks/harmless_mix.py --preset full --examples 2000 --fractions 0.5 --n-prompts 0 \
              --set experts.harmless.trainer=dpo --set experts.harmless.max_pairs=400   # a DPO recipe
Writes benchmarks/results/harmless_mix_calib.json (quick preset) or harmless_mix_calib_<preset>.json. Rows of
an earlier run with other settings are kept (each row carries its own date); a row measured again
replaces the old one. A row is one trained expert (its folder names its config) on one prompt count.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def paired_rows(rows: list[dict]) -> list[dict]:
    """Each later row minus each earlier one on the same prompts: refusal differences, paired 95% intervals.

    Only rows that kept per-prompt refusals (from 2026-12-07) and share both sets' hashes pair; the
    verdict names the change in refusing harmful prompts (higher is safer) and benign ones (lower
    is better).
    """
    from mocae.evaluation.metrics import paired_difference, verdict

    def label(r: dict) -> str:
        return "base" if r["trainer"] is None else f"{Path(r['expert']).name} ({r['trainer']})"

    kept = [r for r in rows if "refused_harmful" in r]
    out = []
    for j, b in enumerate(kept):
        for a in kept[j + 1:]:
            if (a["harmful_sha256"], a["risky_benign_sha256"]) != (b["harmful_sha256"], b["risky_benign_sha256"]):
                continue
            harm = paired_difference(a["refused_harmful"], b["refused_harmful"], scale=100.0)
            benign = paired_difference(a["refused_risky_benign"], b["refused_risky_benign"], scale=100.0)
            out.append({"a": label(a), "b": label(b),
                        "refusal_harmful": harm | {"verdict": verdict(harm)},
                        "over_refusal_risky_benign": benign | {"verdict": verdict(benign, lower_is_better=True)}})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.3, 0.6])
    parser.add_argument("--sources", nargs="+", default=None,
                        help="benign source sets to compare, each '+'-joined (default: the preset's)")
    parser.add_argument("--n-prompts", type=int, default=32,
                        help="harmful (HarmBench validation) and risky benign calib prompts each; 0 = all the "
                             "harmful ones and 120 risky benign")
    parser.add_argument("--base", action="store_true", help="also measure the base model (a row with fraction null)")
    parser.add_argument("--preset", default="quick", help="preset whose harmless expert settings are varied")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="preset overrides, e.g. --set experts.harmless.trainer=dpo (rows record them)")
    args = parser.parse_args()

    import torch
    from peft import PeftModel

    from mocae.backbones import load_backbone
    from mocae.data import load_harmbench
    from mocae.mixture.fit import calib_risky_prompts
    from mocae.refusal import is_refusal, refusal_rate
    from mocae.experts.train import train_expert
    from mocae.generation import generate_batch
    from mocae.generation_cache import prompts_hash
    from mocae.paths import atomic_write_text
    from mocae.pipeline import load_run_config

    run_cfg = load_run_config(args.preset, args.set)
    base_cfg = run_cfg.expert_configs()["harmless"]
    source_sets = [s.split("+") for s in args.sources] if args.sources else [base_cfg.benign_sources]
    variants = [base_cfg.model_copy(update={"benign_fraction": f, "benign_sources": s, "max_examples": args.examples})
                for s in source_sets for f in args.fractions]
    anchors = [e.prompt for e in load_harmbench(split="val")]
    harmful = anchors[: args.n_prompts or None]
    try:  # no prompt any measured expert trains on (its benign rows are Alpaca prompts nearest refusals too)
        safe = calib_risky_prompts(args.n_prompts or 120, anchors, [*run_cfg.expert_configs().values(), *variants])
    except ValueError as err:
        parser.error(f"--n-prompts {args.n_prompts}: {err}")
    name = "harmless_mix_calib.json" if run_cfg.name == "quick" else f"harmless_mix_calib_{run_cfg.name}.json"
    old = json.loads((RESULTS / name).read_text()) if (RESULTS / name).exists() else {}
    rows = old.get("rows", []) if old.get("examples") == args.examples else []  # each row carries its date
    for cfg in ([None] if args.base else []) + variants:
        fraction, sources = (None, []) if cfg is None else (cfg.benign_fraction, cfg.benign_sources)
        model, tok = load_backbone(base_cfg.backbone)
        path = "base model (no expert)"
        if cfg is not None:
            path = train_expert(cfg, progress=True)
            model = PeftModel.from_pretrained(model, str(path))
        model.eval()
        gen = dict(max_new_tokens=32, batch_size=16, progress=False)
        key = (Path(path).name, len(harmful), len(safe))
        rows = [r for r in rows if (Path(r["expert"]).name, r["n_harmful"], r["n_risky_benign"]) != key]
        harmful_out, safe_out = generate_batch(model, tok, harmful, **gen), generate_batch(model, tok, safe, **gen)
        rows.append({
            "benign_fraction": fraction,
            "benign_sources": sources,
            "trainer": None if cfg is None else cfg.trainer,
            "overrides": args.set,
            "refusal_harmful": refusal_rate(harmful_out),
            "over_refusal_risky_benign": refusal_rate(safe_out),
            # per prompt (1 = refused), in set order: rows on the same hashes are paired below
            "refused_harmful": [int(is_refusal(a)) for a in harmful_out],
            "refused_risky_benign": [int(is_refusal(a)) for a in safe_out],
            "harmful_sha256": prompts_hash(harmful)[:16],
            "samples_risky_benign": [{"prompt": q, "answer": a} for q, a in list(zip(safe, safe_out))[::20]],
            "n_harmful": len(harmful), "n_risky_benign": len(safe),
            # rows of one invocation share their risky set; another invocation excludes its own variants'
            # training prompts too, so its set may differ: compare rows on the same hash
            "risky_benign_sha256": prompts_hash(safe)[:16],
            "expert": str(path),
            "date": time.strftime("%Y-%m-%d"),
            "command": "python " + " ".join(sys.argv),
        })
        print(rows[-1], flush=True)
        result = {
            "preset": args.preset, "rows": rows, "examples": args.examples,
            "metric": "string-match refusal (mocae.refusal), greedy, 32 new tokens",
            "paired": paired_rows(rows),
            "sets": "harmful: HarmBench validation behaviours; risky benign: Alpaca nearest those, never an "
                    "expert's training prompt (calibration side: no eval set)",
            "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        atomic_write_text(RESULTS / name, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
