"""``mocae pareto``: the HHH front of a steered MoCaE against the static interpolation of its experts.

On a simplex grid of points ``g`` (components in {0, 1/steps, ..., 1}, summing to 1) two systems
are evaluated with the evaluation harness on the same prompts:

- ``mocae@g``: the calibrated router, its probabilities tilted by the prior ``g`` (steering);
- ``static@g``: the experts' LoRA updates mixed with the fixed weights ``g`` (the static merge of
  the same experts, rewarded-soups style; exactly ``mocae export --weights g``).

At the grid's vertices both are the single expert (under the model's soft decision). The base
model is evaluated first, as the harness' reference. Per point and axis the objective is the first metric present
of ``OBJECTIVES`` (higher is better for each); per point, ``mocae@g - static@g`` is a paired
difference over the same prompts with its bootstrap interval. Written to ``OUT/pareto.json`` and
``OUT/pareto.png`` (one panel per pair of axes, each series' non-dominated points joined), beside
the harness' own results.json / results.md.
"""

from __future__ import annotations

import itertools
import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from mocae.evaluation.harness import EvalConfig
from mocae.spec import capabilities_of, declare

# axis -> metrics in order of preference (all higher-is-better); the first one evaluated is used.
OBJECTIVES = {
    "helpful": ["lc_win_rate_vs_text_davinci_003", "lc_win_rate_vs_gpt4_1106_preview", "lc_win_rate_vs_base",
                "win_rate_vs_base"],
    "harmless": ["safety_score", "safety_score_strmatch"],
    "honest": ["ti", "mc2_chat", "mc2"],
}


class ParetoConfig(BaseModel):
    """What ``mocae pareto`` sweeps and how each point is evaluated."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(2, ge=1, le=10, description="grid resolution: 2 gives 6 points on 3 axes, 3 gives 10")
    sweep: list[str] = Field(["mocae", "static"], min_length=1,
                             description="series: 'mocae' (router tilted by the prior g), 'static' (weights g)")
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig(n_helpful=32, n_harmful=32, n_xstest_safe=32,
                                                                n_truthfulqa=32, efficiency=False))


def simplex_grid(n_axes: int, steps: int) -> list[tuple[float, ...]]:
    """Every point with components in {0, 1/steps, ..., 1} summing to 1, in a fixed order."""
    points = [c for c in itertools.product(range(steps + 1), repeat=n_axes) if sum(c) == steps]
    return [tuple(round(x / steps, 6) for x in c) for c in sorted(points, reverse=True)]


def point_name(series: str, point: tuple[float, ...]) -> str:
    return f"{series}@" + "-".join(f"{x:.2f}" for x in point)


@contextmanager
def steered(model, weights=None, prior=None):
    """``model`` (a MoCaEModel) routing with fixed ``weights`` or its router tilted by ``prior``, inside.

    Everything that routes goes through ``model.route`` (generation, scoring, TruthfulQA MC's
    question routing), so that is the one method replaced.
    """
    original = type(model).route
    fixed = None if weights is None else torch.tensor(weights, dtype=torch.float32)

    tilt = None if prior is None else torch.tensor(prior, dtype=torch.float32)
    axes = list(model.axes)

    @torch.no_grad()
    def route(input_ids, attention_mask, prior=None, decide=True):
        if fixed is not None:
            return fixed.expand(input_ids.shape[0], -1).clone()
        from mocae.mixture.decide import decide as decide_weights

        # as MoCaEModel.route with a prior: calibrated probabilities tilted by the point, then the
        # model's decision (a gate reads the untilted probabilities)
        calibrated = original(model, input_ids, attention_mask, decide=False)
        probs = calibrated * tilt
        probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
        return decide_weights(probs, model.mocae_config.decision, axes, calibrated) if decide else probs
    # A steered point's weights are the sweep's, not the router's calibrated distribution: no
    # routing report, so no router-calibration metrics, which fixed or one-hot weights would make
    # infinite (log 0).
    declare(model, replace(capabilities_of(model), routing_report=False))
    model.route = route
    try:
        yield model
    finally:
        del model.route
        declare(model, None)


def _objective(result: dict, axis: str) -> dict | None:
    metrics = result.get("metrics", {}).get(axis, {})
    for key in OBJECTIVES[axis]:
        m = metrics.get(key)
        if m is not None and m.get("value") is not None:
            return {"metric": key, "value": m["value"], "ci": m.get("ci")}
    return None


def nondominated(points: list[list[float]]) -> list[bool]:
    """True for each point no other point beats on every objective (higher is better, ties allowed)."""
    def dominates(a, b):
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))
    return [not any(dominates(q, p) for q in points if q is not p) for p in points]


def run_pareto(model_dir: str | Path, cfg: ParetoConfig, out_dir: str | Path, judges=None, progress: bool = True,
               model=None) -> dict:
    """Sweep the grid, evaluate every point, write pareto.json and pareto.png into ``out_dir``.

    Args:
        model: an already loaded MoCaEModel (default: loaded from ``model_dir``).
        judges: passed to the harness (default: its trained judges).
    """
    from mocae.evaluation.compare import compare_pair
    from mocae.evaluation.harness import evaluate
    from mocae.mixture.model import MoCaEModel
    from mocae.paths import atomic_write_json

    unknown = sorted(set(cfg.sweep) - {"mocae", "static"})
    if unknown:
        raise ValueError(f"sweep: unknown series {unknown}; choose from ['mocae', 'static']")
    model = model if model is not None else MoCaEModel.from_pretrained(model_dir)
    if not model.routes_per_request and "mocae" in cfg.sweep:
        raise ValueError("sweep 'mocae' tilts per-request router probabilities; this model routes per token "
                         "(sweep only 'static')")
    axes, tokenizer = list(model.axes), model.tokenizer
    grid = simplex_grid(len(axes), cfg.steps)
    out_dir = Path(out_dir)
    active = {"ctx": None}

    def loader(weights=None, prior=None):
        def load():
            if active["ctx"] is not None:
                active["ctx"].__exit__(None, None, None)
            active["ctx"] = steered(model, weights=weights, prior=prior)
            active["ctx"].__enter__()
            return model, tokenizer
        return load

    def load_base():
        from mocae.backbones import load_backbone

        return load_backbone(model.mocae_config.backbone)

    systems = {"base": load_base}
    for point in grid:
        for series in cfg.sweep:
            systems[point_name(series, point)] = (loader(prior=list(point)) if series == "mocae"
                                                  else loader(weights=list(point)))
    try:
        results = evaluate(systems, cfg.eval, out_dir, judges=judges, progress=progress)
    finally:
        if active["ctx"] is not None:
            active["ctx"].__exit__(None, None, None)
    by_name = results["systems"]
    rows = []
    for point in grid:
        for series in cfg.sweep:
            name = point_name(series, point)
            rows.append({"name": name, "series": series, "point": dict(zip(axes, point)),
                         "objectives": {a: _objective(by_name[name], a) for a in OBJECTIVES if a in axes}})
    base = {"name": "base", "objectives": {a: _objective(by_name["base"], a) for a in OBJECTIVES if a in axes}}
    scored_axes = [a for a in OBJECTIVES if a in axes and all(r["objectives"][a] for r in rows)]
    for series in cfg.sweep:
        mine = [r for r in rows if r["series"] == series]
        flags = nondominated([[r["objectives"][a]["value"] for a in scored_axes] for r in mine])
        for r, flag in zip(mine, flags):
            r["nondominated"] = flag
    paired = {}
    if set(cfg.sweep) == {"mocae", "static"}:
        for point in grid:
            a, b = by_name[point_name("mocae", point)], by_name[point_name("static", point)]
            diff = compare_pair(a, b, n_boot=cfg.eval.n_boot, seed=cfg.eval.seed)
            keys = {f"{axis}/{m}" for axis in scored_axes for m in OBJECTIVES[axis]}
            paired[point_name("mocae", point) + " - " + point_name("static", point)] = {
                k: v for k, v in diff.items() if k in keys}
    report = {"model": str(Path(model_dir).resolve()) if model_dir else None, "axes": axes, "grid": grid,
              "objectives": {a: OBJECTIVES[a] for a in scored_axes}, "config": cfg.model_dump(mode="json"),
              "base": base, "points": rows, "paired_mocae_minus_static": paired,
              "results_json": results["paths"]["results_json"]}
    report["plot"] = str(plot_pareto(report, out_dir / "pareto.png")) if len(scored_axes) >= 2 else None
    atomic_write_json(out_dir / "pareto.json", report)
    return report


def plot_pareto(report: dict, path: Path) -> Path:
    """One panel per pair of scored axes: every point, each series' non-dominated points joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mocae.paths import atomic_save_figure

    axes = list(report["objectives"])
    pairs = list(itertools.combinations(axes, 2))
    fig, panels = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.4), squeeze=False)
    colours = {"mocae": "tab:blue", "static": "tab:orange"}
    labels = {"mocae": "MoCaE (router, prior g)", "static": "static merge (weights g)"}
    for ax, (x, y) in zip(panels[0], pairs):
        for series in dict.fromkeys(r["series"] for r in report["points"]):
            pts = [r for r in report["points"] if r["series"] == series]
            xs = [r["objectives"][x]["value"] for r in pts]
            ys = [r["objectives"][y]["value"] for r in pts]
            ax.scatter(xs, ys, c=colours.get(series, "grey"), label=labels.get(series, series), alpha=0.8)
            front = sorted((a, b) for a, b, r in zip(xs, ys, pts) if r.get("nondominated"))
            if len(front) > 1:
                ax.plot(*zip(*front), c=colours.get(series, "grey"), alpha=0.5)
        b = report["base"]["objectives"]
        if b.get(x) and b.get(y):
            ax.scatter([b[x]["value"]], [b[y]["value"]], c="black", marker="x", label="base")
        first = report["points"][0]["objectives"]
        ax.set_xlabel(f"{x}: {first[x]['metric']}")
        ax.set_ylabel(f"{y}: {first[y]['metric']}")
        ax.grid(alpha=0.3)
    panels[0][0].legend(fontsize=8)
    fig.suptitle("HHH front over a simplex grid (non-dominated points on all axes joined)")
    fig.tight_layout()
    path = atomic_save_figure(fig, path)
    plt.close(fig)
    return path
