"""Held-out metrics of the judges: ROC AUC, pairwise agreement, the longer-answer-wins baseline."""

from __future__ import annotations

import numpy as np


def auc(labels, scores) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (ties count half: the Mann-Whitney statistic).

    Raises:
        ValueError: only one class present (AUC is undefined).
    """
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUC needs both classes among the labels")
    # Average ranks handle ties exactly as the pairwise definition does.
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def agreement(p_b_better, b_better) -> float:
    """Share of pairs where the judge picks the labelled winner; p = 0.5 exactly counts half."""
    p = np.asarray(p_b_better, dtype=np.float64)
    y = np.asarray(b_better, dtype=bool)
    if len(p) == 0:
        raise ValueError("agreement over no pairs")
    hit = np.where(p == 0.5, 0.5, (p > 0.5) == y)
    return float(hit.mean())


def length_preference(outputs_a: list[str], outputs_b: list[str]) -> np.ndarray:
    """The "longer answer wins" baseline as P(b better): 1, 0, or 0.5 for equal length (characters)."""
    la = np.array([len(a) for a in outputs_a], dtype=np.float64)
    lb = np.array([len(b) for b in outputs_b], dtype=np.float64)
    return np.where(lb > la, 1.0, np.where(lb < la, 0.0, 0.5))


def length_ratio(outputs_a: list[str], outputs_b: list[str]) -> np.ndarray:
    """longer / shorter length in characters (an empty output counts as length 1)."""
    la = np.array([max(len(a), 1) for a in outputs_a], dtype=np.float64)
    lb = np.array([max(len(b), 1) for b in outputs_b], dtype=np.float64)
    return np.maximum(la, lb) / np.minimum(la, lb)
