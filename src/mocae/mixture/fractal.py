"""Fractal geometry of router features (AlignX's fractal calibrator, DESIGN.md section 5).

Two dimension estimates:
- a *global* box-counting dimension per axis, from all fit-split features of that axis;
- a *local* (per-instance) dimension from k-nearest-neighbour distances (Levina & Bickel 2004).
A prompt whose neighbourhood in axis e's feature cloud has a local dimension far from that
cloud's global dimension is unlikely to belong to axis e; ``calibration.FractalCalibrator``
turns that gap into a logit penalty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

DEFAULT_EPS = (0.05, 0.1, 0.2, 0.4)


def box_counting_dimension(points: torch.Tensor, eps: Sequence[float] = DEFAULT_EPS) -> float:
    """Box-counting (Minkowski) dimension of a point cloud in the unit cube.

    N(eps) is the number of distinct boxes of side eps (cells ``floor(points / eps)``) holding
    at least one point; the dimension is the least-squares slope of log N(eps) against
    log(1/eps). Points are assumed in [0, 1]^d (min-max scale them first); anything outside
    is clamped, and a point exactly on the upper face joins the last box rather than opening
    a new one.

    With the coarse default scales the estimate needs enough points to fill the finest boxes:
    a d-dimensional set needs well over (1/0.05)^d points, so it is reliable for d <= 2 with
    thousands of points and saturates (under-estimates) for higher-dimensional clouds. It is
    used as a per-axis *signature*, not as an exact dimension.

    Args:
        points: N x d tensor, N >= 1.
        eps: at least two distinct box sides in (0, 1].
    Returns:
        The estimated dimension (0 for a single point).
    """
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"points must be a non-empty N x d tensor, got shape {tuple(points.shape)}")
    scales = sorted({float(e) for e in eps})
    if len(scales) < 2 or scales[0] <= 0 or scales[-1] > 1:
        raise ValueError(f"eps needs at least two distinct values in (0, 1], got {tuple(eps)}")
    pts = points.detach().to(torch.float64).clamp(0.0, 1.0)
    log_inv_eps, log_counts = [], []
    for e in scales:
        last_box = math.ceil(1.0 / e) - 1
        cells = torch.floor(pts / e).clamp(max=last_box).to(torch.int64)
        log_counts.append(math.log(torch.unique(cells, dim=0).shape[0]))
        log_inv_eps.append(math.log(1.0 / e))
    x = torch.tensor(log_inv_eps, dtype=torch.float64)
    y = torch.tensor(log_counts, dtype=torch.float64)
    x_c = x - x.mean()
    return float((x_c * (y - y.mean())).sum() / (x_c * x_c).sum())


def random_projection(d_in: int, k: int = 8, seed: int = 0) -> torch.Tensor:
    """A fixed Gaussian projection matrix (d_in x k, entries N(0, 1/k)); use as ``x @ P``.

    Seeded with its own generator, so the same (d_in, k, seed) always gives the same matrix
    and a calibrator can be rebuilt from those three numbers instead of storing the matrix.
    """
    if d_in < 1 or k < 1:
        raise ValueError(f"random_projection needs d_in >= 1 and k >= 1, got d_in={d_in}, k={k}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(d_in, k, generator=gen, dtype=torch.float64) / math.sqrt(k)


def local_dimension_mle(
    query: torch.Tensor, reference: torch.Tensor, k: int = 10, exclude_self: bool = False
) -> torch.Tensor:
    """Levina-Bickel maximum-likelihood local dimension of ``reference`` around each query.

    With r_1 <= ... <= r_k the distances from x to its k nearest reference points,
        D_hat(x) = ( (1 / (k - 1)) * sum_{j=1}^{k-1} log(r_k / r_j) )^-1.
    Far from the reference cloud all r_j are nearly equal, the logs go to 0 and D_hat grows:
    a large local dimension therefore also signals "x is not near this cloud".

    Distances are floored at 1e-10 and the mean log at 1e-12, so duplicates give a small but
    finite D_hat rather than 0 / inf. k is reduced to the number of available neighbours.

    Args:
        query: N x d points.
        reference: M x d points.
        k: neighbours, >= 2.
        exclude_self: query *is* reference (same rows); skip each point's zero distance to
            itself (leave-one-out), as needed when scoring the fit split.
    Returns:
        N local dimensions (float64).
    """
    if query.dim() != 2 or reference.dim() != 2 or query.shape[1] != reference.shape[1]:
        raise ValueError(
            f"query and reference must be 2-D with equal widths, got {tuple(query.shape)} and {tuple(reference.shape)}"
        )
    if exclude_self and query.shape != reference.shape:
        raise ValueError("exclude_self=True needs query to be the reference points themselves")
    available = reference.shape[0] - (1 if exclude_self else 0)
    k = min(k, available)
    if k < 2:
        raise ValueError(f"local_dimension_mle needs at least 2 neighbours, the reference has {available}")
    dist = torch.cdist(query.to(torch.float64), reference.to(torch.float64))
    if exclude_self:
        dist.fill_diagonal_(float("inf"))
    r = dist.topk(k, dim=1, largest=False).values.clamp_min(1e-10)  # ascending r_1..r_k
    mean_log = torch.log(r[:, -1:] / r[:, :-1]).mean(dim=1).clamp_min(1e-12)
    return 1.0 / mean_log
