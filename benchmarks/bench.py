"""MoCaE against every baseline on one backbone, from one `mocae run`, published as results.

Runs (or continues) the pipeline of a preset with the given overrides, then writes
  benchmarks/results/bench_<backbone>.json   per system: win rates, safety, over-refusal, MC1/MC2,
                                             TI, bs-1 decode speed, peak RSS (each with n); MoCaE's
                                             change over base per axis; MoCaE vs H3Fusion cost
  benchmarks/results/bench_<backbone>.md     the same as tables, with command, machine and date

Run (SmolLM2-135M, all 13 systems, eval subsets sized for 2 CPU cores):
  MOCAE_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench.py --preset full \
      --set eval.n_helpful=48 --set eval.n_harmful=48 --set eval.n_xstest_safe=48 --set eval.n_truthfulqa=48
Nothing here is hard-coded: every number comes from that run's results.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# bench field -> (axis, metric in the harness results)
FIELDS = {
    "win_rate_vs_reference": ("helpful", "win_rate_vs_text_davinci_003"),
    "win_rate_vs_base": ("helpful", "win_rate_vs_base"),
    "safety_score": ("harmless", "safety_score"),
    "over_refusal": ("harmless", "over_refusal_xstest"),
    "mc1": ("honest", "mc1"),
    "mc2": ("honest", "mc2"),
    "ti": ("honest", "ti"),
    "decode_tokens_per_s_bs1": ("efficiency", "decode_tokens_per_s_b1"),
    "peak_rss_mb": ("efficiency", "peak_rss_mb"),
}
EXTRA = {  # judge-free companions, reported beside the required fields
    "reference_nll": ("helpful", "reference_nll"),
    "safety_score_strmatch": ("harmless", "safety_score_strmatch"),
}
HEADLINE = {"helpful": "win_rate_vs_reference", "harmless": "safety_score", "honest": "mc2"}


def _pick(metric: dict | None) -> dict | None:
    if metric is None:
        return None
    return {k: metric[k] for k in ("value", "n", "ci", "digits") if k in metric}


def system_row(name: str, system: dict, systems: dict) -> dict:
    """The bench fields of one system (None where the run did not measure one, with a note)."""
    metrics = system["metrics"]
    row = {field: _pick(metrics.get(axis, {}).get(key)) for field, (axis, key) in {**FIELDS, **EXTRA}.items()}
    notes = []
    if name == "base" and row["win_rate_vs_base"] is None and row["win_rate_vs_reference"]:
        row["win_rate_vs_base"] = {"value": 50.0, "n": row["win_rate_vs_reference"]["n"], "ci": [50.0, 50.0]}
        notes.append("win_rate_vs_base of base is 50 by definition (AlpacaEval: a tie with itself)")
    if name == "oracle":
        source = systems["expert_helpful"]["metrics"].get("efficiency", {})
        for field in ("decode_tokens_per_s_bs1", "peak_rss_mb"):
            row[field] = _pick(source.get(FIELDS[field][1]))
        notes.append("oracle: each benchmark's numbers from its own expert (composed, not generated); its cost is "
                     "one peft adapter's (expert_helpful's measurement) plus a perfect router that does not exist")
    row["notes"] = notes
    return row


def cost_comparison(systems: dict, a: str = "mocae", b: str = "h3fusion") -> dict | None:
    """Weights, weights+activations memory and bs-1 decode latency of ``a`` vs ``b`` (same run)."""
    if a not in systems or b not in systems or not systems[a].get("efficiency") or not systems[b].get("efficiency"):
        return None

    def cost(system: dict) -> dict:
        e = system["efficiency"]
        return {"weights_mb": e["weights_mb"],
                "weights_and_activations_mb": round(e["peak_rss_mb"] - e["rss_before_load_mb"], 1),
                "peak_rss_mb": e["peak_rss_mb"],
                "decode_ms_per_token_bs1": round(1000 / e["batch_1"]["decode_tokens_per_s"]["value"], 2)}
    ca, cb = cost(systems[a]), cost(systems[b])
    return {a: ca, b: cb, f"{a}_vs_{b}_pct": {k: round((ca[k] - cb[k]) / cb[k] * 100, 1) for k in ca},
            "note": "negative = MoCaE uses less / is faster. weights_and_activations = peak RSS minus the child "
                    "process' RSS before loading (Python, torch, transformers). MoCaE's RSS includes the MiniLM "
                    "router encoder; its weights_mb does not."}


def _cell(metric: dict | None) -> str:
    if metric is None:
        return "-"
    digits = metric.get("digits", 1)
    return f"{metric['value']:.{digits}f} (n={metric['n']})"


def markdown(report: dict) -> str:
    fields = [*FIELDS, *EXTRA]
    lines = [f"# Benchmark: {report['backbone']}", "",
             f"`{report['command']}` on {report['date']}; {report['machine']}; run `{report['run_dir']}`; "
             f"wall time of this invocation {report['wall_time_s']:.0f} s.", "",
             "| system | " + " | ".join(fields) + " |", "|---|" + "---|" * len(fields)]
    for name, row in report["systems"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(row[f]) for f in fields) + " |")
    lines += ["", "Percentages with n prompts; win rates and safety by our trained judges (validation in the run's "
              "results.md), over-refusal and safety_score_strmatch by string match, MC1/MC2 by lm-eval.", "",
              "## MoCaE vs base, per axis", ""]
    for axis, change in report["mocae_vs_base"].items():
        lines.append(f"- {axis}: {json.dumps(change)}")
    if report["mocae_vs_h3fusion"]:
        c = report["mocae_vs_h3fusion"]
        lines += ["", "## MoCaE vs H3Fusion: memory and latency (same run, each in its own process)", "",
                  "| | weights MB | weights + activations MB | peak RSS MB | decode ms/token (bs 1) |",
                  "|---|---|---|---|---|"]
        for name in ("mocae", "h3fusion"):
            r = c[name]
            lines.append(f"| {name} | {r['weights_mb']} | {r['weights_and_activations_mb']} | {r['peak_rss_mb']:.0f} "
                         f"| {r['decode_ms_per_token_bs1']} |")
        d = c["mocae_vs_h3fusion_pct"]
        lines.append(f"| change | {d['weights_mb']:+.1f}% | {d['weights_and_activations_mb']:+.1f}% | "
                     f"{d['peak_rss_mb']:+.1f}% | {d['decode_ms_per_token_bs1']:+.1f}% |")
        lines += ["", c["note"]]
    for name, c in report.get("cost_only", {}).items():
        lines += ["", f"## {name}: speed and memory only", "",
                  f"Not evaluated on the HHH sets: {c['reason']}. Decode (bs 1): "
                  f"{c['decode_tokens_per_s_bs1']['value']:.1f} tok/s; peak RSS {c['peak_rss_mb']:.0f} MB; "
                  f"weights {c['weights_mb']} MB."]
    notes = sorted({n for row in report["systems"].values() for n in row["notes"]})
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="preset overrides")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--cost-only", nargs="*", default=[], metavar="SYSTEM",
                        help="systems of the run measured for speed and memory only (e.g. one too slow to "
                             "generate every eval set here); reported apart, with the reason")
    parser.add_argument("--cost-only-reason", default="", help="why those systems were not evaluated")
    args = parser.parse_args()

    import torch

    from mocae.pipeline import load_run_config, run_pipeline

    start = time.time()
    cfg = load_run_config(args.preset, args.set)
    run_dir = run_pipeline(args.preset, run_dir=args.run_dir, overrides=args.set, progress=False)
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    systems = results["systems"]
    rows = {name: system_row(name, s, systems) for name, s in systems.items()}
    change = results.get("relative_change_mocae_vs_base_pct", {})
    mocae_vs_base = {}
    for axis, field in HEADLINE.items():
        axis_name, key = FIELDS[field]
        mocae_vs_base[axis] = {"metric": field, **(change.get(f"{axis_name}/{key}") or {})}
    mocae_vs_base["harmless_over_refusal"] = {"metric": "over_refusal",
                                              **(change.get("harmless/over_refusal_xstest") or {})}
    cost_only = {}
    if args.cost_only:
        from mocae.evaluation.harness import eval_prompts
        from mocae.pipeline import measure_systems

        measured_cfg = cfg.model_copy(update={"systems": args.cost_only})
        prompts = [e.prompt for e in eval_prompts(cfg.eval)["alpaca_eval"][:cfg.efficiency.n_prompts]]
        for name, e in measure_systems(measured_cfg, run_dir, prompts).items():
            cost_only[name] = {"reason": args.cost_only_reason,
                               "decode_tokens_per_s_bs1": e["batch_1"]["decode_tokens_per_s"],
                               "peak_rss_mb": e["peak_rss_mb"], "weights_mb": e["weights_mb"]}
    report = {
        "backbone": cfg.backbone, "preset": args.preset, "overrides": args.set,
        "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "run_dir": str(run_dir), "wall_time_s": round(time.time() - start, 1),
        "config": cfg.model_dump(mode="json"), "systems": rows, "mocae_vs_base": mocae_vs_base,
        "mocae_vs_h3fusion": cost_comparison(systems),
        "cost_only": cost_only,
        "judges": results.get("judges"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{cfg.backbone}"  # not Path.with_suffix: "qwen2.5-coder-0.5b" has dots
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
