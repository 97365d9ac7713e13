"""Fit the sequence router (gating cross-entropy) and its calibrators; report calibration.

1. Features: the base model's pooled hidden state at the router's layer for every routing
   prompt (chat-formatted, as at inference), cached per backbone, layer and prompt set.
2. Router: standardisation + unit-norm centroid initialisation, then full-batch AdamW on the
   cross-entropy of the axis labels (H3Fusion's gating loss, done right: per-sample labels,
   mean over samples), optionally with an entropy bonus/penalty and KL to uniform (TrinityX).
3. Calibrators: each fitted on the ``calib`` split (never seen by the router), reported with
   accuracy, ECE (15 bins), Brier and NLL on the in-distribution ``test`` and the ``shifted``
   split, next to the uncalibrated router. The importance calibrator's prior follows
   ``prior_mode`` (``mocae.mixture.decide.prior_weights``).
4. Decision (``fit_decision``): the harm gate's threshold fitted on the ``calib`` split to the
   model's over-refusal budget, and what each routing mode does there (``mocae.mixture.decide``).

Optionally, between 2 and 3, ``train_router_lm``: the LM loss of completions through the mixture.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from mocae import AXES

# The calib side's risky benign prompts (the gate's hard negatives, the ablation's over-refusal set)
# are the Alpaca rows nearest the calib harmful prompts, at most this many; the router's own hard
# negatives skip all of them so what calibrates and measures over-refusal never trained the router.
CALIB_RISKY_RESERVE = 500


class RouterFitConfig(BaseModel):
    """Router training and calibration settings."""

    model_config = ConfigDict(extra="forbid")
    n_per_axis: int = Field(400, gt=1, description="train+calib prompts per axis")
    calib_fraction: float = Field(0.3, gt=0, lt=1, description="share held out to fit calibrators")
    n_test_per_axis: int = Field(120, gt=0, description="prompts per axis in test and shifted splits")
    epochs: int = Field(300, gt=0, description="full-batch optimiser steps")
    learning_rate: float = Field(1e-2, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    entropy_weight: float = Field(0.0, description="+ weight * mean routing entropy (TrinityX uses 0.1)")
    kl_uniform_weight: float = Field(0.0, ge=0, description="+ weight * KL(p || uniform)")
    lm_loss_weight: float = Field(0.0, ge=0, description="> 0 adds the LM loss through the mixture "
                                  "on held-out prompt/completion pairs of every axis")
    lm_steps: int = Field(100, gt=0, description="router steps with the LM loss (batch of lm_batch_size)")
    lm_batch_size: int = Field(4, gt=0)
    lm_examples_per_axis: int = Field(64, gt=0, description="completions per expert source (never eval-side)")
    lm_learning_rate: float | None = Field(None, gt=0, description="LM-loss steps' lr (None: learning_rate / 10)")
    lm_max_length: int = Field(256, gt=0, description="tokens per prompt + completion row")
    prior_mode: Literal["importance", "uniform", "importance_normalised"] = Field(
        "importance", description="gamma of the importance calibrator: TrinityX's (follows task-vector norms), "
                                  "uniform, or importance on unit-norm task vectors (mocae.mixture.decide)")
    fit_gate_threshold: bool = Field(True, description="fit the harm gate threshold on the calib split to the "
                                                       "model's decision.gate_budget (False: keep the model's)")
    gate_hard_negatives: int = Field(0, ge=0, le=CALIB_RISKY_RESERVE,
                                     description="extra non-harmful prompts that sound risky (Alpaca rows nearest "
                                                 "the calib harmful prompts) counted in the gate's budget")
    router_hard_negatives: int = Field(0, ge=0, description="benign prompts that sound risky (Alpaca rows nearest "
                                       "the router's *train* harmful prompts, never one of the calib side's "
                                       "CALIB_RISKY_RESERVE nearest its harmful prompts) added to the router's "
                                       "training split as helpful: sounding risky is not being harmful (HHH only)")
    calibrators: list[str] = Field(default_factory=lambda: ["none", "temperature", "importance", "fractal"],
                                   description="calibrators to fit and report")
    default_calibrator: str = Field(
        "auto", description="the one the saved model uses; 'auto' picks, among `calibrators`, the lowest "
                            "2-fold cross-validated NLL on the calib split (never the test splits)")
    batch_size: int = Field(16, gt=0, description="prompts per feature-extraction forward")
    seed: int = 0


def features_path(model, prompts: list[str], cache: Path) -> Path:
    """Where the router features of ``prompts`` are cached.

    The key is what the features are computed from: the backbone's identity, the router input,
    pooling and layer, and the prompts. Not the experts: features are read with the mixture off.
    """
    from mocae.stages import backbone_fingerprint

    cfg = model.mocae_config
    key = hashlib.sha256(json.dumps([backbone_fingerprint(cfg.backbone), cfg.router_input, cfg.pooling,
                                     model.router.feature_layer, prompts]).encode())
    return Path(cache) / f"features-{key.hexdigest()[:16]}.safetensors"


def _read_features(path: Path, n: int) -> torch.Tensor | None:
    """Cached features, or None (with a warning naming the file) when it is damaged or the wrong size."""
    import warnings

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        features = load_file(str(path))["features"]
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        warnings.warn(f"router features cache {path} is unreadable ({err}); recomputing it", stacklevel=3)
        return None
    if features.ndim != 2 or len(features) != n or not torch.isfinite(features).all():
        warnings.warn(f"router features cache {path} holds {tuple(features.shape)} features for {n} prompts "
                      "(or non-finite values); recomputing it", stacklevel=3)
        return None
    return features


@torch.no_grad()
def extract_features(model, prompts: list[str], batch_size: int = 16, progress: bool = True,
                     cache: Path | None = None) -> torch.Tensor:
    """Router features (N, hidden) for chat prompts, computed with the mixture off.

    Cached in ``cache`` (a folder, see :func:`features_path`); a damaged cache file is recomputed
    with a warning naming it.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from mocae.generation import chat_prompt

    path = features_path(model, prompts, cache) if cache else None
    if path is not None and path.is_file():
        cached = _read_features(path, len(prompts))
        if cached is not None:
            return cached
    texts = [chat_prompt(model.tokenizer, p) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.router.mean.shape[0])
    side, model.tokenizer.padding_side = model.tokenizer.padding_side, "left"
    try:  # the caller's padding side is put back, as chat and generate_batch do
        for start in tqdm(range(0, len(order), batch_size), desc="router features", disable=not progress,
                          leave=False):
            idx = order[start:start + batch_size]
            batch = model.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                                    add_special_tokens=False)
            out[idx] = model.router_features(batch["input_ids"], batch["attention_mask"])
    finally:
        model.tokenizer.padding_side = side
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"features": out}, str(tmp))
        tmp.replace(path)
    return out


def train_router(router, features: torch.Tensor, labels: torch.Tensor, cfg: RouterFitConfig) -> list[float]:
    """Gating cross-entropy (+ optional regularisers), full batch. Returns the loss curve."""
    torch.manual_seed(cfg.seed)
    router.set_normalisation(features)
    router.init_centroids(features, labels)
    optimiser = torch.optim.AdamW(router.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    curve = []
    log_uniform = -torch.log(torch.tensor(float(router.linear.out_features)))
    for _ in range(cfg.epochs):
        logits = router(features)
        log_p = logits.log_softmax(-1)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        entropy = -(log_p.exp() * log_p).sum(-1).mean()
        loss = loss + cfg.entropy_weight * entropy
        if cfg.kl_uniform_weight:
            loss = loss + cfg.kl_uniform_weight * (log_p.exp() * (log_p - log_uniform)).sum(-1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        curve.append(loss.item())
    return curve


def lm_examples(cfg: RouterFitConfig, data_dir: Path | None = None) -> list[tuple[str, str, int]]:
    """(prompt, completion, axis label) pairs for the LM loss through the mixture.

    Taken from the far end of each expert source's shuffled order (Alpaca, safety refusals,
    TruthfulQA training-half answers), which the quick/full experts do not reach. A row whose
    prompt is on the evaluation side of any benchmark (``eval_side_prompts``) is never used.
    """
    import random

    from mocae.data import expand_truthfulqa_answers, load_alpaca, load_safety_refusals, load_truthfulqa
    from mocae.data.heldout import drop_evaluated, evaluated
    from mocae.experts.preference import eval_side_prompts

    guard, held = eval_side_prompts(data_dir), evaluated(data_dir)
    sources = [load_alpaca(data_dir), load_safety_refusals(data_dir),
               expand_truthfulqa_answers(load_truthfulqa(data_dir, split="train"))]
    pairs = []
    for label, rows in enumerate(sources):
        rows = [r for r in drop_evaluated(rows, held=held) if r.completion and guard.which(r.prompt) is None]
        random.Random(cfg.seed + 7).shuffle(rows)
        pairs += [(r.prompt, r.completion, label) for r in rows[-cfg.lm_examples_per_axis:]]
    return pairs


def train_router_lm(model, pairs, cfg: RouterFitConfig, features_fn, progress: bool = True) -> list[float]:
    """``cfg.lm_steps`` router steps on gating CE + ``lm_loss_weight`` * LM loss of completions
    through the mixture (soft weights: the decision modes are not differentiable).

    The router features of every pair's prompt are computed once (``features_fn(prompts)``, the
    mixture off); each step draws ``lm_batch_size`` pairs. Gradients reach only the router: the
    experts' stacked factors are detached and the backbone is frozen, so this tunes how much of
    each expert a prompt gets. Returns the LM loss per step.
    """
    from tqdm.auto import tqdm

    from mocae.generation import completion_batch

    if not pairs:
        raise ValueError("LM-loss router fitting needs at least one prompt/completion pair")
    features = features_fn([p for p, _, _ in pairs])
    labels = torch.tensor([lab for _, _, lab in pairs])
    lr = cfg.lm_learning_rate or cfg.learning_rate * 0.1
    optimiser = torch.optim.AdamW(model.router.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    curve = []
    bar = tqdm(range(cfg.lm_steps), desc="router LM loss", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randperm(len(pairs), generator=gen)[: cfg.lm_batch_size]
        batch = [pairs[i] for i in idx.tolist()]
        rows = completion_batch(model.tokenizer, [p for p, _, _ in batch], [c for _, c, _ in batch],
                                max_length=cfg.lm_max_length)
        logits = model.router(features[idx])
        gate = torch.nn.functional.cross_entropy(logits, labels[idx])
        with model.mixer.weights(logits.softmax(-1)):
            lm = model.peft_model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"],
                                  labels=rows["labels"]).loss
        loss = gate + cfg.lm_loss_weight * lm
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        curve.append(lm.item())
        bar.set_postfix(lm=f"{curve[-1]:.3f}", gate=f"{gate.item():.3f}")
    return curve


GATE_BUDGETS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
TOP1_THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def fit_decision(model, probs: torch.Tensor, labels: torch.Tensor, refit: bool = True,
                 hard_negatives: torch.Tensor | None = None) -> dict:
    """Fit the harm gate threshold on the calib split and report every routing mode there.

    Harmful-or-not comes from the calib labels: the gate axis' label (harmless = HarmBench
    validation behaviours) is harmful, every other axis' prompt is not. With ``refit`` (or no
    threshold yet) the threshold is the smallest that gates at most ``decision.gate_budget`` of
    the non-harmful prompts (``decide.fit_gate_threshold``) and is written into
    ``model.mocae_config``. The report also sweeps budgets (threshold and harmful prompts gated)
    and top1 thresholds (share decided, accuracy of the decided rows), all on calib, so a default
    can be chosen by measurement without a test prompt.

    Args:
        probs: calibrated probabilities (N, E) of the calib split (the installed calibrator's).
        labels: (N,) axis labels.
        hard_negatives: calibrated probabilities (M, E) of extra non-harmful prompts that sound
            risky (``gate_hard_negative_prompts``): counted as non-harmful in the budget and
            reported on their own.

    Returns:
        {"gate": {threshold, budget, shares gated ...} or None, "gate_budget_sweep",
        "top1_sweep", "modes": {mode: decision_report}, "config"}.
    """
    from mocae.mixture.decide import ROUTING_MODES, decision_report, fit_gate_threshold, gate_report

    labels = torch.as_tensor(labels)
    decision = model.mocae_config.decision
    top, argmax = probs.max(-1)
    top1_sweep = {str(t): {"decided": float((top >= t).float().mean()),
                           "decided_accuracy": float((argmax == labels)[top >= t].float().mean())
                           if (top >= t).any() else None} for t in TOP1_THRESHOLDS}
    if decision.gate_axis not in model.axes:
        return {"gate": None, "top1_sweep": top1_sweep, "modes": {
            m: decision_report(probs, labels, decision.model_copy(update={"mode": m}), model.axes)
            for m in ("soft", "top1")}, "config": decision.model_dump()}
    index = model.axes.index(decision.gate_axis)
    p_harm, harmful = probs[:, index], labels == index
    if hard_negatives is not None and len(hard_negatives):
        p_harm = torch.cat([p_harm, hard_negatives[:, index].to(p_harm.dtype)])
        harmful = torch.cat([harmful, torch.zeros(len(hard_negatives), dtype=torch.bool)])
    fitted = refit or decision.gate_threshold is None
    if fitted:
        threshold = fit_gate_threshold(p_harm, harmful, decision.gate_budget)
        decision = model.mocae_config.decision = decision.model_copy(update={"gate_threshold": threshold})
    gate = {**gate_report(p_harm, harmful, decision.gate_threshold), "axis": decision.gate_axis,
            "budget": decision.gate_budget, "fitted_on": "calib" if fitted else "kept"}
    sweep = {}
    for budget in GATE_BUDGETS:
        t = fit_gate_threshold(p_harm, harmful, budget)
        sweep[str(budget)] = gate_report(p_harm, harmful, t)
    if hard_negatives is not None and len(hard_negatives):
        gated = hard_negatives[:, index] > decision.gate_threshold
        gate["hard_negatives"] = {"n": len(hard_negatives), "gated": float(gated.float().mean()),
                                  "argmax_gate_axis": float((hard_negatives.argmax(-1) == index).float().mean())}
    return {"gate": gate, "gate_budget_sweep": sweep, "top1_sweep": top1_sweep,
            "modes": {m: decision_report(probs, labels, decision.model_copy(update={"mode": m}), model.axes)
                      for m in ROUTING_MODES},
            "config": decision.model_dump()}


def _risky_candidates(data_dir: Path | None, exclude: set[str] = frozenset()) -> list:
    """Alpaca rows (a training source) that are not eval-side and not in ``exclude``, one per prompt."""
    from mocae.data import load_alpaca
    from mocae.experts.preference import eval_side_prompts

    guard = eval_side_prompts(data_dir)
    seen, candidates = set(exclude), []
    for e in load_alpaca(data_dir):
        if e.prompt not in seen and guard.which(e.prompt) is None:
            seen.add(e.prompt)
            candidates.append(e)
    return candidates


def gate_hard_negative_prompts(n: int, anchors: list[str], data_dir: Path | None = None, embed=None) -> list[str]:
    """Benign prompts that sound risky, for the harm gate's over-refusal budget.

    The ``n`` Alpaca instructions (training source; an eval-side prompt is never taken) whose
    MiniLM embedding is closest to ``anchors`` (the calib split's harmful prompts): the kind of
    prompt a gate fitted only on plainly benign calib prompts would over-refuse.
    """
    from mocae.experts.dataset import nearest_examples

    return [e.prompt for e in nearest_examples(_risky_candidates(data_dir), anchors, embed)[:n]]


def calib_risky_prompts(n: int, anchors: list[str], experts, data_dir: Path | None = None, embed=None) -> list[str]:
    """The calib side's risky benign prompts that measure over-refusal: the ``n`` nearest ``anchors``
    (the calib harmful prompts) among the ``CALIB_RISKY_RESERVE`` nearest, skipping every prompt an
    expert of ``experts`` (ExpertConfigs) trains on (``mocae.experts.dataset.training_prompts``; the
    harmless expert's ``alpaca_nearest`` benign rows are drawn the same way).

    Raises:
        ValueError: fewer than ``n`` such prompts in the reserve (router hard negatives may train on
            anything beyond it, so the set never reaches past it).
    """
    from mocae.data import normalise_text
    from mocae.experts.dataset import training_prompts

    exclude = set().union(*(training_prompts(c, data_dir) for c in experts))
    reserve = gate_hard_negative_prompts(CALIB_RISKY_RESERVE, anchors, data_dir, embed)
    picked = [p for p in reserve if normalise_text(p) not in exclude][:n]
    if len(picked) < n:
        raise ValueError(f"{n} risky benign calib prompts asked, but only {len(picked)} of the "
                         f"{CALIB_RISKY_RESERVE} nearest the calib harmful prompts are not trained on by an expert")
    return picked


def router_hard_negative_prompts(n: int, anchors: list[str], calib_anchors: list[str], data_dir: Path | None = None,
                                 embed=None, reserve: int = CALIB_RISKY_RESERVE) -> list[str]:
    """Benign prompts that sound risky, to train the router: helpful, not harmful.

    The ``n`` Alpaca instructions closest to ``anchors`` (the router's train harmful prompts),
    skipping the ``reserve`` closest to ``calib_anchors``: those are the calib side's risky benign
    prompts (:func:`gate_hard_negative_prompts`), which measure over-refusal.
    """
    from mocae.experts.dataset import nearest_examples

    reserved = set(gate_hard_negative_prompts(reserve, calib_anchors, data_dir, embed))
    return [e.prompt for e in nearest_examples(_risky_candidates(data_dir, reserved), anchors, embed)[:n]]


def router_data_files(cfg: RouterFitConfig) -> list[str]:
    """The data files (relative to the data directory) :func:`fit_router` reads with ``cfg``."""
    from mocae.data import loaders as L

    files = [L.REFUSAL_DIRECTION.format(kind="harmless", split="train"), L.SAFETY_REFUSALS, L.TRUTHFULQA,
             L.ALPACA_SEED_TASKS, *L.HARMBENCH.values(), L.STRONGREJECT, L.ADVBENCH, L.ALPACA_EVAL,
             L.ALPACA_EVAL_GPT4, L.XSTEST]
    if cfg.lm_loss_weight > 0 or cfg.gate_hard_negatives > 0 or cfg.router_hard_negatives > 0:
        files.append(L.ALPACA)
    return sorted(set(files))


def select_calibrator(candidates: dict, logits, labels, features, folds: int = 2, seed: int = 0) -> dict:
    """Cross-validated NLL on the calib split for each candidate; lower is better.

    Args:
        candidates: name -> zero-argument factory of an unfitted calibrator.

    Returns:
        {name: mean held-out NLL over folds}.
    """
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    parts = order.chunk(folds)
    scores = {}
    for name, make in candidates.items():
        nll = []
        for k in range(folds):
            held = parts[k]
            fit = torch.cat([p for j, p in enumerate(parts) if j != k])
            calibrator = make().fit(logits[fit], labels[fit], features[fit])
            probs = calibrator.probs(logits[held], features[held]).clamp(min=1e-12)
            nll.append(-probs[torch.arange(len(held)), labels[held]].log().mean().item())
        scores[name] = sum(nll) / folds
    return scores


def importance_gamma(model, prior_mode: str = "importance") -> dict[str, float]:
    """Importance prior weights from the experts' task vectors (``decide.prior_weights``).

    The reference vector is the mean of the experts' task vectors (the multi-objective
    direction), so gamma favours experts aligned with what all three share; ``prior_mode``
    ``uniform`` or ``importance_normalised`` keep it from following the vectors' norms.
    """
    from mocae.experts.task_vectors import task_vector_from_peft
    from mocae.mixture.decide import prior_weights

    if prior_mode == "uniform":
        return {axis: 1.0 / len(model.axes) for axis in model.axes}
    vectors = {axis: task_vector_from_peft(model.peft_model, adapter_name=axis) for axis in model.axes}
    return prior_weights(vectors, prior_mode)


def add_router_hard_negatives(train, calib, n: int, axes, gate_axis: str, data_dir: Path | None = None, embed=None,
                              reserve: int = CALIB_RISKY_RESERVE):
    """``train`` plus ``n`` risky benign prompts (:func:`router_hard_negative_prompts`) labelled as the first
    axis that is not ``gate_axis`` (helpful for the HHH axes).

    Raises:
        ValueError: the data holds fewer than ``n`` such prompts outside the calib side's reserve.
    """
    from mocae.mixture.routing_data import RoutingSplit

    gate, label = axes.index(gate_axis), next(i for i, a in enumerate(axes) if a != gate_axis)
    extra = router_hard_negative_prompts(n, train.of(gate), calib.of(gate), data_dir, embed, reserve)
    if len(extra) < n:
        raise ValueError(f"router_hard_negatives: {n} asked, but Alpaca holds only {len(extra)} prompts that are not "
                         f"eval-side and not among the {reserve} the calib side keeps; lower router_hard_negatives")
    return RoutingSplit(train.prompts + extra, train.labels + [label] * len(extra),
                        train.sources + ["alpaca_risky_benign"] * len(extra), train.axes)


def fit_router(model, cfg: RouterFitConfig, data_dir: Path | None = None, cache: Path | None = None,
               progress: bool = True, plot_dir: Path | None = None, train: bool = True,
               prompts: dict | None = None) -> dict:
    """Train ``model``'s sequence router, fit every calibrator, install the default one.

    With ``train=False`` the router is kept as it is and only the calibrators are (re)fitted.

    Args:
        prompts: labelled prompts for experts of any names (``routing_data.labelled_splits``:
            ``{expert: [prompt, ...]}``, split into train and calib by ``cfg.calib_fraction``, or
            ``{split: {expert: [...]}}``); the calibrators are reported on its test / shifted
            splits when it has them. Default: the HHH routing splits (``routing_splits``), which
            need the experts to be exactly ``mocae.AXES`` in that order.

    Returns:
        A JSON-able report: split sizes, loss curve summary, gamma, and for each calibrator
        {"test": metrics, "shifted": metrics} (the evaluation splits there are).
    """
    from mocae.mixture.calibration_metrics import calibration_report, reliability_diagrams
    from mocae.mixture.calibration import build_calibrator
    from mocae.mixture.router import SequenceRouter
    from mocae.mixture.routing_data import labelled_splits, routing_splits

    if not isinstance(model.router, SequenceRouter):
        raise ValueError("fit_router trains a sequence router; this model routes by "
                         f"{model.mocae_config.routing!r}")
    hhh = list(model.axes) == list(AXES)
    if prompts is None and not hhh:  # the HHH routing labels index AXES
        raise ValueError(f"fit_router's own routing prompts are labelled for {list(AXES)} in that order; experts "
                         f"{list(model.axes)} need their own labelled prompts: fit_router(..., prompts={{expert: "
                         "[prompt, ...]}})")
    if train and cfg.lm_loss_weight > 0 and not hhh:
        raise ValueError(f"lm_loss_weight > 0 trains on completions of the HHH sources, labelled for {list(AXES)}; "
                         f"experts {list(model.axes)} have none (set lm_loss_weight: 0)")
    if cfg.default_calibrator != "auto" and cfg.default_calibrator not in cfg.calibrators:
        raise ValueError(f"default_calibrator {cfg.default_calibrator!r} is not among calibrators {cfg.calibrators}")
    if prompts is None:
        splits = routing_splits(cfg.n_per_axis, cfg.calib_fraction, cfg.n_test_per_axis, data_dir, cfg.seed)
    else:
        splits = labelled_splits(prompts, model.axes, cfg.calib_fraction, cfg.seed)
    if cfg.router_hard_negatives:
        if prompts is not None:
            raise ValueError("router_hard_negatives adds risky benign prompts to the HHH routing splits; with your "
                             "own prompts, put such prompts under the expert that should answer them")
        splits["train"] = add_router_hard_negatives(splits["train"], splits["calib"], cfg.router_hard_negatives,
                                                    model.axes, model.mocae_config.decision.gate_axis, data_dir)
    evaluated = [name for name in ("test", "shifted") if name in splits]
    feats = {name: extract_features(model, s.prompts, cfg.batch_size, progress, cache) for name, s in splits.items()}
    labels = {name: torch.tensor(s.labels) for name, s in splits.items()}

    curve = train_router(model.router, feats["train"], labels["train"], cfg) if train else [float("nan")]
    lm_curve = None
    if train and cfg.lm_loss_weight > 0:
        lm_curve = train_router_lm(model, lm_examples(cfg, data_dir), cfg,
                                   lambda prompts: extract_features(model, prompts, cfg.batch_size, False, cache),
                                   progress=progress)
    with torch.no_grad():
        logits = {name: model.router(f) for name, f in feats.items()}

    gamma = importance_gamma(model, cfg.prior_mode) if any("importance" in c for c in cfg.calibrators) else None
    report = {"splits": {n: {"n": len(s), **s.counts()} for n, s in splits.items()},
              "router_loss": {"first": curve[0], "last": curve[-1], "epochs": len(curve)},
              "lm_loss_through_mixture": None if lm_curve is None else {
                  "first": lm_curve[0], "last": lm_curve[-1], "steps": len(lm_curve),
                  "first_10_mean": sum(lm_curve[:10]) / len(lm_curve[:10]),
                  "last_10_mean": sum(lm_curve[-10:]) / len(lm_curve[-10:])},
              "feature_layer": model.router.feature_layer,
              "gamma": gamma, "prior_mode": cfg.prior_mode, "calibrators": {}}
    def make(name):
        kwargs = {"gamma": [gamma[a] for a in model.axes]} if "importance" in name else {}
        return lambda: build_calibrator(name, **kwargs)

    default = cfg.default_calibrator
    if default == "auto":
        candidates = [c for c in cfg.calibrators if c != "none"] or ["none"]
        report["calibrator_selection"] = select_calibrator(
            {c: make(c) for c in candidates}, logits["calib"], labels["calib"], feats["calib"], seed=cfg.seed)
        default = min(report["calibrator_selection"], key=report["calibrator_selection"].get)
    fitted = {}
    for name in cfg.calibrators:
        calibrator = make(name)().fit(logits["calib"], labels["calib"], feats["calib"])
        fitted[name] = calibrator
        report["calibrators"][name] = {
            split: calibration_report(calibrator.probs(logits[split], feats[split]), labels[split])
            for split in evaluated
        }
        report["calibrators"][name]["state"] = calibrator.state_dict()
    model.calibrator = fitted[default]
    model.mocae_config.calibrator = default
    report["default_calibrator"] = default
    # routing that decides: the gate threshold on the calib split, with the installed calibrator
    hard = None
    gate_axis = model.mocae_config.decision.gate_axis
    if cfg.gate_hard_negatives and gate_axis in model.axes:
        index = model.axes.index(gate_axis)
        prompts = gate_hard_negative_prompts(cfg.gate_hard_negatives, splits["calib"].of(index), data_dir)
        hard_feats = extract_features(model, prompts, cfg.batch_size, progress, cache)
        with torch.no_grad():
            hard = model.calibrator.probs(model.router(hard_feats), hard_feats)
    report["decision"] = fit_decision(model, model.calibrator.probs(logits["calib"], feats["calib"]),
                                      labels["calib"], refit=cfg.fit_gate_threshold, hard_negatives=hard)
    if plot_dir is not None and "test" in splits:
        curves = {c: (fitted[c].probs(logits["test"], feats["test"]), labels["test"])
                  for c in dict.fromkeys(["none", default]) if c in fitted}
        report["reliability_diagram"] = str(reliability_diagrams(curves, Path(plot_dir) / "reliability_test.png"))
    return report


def format_calibration_table(report: dict) -> str:
    """Markdown: calibrators x (test, shifted) x (accuracy, ECE, Brier, NLL)."""
    lines = ["| calibrator | split | accuracy | ECE | Brier | NLL |", "|---|---|---|---|---|---|"]
    for name, result in report["calibrators"].items():
        for split in [s for s in ("test", "shifted") if s in result]:
            m = result[split]
            lines.append(f"| {name} | {split} (n={m['n']}) | {m['accuracy']:.3f} | {m['ece']:.3f} | "
                         f"{m['brier']:.3f} | {m['nll']:.3f} |")
    if len(lines) == 2:
        lines.append("(no test or shifted split to evaluate the calibrators on: routing prompts given as "
                     "{split: {expert: [...]}} may add them)")
    return "\n".join(lines)

