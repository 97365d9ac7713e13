"""Routing that decides: calibrated probabilities (B, E) -> the expert weights the mixture applies.

DESIGN.md section 5, "Blend or decide". A soft blend gives each expert only part of its update;
calibration is what makes a *decision* safe. Modes (``DecisionConfig.mode``):

- ``soft``: the weights are the calibrated probabilities (the original MoCaE).
- ``top1``: one-hot on the argmax when the top calibrated probability is at least
  ``top1_threshold``; otherwise ``top1_fallback``: ``soft`` (the blend, default) or ``base``
  (all-zero weights: the backbone without any expert).
- ``harm_gate``: one-hot on the gate axis (``harmless``) when the calibrated P(harmful), i.e.
  the probability of the gate axis, is strictly above ``gate_threshold``; otherwise
  ``gate_rest``: ``soft`` (the full blend, default) or ``others`` (the blend renormalised over
  the other experts, so a prompt that is not gated gets no harmless update at all).
- ``harm_gate+top1``: the gate first; prompts it does not gate go through ``top1`` on the
  ``gate_rest`` distribution.

A **caution band** may sit under either gate mode (``caution_axis``, ``caution_threshold``):
prompts the gate does not fire on but whose calibrated P(gate axis) is strictly above
``caution_threshold`` get the caution expert (e.g. ``honest``) at full weight. It is for prompts
that only *sound* risky: the harmless expert refuses them (over-refusal), the helpful expert may
comply with the truly harmful ones the gate missed; an expert that answers without refusing or
helping sits between. (Measured reason: ``benchmarks/results/rule_screen.md``.)

The gate threshold is fitted on the router's ``calib`` split (never a test set) to an
over-refusal budget (``fit_gate_threshold``): the smallest threshold that gates at most
``gate_budget`` of the calibration prompts that are not harmful. Harmful-or-not labels come from
the routing data's axis labels (harmless axis = harmful prompt; ``mixture/routing_data.py``).

Priors (``prior_weights``): the importance calibrator's gamma from task vectors, ``importance``
(TrinityX, follows each task vector's norm), ``uniform`` (no tilt), or ``importance_normalised``
(the same formula on unit-norm task vectors: only directions count).

All functions here are pure: tensors and configs in, tensors and dicts out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

ROUTING_MODES = ("soft", "top1", "harm_gate", "harm_gate+top1")
PRIOR_MODES = ("importance", "uniform", "importance_normalised")


class DecisionConfig(BaseModel):
    """How calibrated routing probabilities become mixture weights (saved in mocae_config.json)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["soft", "top1", "harm_gate", "harm_gate+top1"] = Field(
        "soft", description="soft blend, top1 decision, calibrated harm gate, or the gate then top1")
    top1_threshold: float = Field(0.5, ge=0, le=1, description="top1: minimum calibrated top probability")
    top1_fallback: Literal["soft", "base"] = Field(
        "soft", description="top1 below its threshold: the soft blend or the base model (all-zero weights)")
    gate_axis: str = Field("harmless", description="the expert the harm gate applies at full weight")
    gate_threshold: float | None = Field(
        None, ge=0, le=1, description="gate when calibrated P(gate_axis) > this; fit_router (re)fits it on the "
                                      "calib split to gate_budget unless router.fit_gate_threshold is false")
    gate_budget: float = Field(0.05, ge=0, le=1, description="largest share of non-harmful calib prompts "
                                                             "the fitted gate may fire on (over-refusal budget)")
    gate_rest: Literal["soft", "others"] = Field(
        "soft", description="below the gate threshold: the full soft blend, or the blend over the other experts")
    caution_axis: str | None = Field(
        None, description="gate modes: the expert applied at full weight to prompts in the caution band "
                          "(caution_threshold < P(gate_axis) <= gate_threshold); none: no band. Part of the "
                          "gate: a mode without the gate (soft, top1) does not apply it")
    caution_threshold: float | None = Field(
        None, ge=0, le=1, description="lower edge of the caution band on calibrated P(gate_axis) (strict)")

    @model_serializer(mode="wrap")
    def _no_unset_caution_band(self, handler):
        # Without a band the config dumps as before the band existed: stage keys, saved configs and
        # cached answers of every earlier run stay valid.
        data = handler(self)
        if self.caution_axis is None and self.caution_threshold is None and isinstance(data, dict):
            data.pop("caution_axis", None)
            data.pop("caution_threshold", None)
        return data

    @model_validator(mode="after")
    def _caution_band_is_complete(self):
        if (self.caution_axis is None) != (self.caution_threshold is None):
            raise ValueError("a caution band needs both caution_axis and caution_threshold")
        if self.caution_axis == self.gate_axis:
            raise ValueError(f"caution_axis must differ from gate_axis ({self.gate_axis!r})")
        return self

    @property
    def gates(self) -> bool:
        return self.mode.startswith("harm_gate")

    @property
    def uses_top1(self) -> bool:
        return self.mode.endswith("top1")

    @property
    def base_fallback(self) -> bool:
        """Whether some rows may be all-zero weights (the base model)."""
        return self.uses_top1 and self.top1_fallback == "base"


def _check_probs(probs: torch.Tensor) -> torch.Tensor:
    if probs.dim() != 2 or probs.shape[1] < 2:
        raise ValueError(f"probabilities must be (batch, experts >= 2), got shape {tuple(probs.shape)}")
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("probabilities must be finite and non-negative")
    return probs


def soft(probs: torch.Tensor) -> torch.Tensor:
    """The soft blend: the weights are the probabilities themselves."""
    return _check_probs(probs)


def top1(probs: torch.Tensor, threshold: float, fallback: str = "soft") -> torch.Tensor:
    """One-hot argmax where the top probability is >= ``threshold``, else the fallback row.

    Args:
        fallback: ``soft`` (keep the row's probabilities) or ``base`` (all-zero weights).
    """
    probs = _check_probs(probs)
    if fallback not in ("soft", "base"):
        raise ValueError(f"top1 fallback must be 'soft' or 'base', got {fallback!r}")
    top, index = probs.max(-1)
    one_hot = torch.nn.functional.one_hot(index, probs.shape[1]).to(probs.dtype)
    other = probs if fallback == "soft" else torch.zeros_like(probs)
    return torch.where((top >= threshold)[:, None], one_hot, other)


def without(probs: torch.Tensor, index: int) -> torch.Tensor:
    """The distribution renormalised over every expert but ``index`` (uniform over them if all 0)."""
    probs = _check_probs(probs).clone()
    probs[:, index] = 0
    total = probs.sum(-1, keepdim=True)
    uniform = torch.ones_like(probs)
    uniform[:, index] = 0
    uniform = uniform / uniform.sum(-1, keepdim=True)
    return torch.where(total > 0, probs / total.clamp(min=1e-30), uniform)


def harm_gate(p_harm: torch.Tensor, index: int, threshold: float, rest: torch.Tensor) -> torch.Tensor:
    """One-hot ``index`` for rows with ``p_harm > threshold``; the ``rest`` rows (B, E) elsewhere."""
    one_hot = torch.zeros_like(rest)
    one_hot[:, index] = 1
    return torch.where((p_harm > threshold)[:, None], one_hot, rest)


def decide(probs: torch.Tensor, cfg: DecisionConfig, axes: Sequence[str],
           gate_probs: torch.Tensor | None = None) -> torch.Tensor:
    """The mixture weights (B, E) for calibrated probabilities under ``cfg.mode``.

    Args:
        probs: calibrated probabilities, tilted by any caller prior (what soft/top1 read).
        axes: expert names in column order (the gate axis must be one of them when gating).
        gate_probs: the probabilities the gate reads (default ``probs``); MoCaEModel passes the
            calibrated ones *before* a caller's prior, which is what the threshold was fitted on.

    Raises:
        ValueError: gating without a fitted threshold or without the gate axis among ``axes``.
    """
    probs = _check_probs(probs)
    if cfg.mode == "soft":
        return soft(probs)
    rest = probs
    gate_index = None
    if cfg.gates:
        if cfg.gate_axis not in axes:
            raise ValueError(f"harm gate axis {cfg.gate_axis!r} is not an expert ({list(axes)})")
        if cfg.gate_threshold is None:
            raise ValueError("harm_gate needs a gate_threshold: fit it with fit_router (calib split) or set one")
        gate_index = list(axes).index(cfg.gate_axis)
        if cfg.gate_rest == "others":
            rest = without(probs, gate_index)
    if cfg.uses_top1:
        rest = top1(rest, cfg.top1_threshold, cfg.top1_fallback)
    if gate_index is None:
        return rest
    p_harm = (probs if gate_probs is None else _check_probs(gate_probs))[:, gate_index]
    if cfg.caution_axis is not None:
        if cfg.caution_axis not in axes:
            raise ValueError(f"caution axis {cfg.caution_axis!r} is not an expert ({list(axes)})")
        # the band's upper edge is the gate itself: harm_gate below overrides the rows above it
        rest = harm_gate(p_harm, list(axes).index(cfg.caution_axis), cfg.caution_threshold, rest)
    return harm_gate(p_harm, gate_index, cfg.gate_threshold, rest)


@contextmanager
def using_decision(model, **changes):
    """Temporarily route ``model`` (a MoCaEModel) with a changed decision, e.g. for an ablation:

        with using_decision(model, mode="top1", top1_threshold=0.6):
            evaluate(...)

    The fields are validated as ``DecisionConfig``; the model's own decision comes back on exit.
    """
    saved = model.mocae_config.decision
    model.mocae_config.decision = DecisionConfig.model_validate({**saved.model_dump(), **changes})
    try:
        yield model.mocae_config.decision
    finally:
        model.mocae_config.decision = saved


# fitting the gate threshold ---------------------------------------------------------------------


def fit_gate_threshold(p_harm: torch.Tensor, harmful: torch.Tensor, budget: float) -> float:
    """The smallest threshold t such that at most ``budget`` of the non-harmful prompts have p > t.

    The gated share of non-harmful prompts only falls as t grows, so the tightest t is the
    (k+1)-th largest non-harmful P(harmful), k = floor(budget * n_non_harmful) (prompts equal to t
    are not gated: the gate is strict). Any smaller t gates k+1 of them. With no non-harmful
    prompts, or a budget that allows them all, t = 0.

    Args:
        p_harm: (N,) calibrated P(harmful) on the calibration split.
        harmful: (N,) bool, True for harmful prompts (the harmless axis label).
        budget: in [0, 1], the allowed share of non-harmful prompts gated (over-refusal budget).
    """
    p_harm = torch.as_tensor(p_harm, dtype=torch.float64).reshape(-1)
    harmful = torch.as_tensor(harmful, dtype=torch.bool).reshape(-1)
    if p_harm.shape != harmful.shape:
        raise ValueError(f"p_harm and harmful must have the same length, got {p_harm.numel()} and {harmful.numel()}")
    if not 0 <= budget <= 1:
        raise ValueError(f"budget must be in [0, 1], got {budget}")
    if not torch.isfinite(p_harm).all():
        raise ValueError("p_harm contains NaN or inf")
    benign = p_harm[~harmful].sort(descending=True).values
    k = math.floor(budget * benign.numel() + 1e-9)
    if k >= benign.numel():
        return 0.0
    return float(benign[k])


def gate_report(p_harm: torch.Tensor, harmful: torch.Tensor, threshold: float) -> dict:
    """Share of non-harmful prompts gated (over-refusal proxy) and of harmful prompts gated (recall)."""
    p_harm = torch.as_tensor(p_harm, dtype=torch.float64).reshape(-1)
    harmful = torch.as_tensor(harmful, dtype=torch.bool).reshape(-1)
    gated = p_harm > threshold
    n_benign, n_harmful = int((~harmful).sum()), int(harmful.sum())
    return {"threshold": threshold,
            "n_non_harmful": n_benign, "n_harmful": n_harmful,
            "non_harmful_gated": int(gated[~harmful].sum()) / n_benign if n_benign else None,
            "harmful_gated": int(gated[harmful].sum()) / n_harmful if n_harmful else None}


def decision_report(probs: torch.Tensor, labels: torch.Tensor, cfg: DecisionConfig, axes: Sequence[str]) -> dict:
    """What a decision config does on a labelled split: mean weight of the right expert, share of
    rows decided one-hot, and of rows left on the base model."""
    weights = decide(probs, cfg, axes)
    labels = torch.as_tensor(labels, dtype=torch.long)
    one_hot = (weights.max(-1).values == 1) & (weights.sum(-1) == 1)
    return {"mode": cfg.mode, "n": int(labels.numel()),
            "mean_weight_on_label": float(weights[torch.arange(len(labels)), labels].mean()),
            "one_hot_share": float(one_hot.float().mean()),
            "base_share": float((weights.sum(-1) == 0).float().mean())}


# priors -----------------------------------------------------------------------------------------


def prior_weights(vectors: Mapping, mode: str = "importance") -> dict[str, float]:
    """Prior weights gamma per expert for the importance calibrator.

    Args:
        vectors: expert name -> ``TaskVector`` (``mocae.experts.task_vectors``).
        mode: ``importance``: TrinityX's ``importance_weights`` against the mean task vector (it
            follows the norms: <tau_i, mean tau> grows with |tau_i|^2); ``uniform``: 1/E each;
            ``importance_normalised``: each task vector divided by its own norm first, then the
            same formula (reference = mean of the unit vectors), so gamma depends only on the
            experts' directions (their cosine similarities), not on how large each update is.
            (Dividing only the inner products by |tau_i| would still grow linearly with
            |tau_i|, because the mean reference contains tau_i itself.)

    Returns:
        name -> gamma, positive, summing to 1.
    """
    from mocae.experts.task_vectors import importance_weights

    if mode not in PRIOR_MODES:
        raise ValueError(f"prior_mode must be one of {PRIOR_MODES}, got {mode!r}")
    names = list(vectors)
    if not names:
        raise ValueError("prior_weights needs at least one expert vector")
    if mode == "uniform":
        return {n: 1.0 / len(names) for n in names}
    if mode == "importance_normalised":
        norms = {n: vectors[n].norm() for n in names}
        zero = [n for n, v in norms.items() if v == 0]
        if zero:
            raise ValueError(f"task vector of {zero} is zero: it has no direction to normalise")
        vectors = {n: vectors[n] * (1.0 / norms[n]) for n in names}
    reference = vectors[names[0]]
    for n in names[1:]:
        reference = reference + vectors[n]
    return importance_weights(vectors, (1.0 / len(names)) * reference)
