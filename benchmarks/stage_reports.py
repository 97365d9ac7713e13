"""Run a preset's Stage 1 and 2 (experts, MoCaE; resumable) and publish their results.

Writes, from that run only:
  benchmarks/results/experts.json             sanity table: base, each expert, MoCaE on every axis,
                                              plus each expert's training record
  benchmarks/results/router_calibration.json  per calibrator: accuracy/ECE/Brier/NLL on the
                                              in-distribution test split and the shifted split
  benchmarks/results/stage_reports.md         both as Markdown, with command, machine and date

Run:  MOCAE_DATA_DIR=../shared/data .venv/bin/python benchmarks/stage_reports.py --preset full
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--run-dir", default=None, help="run folder (default runs/<name>-stages-<hash>); "
                        "finished stages in it are reused")
    args = parser.parse_args()

    import torch

    from mocae.config import config_hash
    from mocae.evaluation.sanity import evaluate_experts, format_sanity_table
    from mocae.mixture.fit import format_calibration_table
    from mocae.paths import atomic_write_json
    from mocae.pipeline import SanityConfig, build_mocae, load_run_config, train_experts

    start = time.time()
    # The sanity sizes of the published experts.json (a preset's own `sanity` section wins).
    sanity_cfg = SanityConfig(n_harmful=64, n_xstest_safe=64, n_truthfulqa=40, max_new_tokens=40)
    cfg = load_run_config(args.preset)
    run_dir = Path(args.run_dir or Path("runs") / f"{cfg.name}-stages-{config_hash(cfg)}")
    experts_paths = train_experts(cfg)
    mocae_dir = build_mocae(cfg, experts_paths, run_dir)
    atomic_write_json(run_dir / "sanity.json", evaluate_experts(
        cfg.backbone, experts_paths, cfg.sanity or sanity_cfg, cache=run_dir / "sanity", mocae_dir=mocae_dir))
    atomic_write_json(run_dir / "experts.json", {
        a: {"path": str(p), **{k: v for k, v in json.loads((p / "training.json").read_text()).items()
                               if k in ("data", "steps", "tokens_per_s", "wall_time_s", "peak_rss_mb")}}
        for a, p in experts_paths.items()})
    about = {
        "preset": args.preset,
        "run_dir": str(run_dir),
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "wall_time_s_this_invocation": round(time.time() - start, 1),
    }
    sanity = json.loads((run_dir / "sanity.json").read_text())
    experts = json.loads((run_dir / "experts.json").read_text())
    calibration = json.loads((run_dir / "router_calibration.json").read_text())

    default = calibration["default_calibrator"]
    table = {name: {split: {k: r[split][k] for k in ("accuracy", "ece", "brier", "nll", "n")}
                    for split in ("test", "shifted")}
             for name, r in calibration["calibrators"].items()}
    checks = {
        "default": default,
        "default_ece_test_le_0.05": table[default]["test"]["ece"] <= 0.05,
        "default_beats_none_on_test": table[default]["test"]["ece"] < table["none"]["test"]["ece"],
        "default_beats_none_on_shifted": table[default]["shifted"]["ece"] < table["none"]["shifted"]["ece"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "experts.json").write_text(json.dumps(
        {**about, "sanity": sanity, "expert_training": experts}, indent=2) + "\n")
    (RESULTS / "router_calibration.json").write_text(json.dumps(
        {**about, **table, "checks": checks, "splits": calibration["splits"], "gamma": calibration["gamma"],
         "feature_layer": calibration["feature_layer"]}, indent=2) + "\n")
    if calibration.get("reliability_diagram"):
        shutil.copy(calibration["reliability_diagram"], RESULTS / "reliability_test.png")
    md = [f"# Stage 1 and 2 results ({args.preset} preset)", "",
          f"`{about['command']}` on {about['date']}, {about['machine']}; run directory `{run_dir}`.", "",
          "## Experts: sanity table (held-out prompts)", "", format_sanity_table(sanity), "",
          "## Router calibration", "", format_calibration_table(calibration), "",
          f"Default calibrator: `{default}`. Checks: {json.dumps(checks)}", ""]
    (RESULTS / "stage_reports.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
