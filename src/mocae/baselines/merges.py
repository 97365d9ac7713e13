"""Static merges of the experts: task arithmetic, TIES and DARE on their dense deltas.

Each expert's task vector is ``delta_W = scaling * B @ A`` per module (from peft's own
``get_delta_weight``, see ``mocae.experts.task_vectors``). Per module, the E deltas are
stacked and combined by ``peft.utils.merge_utils``; the merged delta is added into the base
weights, giving a plain transformers model with no adapter left.

peft's ``add_weighted_adapter`` with ``linear``/``ties``/``dare_*`` is *not* used: it merges
the A and the B factors separately, so ``sum(w B) @ sum(w A)`` has cross terms
``B_i A_j`` and is not task arithmetic (DESIGN.md section 10).

How peft's functions combine (weights w_e, deltas d_e):
  task_arithmetic  sum_e w_e d_e
  ties             trim each d_e to its top-``density`` magnitudes; elect a sign per entry
                   (``total``: sign of sum_e d_e, ``frequency``: majority of signs, computed on
                   the unweighted deltas); average w_e d_e over the experts that agree
  dare_linear      drop each entry with probability 1 - density, rescale by 1/density, sum
  dare_ties        DARE's drop + rescale, then TIES's sign election and disjoint mean

Default weights (``weights=None``): the sum-based methods (task_arithmetic, dare_linear) use
1/E each, i.e. the average of the deltas (Ilharco et al. tune one lambda on held-out data
and find 0.3-0.5 best for several tasks; 1/3 for our three axes is in that range). The
sign-elected methods (ties, dare_ties) use 1.0 each: their disjoint merge already averages
over the agreeing experts, and the TIES paper's default is lambda = 1.

DARE's random drop uses torch's global RNG inside peft; we re-seed it per module from
``seed`` and the module's position in sorted-name order (inside ``fork_rng``, so the caller's
RNG is untouched): the same seed gives the same merge whatever else ran before.

A module targeted by some experts but not others counts as a zero delta for the others
(what the expert does to that weight): it is trimmed away by TIES and never elects a sign.

    cfg = MergeConfig(method="ties", density=0.2)
    model, tok = build_merged("smollm2-135m", {"helpful": ..., "harmless": ..., "honest": ...}, cfg)
    save_merged(model, tok, "runs/x/ties", {"backbone": "smollm2-135m", "experts": experts})
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Literal

import torch
from peft.utils import merge_utils
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mocae.experts.checks import check_experts
from mocae.experts.task_vectors import TaskVector, apply_task_vector, load_task_vector
from mocae.paths import atomic_directory, atomic_write_json
from mocae.spec import BuildContext, SystemSpec, write_marker

MERGE_FILE = "merge.json"
METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
SIGN_ELECTED = ("ties", "dare_ties")


class MergeConfig(BaseModel):
    """How to merge the experts' dense deltas (module docstring: defaults and their sources)."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["task_arithmetic", "ties", "dare_linear", "dare_ties"] = Field(
        description="peft.utils.merge_utils function applied per module to the stacked deltas")
    weights: list[float] | None = Field(
        None, description="one weight per expert, in the experts' order; None = 1/E for task_arithmetic "
                          "and dare_linear, 1.0 for ties and dare_ties")
    density: float = Field(
        0.5, gt=0, le=1, description="ties: fraction of largest-magnitude entries kept per expert; "
                                     "dare: keep probability (dropped entries rescaled by 1/density)")
    majority_sign_method: Literal["total", "frequency"] = Field(
        "total", description="ties/dare_ties sign election: sign of the summed deltas, or majority of signs")
    seed: int = Field(0, description="seed of DARE's random drop (re-seeded per module)")

    @field_validator("weights")
    @classmethod
    def _finite_weights(cls, weights):
        if weights is not None and (not weights or any(w != w or abs(w) == float("inf") for w in weights)):
            raise ValueError(f"weights must be a non-empty list of finite numbers, got {weights}")
        return weights

    def expert_weights(self, num_experts: int) -> list[float]:
        """The weight of each expert (resolving the None default).

        Raises:
            ValueError: ``weights`` has a different length than the number of experts.
        """
        if self.weights is None:
            return [1.0 if self.method in SIGN_ELECTED else 1.0 / num_experts] * num_experts
        if len(self.weights) != num_experts:
            raise ValueError(f"MergeConfig.weights has {len(self.weights)} entries for {num_experts} experts")
        return list(self.weights)


def merge_module(deltas: list[torch.Tensor], weights: list[float], cfg: MergeConfig) -> torch.Tensor:
    """Merge one module's deltas with the configured peft function.

    Args:
        deltas: one tensor per expert, all the same shape.
        weights: one weight per expert.
    Returns:
        The merged delta (fp32).
    """
    w = torch.tensor(weights, dtype=torch.float32)
    if cfg.method == "task_arithmetic":
        return merge_utils.task_arithmetic(deltas, w)
    with warnings.catch_warnings():
        # density 1.0 is a legitimate "no trimming" setting; peft warns on every module.
        warnings.filterwarnings("ignore", message="The density .* no pruning")
        if cfg.method == "ties":
            return merge_utils.ties(deltas, w, cfg.density, cfg.majority_sign_method)
        if cfg.method == "dare_linear":
            return merge_utils.dare_linear(deltas, w, cfg.density)
        if cfg.method == "dare_ties":
            return merge_utils.dare_ties(deltas, w, cfg.density, cfg.majority_sign_method)
    raise ValueError(f"unknown merge method {cfg.method!r}; expected one of {METHODS}")


def merge_task_vectors(vectors: dict[str, TaskVector], cfg: MergeConfig) -> TaskVector:
    """Merge task vectors module by module.

    Args:
        vectors: expert name -> task vector; the dict order is the order of ``cfg.weights``.
        cfg: the merge settings.
    Returns:
        The merged TaskVector over the union of the experts' modules.
    """
    if not vectors:
        raise ValueError("merging needs at least one expert")
    weights = cfg.expert_weights(len(vectors))
    names = sorted(set().union(*(set(v.names) for v in vectors.values())))
    merged = {}
    for index, module in enumerate(names):
        present = [v[module] for v in vectors.values() if module in v]
        shapes = {tuple(d.shape) for d in present}
        if len(shapes) > 1:
            raise ValueError(f"module {module}: the experts' deltas have different shapes {sorted(shapes)}")
        deltas = [v[module] if module in v else torch.zeros_like(present[0]) for v in vectors.values()]
        # fork_rng: DARE draws from the global RNG; seed per module, leave the caller's RNG alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 1_000_003 + index)
            merged[module] = merge_module(deltas, weights, cfg)
    return TaskVector(merged)


def merged_deltas(experts: dict[str, str | Path], base_model: torch.nn.Module, cfg: MergeConfig) -> TaskVector:
    """Load each expert's task vector onto ``base_model`` and merge them.

    Args:
        experts: expert name -> adapter folder; the order matches ``cfg.weights``.
        base_model: the plain backbone (left unchanged).
        cfg: the merge settings.
    Returns:
        The merged task vector.
    """
    if not experts:
        raise ValueError("merging needs at least one expert")
    cfg.expert_weights(len(experts))  # fail on a wrong weight count before loading anything
    check_experts(None, experts)
    vectors = {name: load_task_vector(path, base_model) for name, path in experts.items()}
    return merge_task_vectors(vectors, cfg)


def build_merged(backbone: str, experts: dict[str, str | Path], cfg: MergeConfig,
                 model_and_tokenizer: tuple | None = None) -> tuple:
    """The backbone with the merged delta added into its weights.

    Args:
        backbone: backbone name (``load_backbone``), also checked against the experts' records.
        experts: expert name -> adapter folder.
        cfg: the merge settings.
        model_and_tokenizer: an already loaded (plain) backbone to modify in place, to skip loading.
    Returns:
        (model, tokenizer): a plain transformers causal LM with ``model.merge_config`` set.
    """
    from mocae.backbones import load_backbone

    check_experts(backbone, experts)
    model, tokenizer = model_and_tokenizer or load_backbone(backbone)
    apply_task_vector(model, merged_deltas(experts, model, cfg))
    model.merge_config = cfg.model_dump()
    model.eval()
    return model, tokenizer


def save_merged(model, tokenizer, path: str | Path, meta: dict | None = None) -> Path:
    """Save a merged model as a plain safetensors checkpoint + tokenizer + ``merge.json``, atomically.

    Args:
        model, tokenizer: from ``build_merged``.
        path: target folder (replaced only once everything is written).
        meta: extra provenance for ``merge.json`` (backbone, experts, ...).
    Returns:
        The folder; ``AutoModelForCausalLM.from_pretrained`` loads it.
    """
    record = {"merge_config": getattr(model, "merge_config", None), **(meta or {})}
    with atomic_directory(Path(path)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / MERGE_FILE, json.loads(json.dumps(record, default=str)))
        write_marker(tmp, SYSTEM.name)
    return Path(path)


# ---- the system: task_arithmetic, ties and dare, built from the run's experts when evaluated
def default_merges() -> dict[str, MergeConfig]:
    """The run's three merges: task arithmetic, TIES and DARE-TIES at the module defaults."""
    return {"task_arithmetic": MergeConfig(method="task_arithmetic"),
            "ties": MergeConfig(method="ties"),
            "dare": MergeConfig(method="dare_ties")}


def _build(ctx: BuildContext):
    return build_merged(ctx.backbone, ctx.experts, ctx.settings[ctx.name])


def _fingerprint(ctx: BuildContext) -> dict:
    from mocae.stages import experts_fingerprint

    return {"experts": experts_fingerprint(ctx.experts),
            "merge": ctx.settings[ctx.name].model_dump(mode="json")}


def _from_pretrained(path: str | Path, backbone: str | None = None):
    from mocae.backbones import load_backbone

    return load_backbone(str(path))  # a plain transformers checkpoint with its tokenizer


def _inspect(path: str | Path, backbone: str | None = None) -> str | None:
    from mocae.errors import read_json

    return read_json(Path(path) / MERGE_FILE).get("backbone")


SYSTEM = SystemSpec(
    name="merges", names=tuple(default_merges()), config=dict[str, MergeConfig], config_default=default_merges,
    build=_build, fingerprint=_fingerprint, from_pretrained=_from_pretrained, inspect=_inspect,
    save_pretrained=lambda model, tokenizer, path: save_merged(model, tokenizer, path),
    files=(MERGE_FILE, "config.json"), description="task_arithmetic / ties / dare settings")
