"""The quick pipeline on a CUDA GPU at small size: does every stage run there, and how fast.

Runs ``mocae run --preset quick`` with ``MOCAE_DEVICE=cuda`` and smaller prompt sets (``SMALL``,
plus any ``--set``), then writes
  benchmarks/results/gpu_check.json   the GPU, torch / CUDA versions, wall time, peak GPU memory,
                                      each stage's status and every system's headline metrics
                                      (value, n, 95% interval) from the run's results.json.

Run (on a machine with a GPU and a CUDA build of torch):
  MOCAE_DATA_DIR=../shared/data .venv/bin/python benchmarks/gpu_check.py --run-dir runs/gpu-check
Without a GPU it stops at once with a message saying so (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# Small enough for a few minutes on one GPU, large enough that every metric has a value.
SMALL = ["eval.n_helpful=8", "eval.n_harmful=8", "eval.n_jailbreak=9", "eval.n_xstest_safe=8",
         "eval.n_truthfulqa=8", "experts.helpful.max_examples=64", "experts.harmless.max_examples=64",
         "experts.honest.max_examples=64"]
HEADLINES = {"helpful": ("reference_nll", "reference_nll_gpt4", "output_length_chars"),
             "harmless": ("safety_score_strmatch", "over_refusal_xstest"), "honest": ("mc1", "mc2")}
NO_GPU = 2


def no_gpu_message() -> str | None:
    """Why this check cannot run here, or None when torch sees a CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return None
    build = f"torch {torch.__version__}, " + (f"built for CUDA {torch.version.cuda}" if torch.version.cuda
                                             else "a CPU-only build")
    return (f"gpu_check: no CUDA GPU found ({build}). This check runs the quick pipeline on a GPU; "
            "run it on a machine with one and a CUDA build of torch (nothing was run or written).")


def summarize(run_dir: Path, wall_s: float) -> dict:
    """The figures gpu_check.json holds, read from the finished run."""
    import torch

    results = json.loads((run_dir / "eval" / "results.json").read_text())
    stages = json.loads((run_dir / "stages.json").read_text()) if (run_dir / "stages.json").is_file() else {}
    systems = {}
    for name, system in results["systems"].items():
        systems[name] = {f"{axis}/{metric}": {k: system["metrics"][axis][metric].get(k) for k in ("value", "n", "ci")}
                         for axis, metrics in HEADLINES.items() for metric in metrics
                         if metric in system["metrics"].get(axis, {})}
        systems[name]["timing_s"] = system.get("timing_s", {})
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda, "machine": platform.machine(),
            "run_dir": str(run_dir), "overrides": SMALL, "wall_time_s": round(wall_s, 1),
            "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "stages": {n: {"status": e.get("status"), "reason": e.get("reason")}
                       for n, e in stages.get("stages", {}).items()},
            "systems": systems,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/gpu-check", help="the run folder (resumable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more preset overrides")
    parser.add_argument("--out", default=str(RESULTS / "gpu_check.json"), help="where to write the figures")
    args = parser.parse_args(argv)
    message = no_gpu_message()
    if message is not None:
        print(message, file=sys.stderr)
        return NO_GPU
    os.environ["MOCAE_DEVICE"] = "cuda"  # every stage and the efficiency child processes
    from mocae.paths import atomic_write_json
    from mocae.pipeline import run_pipeline

    start = time.perf_counter()
    run_dir = run_pipeline("quick", run_dir=args.run_dir, overrides=SMALL + args.set, progress=False)
    report = summarize(Path(run_dir), time.perf_counter() - start)
    atomic_write_json(Path(args.out), report)
    print(f"wrote {args.out}: {report['gpu']}, {report['wall_time_s']} s, peak {report['peak_gpu_memory_mb']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
