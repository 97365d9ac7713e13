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
    """The command, date and machine a result records (what it lacks is said, not invented)."""
    machine = r.get("machine")
    if isinstance(machine, dict):
        machine = ", ".join(f"{k} {machine[k]}" for k in ("torch", "threads", "cpus", "cpu_count") if k in machine)
    parts = [f"`{r['command']}`" if r.get("command") else "no command recorded",
             f"on {r['date']}" if r.get("date") else "no date recorded"]
    return ", ".join(parts) + (f" ({machine})" if machine else "")


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
    if r.get("paired"):
        lines += ["", "Paired differences (a - b, points, 95% paired bootstrap interval) between rows on the same prompts:",
                  "", "| a | b | refusal on harmful | over-refusal on risky benign |", "|---|---|---|---|"]
        for d in r["paired"]:
            cells = [f"{m['value']:+.1f} [{m['ci'][0]:+.1f}, {m['ci'][1]:+.1f}] {m['verdict']}"
                     for m in (d["refusal_harmful"], d["over_refusal_risky_benign"])]
            lines.append(f"| {d['a']} | {d['b']} | {cells[0]} | {cells[1]} |")
    return lines


def contamination(r: dict) -> list[str]:
    pairs = r["pairs"]
    found = [p for p in pairs if p["exact"] or p["near"]]
    near = "" if r["exact_only"] else f" and near duplicates ({r['encoder']} cosine >= {r['threshold']})"
    lines = [f"**{r['overlaps']} overlaps** in {len(pairs)} (training source, eval set, field) pairs: exact matches after "
             f"normalisation{near}.",
             "", "| training source | read by | eval sets checked |", "|---|---|---|"]
    for source in r["training_sources"]:
        sets = sorted({p["eval_set"] for p in pairs if p["source"] == source["name"]})
        lines.append(f"| {source['name']} | {', '.join(source['stages'])} | {', '.join(sets)} |")
    lines += [f"- overlap: {p['source']} x {p['eval_set']} ({p['field']}): {p['exact']} exact, {p['near']} near"
              for p in found]
    lines += ["", "Not trained on (checked as such): " + "; ".join(r.get("not_trained_on", []))]
    return lines


def serve_load(r: dict) -> list[str]:
    soak = r["soak"]
    lines = [f"Soak: {soak['requests']} requests ({soak['malformed']} malformed) at concurrency 32: **{soak['lost']} lost, "
             f"{soak['5xx']} 5xx**, {soak['malformed_4xx']} malformed answered 4xx; latency p50/p95/p99 "
             f"{soak['latency_s']['p50']} / {soak['latency_s']['p95']} / {soak['latency_s']['p99']} s "
             f"({r['machine']['threads']} torch thread, load average at start {r['machine']['load_average_at_start']}).",
             "", "| ratio | value | target | met |", "|---|---|---|---|"]
    lines += [f"| {name} | {t['value']} | {t['target']} | {'yes' if t['met'] else 'no'} |"
              for name, t in r["targets"].items()]
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


def own_markdown(path: Path) -> list[str]:
    """A result's own Markdown report (written beside its JSON by its script), its headings one level down."""
    lines = path.read_text(encoding="utf-8").splitlines()
    body = lines[1:] if lines and lines[0].startswith("# ") else lines
    return [f"#{line}" if line.startswith("#") else line for line in body]


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
    "contamination.json": ("Contamination check: every training source against every evaluated set", contamination),
    "judges.json": ("Offline judges: held-out validation", "judges.md"),
    "expert_dev.json": ("Expert candidates on AlpacaEval judge_dev (never evaluated)", "expert_dev.md"),
    "router_screen.json": ("Router variants, calibration side (no generation)", "router_screen.md"),
    "rule_screen.json": ("Hard decision rules screened by composition, calibration side", "rule_screen.md"),
    "mocae_ablation.json": ("MoCaE ablation, calibration side: what the default is chosen by", "mocae_ablation.md"),
    "serve_load.json": ("Serving under load (benchmarks/serve_load.py)", serve_load),
    "bench_smollm2-135m.json": ("Every system, SmolLM2-135M (benchmarks/bench.py)", bench),
    "bench_qwen2.5-coder-0.5b.json": ("Every system, Qwen2.5-Coder-0.5B (benchmarks/bench.py)", bench),
}


def main() -> None:
    out = ["# Benchmark results", "", "Generated by `benchmarks/summarize.py` from the JSON files beside it.", ""]
    for file, (title, render) in SECTIONS.items():
        path = RESULTS / file
        interim = RESULTS / file.removesuffix(".json") / "interim.md"
        if not path.is_file() and file.startswith("bench_") and interim.is_file():
            # every system has not landed yet: the landed ones, as their sittings left them
            out += [f"## {title}: interim", "", f"Source: `{interim.relative_to(RESULTS)}`.", "",
                    *own_markdown(interim), ""]
            continue
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        body = own_markdown(RESULTS / render) if isinstance(render, str) else render(r)
        out += [f"## {title}", "", f"Source: `{file}`; {_provenance(r)}.", "", *body, ""]
    (RESULTS / "SUMMARY.md").write_text("\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()
