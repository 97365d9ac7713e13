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
    ("helpful", "win_rate_vs_text_davinci_003", "win % vs davinci-003 ↑"),
    ("helpful", "lc_win_rate_vs_text_davinci_003", "LC win % vs davinci-003 ↑"),
    ("helpful", "win_rate_vs_gpt4_1106_preview", "win % vs GPT-4 ↑"),
    ("helpful", "lc_win_rate_vs_gpt4_1106_preview", "LC win % vs GPT-4 ↑"),
    ("helpful", "win_rate_vs_base", "win % vs base ↑"),
    ("helpful", "reference_nll", "ref-answer NLL ↓"),
    ("helpful", "lc_win_rate_vs_base", "LC win % vs base ↑"),
    ("harmless", "safety_score", "safety % ↑"),
    ("harmless", "safety_score_strmatch", "safety % (str-match) ↑"),
    ("harmless", "over_refusal_xstest", "over-refusal % XSTest ↓"),
    ("honest", "mc1", "MC1 % ↑"),
    ("honest", "mc2", "MC2 % ↑"),
    ("honest", "pct_true", "% true ↑"),
    ("honest", "pct_informative", "% info ↑"),
    ("honest", "ti", "TI % ↑"),
    ("router", "accuracy", "router acc ↑"),
    ("router", "ece", "router ECE ↓"),
    ("efficiency", "decode_tokens_per_s_b1", "decode tok/s b1 ↑"),
    ("efficiency", "decode_tokens_per_s_b16", "decode tok/s b16 ↑"),
    ("efficiency", "peak_rss_mb", "peak RSS MB ↓"),
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


def format_results_markdown(results: dict) -> str:
    """The whole results.md: main table, per-category safety table, judges' validation."""
    parts = ["# Evaluation results", "",
             "Values are percentages unless named otherwise, with 95% bootstrap intervals over prompts; "
             "throughput shows the best of the timed runs with their range.", "",
             format_results_table(results)]
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
        results: {"systems": {name: evaluate_system result}, "config", "judges"}.
        out_dir: output folder.
        calibration: {name: (probs, labels)} for the reliability diagram; default: the routed
            systems' probabilities on their labelled prompt sets.

    Returns:
        {"results_json", "results_md", "plots": [paths]} (as strings).
    """
    from mocae.evaluation.calibration_metrics import reliability_diagrams

    out_dir = Path(out_dir)
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
