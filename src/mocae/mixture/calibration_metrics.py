"""Calibration metrics for router probabilities: ECE, Brier, NLL and reliability diagrams.

ECE is torchmetrics' top-label ``MulticlassCalibrationError`` (15 equal-width bins, L1):
    ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b|
where a sample's confidence is its largest probability and it is correct when that class is
the label. Bins are [i/B, (i+1)/B) (torchmetrics uses ``bucketize(right=True)``).
"""

from __future__ import annotations

from pathlib import Path

import torch
# The Agg canvas directly, not pyplot: no global backend switch, no display, no figure leaks.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchmetrics.classification import MulticlassCalibrationError

from mocae.paths import atomic_save_figure


def _validate(probs, labels) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(probs).detach().to(torch.float64)
    y = torch.as_tensor(labels).detach()
    if p.dim() != 2 or p.shape[0] == 0 or p.shape[1] < 2:
        raise ValueError(f"probs must be a non-empty N x E tensor with E >= 2, got shape {tuple(p.shape)}")
    if y.dim() != 1 or y.shape[0] != p.shape[0] or y.is_floating_point():
        raise ValueError(f"labels must be 1-D integers with N={p.shape[0]} entries, got {y.dtype} {tuple(y.shape)}")
    y = y.to(torch.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must lie in 0..{p.shape[1] - 1}")
    if not torch.isfinite(p).all() or (p < 0).any() or not torch.allclose(p.sum(1), torch.ones(len(p), dtype=p.dtype), atol=1e-4):
        raise ValueError("probs must be finite, non-negative, with rows summing to 1 (pass probabilities, not logits)")
    return p, y


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """Top-label ECE (L1) with ``n_bins`` equal-width bins, via torchmetrics."""
    p, y = _validate(probs, labels)
    metric = MulticlassCalibrationError(num_classes=p.shape[1], n_bins=n_bins, norm="l1")
    return float(metric(p.float(), y))


def calibration_report(probs, labels, n_bins: int = 15) -> dict:
    """Accuracy, ECE, Brier score and NLL of probabilistic predictions.

    Args:
        probs: N x E probabilities (rows sum to 1).
        labels: N integer labels in 0..E-1.
        n_bins: ECE bins.
    Returns:
        {"accuracy", "ece", "brier" (mean over samples of sum_e (p_e - onehot_e)^2, in [0, 2]),
         "nll" (mean -log p_label, p clamped at 1e-12), "n"}.
    """
    p, y = _validate(probs, labels)
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)
    return {
        "accuracy": float((p.argmax(1) == y).double().mean()),
        "ece": expected_calibration_error(p, y, n_bins),
        "brier": float(((p - onehot) ** 2).sum(1).mean()),
        "nll": float(-p.gather(1, y[:, None]).clamp_min(1e-12).log().mean()),
        "n": int(len(y)),
    }


def _bins(p: torch.Tensor, y: torch.Tensor, n_bins: int):
    """Per bin: count, mean confidence, accuracy (bins as in torchmetrics; 1.0 joins the last)."""
    conf, pred = p.max(1)
    correct = (pred == y).double()
    idx = (torch.bucketize(conf, torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype), right=True) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, correct)
    safe = count.clamp_min(1)
    return count, conf_sum / safe, acc_sum / safe


def reliability_diagrams(curves: dict, path, n_bins: int = 15, title: str | None = None) -> Path:
    """Reliability diagrams side by side (e.g. {"before": (p, y), "after": (p_cal, y)}) as a PNG.

    Each column: accuracy per confidence bin (bars) against the diagonal of perfect
    calibration, the gap to the bin's mean confidence shaded, ECE in the panel title; below
    it, how many samples fall in each bin. Written atomically (temp file, then os.replace).

    Returns:
        The written path.
    """
    if not curves:
        raise ValueError("reliability_diagrams needs at least one (probs, labels) curve")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(4.2 * len(curves), 5.6), constrained_layout=True)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, len(curves), height_ratios=(3, 1))
    width = 1.0 / n_bins
    centres = ((torch.arange(n_bins, dtype=torch.float64) + 0.5) * width).numpy()
    for col, (name, (probs, labels)) in enumerate(curves.items()):
        p, y = _validate(probs, labels)
        count, conf, acc = (t.numpy() for t in _bins(p, y, n_bins))  # matplotlib wants numpy
        ece = expected_calibration_error(p, y, n_bins)
        used = count > 0
        top = fig.add_subplot(grid[0, col])
        top.bar(centres[used], acc[used], width=width, edgecolor="black", color="tab:blue", label="accuracy")
        top.bar(centres[used], (conf - acc)[used], bottom=acc[used], width=width, color="tab:red",
                alpha=0.3, hatch="//", label="gap to confidence")
        top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{name}: ECE = {ece:.3f} (n={len(y)})")
        top.legend(loc="upper left", fontsize=8)
        bottom = fig.add_subplot(grid[1, col], sharex=top)
        bottom.bar(centres, count, width=width, edgecolor="black", color="tab:gray")
        bottom.set(xlabel="confidence (max probability)", ylabel="count")
    if title:
        fig.suptitle(title)
    return atomic_save_figure(fig, path)


def reliability_diagram(probs, labels=None, path=None, n_bins: int = 15, title: str | None = None) -> Path:
    """One reliability diagram (PNG, ECE in the title); see ``reliability_diagrams``.

    ``probs`` may also be a dict {name: (probs, labels)} (then ``labels`` is None) to draw
    several, e.g. before and after calibration, side by side.
    """
    if path is None:
        raise ValueError("reliability_diagram needs an output path")
    if isinstance(probs, dict):
        if labels is not None:
            raise ValueError("pass labels inside the dict {name: (probs, labels)}, not separately")
        return reliability_diagrams(probs, path, n_bins, title)
    return reliability_diagrams({title or "reliability": (probs, labels)}, path, n_bins, None)
