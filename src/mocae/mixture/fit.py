"""Fit the sequence router (gating cross-entropy) and its calibrators; report calibration.

1. Features: the base model's pooled hidden state at the router's layer for every routing
   prompt (chat-formatted, as at inference), cached per backbone, layer and prompt set.
2. Router: standardisation + unit-norm centroid initialisation, then full-batch AdamW on the
   cross-entropy of the axis labels (H3Fusion's gating loss, done right: per-sample labels,
   mean over samples), optionally with an entropy bonus/penalty and KL to uniform (TrinityX).
3. Calibrators: each fitted on the ``calib`` split (never seen by the router), reported with
   accuracy, ECE (15 bins), Brier and NLL on the in-distribution ``test`` and the ``shifted``
   split, next to the uncalibrated router.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from mocae import AXES


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
    lm_steps: int = Field(20, gt=0, description="router steps with the LM loss (batch of lm_batch_size)")
    lm_batch_size: int = Field(4, gt=0)
    lm_examples_per_axis: int = Field(32, gt=0)
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
    model.tokenizer.padding_side = "left"
    for start in tqdm(range(0, len(order), batch_size), desc="router features", disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        batch = model.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        out[idx] = model.router_features(batch["input_ids"], batch["attention_mask"])
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
    TruthfulQA training-half answers), which the quick/full experts do not reach.
    """
    import random

    from mocae.data import expand_truthfulqa_answers, load_alpaca, load_safety_refusals, load_truthfulqa

    sources = [load_alpaca(data_dir), load_safety_refusals(data_dir),
               expand_truthfulqa_answers(load_truthfulqa(data_dir, split="train"))]
    pairs = []
    for label, rows in enumerate(sources):
        rows = [r for r in rows if r.completion]
        random.Random(cfg.seed + 7).shuffle(rows)
        pairs += [(r.prompt, r.completion, label) for r in rows[-cfg.lm_examples_per_axis:]]
    return pairs


def train_router_lm(model, pairs, cfg: RouterFitConfig, features_fn) -> list[float]:
    """Router steps on gating CE + ``lm_loss_weight`` * LM loss of completions through the mixture.

    Gradients reach only the router: the experts' stacked factors are detached and the
    backbone is frozen, so this tunes how much of each expert a prompt gets.
    """
    from mocae.generation import completion_batch

    optimiser = torch.optim.AdamW(model.router.parameters(), lr=cfg.learning_rate * 0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    curve = []
    for _ in range(cfg.lm_steps):
        idx = torch.randperm(len(pairs), generator=gen)[: cfg.lm_batch_size].tolist()
        batch = [pairs[i] for i in idx]
        rows = completion_batch(model.tokenizer, [p for p, _, _ in batch], [c for _, c, _ in batch], max_length=256)
        logits = model.router(features_fn([p for p, _, _ in batch]))
        gate = torch.nn.functional.cross_entropy(logits, torch.tensor([lab for _, _, lab in batch]))
        with model.mixer.weights(logits.softmax(-1)):
            lm = model.peft_model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"],
                                  labels=rows["labels"]).loss
        loss = gate + cfg.lm_loss_weight * lm
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        curve.append(lm.item())
    return curve


def router_data_files(cfg: RouterFitConfig) -> list[str]:
    """The data files (relative to the data directory) :func:`fit_router` reads with ``cfg``."""
    from mocae.data import loaders as L

    files = [L.REFUSAL_DIRECTION.format(kind="harmless", split="train"), L.SAFETY_REFUSALS, L.TRUTHFULQA,
             L.ALPACA_SEED_TASKS, *L.HARMBENCH.values(), L.STRONGREJECT, L.ADVBENCH, L.ALPACA_EVAL,
             L.ALPACA_EVAL_GPT4, L.XSTEST]
    if cfg.lm_loss_weight > 0:
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


def importance_gamma(model) -> dict[str, float]:
    """TrinityX importance weights from the experts' task vectors.

    The reference vector is the mean of the experts' task vectors (the multi-objective
    direction), so gamma favours experts aligned with what all three share.
    """
    from mocae.experts.task_vectors import importance_weights, task_vector_from_peft

    vectors = {axis: task_vector_from_peft(model.peft_model, adapter_name=axis) for axis in model.axes}
    reference = vectors[model.axes[0]]
    for axis in model.axes[1:]:
        reference = reference + vectors[axis]
    return importance_weights(vectors, (1.0 / len(vectors)) * reference)


def fit_router(model, cfg: RouterFitConfig, data_dir: Path | None = None, cache: Path | None = None,
               progress: bool = True, plot_dir: Path | None = None, train: bool = True) -> dict:
    """Train ``model``'s sequence router, fit every calibrator, install the default one.

    With ``train=False`` the router is kept as it is and only the calibrators are (re)fitted.

    Returns:
        A JSON-able report: split sizes, loss curve summary, gamma, and for each calibrator
        {"test": metrics, "shifted": metrics}.
    """
    from mocae.evaluation.calibration_metrics import calibration_report, reliability_diagrams
    from mocae.mixture.calibration import build_calibrator
    from mocae.mixture.router import SequenceRouter
    from mocae.mixture.routing_data import routing_splits

    if not isinstance(model.router, SequenceRouter):
        raise ValueError("fit_router trains a sequence router; this model routes by "
                         f"{model.mocae_config.routing!r}")
    if list(model.axes) != list(AXES):  # the routing labels index AXES
        raise ValueError(f"fit_router needs experts for exactly {list(AXES)} in that order, got {list(model.axes)}")
    if cfg.default_calibrator != "auto" and cfg.default_calibrator not in cfg.calibrators:
        raise ValueError(f"default_calibrator {cfg.default_calibrator!r} is not among calibrators {cfg.calibrators}")
    splits = routing_splits(cfg.n_per_axis, cfg.calib_fraction, cfg.n_test_per_axis, data_dir, cfg.seed)
    feats = {name: extract_features(model, s.prompts, cfg.batch_size, progress, cache) for name, s in splits.items()}
    labels = {name: torch.tensor(s.labels) for name, s in splits.items()}

    curve = train_router(model.router, feats["train"], labels["train"], cfg) if train else [float("nan")]
    lm_curve = None
    if train and cfg.lm_loss_weight > 0:
        lm_curve = train_router_lm(model, lm_examples(cfg, data_dir), cfg,
                                   lambda prompts: extract_features(model, prompts, cfg.batch_size, False, cache))
    with torch.no_grad():
        logits = {name: model.router(f) for name, f in feats.items()}

    gamma = importance_gamma(model) if any("importance" in c for c in cfg.calibrators) else None
    report = {"splits": {n: {"n": len(s), **s.counts()} for n, s in splits.items()},
              "router_loss": {"first": curve[0], "last": curve[-1], "epochs": len(curve)},
              "lm_loss_through_mixture": None if lm_curve is None else {"first": lm_curve[0], "last": lm_curve[-1],
                                                                       "steps": len(lm_curve)},
              "feature_layer": model.router.feature_layer,
              "gamma": gamma, "calibrators": {}}
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
            for split in ("test", "shifted")
        }
        report["calibrators"][name]["state"] = calibrator.state_dict()
    model.calibrator = fitted[default]
    model.mocae_config.calibrator = default
    report["default_calibrator"] = default
    if plot_dir is not None:
        curves = {c: (fitted[c].probs(logits["test"], feats["test"]), labels["test"])
                  for c in dict.fromkeys(["none", default]) if c in fitted}
        report["reliability_diagram"] = str(reliability_diagrams(curves, Path(plot_dir) / "reliability_test.png"))
    return report


def format_calibration_table(report: dict) -> str:
    """Markdown: calibrators x (test, shifted) x (accuracy, ECE, Brier, NLL)."""
    lines = ["| calibrator | split | accuracy | ECE | Brier | NLL |", "|---|---|---|---|---|---|"]
    for name, result in report["calibrators"].items():
        for split in ("test", "shifted"):
            m = result[split]
            lines.append(f"| {name} | {split} (n={m['n']}) | {m['accuracy']:.3f} | {m['ece']:.3f} | "
                         f"{m['brier']:.3f} | {m['nll']:.3f} |")
    return "\n".join(lines)

