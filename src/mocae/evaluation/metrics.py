"""Evaluation metrics as pure functions: each returns ``{"value", "n", "ci": [low, high]}``.

Percentages are on a 0-100 scale. Confidence intervals are 95% percentile bootstraps over
prompts (resampling the evaluated prompts with replacement), so they say how much a number
would move on another draw of prompts of the same kind, not how noisy the judge is.

The length-controlled win rate follows AlpacaEval 2 (Dubois et al. 2024, "Length-Controlled
AlpacaEval", arXiv 2404.04475; ``alpaca_eval/metrics/glm_winrate.py`` in alpaca_eval 0.6.6).
``alpaca_eval`` itself is not used: its GLM downloads ``df_gamed.csv`` and
``instruction_difficulty.csv`` from the Hub at run time and it imports ``pkg_resources``
(setuptools < 81), so it cannot run offline here. We fit its ``length_controlled_minimal``
formula (the full ``v1`` formula adds a per-instruction difficulty estimated from the public
leaderboard, which we do not have): a logistic GLM of the preference on
``tanh(delta_len / std(delta_len))`` plus an intercept, and report the predicted win rate at
zero length difference, ``sigmoid(intercept)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def _as_array(values, name: str) -> np.ndarray:
    """Float array of ``values``; raises on empty or non-finite input (a rate over nothing is not 0)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0 or arr.shape[0] == 0:
        raise ValueError(f"{name}: empty input (no prompts were scored)")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: values must be finite numbers")
    return arr


def _probabilities(values, name: str) -> np.ndarray:
    arr = _as_array(values, name)
    if arr.ndim != 1 or (arr < 0).any() or (arr > 1).any():
        raise ValueError(f"{name}: expected a flat list of probabilities in [0, 1]")
    return arr


def bootstrap_ci(values, stat: Callable = np.mean, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over the rows of ``values``.

    Args:
        values: N values, or an N x k array whose rows are resampled together (e.g. paired data).
        stat: function of a resampled array returning a number (default: the mean).
        n_boot: bootstrap resamples.
        seed: RNG seed (intervals are reproducible).
        alpha: 1 - coverage (0.05 gives a 95% interval).

    Returns:
        (low, high).
    """
    arr = _as_array(values, "bootstrap_ci")
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError("bootstrap_ci needs n_boot >= 1 and 0 < alpha < 1")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.shape[0], size=(n_boot, arr.shape[0]))
    if stat is np.mean and arr.ndim == 1:
        stats = arr[idx].mean(axis=1)  # vectorised fast path for the common case
    else:
        stats = np.array([float(stat(arr[i])) for i in idx])
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def mean_metric(values, scale: float = 1.0, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean of per-prompt ``values`` times ``scale``, with its bootstrap interval."""
    arr = _as_array(values, "mean_metric")
    low, high = bootstrap_ci(arr, n_boot=n_boot, seed=seed)
    return {"value": float(arr.mean()) * scale, "n": int(arr.shape[0]), "ci": [low * scale, high * scale]}


def hard_preferences(p, draw_margin: float = 0.0) -> list[float]:
    """Turn P(model better) into hard AlpacaEval outcomes: 1 win, 0 loss, 0.5 draw.

    A probability within ``draw_margin`` of 0.5 (inclusive) is a draw.
    """
    arr = _probabilities(p, "hard_preferences")
    return [1.0 if x > 0.5 + draw_margin else 0.0 if x < 0.5 - draw_margin else 0.5 for x in arr]


def win_rate(prefs: Sequence[float], n_boot: int = 1000, seed: int = 0) -> dict:
    """Win rate (%) from per-prompt preferences.

    Args:
        prefs: P(model better) in [0, 1] (AlpacaEval 2's weighted win rate) or hard 0 / 0.5 / 1
            outcomes (AlpacaEval 1; draws count half).
    """
    return mean_metric(_probabilities(prefs, "win_rate"), scale=100.0, n_boot=n_boot, seed=seed)


def _fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3, iters: int = 50) -> np.ndarray:
    """Newton's method for a logistic regression with soft labels y and design [1, x].

    A small ridge keeps the fit finite when preferences are perfectly separated by length
    (AlpacaEval's sklearn fit uses an L1 penalty chosen by cross-validation instead).

    Returns:
        coefficients (intercept, slope).
    """
    design = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(design @ w)))
        grad = design.T @ (p - y) + ridge * w
        hess = (design * (p * (1 - p))[:, None]).T @ design + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def _lc_from_rows(rows: np.ndarray) -> float:
    """LC win rate (0-1) from rows (preference, length delta)."""
    prefs, delta = rows[:, 0], rows[:, 1]
    std = delta.std(ddof=1) if len(delta) > 1 else 0.0
    if std == 0:  # no length variation: nothing to control for (AlpacaEval would divide by 0)
        return float(prefs.mean())
    intercept, _ = _fit_logistic(np.tanh(delta / std), prefs)
    return float(1.0 / (1.0 + np.exp(-intercept)))


def length_controlled_win_rate(prefs: Sequence[float], model_lengths: Sequence[float],
                               reference_lengths: Sequence[float], n_boot: int = 1000, seed: int = 0) -> dict:
    """AlpacaEval 2's length-controlled win rate (%): the win rate predicted at equal lengths.

    Args:
        prefs: P(model better) (or hard 0 / 0.5 / 1) per prompt.
        model_lengths, reference_lengths: output lengths in characters (AlpacaEval uses ``str.len``).
        n_boot, seed: bootstrap settings (the GLM is refitted on every resample).

    Returns:
        {"value", "n", "ci", "raw": raw win rate, "length_coef": GLM slope on tanh(std delta)}.
    """
    p = _probabilities(prefs, "length_controlled_win_rate")
    if not len(model_lengths) == len(reference_lengths) == len(p):
        raise ValueError(f"length_controlled_win_rate: {len(p)} preferences but {len(model_lengths)} model and "
                         f"{len(reference_lengths)} reference lengths")
    delta = _as_array(model_lengths, "model_lengths") - _as_array(reference_lengths, "reference_lengths")
    rows = np.stack([p, delta], axis=1)
    std = delta.std(ddof=1) if len(delta) > 1 else 0.0
    slope = float(_fit_logistic(np.tanh(delta / std), p)[1]) if std > 0 else 0.0
    low, high = bootstrap_ci(rows, stat=_lc_from_rows, n_boot=n_boot, seed=seed)
    return {"value": 100.0 * _lc_from_rows(rows), "n": len(p), "ci": [100.0 * low, 100.0 * high],
            "raw": 100.0 * float(p.mean()), "length_coef": slope}


def lc_rows(prefs: Sequence[float], model_lengths: Sequence[float], other_lengths: Sequence[float]) -> np.ndarray:
    """Per-prompt rows (preference, model length, other length) for :func:`lc_stat` / :func:`paired_difference`."""
    p = _probabilities(prefs, "lc_rows")
    if not len(model_lengths) == len(other_lengths) == len(p):
        raise ValueError(f"lc_rows: {len(p)} preferences but {len(model_lengths)} model and "
                         f"{len(other_lengths)} other lengths")
    return np.stack([p, _as_array(model_lengths, "model_lengths"), _as_array(other_lengths, "other_lengths")], 1)


def lc_stat(rows: np.ndarray) -> float:
    """LC win rate (0-1) of :func:`lc_rows` rows: the GLM is fitted on exactly these rows."""
    return _lc_from_rows(np.stack([rows[:, 0], rows[:, 1] - rows[:, 2]], axis=1))


def paired_difference(a_values, b_values, stat: Callable = np.mean, n_boot: int = 1000, seed: int = 0,
                      scale: float = 1.0, alpha: float = 0.05) -> dict:
    """``stat(a) - stat(b)`` over the same prompts, with a paired percentile bootstrap interval.

    Each resample draws prompt indices once and applies them to both sides, so what the two
    systems share (a hard prompt is hard for both) cancels out of the interval.

    Args:
        a_values, b_values: per-prompt values of the same N prompts in the same order (N values,
            or N x k rows, e.g. :func:`lc_rows` with ``stat=lc_stat``).
        stat: statistic of one side's resampled rows (default: the mean); refitted per resample.
        n_boot, seed, alpha: bootstrap settings (95% interval by default).
        scale: multiplies value and interval (100 for percentages).

    Returns:
        {"value", "n", "ci": [low, high]}.

    Raises:
        ValueError: the two sides have different lengths, or are empty or non-finite.
    """
    if not 0 < alpha < 1:
        raise ValueError("paired_difference needs 0 < alpha < 1")
    value, diffs = paired_replicates(a_values, b_values, stat, n_boot, seed)
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    return {"value": value * scale, "n": len(a_values), "ci": [float(low) * scale, float(high) * scale]}


def paired_replicates(a_values, b_values, stat: Callable = np.mean, n_boot: int = 1000,
                      seed: int = 0) -> tuple[float, np.ndarray]:
    """``stat(a) - stat(b)`` and its ``n_boot`` paired bootstrap replicates (unscaled).

    What :func:`paired_difference` takes its interval from; a sum of differences over prompt sets
    that are resampled independently (e.g. an HHH mean) adds these replicates set by set.
    """
    a, b = _as_array(a_values, "paired_difference (a)"), _as_array(b_values, "paired_difference (b)")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired_difference: {a.shape[0]} values on one side and {b.shape[0]} on the other "
                         "(a paired comparison needs the same prompts on both sides)")
    if n_boot < 1:
        raise ValueError("paired_difference needs n_boot >= 1")
    idx = np.random.default_rng(seed).integers(0, a.shape[0], size=(n_boot, a.shape[0]))
    if stat is np.mean and a.ndim == 1 and b.ndim == 1:
        diffs = (a - b)[idx].mean(axis=1)
    else:
        diffs = np.array([float(stat(a[i])) - float(stat(b[i])) for i in idx])
    return float(stat(a)) - float(stat(b)), diffs


def verdict(diff: dict, lower_is_better: bool = False) -> str:
    """"better" or "worse" only when the 95% interval of a difference (a - b) excludes zero.

    Args:
        diff: a :func:`paired_difference` result.
        lower_is_better: the metric improves downwards (over-refusal, NLL).

    Returns:
        "better", "worse" or "within noise".
    """
    low, high = diff["ci"]
    if low <= 0 <= high:
        return "within noise"
    up = low > 0
    return "better" if up != lower_is_better else "worse"


def resolvable_difference(n: int, p: float = 0.5, z: float = 1.96) -> float:
    """Half-width (percentage points) of a paired 95% interval of a binary metric at rate ``p`` on
    ``n`` prompts when the two systems' outcomes are uncorrelated: smaller differences cannot be
    told from noise at this n (correlated systems resolve somewhat smaller ones)."""
    if n < 1 or not 0 <= p <= 1:
        raise ValueError(f"resolvable_difference needs n >= 1 and 0 <= p <= 1, got n={n}, p={p}")
    return 100.0 * z * float(np.sqrt(2 * p * (1 - p) / n))


def safety_score(judge_probs_safe: Sequence[float], threshold: float = 0.5, n_boot: int = 1000,
                 seed: int = 0) -> dict:
    """% of harmful prompts answered safely (P(safe) >= ``threshold``; booleans work too)."""
    p = _probabilities(judge_probs_safe, "safety_score")
    return mean_metric((p >= threshold).astype(float), scale=100.0, n_boot=n_boot, seed=seed)


def over_refusal(refused: Sequence[bool], n_boot: int = 1000, seed: int = 0) -> dict:
    """% of safe prompts (XSTest safe) that were refused: lower is better."""
    return mean_metric(_probabilities(refused, "over_refusal"), scale=100.0, n_boot=n_boot, seed=seed)


def per_category(values: Sequence[float], categories: Sequence[str]) -> dict[str, tuple[float, int]]:
    """{category: (mean of its values, count)}, categories sorted by name."""
    arr = _as_array(values, "per_category")
    if len(categories) != len(arr):
        raise ValueError(f"per_category: {len(arr)} values but {len(categories)} categories")
    table: dict[str, list[float]] = {}
    for value, category in zip(arr, categories):
        table.setdefault(str(category), []).append(float(value))
    return {c: (float(np.mean(v)), len(v)) for c, v in sorted(table.items())}


def truthful_informative(p_true: Sequence[float], p_info: Sequence[float], threshold: float = 0.5,
                         n_boot: int = 1000, seed: int = 0) -> dict:
    """TruthfulQA's judged generation metrics: % true, % informative and % both (TI).

    Returns:
        {"true": metric, "informative": metric, "ti": metric}.
    """
    t = _probabilities(p_true, "truthful_informative (p_true)") >= threshold
    i = _probabilities(p_info, "truthful_informative (p_info)") >= threshold
    if len(t) != len(i):
        raise ValueError(f"truthful_informative: {len(t)} truth scores but {len(i)} informativeness scores")
    kw = dict(scale=100.0, n_boot=n_boot, seed=seed)
    return {"true": mean_metric(t.astype(float), **kw), "informative": mean_metric(i.astype(float), **kw),
            "ti": mean_metric((t & i).astype(float), **kw)}


def router_calibration(probs, labels, n_boot: int = 1000, seed: int = 0) -> dict:
    """Router accuracy, ECE (15 bins), Brier and NLL, each a metric with a bootstrap interval.

    Args:
        probs: N x E routing probabilities (rows sum to 1).
        labels: N integer expert labels (the right expert for each prompt's benchmark).

    Returns:
        {"accuracy", "ece", "brier", "nll"}: values as ``calibration_report`` computes them.
    """
    from mocae.mixture.calibration_metrics import calibration_report, expected_calibration_error

    probs, labels = _as_array(probs, "router_calibration"), np.asarray(labels, dtype=np.int64)
    report = calibration_report(probs, labels)
    onehot = np.eye(probs.shape[1])[labels]
    per_sample = {"accuracy": (probs.argmax(1) == labels).astype(float), "brier": ((probs - onehot) ** 2).sum(1),
                  "nll": -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))}
    out = {k: {"value": report[k], "n": len(labels), "ci": list(bootstrap_ci(v, n_boot=n_boot, seed=seed))}
           for k, v in per_sample.items()}
    rows = np.concatenate([probs, labels[:, None]], axis=1)
    # torchmetrics per resample is slow-ish: at most 200 resamples for the ECE interval.
    ece_ci = bootstrap_ci(rows, stat=lambda r: expected_calibration_error(r[:, :-1], r[:, -1].astype(np.int64)),
                          n_boot=min(n_boot, 200), seed=seed)
    out["ece"] = {"value": report["ece"], "n": len(labels), "ci": list(ece_ci)}
    return out
