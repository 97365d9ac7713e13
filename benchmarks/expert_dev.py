"""Choose an expert's recipe on the dev side, never on the eval sets: each candidate against base.

The bench evaluates experts on the eval sides; a recipe chosen there would be chosen on the test.
This script measures candidate experts where nothing is evaluated later:
  helpful  the 81 AlpacaEval judge_dev instructions (used only to pick the helpful judge's
           checkpoint, never for a figure): length-controlled and raw win rate vs the base model's
           own answers, paired over the same instructions, answer length and truncated share.

Each candidate is a preset (plus overrides) whose expert is trained (or found in the cache) with
`mocae train-expert`; results append to benchmarks/results/expert_dev.json (keyed by the expert's
folder) and expert_dev.md.

Run (SmolLM2-135M; trains the expert first if the cache lacks it):
  MOCAE_DATA_DIR=../shared/data .venv/bin/python benchmarks/expert_dev.py --axis helpful --preset full
  MOCAE_DATA_DIR=../shared/data .venv/bin/python benchmarks/expert_dev.py --axis helpful --preset full \
      --set experts.helpful.trainer=sft --set experts.helpful.max_examples=2000
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def helpful_dev(expert_path: Path, backbone: str, max_new_tokens: int, batch_size: int, n_boot: int = 1000) -> dict:
    """Win rates of the expert vs base on AlpacaEval's judge_dev instructions (paired, with lengths)."""
    import torch
    from peft import PeftModel

    from mocae.backbones import load_backbone
    from mocae.data import load_alpaca_eval
    from mocae.evaluation import metrics as M
    from mocae.evaluation.judges import load_judge
    from mocae.generation_cache import GenerationConfig, generate_records, model_fingerprint
    from mocae.paths import cache_dir

    instructions = [e.prompt for e in load_alpaca_eval(None, split="judge_dev")]
    gen = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    answers = {}
    for name in ("base", "expert"):
        model, tokenizer = load_backbone(backbone)
        if name == "expert":
            model = PeftModel.from_pretrained(model, str(expert_path)).eval()
        with torch.inference_mode():
            answers[name] = generate_records(model, tokenizer, f"{name}-{model_fingerprint(model)}",
                                             "alpaca_eval_judge_dev", instructions, gen,
                                             cache_dir() / "generations", progress=True)
        del model
    judge = load_judge("helpful")
    p = judge.prefer(instructions, answers["base"].outputs, answers["expert"].outputs)  # P(expert better)
    chars = {k: [len(o) for o in g.outputs] for k, g in answers.items()}
    boot = dict(n_boot=n_boot, seed=0)
    return {
        "set": "AlpacaEval judge_dev", "n": len(instructions),
        "lc_win_rate_vs_base": M.length_controlled_win_rate(p, chars["expert"], chars["base"], **boot),
        "win_rate_vs_base": M.win_rate(p, **boot),
        "output_chars_mean": {k: M.mean_metric(v, **boot) for k, v in chars.items()},
        "truncated_share": {k: M.mean_metric([float(t) for t in g.truncated], scale=100.0, **boot)
                            for k, g in answers.items()},
        "judge": judge.validation,
        "examples": [{"instruction": i, "base": b[:400], "expert": e[:400], "p_expert_better": round(float(q), 3)}
                     for i, b, e, q in list(zip(instructions, answers["base"].outputs, answers["expert"].outputs, p))[:5]],
    }


def _row(key: str, entry: dict) -> str:
    m = entry["metrics"]
    lc, wr = m["lc_win_rate_vs_base"], m["win_rate_vs_base"]
    ch = m["output_chars_mean"]
    return (f"| {key} | {entry['trainer']} | {lc['value']:.1f} [{lc['ci'][0]:.1f}, {lc['ci'][1]:.1f}] "
            f"| {wr['value']:.1f} [{wr['ci'][0]:.1f}, {wr['ci'][1]:.1f}] | {ch['expert']['value']:.0f} vs "
            f"{ch['base']['value']:.0f} | {m['truncated_share']['expert']['value']:.1f} | {m['n']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--axis", choices=["helpful"], required=True)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="preset overrides")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    import torch

    from mocae.experts.train import train_expert
    from mocae.paths import atomic_write_json, atomic_write_text
    from mocae.pipeline import load_run_config

    cfg = load_run_config(args.preset, args.set)
    expert_cfg = cfg.expert_configs()[args.axis]
    expert_path = Path(train_expert(expert_cfg))  # the cached one when this config trained before
    record = json.loads((expert_path / "training.json").read_text())
    metrics = helpful_dev(expert_path, cfg.backbone, args.max_new_tokens, args.batch_size)
    out_path = RESULTS / "expert_dev.json"
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    results[expert_path.name] = {
        "axis": args.axis, "trainer": expert_cfg.trainer, "preset": args.preset, "overrides": args.set,
        "expert_config": expert_cfg.model_dump(mode="json"), "training": {k: record.get(k) for k in (
            "trainer", "data", "steps", "wall_time_s", "tokens_per_s", "pairs", "sources")},
        "metrics": metrics, "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"}
    atomic_write_json(out_path, results)
    lines = ["# Expert recipes on the dev side (never the eval sets)", "",
             "Each candidate expert against the base model on AlpacaEval's 81 judge_dev instructions (the helpful "
             "judge's checkpoint-selection set, never evaluated): win rates by the helpful judge, paired 95% bootstrap "
             "intervals. The judge's own length-matched validation is weak (judges.json), so read the LC figure "
             "beside the lengths.", "",
             "| expert | trainer | LC win rate vs base | win rate vs base | chars (expert vs base) | truncated % | n |",
             "|---|---|---|---|---|---|---|"]
    lines += [_row(k, e) for k, e in results.items()]
    lines += ["", *[f"- {k}: `{e['command']}` on {e['date']}; {e['machine']}" for k, e in results.items()]]
    atomic_write_text(RESULTS / "expert_dev.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
