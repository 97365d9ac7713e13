"""Collect benchmarks/results/*.json into one Markdown page (benchmarks/results/SUMMARY.md).

Each section shows the figures of one result file with the command, machine and date it
records; nothing is computed here that the file does not hold.

Run:  .venv/bin/python benchmarks/summarize.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _provenance(r: dict) -> str:
    return f"`{r.get('command', '?')}` on {r.get('date', '?')} ({r.get('machine', '?')})"


def train_speed(r: dict) -> list[str]:
    return [f"Plain fp32 peft + Trainer: **{r['baseline_tokens_per_s']} tok/s**; mocae expert trainer: "
            f"**{r['ours_tokens_per_s']} tok/s**; ratio **{r['ratio']}x** over {r['steps']} steps "
            f"({r['examples']} examples, batch {r['batch_size']}, max length {r['max_length']}, {r['backbone']}).",
            f"Baseline: {r['baseline']}. Ours: {r['ours']}."]


def mixing_overhead(r: dict) -> list[str]:
    lines = ["| system | decode tok/s bs1 | decode tok/s bs16 | latency vs base (bs1) | peak RSS MB | date |",
             "|---|---|---|---|---|---|"]
    for name, s in r["systems"].items():
        lines.append(f"| {name} | {s['bs1']['decode_tokens_per_s']} | {s['bs16']['decode_tokens_per_s']} | "
                     f"{r['latency_ratio_vs_base_bs1'][name]}x | {s['peak_rss_mb']} | {s.get('date', r['date'])} |")
    if r.get("conditions"):
        lines.append(f"\nConditions: {r['conditions']}")
    same = r.get("xlora_cached_same_tokens_as_peft_bs16")
    if same is not None:
        lines.append(f"\nX-LoRA with mocae's KV-cached decoding gives the same tokens as peft's uncached generate "
                     f"(batch 16, {r['new_tokens']} tokens): {same}.")
    return lines


def router_calibration(r: dict) -> list[str]:
    lines = ["| calibrator | split | accuracy | ECE | Brier | NLL | n |", "|---|---|---|---|---|---|---|"]
    for name, splits in r.items():
        if not isinstance(splits, dict) or "accuracy" not in splits.get("test", {}):
            continue
        for split in ("test", "shifted"):
            m = splits[split]
            lines.append(f"| {name} | {split} | {m['accuracy']:.3f} | {m['ece']:.3f} | {m['brier']:.3f} | "
                         f"{m['nll']:.3f} | {m['n']} |")
    lines.append(f"\nChecks: `{json.dumps(r.get('checks', {}))}`")
    return lines


def experts(r: dict) -> list[str]:
    from mocae.evaluation.sanity import format_sanity_table

    return [format_sanity_table(r["sanity"])]


def harmless_mix(r: dict) -> list[str]:
    lines = [f"Harmless expert at {r['examples']} examples; {r['metric']}. Each row names its benign sources, "
             "its eval size and date; the last two columns are the first 64 prompts of each set, comparable "
             "across rows.", "",
             "| benign fraction | benign sources | refusal on HarmBench (higher) | over-refusal XSTest safe (lower) "
             "| n harmful / safe | first 64: refusal / over-refusal | date |", "|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        n_h, n_s = x.get("n_harmful", r.get("n_harmful")), x.get("n_safe", r.get("n_safe"))
        first = (f"{x['refusal_harmful_first64']:.3f} / {x['over_refusal_xstest_safe_first64']:.3f}"
                 if "refusal_harmful_first64" in x else
                 (f"{x['refusal_harmful']:.3f} / {x['over_refusal_xstest_safe']:.3f}" if n_h == n_s == 64 else "-"))
        fraction = "base model" if x["benign_fraction"] is None else x["benign_fraction"]
        lines.append(f"| {fraction} | {'+'.join(x.get('benign_sources', ['alpaca'])) or '-'} | "
                     f"{x['refusal_harmful']:.3f} | {x['over_refusal_xstest_safe']:.3f} | {n_h} / {n_s} | {first} | "
                     f"{x.get('date', r.get('date'))} |")
    commands = dict.fromkeys(x["command"] for x in r["rows"] if x.get("command"))
    lines += ["", "Rows come from: " + "; ".join(f"`{c}`" for c in commands)] if commands else []
    return lines


def harmless_mix_calib(r: dict) -> list[str]:
    lines = [f"Harmless expert at {r['examples']} examples; {r['metric']}; {r['sets']}.", "",
             "| trainer | benign fraction | benign sources | refusal on harmful (higher) | over-refusal on risky benign "
             "(lower) | n harmful / risky benign (set) | date |", "|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        fraction = "base model" if x["benign_fraction"] is None else x["benign_fraction"]
        trainer = " ".join([x.get("trainer") or "-", *x.get("overrides", [])])
        lines.append(f"| {trainer} | {fraction} | {'+'.join(x['benign_sources']) or '-'} | {x['refusal_harmful']:.3f} | "
                     f"{x['over_refusal_risky_benign']:.3f} | {x['n_harmful']} / {x['n_risky_benign']} "
                     f"({x.get('risky_benign_sha256', '?')[:8]}) | {x['date']} |")
    return lines


def bench(r: dict) -> list[str]:
    import sys

    if "paired" not in r:  # written before issue 12's protocol: its numbers are not shown beside new ones
        return ["Measured before the evaluation protocol of issue 12 (judge-train instructions among the "
                "helpful prompts, n too small to rank systems, no paired intervals); not shown. Re-run "
                "`benchmarks/bench.py` to replace it."]
    sys.path.insert(0, str(Path(__file__).parent))
    from bench import markdown

    return markdown(r).splitlines()[3:]  # without its title and provenance line


SECTIONS = {
    "train_speed.json": ("Stage 1 training speed", train_speed),
    "experts.json": ("Stage 1 experts: sanity table on held-out prompts", experts),
    "harmless_mix.json": ("Stage 1 harmless expert: benign-instruction share (measured on eval sets: HarmBench "
                          "test and XSTest safe; not a basis for a choice)", harmless_mix),
    "harmless_mix_calib.json": ("Stage 1 harmless expert: benign-instruction share, calibration side",
                                harmless_mix_calib),
    "router_calibration.json": ("Stage 2 router calibration", router_calibration),
    "mixing_overhead.json": ("Stage 2 mixing overhead", mixing_overhead),
    "xlora_decode.json": ("X-LoRA baseline: KV-cached decoding vs peft's uncached generate (under load)",
                          mixing_overhead),
    "harmless_mix_full.json": ("Stage 1 harmless expert at full size: benign-instruction share (measured on eval "
                               "sets: HarmBench test and XSTest safe; not a basis for a choice)", harmless_mix),
    "harmless_mix_calib_full.json": ("Stage 1 harmless expert at full size: benign-instruction share, calibration "
                                     "side", harmless_mix_calib),
    "bench_smollm2-135m.json": ("Every system, SmolLM2-135M (benchmarks/bench.py)", bench),
    "bench_qwen2.5-coder-0.5b.json": ("Every system, Qwen2.5-Coder-0.5B (benchmarks/bench.py)", bench),
}


def main() -> None:
    out = ["# Benchmark results", "", "Generated by `benchmarks/summarize.py` from the JSON files beside it.", ""]
    for file, (title, render) in SECTIONS.items():
        path = RESULTS / file
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        out += [f"## {title}", "", f"Source: `{file}`; {_provenance(r)}.", "", *render(r), ""]
    (RESULTS / "SUMMARY.md").write_text("\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()
