"""Routed baselines taken from peft: X-LoRA (a trained token classifier) and Arrow (training-free).

X-LoRA (arXiv 2402.07148, ``peft.XLoraConfig``): a classifier on the base model's last hidden
state gives every token a softmax weight per expert, and each LoRA layer adds
``sum_e w_e * scale_e * B_e A_e x``. Only the classifier trains (LM loss on the completion).
What peft 0.21.2 does, and what we do about it:
  * adapter names must be "0", "1", ...: X-LoRA loads the i-th entry of ``adapters`` under
    the name ``str(i)`` but then activates the dict's *keys*; any other keys fail in the
    first forward (``KeyError: 'helpful'``). We pass ``{"0": path, ...}`` and keep the axis
    names, in index order, in ``model.xlora_experts``.
  * every forward runs twice (a scaling pass with the adapters off to get the hidden state,
    then the real pass), and ``XLoraModel`` refuses a model with ``config.use_cache=True``
    and forces ``use_cache=False`` in ``generate``: each new token re-encodes the whole
    sequence, twice (1.8 tok/s at batch 1 on SmolLM2-135M). We set ``use_cache=False`` on the
    backbone for peft, and replace ``model.generate`` with a decoder that runs the same two
    passes with one KV cache each (``xlora_decode``: exact, since both passes are causal);
    peft's own stays as ``model.generate_uncached``. ``model.xlora_note`` records this.
  * ``PeftModel.save_pretrained`` is broken for X-LoRA: the top-level
    ``adapter_model.safetensors`` is empty (the classifier is not saved), and the per-expert
    subfolders "0", "1", ... hold the classifier and base weights with adapter-name-mangled
    keys (``layers.0.weight`` -> ``layers.weight``); ``from_pretrained`` re-reads the experts
    from their original paths, and pointed at those subfolders it loops forever
    (``_load_adapter_into_lora_model`` strips key prefixes until ``model.``, never found).
    ``save_xlora`` therefore writes the classifier state dict, copies of the expert adapter
    folders and a json; ``load_xlora`` rebuilds from those.

Arrow (arXiv 2405.11157, ``peft.ArrowConfig`` + ``create_arrow_model``): each expert's
prototype is the top right singular vector of its ``B @ A`` per layer; a token goes to the
``top_k`` experts with the largest ``|<x, prototype>|`` (sign-agnostic, not normalised by
``|x|``), weighted by a softmax of those scores over ``router_temperature``. No training.
peft's defaults are top_k=3, router_temperature=1.0, rng_seed=None; we seed the power
iteration (``seed=0``) so the prototypes, and so the outputs, are reproducible. peft requires
every expert to share the LoRA rank and target modules (checked here, naming the expert) and
fails with a bare ``RuntimeError: selected index k out of range`` at the first forward when
top_k exceeds the number of experts (checked here at build time). General-knowledge
subtraction (``use_gks``) is not used: it needs separately trained general adapters.

    model, tok = build_xlora("smollm2-135m", experts, XLoraBaselineConfig())
    fit_xlora(model, tok, [(prompt, completion, axis_index), ...])
    save_xlora(model, "runs/x/xlora"); model, tok = load_xlora("runs/x/xlora")
    model, tok = build_arrow("smollm2-135m", experts, ArrowBaselineConfig())
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from mocae.baselines.xlora_decode import use_cached_decoding
from mocae.experts.checks import check_experts
from mocae.paths import atomic_directory, atomic_write_json
from mocae.spec import BuildContext, Capabilities, SystemSpec, declare, write_marker

XLORA_FILE = "xlora.json"
XLORA_CLASSIFIER_FILE = "xlora_classifier.safetensors"
XLORA_NOTE = ("peft X-LoRA: two forward passes per call (scaling pass + real pass); peft's generate forces "
              "use_cache=False, so mocae decodes it with one KV cache per pass (baselines/xlora_decode.py, "
              "same tokens as peft's own generate, kept as model.generate_uncached)")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "training.json")
# X-LoRA's two-pass forward has no usable KV cache (the MC scorer's shared prefix cannot be reused);
# Arrow's router mixes fp32 and bf16 in a scatter_ under autocast and fails (scoring stays fp32).
XLORA_CAPABILITIES = Capabilities(kv_cache=False)
ARROW_CAPABILITIES = Capabilities(bf16_autocast=False)


class XLoraBaselineConfig(BaseModel):
    """X-LoRA classifier and its training (peft's defaults unless noted; none are paper settings)."""

    model_config = ConfigDict(extra="forbid")
    depth: int = Field(1, ge=1, description="classifier layers (1 = a linear map hidden -> experts)")
    size: int = Field(2048, ge=1, description="classifier hidden width (only used when depth > 1)")
    dropout: float = Field(0.2, ge=0, lt=1, description="classifier dropout (only used when depth > 1)")
    layerwise_scalings: bool = Field(False, description="separate expert weights for every LoRA layer")
    top_k: int | None = Field(None, ge=1, description="keep only the top_k expert weights per token (None = dense)")
    softmax_temperature: float = Field(1.0, gt=0, description="temperature of the classifier's softmax")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate of the classifier (our choice)")
    steps: int = Field(100, ge=0, description="optimiser steps")
    batch_size: int = Field(8, ge=1, description="examples per step")
    max_length: int = Field(256, ge=1, description="tokens per example (prompt + completion)")
    seed: int = Field(0, description="classifier initialisation and example order")


class ArrowBaselineConfig(BaseModel):
    """Arrow routing (peft.ArrowConfig)."""

    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(3, ge=1, description="experts mixed per token (peft default 3; at most the number of experts)")
    router_temperature: float = Field(1.0, gt=0, description="softmax temperature over the top_k scores")
    seed: int | None = Field(0, description="seed of the prototypes' power iteration (peft default None: "
                                            "not reproducible)")


def _read_adapter_config(path: Path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


def _targets(adapter_config: dict):
    targets = adapter_config.get("target_modules")
    return sorted(targets) if isinstance(targets, list) else targets  # a regex string stays as is


def _check_names(experts: dict) -> None:
    if not experts:
        raise ValueError("need at least one expert")
    bad = [n for n in experts if not n or "/" in n or "\\" in n or n.startswith(".")]
    if bad:
        raise ValueError(f"expert names must be plain folder names, got {bad}")


# ---------------------------------------------------------------- X-LoRA

def build_xlora(backbone: str, experts: dict[str, str | Path], cfg: XLoraBaselineConfig | None = None,
                model_and_tokenizer: tuple | None = None) -> tuple:
    """An X-LoRA model over the experts, with an untrained classifier.

    Args:
        backbone: backbone name (``load_backbone``), checked against the experts' records.
        experts: expert name -> adapter folder; the order fixes the classifier's outputs.
        cfg: classifier settings.
        model_and_tokenizer: an already loaded plain backbone to wrap (its use_cache is turned off).
    Returns:
        (model, tokenizer): a peft ``PeftModelForCausalLM``; ``model.xlora_experts`` lists the
        expert names in classifier order, ``model.xlora_note`` states the cost.
    """
    from peft import XLoraConfig, get_peft_model

    from mocae.backbones import load_backbone

    cfg = cfg or XLoraBaselineConfig()
    _check_names(experts)
    check_experts(backbone, experts)
    paths = {name: Path(path) for name, path in experts.items()}
    if cfg.top_k is not None and cfg.top_k > len(paths):
        raise ValueError(f"XLoraBaselineConfig.top_k={cfg.top_k} exceeds the {len(paths)} experts")
    for name, path in paths.items():
        if _read_adapter_config(path).get("use_dora"):
            raise ValueError(f"expert {name!r} is a DoRA adapter; peft's X-LoRA does not support DoRA")
    model, tokenizer = model_and_tokenizer or load_backbone(backbone)
    # XLoraModel raises on use_cache=True; generate forces it off anyway (two passes per token).
    model.config.use_cache = False
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = False
    xcfg = XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=model.config.hidden_size,
        adapters={str(i): str(p) for i, p in enumerate(paths.values())},  # peft 0.21 needs "0", "1", ...
        xlora_depth=cfg.depth, xlora_size=cfg.size, xlora_dropout_p=cfg.dropout,
        layerwise_scalings=cfg.layerwise_scalings, top_k_lora=cfg.top_k,
        softmax_temperature=cfg.softmax_temperature,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the classifier's initialisation
        model = get_peft_model(model, xcfg)
    model.requires_grad_(False)
    model.eval()
    model.xlora_experts = list(paths)
    model.xlora_expert_paths = {name: str(p) for name, p in paths.items()}
    model.xlora_backbone = backbone
    model.xlora_settings = cfg.model_dump()
    model.xlora_note = XLORA_NOTE
    return declare(use_cached_decoding(model), XLORA_CAPABILITIES), tokenizer


def xlora_classifier(model) -> torch.nn.Module:
    """The X-LoRA classifier module of a ``build_xlora`` model.

    Raises:
        ValueError: ``model`` is not an X-LoRA model.
    """
    classifier = getattr(getattr(model, "base_model", None), "internal_xlora_classifier", None)
    if classifier is None:
        raise ValueError(f"{type(model).__name__} is not a peft X-LoRA model (no internal_xlora_classifier)")
    return classifier


def fit_xlora(model, tokenizer, examples: list[tuple[str, str, int]], cfg: XLoraBaselineConfig | None = None,
              progress: bool = True, device: str | None = None) -> dict:
    """Train only the X-LoRA classifier on the LM loss of the completions.

    The experts, the base model and their dropout stay in eval mode; only the classifier
    (and its dropout) is in train mode, under bf16 autocast (``baselines.training``).

    Args:
        examples: (prompt, completion, axis index) triples; X-LoRA learns its routing from the
            LM loss alone (as in the paper), so the axis index is not used.
        cfg: training settings (default: those given to ``build_xlora``).
        progress: show a tqdm bar.
        device: where to train (``mocae.device.resolve``; the model is moved there).
    Returns:
        {"losses": per-step LM loss, "steps", "wall_time_s", "trainable_params"}.
    """
    from mocae.baselines.training import train_on_completions

    cfg = cfg or XLoraBaselineConfig(**getattr(model, "xlora_settings", {}))
    classifier = xlora_classifier(model)
    if not examples:
        raise ValueError("fit_xlora needs at least one example")
    params = list(classifier.parameters())
    # The experts, the base model and their dropout stay in eval mode: only the classifier trains.
    history, wall = train_on_completions(model, tokenizer, examples, params, cfg, "x-lora", progress,
                                         train_module=classifier, device=device)
    return {"losses": history["losses"], "steps": cfg.steps, "wall_time_s": wall,
            "trainable_params": sum(p.numel() for p in params)}


def save_xlora(model, path: str | Path, meta: dict | None = None) -> Path:
    """Save a ``build_xlora`` model: classifier weights, copies of the experts, ``xlora.json``.

    The folder is self-contained (the experts are copied, ~2 r (in + out) values per module
    each), so it survives the original expert folders moving. Written atomically.

    Args:
        model: from ``build_xlora`` (trained or not).
        path: target folder.
        meta: extra provenance for ``xlora.json``.
    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    classifier = xlora_classifier(model)
    record = {"backbone": model.xlora_backbone, "experts": model.xlora_experts,
              "source_experts": model.xlora_expert_paths, "config": model.xlora_settings,
              "note": model.xlora_note, **(meta or {})}
    with atomic_directory(Path(path)) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in classifier.state_dict().items()}
        save_file(state, tmp / XLORA_CLASSIFIER_FILE)
        for name, source in model.xlora_expert_paths.items():
            (tmp / "experts" / name).mkdir(parents=True)
            for file in ADAPTER_FILES:
                if (Path(source) / file).is_file():
                    shutil.copy2(Path(source) / file, tmp / "experts" / name / file)
        atomic_write_json(tmp / XLORA_FILE, json.loads(json.dumps(record, default=str)))
        write_marker(tmp, XLORA_SYSTEM.name)
    return Path(path)


def load_xlora(path: str | Path, model_and_tokenizer: tuple | None = None) -> tuple:
    """Rebuild a model saved by ``save_xlora``.

    Args:
        path: the saved folder.
        model_and_tokenizer: an already loaded plain backbone to wrap.
    Returns:
        (model, tokenizer) as from ``build_xlora``, with the saved classifier weights.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / XLORA_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a saved X-LoRA baseline (no {XLORA_FILE})")
    record = json.loads((path / XLORA_FILE).read_text())
    experts = {name: path / "experts" / name for name in record["experts"]}
    model, tokenizer = build_xlora(record["backbone"], experts, XLoraBaselineConfig(**record["config"]),
                                   model_and_tokenizer)
    xlora_classifier(model).load_state_dict(load_file(path / XLORA_CLASSIFIER_FILE), strict=True)
    model.xlora_expert_paths = record.get("source_experts", model.xlora_expert_paths)
    return model, tokenizer


# ---------------------------------------------------------------- Arrow

def build_arrow(backbone: str, experts: dict[str, str | Path], cfg: ArrowBaselineConfig | None = None,
                model_and_tokenizer: tuple | None = None) -> tuple:
    """An Arrow-routed model over the experts (training-free).

    Args:
        backbone: backbone name (``load_backbone``), checked against the experts' records.
        experts: expert name -> adapter folder (same LoRA rank and target modules).
        cfg: routing settings.
        model_and_tokenizer: an already loaded plain backbone to wrap.
    Returns:
        (model, tokenizer): a peft ``PeftModel`` with the ``arrow_router`` adapter active;
        ``model.arrow_experts`` maps peft's names (``task_0``, ...) to the expert names.
    """
    from peft import ArrowConfig, create_arrow_model

    from mocae.backbones import load_backbone

    cfg = cfg or ArrowBaselineConfig()
    _check_names(experts)
    check_experts(backbone, experts)
    paths = {name: Path(path) for name, path in experts.items()}
    if cfg.top_k > len(paths):
        raise ValueError(f"ArrowBaselineConfig.top_k={cfg.top_k} exceeds the {len(paths)} experts")
    # peft checks these too, but names the experts task_0, task_1, ...
    configs = {name: _read_adapter_config(p) for name, p in paths.items()}
    first, ref = next(iter(configs.items()))
    for name, c in configs.items():
        if c["r"] != ref["r"] or _targets(c) != _targets(ref):
            raise ValueError(f"Arrow needs experts with one LoRA rank and target set: {name!r} has "
                             f"r={c['r']} on {_targets(c)}, {first!r} has r={ref['r']} on {_targets(ref)}")
    model, tokenizer = model_and_tokenizer or load_backbone(backbone)
    arrow_cfg = ArrowConfig(top_k=cfg.top_k, router_temperature=cfg.router_temperature, rng_seed=cfg.seed)
    model = create_arrow_model(model, [str(p) for p in paths.values()], arrow_cfg)
    model.requires_grad_(False)
    with torch.no_grad():  # the arrow_router adapter's own A/B are unused placeholders, but peft draws A from
        for name, p in model.named_parameters():  # the global RNG: zeroed, so the weights' fingerprint is stable
            if ".arrow_router." in name:
                p.zero_()
    model.eval()
    model.arrow_experts = {f"task_{i}": name for i, name in enumerate(paths)}
    model.arrow_settings = cfg.model_dump()
    return declare(model, ARROW_CAPABILITIES), tokenizer


# ---------------------------------------------------------------- the systems
def _fit_xlora(ctx: BuildContext, examples: list[tuple[str, str, int]], progress: bool = True):
    model, tokenizer = build_xlora(ctx.backbone, ctx.experts, ctx.settings)
    return model, tokenizer, fit_xlora(model, tokenizer, examples, ctx.settings, progress=progress)


def _inspect_xlora(path: str | Path, backbone: str | None = None) -> str:
    from mocae.errors import read_json

    return read_json(Path(path) / XLORA_FILE)["backbone"]


def _arrow_fingerprint(ctx: BuildContext) -> dict:
    from mocae.stages import experts_fingerprint

    return {"experts": experts_fingerprint(ctx.experts),
            "arrow": ctx.settings.model_dump(mode="json")}


XLORA_SYSTEM = SystemSpec(
    name="xlora", config=XLoraBaselineConfig, fit=_fit_xlora, saved=True, files=(XLORA_FILE, XLORA_CLASSIFIER_FILE),
    save_pretrained=lambda model, tokenizer, path: save_xlora(model, path),
    from_pretrained=lambda path, backbone=None: load_xlora(path), inspect=_inspect_xlora,
    capabilities=XLORA_CAPABILITIES, description="peft X-LoRA, its classifier trained here")
ARROW_SYSTEM = SystemSpec(
    name="arrow", config=ArrowBaselineConfig, build=lambda ctx: build_arrow(ctx.backbone, ctx.experts, ctx.settings),
    fingerprint=_arrow_fingerprint, capabilities=ARROW_CAPABILITIES, description="peft Arrow, training-free")
