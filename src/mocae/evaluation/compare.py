"""Paired comparisons of evaluated systems: every difference on the same prompts, with its interval.

Each system's result keeps its per-prompt values (``per_prompt``, written by the harness), so
a difference between two systems is bootstrapped over prompt indices drawn once for both
(:func:`mocae.evaluation.metrics.paired_difference`; LC win rates refit their GLM on both
sides of every resample). A report calls a difference "better" or "worse" only where its 95%
interval excludes zero, "within noise" otherwise.

    comparisons = compare_systems(results)   # {"mocae-base": {"helpful/lc_win_rate_vs_...": {...}}}
"""

from __future__ import annotations

import numpy as np

from mocae.evaluation import metrics as M

# Orientation by metric-name prefix: lower is better for these ...
LOWER_IS_BETTER = ("over_refusal", "reference_nll")
# ... and these have no better side: a difference is "higher" or "lower".
NEUTRAL = ("output_length", "truncated_share")


def orientation(key: str) -> str:
    """"higher" (higher is better), "lower" (lower is better) or "neutral" for an "axis/metric" key."""
    name = key.split("/", 1)[-1]
    if name.startswith(LOWER_IS_BETTER):
        return "lower"
    return "neutral" if name.startswith(NEUTRAL) else "higher"


def judge_verdict(diff: dict, key: str) -> str:
    """better / worse / within noise (or higher / lower / within noise for neutral metrics)."""
    way = orientation(key)
    word = M.verdict(diff, lower_is_better=way == "lower")
    if way == "neutral" and word != "within noise":
        return "higher" if diff["ci"][0] > 0 else "lower"
    return word


def _base_self(entry: dict) -> dict:
    """The base model's own entry of a vs-base metric: a tie with itself on every prompt."""
    if entry.get("lc"):
        return {**entry, "pref": [0.5] * len(entry["pref"]), "chars": list(entry["other_chars"])}
    return {**entry, "values": [0.5] * len(entry["values"])}


def _stat_inputs(a: dict, b: dict) -> tuple:
    """(a's rows, b's rows, statistic, scale) of two ``per_prompt`` entries: LC win rates refit their GLM."""
    if bool(a.get("lc")) != bool(b.get("lc")):
        raise ValueError("cannot pair an LC win rate with a plain metric")
    if a.get("lc"):
        rows = [M.lc_rows(e["pref"], e["chars"], e["other_chars"]) for e in (a, b)]
        return rows[0], rows[1], M.lc_stat, 100.0
    return a["values"], b["values"], np.mean, a.get("scale", 1.0)


def paired_entry(a: dict, b: dict, n_boot: int = 1000, seed: int = 0) -> dict:
    """Paired difference a - b of one metric from two ``per_prompt`` entries of the same prompts.

    Raises:
        ValueError: the entries are of different kinds or lengths.
    """
    rows_a, rows_b, stat, scale = _stat_inputs(a, b)
    return M.paired_difference(rows_a, rows_b, stat=stat, n_boot=n_boot, seed=seed, scale=scale)


def _pairable(a: dict, b: dict, key: str) -> tuple[dict, dict] | None:
    """The ``per_prompt`` entries of metric ``key`` in systems ``a`` and ``b``, if they pair.

    When ``b`` is the base model, its vs-base metrics are a tie with itself. None when either
    lacks the metric, or the prompts are other or unverifiable (another eval config): never paired.
    """
    entry, other = (a.get("per_prompt") or {}).get(key), (b.get("per_prompt") or {}).get(key)
    if other is None and entry is not None and b.get("name") == "base" and "_vs_base" in key:
        other = _base_self(entry)
    if entry is None or other is None:
        return None
    digest = (a.get("prompt_sets") or {}).get(entry["set"])
    if digest is None or digest != (b.get("prompt_sets") or {}).get(other["set"]):
        return None
    if len(entry.get("values", entry.get("pref", []))) != len(other.get("values", other.get("pref", []))):
        return None
    return entry, other


# The HHH mean of issue 14: (LC win rate vs base + safety + (100 - over-refusal) + MC2) / 4, in points.
HHH = (("helpful/lc_win_rate_vs_base", 1.0), ("harmless/safety_score", 1.0),
       ("harmless/over_refusal_xstest", -1.0), ("honest/mc2", 1.0))


def metric_value(system: dict, key: str) -> float | None:
    """The value of ``"axis/metric"`` in a system's metrics (base's win rates vs itself are 50)."""
    axis, name = key.split("/", 1)
    metric = (system.get("metrics") or {}).get(axis, {}).get(name)
    if metric is None and system.get("name") == "base" and name.endswith("_vs_base"):
        return 50.0
    return None if metric is None else metric["value"]


def hhh_mean(system: dict) -> float | None:
    """A system's HHH mean in points (base's LC win rate vs itself is 50); None if a part is missing."""
    parts = [metric_value(system, key) for key, _ in HHH]
    if None in parts:
        return None
    return float(np.mean([v if sign > 0 else 100.0 - v for v, (_, sign) in zip(parts, HHH)]))


def hhh_difference(a: dict, b: dict, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict | None:
    """Paired ``hhh_mean(a) - hhh_mean(b)`` with a bootstrap interval.

    Each part is paired over its own prompt set and the four sets are resampled independently
    (they are different prompts); a replicate of the mean is the signed mean of the parts'
    replicates. None when either system lacks a part's per-prompt values or the prompts differ.
    """
    value, total, n = 0.0, np.zeros(n_boot), 0
    for k, (key, sign) in enumerate(HHH):
        pair = _pairable(a, b, key)
        if pair is None:
            return None
        rows_a, rows_b, stat, scale = _stat_inputs(*pair)
        v, reps = M.paired_replicates(rows_a, rows_b, stat=stat, n_boot=n_boot, seed=seed + k)
        n += len(rows_a)
        value += sign * v * scale / len(HHH)
        total += sign * reps * scale / len(HHH)
    low, high = np.quantile(total, [alpha / 2, 1 - alpha / 2])
    diff = {"value": value, "n": n, "ci": [float(low), float(high)]}
    return {**diff, "verdict": M.verdict(diff)}


def compare_pair(a: dict, b: dict, n_boot: int = 1000, seed: int = 0) -> dict:
    """Every metric both systems kept per prompt, as a paired difference ``a - b`` with its verdict.

    Args:
        a, b: evaluate_system results (with ``per_prompt`` and ``prompt_sets``). When ``b`` is the
            base model, its vs-base metrics are a tie with itself (win rate 50 on every prompt).

    Returns:
        {"axis/metric": {"value", "n", "ci", "verdict", "orientation"}}; metrics whose prompt sets
        differ between the two (another eval config) are left out.
    """
    out = {}
    for key in a.get("per_prompt") or {}:
        pair = _pairable(a, b, key)
        if pair is None:
            continue
        diff = paired_entry(*pair, n_boot=n_boot, seed=seed)
        out[key] = {**diff, "verdict": judge_verdict(diff, key), "orientation": orientation(key)}
    return out


def compare_systems(results: dict, focus: str = "mocae", reference: str = "base", n_boot: int | None = None,
                    seed: int | None = None) -> dict:
    """Every system minus ``reference`` and ``focus`` minus every other system, paired.

    Args:
        results: {"systems": {name: result}, "config": eval config (n_boot, seed)}.

    Returns:
        {"<a>-<b>": compare_pair(a, b)} for the pairs whose systems kept per-prompt values
        (a composed system such as the oracle has none and is left out).
    """
    cfg = results.get("config") or {}
    n_boot = n_boot if n_boot is not None else cfg.get("n_boot", 1000)
    seed = seed if seed is not None else cfg.get("seed", 0)
    systems = {n: s for n, s in results["systems"].items() if s.get("per_prompt")}
    pairs = [(n, reference) for n in systems if n != reference and reference in systems]
    pairs += [(focus, n) for n in systems if focus in systems and n not in (focus, reference)]
    return {f"{a}-{b}": compare_pair(systems[a], systems[b], n_boot, seed) for a, b in pairs}


def resolution(results: dict) -> dict:
    """What this evaluation's n can tell apart, per prompt set.

    Returns:
        {set: {"n", "binary_half_width": paired 95% half-width (points) of a 50%/50% binary
        metric between uncorrelated systems, "measured_half_width": median half-width of the
        paired intervals measured on that set (None before any comparison)}}.
    """
    ns: dict[str, int] = {}
    kinds: dict[str, tuple[str, bool]] = {}  # metric key -> (prompt set, is a percentage)
    for system in results["systems"].values():
        for key, entry in (system.get("per_prompt") or {}).items():
            n = len(entry.get("values", entry.get("pref", [])))
            ns[entry["set"]] = min(ns.get(entry["set"], n), n)
            kinds[key] = (entry["set"], bool(entry.get("lc")) or entry.get("scale") == 100.0)
    widths: dict[str, list[float]] = {}
    for pair in (results.get("comparisons") or {}).values():
        for key, diff in pair.items():
            set_name, percent = kinds.get(key, (None, False))
            if percent:
                widths.setdefault(set_name, []).append((diff["ci"][1] - diff["ci"][0]) / 2)
    return {s: {"n": n, "binary_half_width": round(M.resolvable_difference(n), 1),
                "measured_half_width": round(float(np.median(widths[s])), 1) if widths.get(s) else None}
            for s, n in sorted(ns.items())}
