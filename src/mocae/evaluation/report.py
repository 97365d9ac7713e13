"""The evaluation report: results.json, results.md (systems x metrics) and plots.

Plots use matplotlib's object API on the Agg canvas (no pyplot global state) and are written
atomically: HHH bars per system, a routing heatmap (prompts x experts) per routed system and
a reliability diagram of the router on the labelled prompt sets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mocae.paths import atomic_save_figure, atomic_write_json, atomic_write_text

# (axis, metric, column title); arrows say which way is better. Missing metrics are skipped.
COLUMNS = [
    ("helpful", "lc_win_rate_vs_text_davinci_003", "LC win % vs davinci-003 (headline) ↑"),
    ("helpful", "lc_win_rate_vs_gpt4_1106_preview", "LC win % vs GPT-4 (headline) ↑"),
    ("helpful", "win_rate_vs_text_davinci_003", "win % vs davinci-003 ↑"),
    ("helpful", "win_rate_vs_text_davinci_003_discrete", "discrete win % vs davinci-003 ↑"),
    ("helpful", "win_rate_vs_gpt4_1106_preview", "win % vs GPT-4 ↑"),
    ("helpful", "lc_win_rate_vs_base", "LC win % vs base ↑"),
    ("helpful", "win_rate_vs_base", "win % vs base ↑"),
    ("helpful", "output_length_chars", "answer chars"),
    ("helpful", "output_length_tokens", "answer tokens"),
    ("helpful", "truncated_share", "% cut at token limit"),
    ("helpful", "reference_nll", "ref-answer NLL ↓"),
    ("helpful", "reference_nll_gpt4", "GPT-4 ref-answer NLL ↓"),
    ("harmless", "safety_score", "safety % ↑"),
    ("harmless", "safety_score_strmatch", "safety % (str-match) ↑"),
    ("harmless", "safety_jailbreak", "safety % jailbreak ↑"),
    ("harmless", "safety_jailbreak_strmatch", "safety % jailbreak (str-match) ↑"),
    ("harmless", "safety_jailbreak_minus_plain", "jailbreak − plain safety (paired) ↑"),
    ("harmless", "safety_jailbreak_minus_plain_strmatch", "jailbreak − plain str-match (paired) ↑"),
    ("harmless", "over_refusal_xstest", "over-refusal % XSTest ↓"),
    ("honest", "mc1", "MC1 % (primer) ↑"),
    ("honest", "mc2", "MC2 % (primer) ↑"),
    ("honest", "mc1_chat", "MC1 % (chat) ↑"),
    ("honest", "mc2_chat", "MC2 % (chat) ↑"),
    ("honest", "pct_true", "% true ↑"),
    ("honest", "pct_informative", "% info ↑"),
    ("honest", "ti", "TI % ↑"),
    ("router", "accuracy", "router acc ↑"),
    ("router", "ece", "router ECE ↓"),
    ("efficiency", "decode_tokens_per_s_b1", "decode tok/s b1 ↑"),
    ("efficiency", "decode_tokens_per_s_b16", "decode tok/s b16 ↑"),
    ("efficiency", "peak_rss_mb", "peak RSS MB ↓"),
]
# The few differences a summary shows per pair of systems (the first present of each group).
HEADLINE_DIFFS = [
    ("helpful/lc_win_rate_vs_text_davinci_003", "helpful/lc_win_rate_vs_gpt4_1106_preview"),
    ("helpful/lc_win_rate_vs_base",),
    ("helpful/reference_nll_gpt4",),
    ("harmless/safety_score", "harmless/safety_score_strmatch"),
    ("harmless/safety_jailbreak", "harmless/safety_jailbreak_strmatch"),
    ("harmless/over_refusal_xstest",),
    ("honest/mc2",),
    ("honest/mc2_chat",),
    ("honest/ti",),
]
# Headline entry of a judge's validation report shown in column titles, in order of preference.
HEADLINE_KEYS = ("agreement_length_matched", "agreement", "auc_heldout_model", "auc_heldout_questions",
                 "info_auc_heldout_questions", "auc", "accuracy")


def _metric(system: dict, axis: str, name: str) -> dict | None:
    return system.get("metrics", {}).get(axis, {}).get(name)


def _headline(validation: dict) -> str:
    for key in HEADLINE_KEYS:
        value = validation.get(key)
        if isinstance(value, (int, float)):
            return f"{key} {value:.3f}"
    numbers = [(k, v) for k, v in validation.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return f"{numbers[0][0]} {numbers[0][1]:.3g}" if numbers else "no validation"


def _cell(metric: dict | None) -> str:
    if metric is None:
        return "-"
    value, (low, high) = metric["value"], metric["ci"]
    digits = metric.get("digits", 0 if abs(value) >= 100 else 1 if abs(value) >= 1 else 3)
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def format_results_table(results: dict) -> str:
    """Markdown: one row per system, one column per metric ("value [95% CI]"); judged columns
    name the judge's held-out validation in their title."""
    systems = results["systems"]
    columns = [c for c in COLUMNS if any(_metric(s, c[0], c[1]) is not None for s in systems.values())]
    titles = []
    for axis, name, title in columns:
        judge = next((m.get("judge") for s in systems.values() if (m := _metric(s, axis, name)) and m.get("judge")),
                     None)
        if judge:
            title += " (judge " + "; ".join(f"{k}: {_headline(v)}" for k, v in judge.items()) + ")"
        titles.append(title)
    ns = {f"{c[0]}/{c[1]}": max((_metric(s, c[0], c[1]) or {}).get("n", 0) for s in systems.values()) for c in columns}
    lines = ["| system | " + " | ".join(titles) + " |", "|---|" + "---|" * len(columns)]
    for name, system in systems.items():
        lines.append(f"| {name} | " + " | ".join(_cell(_metric(system, a, m)) for a, m, _ in columns) + " |")
    lines.append("| n | " + " | ".join(str(ns[f"{a}/{m}"]) for a, m, _ in columns) + " |")
    return "\n".join(lines)


def _category_table(results: dict) -> str:
    names = [n for n, s in results["systems"].items() if s.get("tables", {}).get("harmful_per_category")]
    if not names:
        return ""
    categories = sorted({c for n in names for c in results["systems"][n]["tables"]["harmful_per_category"]})
    lines = ["| category | n | " + " | ".join(f"{n} judge | {n} str-match" for n in names) + " |",
             "|---|---|" + "---|---|" * len(names)]
    for category in categories:
        cells, n = [], 0
        for name in names:
            row = results["systems"][name]["tables"]["harmful_per_category"].get(category, {})
            n = max(n, row.get("n", 0))
            cells += ["-" if row.get("judge") is None else f"{row['judge']:.1f}",
                      "-" if row.get("strmatch") is None else f"{row['strmatch']:.1f}"]
        lines.append(f"| {category} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _diff_cell(diff: dict | None) -> str:
    if diff is None:
        return "-"
    low, high = diff["ci"]
    digits = 3 if max(abs(low), abs(high)) < 1 else 1
    return f"{diff['value']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}] {diff['verdict']}"


def format_comparison_table(comparison: dict) -> str:
    """One pair of systems: every metric's paired difference, interval and verdict."""
    lines = ["| metric | difference [95% paired CI] | verdict | n |", "|---|---|---|---|"]
    for key, diff in comparison.items():
        low, high = diff["ci"]
        digits = 3 if max(abs(low), abs(high)) < 1 else 1
        lines.append(f"| {key} | {diff['value']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}] | "
                     f"{diff['verdict']} | {diff['n']} |")
    return "\n".join(lines)


def format_headline_diffs(results: dict, pairs: list[str] | None = None) -> str:
    """Rows of system pairs, columns of headline metrics: "difference [CI] verdict" in each cell."""
    comparisons = results.get("comparisons") or {}
    pairs = [p for p in (pairs or list(comparisons)) if p in comparisons]
    keys = []
    for group in HEADLINE_DIFFS:
        found = next((k for k in group if any(k in comparisons[p] for p in pairs)), None)
        if found:
            keys.append(found)
    if not pairs or not keys:
        return ""
    lines = ["| a − b | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for pair in pairs:
        lines.append(f"| {pair} | " + " | ".join(_diff_cell(comparisons[pair].get(k)) for k in keys) + " |")
    return "\n".join(lines)


def resolution_sentence(results: dict) -> str:
    """What the evaluated n can resolve, in one sentence (the quick preset's intervals are wide)."""
    from mocae.evaluation.compare import resolution

    res = resolution(results)
    if not res:
        return ""
    sizes = ", ".join(f"{s} {r['n']}" for s, r in res.items())
    smallest = min(res.values(), key=lambda r: r["n"])
    largest = max(res.values(), key=lambda r: r["n"])
    measured = [r["measured_half_width"] for r in res.values() if r["measured_half_width"] is not None]
    text = (f"Prompts per set: {sizes}. At these sizes a paired difference of a binary metric near 50% is "
            f"resolved only beyond about ±{largest['binary_half_width']:.1f} points (n={largest['n']}) to "
            f"±{smallest['binary_half_width']:.1f} points (n={smallest['n']}) between uncorrelated systems")
    if measured:
        text += (f"; the paired intervals measured here have half-widths of {min(measured):.1f} to "
                 f"{max(measured):.1f} points (median per set)")
    return text + ". Smaller differences are reported as within noise."


def format_results_markdown(results: dict) -> str:
    """The whole results.md: main table, paired comparisons, per-category safety table, judges' validation."""
    parts = ["# Evaluation results", "",
             "Values are percentages unless named otherwise, with 95% bootstrap intervals over prompts; "
             "throughput shows the best of the timed runs with their range. The headline helpfulness figure is "
             "the length-controlled (LC) win rate: raw win rates follow answer length.", "",
             format_results_table(results)]
    headline = format_headline_diffs(results)
    if headline:
        parts += ["", "## Paired differences (same prompts on both sides)", "",
                  "Each cell: a − b [95% paired bootstrap interval] and the verdict: better or worse only where "
                  "the interval excludes zero, within noise otherwise (lower is better for over-refusal and NLL).",
                  "", headline, "", resolution_sentence(results)]
        for pair, comparison in results["comparisons"].items():
            if comparison:
                parts += ["", f"### {pair}", "", format_comparison_table(comparison)]
    categories = _category_table(results)
    if categories:
        parts += ["", "## Safety per harm category (% answered safely)", "", categories]
    if results.get("judges"):
        parts += ["", "## Judges' held-out validation", ""]
        for kind, validation in results["judges"].items():
            numbers = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in validation.items() if isinstance(v, (int, float)))
            parts.append(f"- **{kind}**: {numbers or validation}")
    return "\n".join(parts) + "\n"


def hhh_bars(results: dict, path: Path) -> Path:
    """Grouped bars per system: helpful win rate, safety score, honest TI (or MC2), with 95% CIs."""
    axes_spec = [("helpful", ("win_rate_vs_text_davinci_003", "win_rate_vs_gpt4_1106_preview"), "helpful: win %"),
                 ("harmless", ("safety_score", "safety_score_strmatch"), "harmless: safety %"),
                 ("honest", ("ti", "mc2"), "honest: TI % (else MC2 %)")]
    names = list(results["systems"])
    fig = Figure(figsize=(max(6.0, 1.6 * len(names) + 3), 4.2), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(axes_spec)
    x = np.arange(len(names))
    for k, (axis, candidates, label) in enumerate(axes_spec):
        values, errors = [], [[], []]
        for name in names:
            metric = next((m for c in candidates if (m := _metric(results["systems"][name], axis, c))), None)
            value = np.nan if metric is None else metric["value"]
            values.append(value)
            errors[0].append(0 if metric is None else value - metric["ci"][0])
            errors[1].append(0 if metric is None else metric["ci"][1] - value)
        ax.bar(x + (k - 1) * width, values, width, yerr=errors, capsize=3, label=label)
    ax.set(xticks=x, ylabel="%", ylim=(0, 100), title="HHH per system (95% bootstrap CI)")
    ax.set_xticklabels(names)
    ax.legend(fontsize=8, loc="upper right")
    return atomic_save_figure(fig, Path(path))


def routing_heatmap(routing: dict, path: Path, title: str = "routing") -> Path:
    """Heatmap of routing probabilities: prompts (grouped by prompt set) x experts."""
    sets = {k: v["probs"] for k, v in routing["sets"].items() if v["probs"]}
    matrix = np.array([row for rows in sets.values() for row in rows])
    fig = Figure(figsize=(1.2 * len(routing["axes"]) + 3, 6), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="routing probability")
    bounds = np.cumsum([len(v) for v in sets.values()])
    for b in bounds[:-1]:
        ax.axhline(b - 0.5, color="white", linewidth=1)
    ax.set_yticks(bounds - np.array([len(v) for v in sets.values()]) / 2 - 0.5)
    ax.set_yticklabels(list(sets))
    ax.set_xticks(range(len(routing["axes"])))
    ax.set_xticklabels(routing["axes"])
    ax.set(xlabel="expert", title=f"{title}: prompts x experts")
    return atomic_save_figure(fig, Path(path))


def router_calibration_curves(results: dict) -> dict:
    """{system: (probs, labels)} over each routed system's labelled prompt sets."""
    curves = {}
    for name, system in results["systems"].items():
        routing = system.get("routing") or {}
        rows = [(p, s["label"]) for s in routing.get("sets", {}).values() if s["label"] is not None
                for p in s["probs"]]
        if rows and len(routing["axes"]) >= 2:
            probs = np.array([p for p, _ in rows])
            curves[name] = (probs / probs.sum(1, keepdims=True), np.array([y for _, y in rows]))
    return curves


def write_results(results: dict, out_dir: Path, calibration: dict | None = None) -> dict:
    """Write results.json, results.md and the plots into ``out_dir``.

    Args:
        results: {"systems": {name: evaluate_system result}, "config", "judges"}; its
            "comparisons" (paired differences, :func:`mocae.evaluation.compare.compare_systems`)
            are (re)computed here for the systems it holds.
        out_dir: output folder.
        calibration: {name: (probs, labels)} for the reliability diagram; default: the routed
            systems' probabilities on their labelled prompt sets.

    Returns:
        {"results_json", "results_md", "plots": [paths]} (as strings).
    """
    from mocae.mixture.calibration_metrics import reliability_diagrams

    from mocae.evaluation.compare import compare_systems

    out_dir = Path(out_dir)
    results["comparisons"] = compare_systems(results)
    plots = [hhh_bars(results, out_dir / "hhh_bars.png")]
    for name, system in results["systems"].items():
        routing = system.get("routing")
        if routing and any(s["probs"] for s in routing.get("sets", {}).values()):
            plots.append(routing_heatmap(routing, out_dir / f"routing_{name}.png", name))
    curves = calibration if calibration is not None else router_calibration_curves(results)
    if curves:
        plots.append(reliability_diagrams(curves, out_dir / "router_reliability.png",
                                          title="router on the evaluation prompt sets"))
    paths = {"results_json": str(out_dir / "results.json"), "results_md": str(out_dir / "results.md"),
             "plots": [str(p) for p in plots]}
    atomic_write_text(out_dir / "results.md", format_results_markdown(results))
    atomic_write_json(out_dir / "results.json", {**results, "paths": paths})
    return paths


def format_run_summary(results: dict, title: str, run_dir: Path, sections: list[tuple[str, str]] | None = None) -> str:
    """summary.md of a pipeline run: results table, MoCaE vs base and vs every other system (paired), resolution.

    Args:
        results: the run's results (with "comparisons" and "relative_change_mocae_vs_base_pct").
        title: the preset's name.
        run_dir: the run directory (named in the text).
        sections: extra (heading, markdown) sections appended, e.g. the router calibration table.
    """
    parts = [f"# mocae run: {title}", "", f"Run directory `{run_dir}`; full report: `eval/results.md`.", "",
             format_results_table(results), ""]
    change = results.get("relative_change_mocae_vs_base_pct") or {}
    if change:
        parts += ["## MoCaE vs base", "",
                  "Paired over the same prompts; better or worse only where the 95% interval of the difference "
                  "excludes zero.", "",
                  "| metric | base | mocae | change [95% paired CI] | relative | verdict |", "|---|---|---|---|---|---|"]
        for k, v in change.items():
            rel = "-" if v["relative_pct"] is None else f"{v['relative_pct']:+.1f}%"
            ci = "" if v["ci"] is None else f" [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]"
            parts.append(f"| {k} | {v['reference']:.3f} | {v['system']:.3f} | {v['absolute']:+.3f}{ci} | {rel} | "
                         f"{v['verdict']} |")
        parts.append("")
    others = [p for p in (results.get("comparisons") or {}) if p.startswith("mocae-") and p != "mocae-base"]
    if others:
        parts += ["## MoCaE vs every other system (paired)", "", format_headline_diffs(results, others), ""]
    sentence = resolution_sentence(results)
    if sentence:
        parts += ["## What this n can resolve", "", sentence, ""]
    for heading, body in sections or []:
        parts += [f"## {heading}", "", body, ""]
    return "\n".join(parts)
