"""H3Fusion MoE baseline (arXiv 2411.17792): per-axis LoRA experts fused into an MoE of MLPs.

Every decoder layer's MLP (Llama-style ``gate_proj``/``up_proj``/``down_proj`` + ``act_fn``)
becomes E expert MLPs; expert e's projection is ``W_base + scale_e * B_e @ A_e`` from expert e's
LoRA on it (zero delta where the expert has no LoRA). The public H3Fusion code drops
``scale = lora_alpha / r``; we apply peft's own scaling (and check it against
``get_delta_weight``). A trainable token router ``nn.Linear(hidden, E)`` per layer keeps the
top-2 experts per token with softmax weights renormalised over the kept ones.

Modules the experts adapted outside the MLP (attention q/k/v/o) cannot be routed without
changing the attention block, so they get the mean of the experts' deltas (a model soup over
all E experts, a missing delta counting as zero), folded into the base weights and frozen.
(The H3Fusion paper also trains an attention LoRA during fusion; we leave attention fixed.)

Fusion loss (``fit_h3fusion``): LM loss on the completion + lambda * cross-entropy of each
sample's token-averaged router probabilities against its axis label + gamma * the sum of the
experts' ``||scale * B @ A||_F`` (drift).

Two forms of ``H3FusionMLP``: training (frozen shared base + per-expert LoRA, cheap) and
deployed (``materialize()``: E dense copies of each projection, the memory MoCaE is compared
with). The model stays a plain transformers causal LM, so ``generate`` and lm-eval work.

    model, tok = build_h3fusion("smollm2-135m", {"helpful": ..., "harmless": ..., "honest": ...})
    fit_h3fusion(model, tok, [(prompt, completion, axis_index), ...])
    save_h3fusion(model, "runs/x/h3fusion", "smollm2-135m", experts, cfg)
    model, tok = load_h3fusion("runs/x/h3fusion")   # materialized
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mocae.paths import atomic_directory
from mocae.spec import BuildContext, SystemSpec, write_marker

CONFIG_FILE = "h3fusion_config.json"
STATE_FILE = "h3fusion.safetensors"
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class H3FusionConfig(BaseModel):
    """Settings of the H3Fusion fusion stage (DESIGN.md 6b, preset ``h3fusion``)."""

    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(2, ge=1, description="experts kept per token (weights renormalised over them)")
    gating_weight: float = Field(0.01, ge=0, description="lambda: weight of the per-sample gating cross-entropy")
    drift_weight: float = Field(0.001, ge=0, description="gamma: weight of the experts' LoRA-update norm")
    learning_rate: float = Field(1e-3, gt=0, description="AdamW learning rate")
    steps: int = Field(60, ge=0, description="optimiser steps")
    batch_size: int = Field(8, ge=1, description="examples per step")
    max_length: int = Field(256, ge=1, description="tokens per example (prompt + completion)")
    train_experts: bool = Field(True, description="also fine-tune the experts' LoRA A/B (the drift term "
                                                  "keeps them small); False trains the routers only")
    seed: int = Field(0, description="router init and batch order")


class H3FusionMLP(nn.Module):
    """E expert MLPs behind a top-k token router, replacing one decoder layer's MLP.

    Args:
        mlp: the original MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``); its
            projections become the shared frozen base.
        loras: projection name -> one ``(A, B, scale)`` or None per expert (None = no LoRA).
        top_k: experts kept per token.
        generator: seeds the router init.
    """

    def __init__(self, mlp: nn.Module, loras: dict[str, list], top_k: int = 2,
                 generator: torch.Generator | None = None):
        super().__init__()
        missing = [p for p in (*PROJECTIONS, "act_fn") if not hasattr(mlp, p)]
        if missing:
            raise ValueError(f"{type(mlp).__name__} is not a gated (Llama-style) MLP: no {missing}")
        self.num_experts = len(loras["gate_proj"])
        self.top_k = min(top_k, self.num_experts)
        self.act_fn = mlp.act_fn
        for proj in PROJECTIONS:
            setattr(self, proj, getattr(mlp, proj))
        hidden = mlp.gate_proj.in_features
        w = mlp.gate_proj.weight
        # No bias (Mixtral's gate). Small random init, not zeros: near-uniform probabilities
        # (the mixture starts close to the expert average), but ties broken per token so that
        # top-k does not send every token to experts 0 and 1 (topk's tie order) at step 0.
        self.router = nn.Linear(hidden, self.num_experts, bias=False, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            init = torch.randn(self.router.weight.shape, generator=generator) * math.sqrt(0.1 / hidden)
            self.router.weight.copy_(init)
        # Training form: per expert LoRA factors; an expert without LoRA gets rank 0 (zero delta).
        self.lora_A, self.lora_B, self.scales = nn.ModuleDict(), nn.ModuleDict(), {}
        for proj in PROJECTIONS:
            base = getattr(mlp, proj)
            As, Bs, scales = [], [], []
            for item in loras[proj]:
                A, B, s = item if item is not None else (
                    torch.zeros(0, base.in_features), torch.zeros(base.out_features, 0), 0.0)
                As.append(nn.Parameter(A.detach().clone().to(w.device, w.dtype)))
                Bs.append(nn.Parameter(B.detach().clone().to(w.device, w.dtype)))
                scales.append(float(s))
            self.lora_A[proj], self.lora_B[proj] = nn.ParameterList(As), nn.ParameterList(Bs)
            self.scales[proj] = scales
        self.materialized = False
        self.forced_weights: torch.Tensor | None = None  # (E,) or (B, T, E); None = use the router
        self.last_probs: torch.Tensor | None = None  # (B, T, E) full softmax, for the gating loss

    def delta(self, proj: str, e: int) -> torch.Tensor:
        """Expert e's dense update ``scale * B @ A`` on ``proj`` (training form only)."""
        A, B = self.lora_A[proj][e], self.lora_B[proj][e]
        return self.scales[proj][e] * (B.float() @ A.float())

    @torch.no_grad()
    def materialize(self) -> None:
        """Switch to the deployed form: E dense copies of every projection, LoRA dropped."""
        if self.materialized:
            return
        self.dense, self.dense_bias = nn.ParameterDict(), nn.ParameterDict()
        for proj in PROJECTIONS:
            base = getattr(self, proj)
            W = base.weight
            copies = torch.stack([W.float() + self.delta(proj, e) for e in range(self.num_experts)])
            self.dense[proj] = nn.Parameter(copies.to(W.dtype), requires_grad=False)
            if base.bias is not None:  # LoRA leaves biases alone: one shared copy
                self.dense_bias[proj] = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
            delattr(self, proj)
        del self.lora_A, self.lora_B
        self.materialized = True

    def _linear(self, proj: str, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.materialized:
            return F.linear(x, self.dense[proj][e], self.dense_bias[proj] if proj in self.dense_bias else None)
        y = getattr(self, proj)(x)
        A = self.lora_A[proj][e]
        if A.shape[0] == 0:
            return y
        return y + self.scales[proj][e] * F.linear(F.linear(x, A), self.lora_B[proj][e])

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's MLP on hidden states ``x``."""
        hidden = self.act_fn(self._linear("gate_proj", e, x)) * self._linear("up_proj", e, x)
        return self._linear("down_proj", e, hidden)

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights (..., E): top-k of the router softmax, renormalised."""
        if self.forced_weights is not None:
            self.last_probs = None
            forced = self.forced_weights.to(device=x.device, dtype=torch.float32)
            return forced.expand(*x.shape[:-1], self.num_experts)
        # fp32 even under bf16 autocast: top-k is discrete and bf16 rounding flips close calls
        # between training (autocast) and evaluation (fp32).
        with torch.autocast(x.device.type, enabled=False):
            probs = F.linear(x.float(), self.router.weight.float()).softmax(-1)
        self.last_probs = probs
        top, idx = probs.topk(self.top_k, dim=-1)
        return torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.routing_weights(x).reshape(-1, self.num_experts)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.zeros_like(flat)
        # Each expert runs only on the tokens routed to it (Mixtral-style dispatch).
        for e in range(self.num_experts):
            rows = weights[:, e].nonzero().squeeze(-1)
            if rows.numel():
                y = self.expert(e, flat[rows]) * weights[rows, e, None]
                out = out.index_add(0, rows, y.to(out.dtype))
        return out.reshape(x.shape)


def h3fusion_layers(model: nn.Module) -> list[H3FusionMLP]:
    """The model's H3FusionMLP modules, in layer order."""
    layers = [m for m in model.modules() if isinstance(m, H3FusionMLP)]
    if not layers:
        raise ValueError("not an H3Fusion model (no H3FusionMLP layers); use build_h3fusion")
    return layers


def materialize_h3fusion(model: nn.Module) -> nn.Module:
    """Convert every layer to the deployed (dense experts) form, in place; returns ``model``."""
    for layer in h3fusion_layers(model):
        layer.materialize()
    return model


def _read_loras(base: nn.Module, experts: dict[str, str | Path]) -> dict[str, list]:
    """Load all experts onto ``base``, read every LoRA module's (A, B, scale, delta), unload.

    Returns:
        base-model module name -> one ``(A, B, scale, delta)`` or None per expert.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from mocae.experts.task_vectors import _strip_prefix

    axes = list(experts)
    had_config = hasattr(base, "peft_config")
    peft_model = PeftModel.from_pretrained(base, str(experts[axes[0]]), adapter_name=axes[0])
    try:
        for axis in axes[1:]:
            peft_model.load_adapter(str(experts[axis]), adapter_name=axis)
        found: dict[str, list] = {}
        with torch.no_grad():
            for name, module in peft_model.named_modules():
                if not isinstance(module, LoraLayer):
                    continue
                row = [None] * len(axes)
                for i, axis in enumerate(axes):
                    if axis not in module.lora_A:
                        continue
                    if module.use_dora.get(axis, False):
                        raise ValueError(f"expert {axis!r} uses DoRA, which H3Fusion does not support")
                    # peft's own maths (fan_in_fan_out, rsLoRA scaling) for the dense delta.
                    delta = module.get_delta_weight(axis).detach().float().clone()
                    A, B = module.lora_A[axis].weight, module.lora_B[axis].weight
                    row[i] = (A.detach().clone(), B.detach().clone(), float(module.scaling[axis]), delta)
                found[_strip_prefix(name)] = row
    finally:
        # unload() puts the base Linears back; the stray peft_config would confuse later peft use.
        peft_model.unload()
        if not had_config and hasattr(base, "peft_config"):
            del base.peft_config
    if not found:
        raise ValueError("the experts have no LoRA layers")
    return found


def build_h3fusion(backbone: str, experts: dict[str, str | Path], cfg: H3FusionConfig | None = None,
                   model_and_tokenizer=None):
    """The untrained H3Fusion model: every decoder MLP swapped for an H3FusionMLP, in place.

    Args:
        backbone: backbone name (``mocae.backbones.load_backbone``).
        experts: axis -> peft LoRA folder; the order is the router's output order.
        cfg: fusion settings (``top_k``, ``seed`` are used here).
        model_and_tokenizer: an already loaded (plain) backbone, modified in place.
    Returns:
        (model, tokenizer); ``model.h3fusion_axes`` lists the axes, ``model.h3fusion_source`` the
        backbone, experts and settings it was built from. Base weights are frozen.
    """
    from mocae.backbones import load_backbone
    from mocae.experts.checks import check_experts
    from mocae.experts.task_vectors import TaskVector, apply_task_vector
    from mocae.mixture.router import decoder_layers

    cfg = cfg or H3FusionConfig()
    if not experts:
        raise ValueError("H3Fusion needs at least one expert")
    check_experts(backbone, experts)
    model, tokenizer = model_and_tokenizer or load_backbone(backbone)
    layers = decoder_layers(model)
    # base-model module name -> (layer index, projection) for the MLP projections.
    mlp_ids = {id(getattr(layer.mlp, p)): (i, p) for i, layer in enumerate(layers) for p in PROJECTIONS
               if hasattr(layer.mlp, p)}
    mlp_names = {n: mlp_ids[id(m)] for n, m in model.named_modules() if id(m) in mlp_ids}
    found = _read_loras(model, experts)
    E = len(experts)
    loras = [{p: [None] * E for p in PROJECTIONS} for _ in layers]
    soup = {}
    for name, row in found.items():
        if name in mlp_names:
            i, proj = mlp_names[name]
            for e, item in enumerate(row):
                if item is None:
                    continue
                A, B, scale, delta = item
                # The MLP experts use (A, B, scale); make sure that is exactly peft's delta.
                if not torch.allclose(scale * (B.float() @ A.float()), delta, atol=1e-6, rtol=1e-4):
                    raise ValueError(f"{name}: peft's delta is not scale * B @ A (fan_in_fan_out?)")
                loras[i][proj][e] = (A, B, scale)
        elif any(item is not None for item in row):
            soup[name] = sum(item[3] for item in row if item is not None) / E
    if soup:
        apply_task_vector(model, TaskVector(soup))
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(cfg.seed)
    for i, layer in enumerate(layers):
        layer.mlp = H3FusionMLP(layer.mlp, loras[i], top_k=cfg.top_k, generator=generator)
    model.h3fusion_axes = list(experts)
    model.h3fusion_source = {"backbone": backbone, "experts": dict(experts), "config": cfg}  # what saving records
    model.eval()
    return model, tokenizer


def drift_norm(model: nn.Module) -> torch.Tensor:
    """Sum over layers, projections and experts of ``||scale * B_e @ A_e||_F`` (differentiable).

    Uses ``||B A||_F^2 = sum((B^T B) * (A A^T))``: r x r products instead of the dense delta.
    """
    total = torch.zeros(())
    for layer in h3fusion_layers(model):
        if layer.materialized:
            raise ValueError("drift needs the training form (call before materialize)")
        for proj in PROJECTIONS:
            for e in range(layer.num_experts):
                A, B = layer.lora_A[proj][e].float(), layer.lora_B[proj][e].float()
                if A.shape[0] == 0:
                    continue
                sq = ((B.T @ B) * (A @ A.T)).sum().clamp_min(1e-12)
                total = total + abs(layer.scales[proj][e]) * sq.sqrt()
    return total


def gating_loss(model: nn.Module, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the cross-entropy between each sample's router probabilities
    (averaged over its non-pad tokens) and its axis label."""
    mask = attention_mask.float().unsqueeze(-1)
    losses = []
    for layer in h3fusion_layers(model):
        if layer.last_probs is None:
            raise ValueError("no router probabilities recorded (forced routing?)")
        per_sample = (layer.last_probs * mask).sum(1) / mask.sum(1).clamp_min(1)
        losses.append(F.nll_loss(per_sample.clamp_min(1e-9).log(), labels))
    return torch.stack(losses).mean()


def fit_h3fusion(model, tokenizer, examples: list[tuple[str, str, int]], cfg: H3FusionConfig | None = None,
                 progress: bool = True, device: str | None = None) -> dict:
    """Train the routers (and, if ``cfg.train_experts``, the experts' LoRA) of a built model.

    Loss = LM loss on completion tokens + gating_weight * gating CE + drift_weight * drift.

    Args:
        examples: (prompt, completion, axis index into ``model.h3fusion_axes``) triples.
        progress: show a tqdm bar.
        device: where to train (``mocae.device.resolve``; the model is moved there).
    Returns:
        {"losses", "lm_loss", "gating_loss", "drift": per-step lists, "steps", "wall_time_s"}.
    """
    from mocae.baselines.training import train_on_completions

    cfg = cfg or H3FusionConfig()
    layers = h3fusion_layers(model)
    E = layers[0].num_experts
    if not examples:
        raise ValueError("fit_h3fusion needs at least one example")
    bad = [y for _, _, y in examples if not 0 <= y < E]
    if bad:
        raise ValueError(f"axis labels must be in [0, {E}); got {sorted(set(bad))}")
    params = [p for name, p in _fusion_params(model).items()
              if p.numel() and (cfg.train_experts or name.endswith("router.weight"))]

    def terms(out, batch, labels):
        lm = out.loss.float()
        gate = gating_loss(model, batch["attention_mask"], labels)
        drift = drift_norm(model)
        return {"losses": lm + cfg.gating_weight * gate + cfg.drift_weight * drift, "lm_loss": lm,
                "gating_loss": gate, "drift": drift}

    try:
        history, wall = train_on_completions(model, tokenizer, examples, params, cfg, "h3fusion", progress, terms,
                                             ("losses", "lm_loss", "gating_loss", "drift"), device=device)
    finally:
        for layer in layers:
            layer.last_probs = None  # do not keep the last step's graph alive
    return {**history, "steps": cfg.steps, "wall_time_s": wall}


def _fusion_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """What training changes: router weights and per-expert LoRA factors, keyed ``layers.<i>.<name>``."""
    params = {}
    for i, layer in enumerate(h3fusion_layers(model)):
        if layer.materialized:
            raise ValueError("needs the training form: save or fit before materialize (it drops the LoRA)")
        params[f"layers.{i}.router.weight"] = layer.router.weight
        for kind in ("lora_A", "lora_B"):
            for proj, plist in getattr(layer, kind).items():
                params.update({f"layers.{i}.{kind}.{proj}.{e}": p for e, p in enumerate(plist)})
    return params


def save_h3fusion(model: nn.Module, path: str | Path, backbone: str | None = None,
                  experts: dict[str, str | Path] | None = None, cfg: H3FusionConfig | None = None) -> Path:
    """Write ``h3fusion_config.json`` + ``h3fusion.safetensors`` to ``path`` atomically.

    The expert folders are referenced (absolute paths), not copied: loading rebuilds from them.

    Args:
        backbone, experts, cfg: what the model was built from (default: ``model.h3fusion_source``).
    """
    from safetensors.torch import save_file

    source = getattr(model, "h3fusion_source", {})
    backbone = backbone or source["backbone"]
    experts = experts or source["experts"]
    cfg = cfg or source["config"]
    state = {k: v.detach().contiguous() for k, v in _fusion_params(model).items()}
    path = Path(path)
    with atomic_directory(path) as tmp:
        save_file(state, str(tmp / STATE_FILE))
        meta = {"backbone": backbone, "experts": {a: str(Path(p).resolve()) for a, p in experts.items()},
                "num_experts": len(experts), "config": cfg.model_dump()}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return path


def load_h3fusion(path: str | Path, model_and_tokenizer=None):
    """Rebuild a saved H3Fusion model and return it materialized (deployed form).

    Raises:
        FileNotFoundError: ``path`` is not an H3Fusion folder.
        ValueError: the saved router/LoRA tensors do not fit the experts (count or shapes).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not an H3Fusion folder (needs {CONFIG_FILE} and {STATE_FILE})")
    meta = json.loads((path / CONFIG_FILE).read_text())
    if len(meta["experts"]) != meta["num_experts"]:
        raise ValueError(f"{path}: config lists {len(meta['experts'])} experts, "
                         f"the saved model has {meta['num_experts']}")
    cfg = H3FusionConfig.model_validate(meta["config"])
    model, tokenizer = build_h3fusion(meta["backbone"], meta["experts"], cfg, model_and_tokenizer)
    saved = load_file(str(path / STATE_FILE))
    params = _fusion_params(model)
    want = {k: tuple(v.shape) for k, v in params.items()}
    got = {k: tuple(v.shape) for k, v in saved.items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:4]
        raise ValueError(f"{path / STATE_FILE} does not fit {len(meta['experts'])} experts on "
                         f"{meta['backbone']!r} (expert count or LoRA shapes differ), e.g. {diff}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    return materialize_h3fusion(model), tokenizer


# ---- the system: trained in the run directory, loaded materialized -------------------------------
def _fit(ctx: BuildContext, examples: list[tuple[str, str, int]], progress: bool = True):
    model, tokenizer = build_h3fusion(ctx.backbone, ctx.experts, ctx.settings)
    return model, tokenizer, fit_h3fusion(model, tokenizer, examples, ctx.settings, progress=progress)


def _save(model, tokenizer, path: str | Path) -> Path:
    path = save_h3fusion(model, path)
    write_marker(path, SYSTEM.name)  # after the atomic save: without it the folder is known by its files
    return path


def _inspect(path: str | Path, backbone: str | None = None) -> str:
    from mocae.errors import read_json

    if not (Path(path) / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not an H3Fusion folder (needs {CONFIG_FILE} and {STATE_FILE})")
    return read_json(Path(path) / CONFIG_FILE)["backbone"]


SYSTEM = SystemSpec(
    name="h3fusion", config=H3FusionConfig, fit=_fit, saved=True, files=(CONFIG_FILE, STATE_FILE),
    save_pretrained=_save,
    from_pretrained=lambda path, backbone=None: load_h3fusion(path), inspect=_inspect,
    description="MoE of the experts' MLPs behind a trained token router")
