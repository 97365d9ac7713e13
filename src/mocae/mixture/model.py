"""MoCaEModel: backbone + named LoRA experts + router + calibrator, saved as one folder.

    model = MoCaEModel.build(MoCaEConfig(backbone="smollm2-135m", experts={...}))
    out = model.chat(["How do I pick a lock?"])      # [{"text": ..., "routing": {...}}]
    model.save_pretrained("runs/x/mocae"); MoCaEModel.from_pretrained("runs/x/mocae")

Experts are any two or more named peft LoRA adapters of one backbone; ``mocae.AXES`` (helpful,
harmless, honest) is the set the HHH evaluation and the default router data use. Weights,
priors, the harm gate's expert and exports name experts; ``model.axes`` lists them in router
order. Folder layout: ``experts/<name>/`` (plain peft adapters), ``router.safetensors``,
``mocae_config.json`` (this config, the calibrator's state, the feature layer).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from mocae import AXES
from mocae.encoder import sentence_embeddings
from mocae.errors import LoadError, load_safetensors, read_json
from mocae.experts.checks import TRAINING_FILE, check_experts as check_expert_folders
from mocae.mixture.decide import DecisionConfig, decide as decide_weights
from mocae.mixture.layer import LoraMixer, PeftBackedModel, check_weights
from mocae.paths import atomic_directory
from mocae.spec import write_marker
from mocae.mixture.router import (
    SequenceRouter,
    StaticRouter,
    TokenRouter,
    decoder_layers,
    content_margins,
    pooled_hidden_states,
    pooling_mask,
    template_margins,
)

CONFIG_FILE = "mocae_config.json"
ROUTER_FILE = "router.safetensors"


class MoCaEConfig(BaseModel):
    """What a MoCaE model is made of."""

    model_config = ConfigDict(extra="forbid")
    backbone: str = Field(description="backbone the experts were trained on")
    experts: dict[str, str] = Field(description="expert name -> peft adapter folder, in router output order "
                                                "(two or more; mocae.AXES for the HHH evaluation)")
    routing: Literal["sequence", "token", "static"] = "sequence"
    feature_layer: int | None = Field(None, description="sequence routing: pooled layer (None = middle)")
    router_input: Literal["hidden", "embedding"] = Field(
        "embedding", description="sequence routing: a MiniLM sentence embedding of the user's message "
                                 "(default: calibrates best, benchmarks/results/router_calibration.json) "
                                 "or the base model's hidden state at feature_layer")
    pooling: Literal["mean", "content", "last"] = Field(
        "content", description="sequence routing: average all tokens, only the user's message, or take the last")
    top_k: int | None = Field(None, description="token routing: experts kept per token")
    token_temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="token routing softmax temperature")
    static_weights: list[float] | dict[str, float] | None = Field(
        None, description="static routing weights, in expert order or by name (experts left out get 0)")
    calibrator: str = Field("temperature", description="see mocae.mixture.calibration.build_calibrator")
    merge_single_request: bool = Field(True, description="fold weights into W0 for batch-1 generation")
    decision: DecisionConfig = Field(  # routing that decides (mocae.mixture.decide)
        default_factory=DecisionConfig, description="how calibrated probabilities become weights: soft blend, "
                                                    "top1, harm gate (threshold fitted on calib) or gate+top1")

    @model_validator(mode="after")
    def _decision_needs_per_request_routing(self):
        if self.routing == "token" and self.decision.mode != "soft":
            raise ValueError(f"decision mode {self.decision.mode!r} decides per request; token routing has "
                             "no per-request probabilities (use sequence routing or mode 'soft')")
        return self

    @model_validator(mode="after")
    def _named_experts(self):
        check_expert_names(list(self.experts))
        if self.decision.gates and self.decision.gate_axis not in self.experts:
            raise ValueError(f"decision mode {self.decision.mode!r} gates on expert {self.decision.gate_axis!r}, "
                             f"which is not one of the experts {list(self.experts)} (set decision.gate_axis)")
        if isinstance(self.static_weights, dict):
            unknown = sorted(set(self.static_weights) - set(self.experts))
            if unknown:
                raise ValueError(f"static_weights: unknown experts {unknown}; the experts are {list(self.experts)}")
            self.static_weights = [float(self.static_weights.get(name, 0.0)) for name in self.experts]
        return self


_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def check_expert_names(names: list[str], model=None) -> None:
    """Expert names are peft adapter names and folder names: at least two, each a letter then
    letters, digits, ``_`` or ``-``, and no attribute of torch's ModuleDict (which holds each
    layer's adapters, so ``train`` cannot be one). With the backbone ``model``, no name may be a
    part of its module names either: peft tells adapters' weights apart by such parts, so an
    expert called ``mlp`` or ``q_proj`` would lose weights when saved.

    Raises:
        ValueError: naming the experts at fault.
    """
    if len(names) < 2:
        raise ValueError(f"a mixture needs at least two experts, got {names}")
    bad = [n for n in names if not isinstance(n, str) or not _NAME.fullmatch(n)]
    if bad:
        raise ValueError(f"expert names {bad} are not a letter followed by letters, digits, '_' or '-'")
    reserved = [n for n in names if hasattr(nn.ModuleDict(), n)]
    if reserved:
        raise ValueError(f"expert names {reserved} are attributes of torch's ModuleDict, which holds peft's "
                         "adapters; choose other names")
    if model is not None:
        parts = {part for name, _ in model.named_parameters() for part in name.split(".")}
        parts |= {part for name, _ in model.named_modules() for part in name.split(".")}
        parts |= {"base_model", "base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                  "lora_dropout", "lora_magnitude_vector"}
        clash = [n for n in names if n in parts]
        if clash:
            raise ValueError(f"expert names {clash} are parts of the backbone's (or peft's) module names; peft "
                             "would mix up their weights when saving: choose other names")


def check_experts(backbone: str, experts: dict[str, str], model=None, rebuild: str | None = None) -> None:
    """Experts must be LoRA adapters of ``backbone`` that target the same modules
    (``mocae.experts.checks.check_experts``, which raises naming the expert's file at fault)."""
    check_expert_folders(backbone, experts, model, rebuild, same_targets=True)


def _load_adapters(base, experts: dict[str, str], rebuild: str | None = None):
    """A PeftModel holding every expert under its name; a damaged weights file is named."""
    from peft import PeftModel
    from safetensors import SafetensorError

    peft_model = None
    for axis, path in experts.items():
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(base, path, adapter_name=axis)
            else:
                peft_model.load_adapter(path, adapter_name=axis)
        except (SafetensorError, OSError) as err:
            retrain = f"rm -r {path} && mocae train-expert --axis {axis}" if axis in AXES else None
            raise LoadError(Path(path) / "adapter_model.safetensors", f"expert {axis!r} cannot be loaded ({err})",
                            rebuild or retrain) from None
    return peft_model.eval()


class MoCaEModel(PeftBackedModel):
    """The Mixture of Calibrated Experts. Use ``build`` or ``from_pretrained`` to make one."""

    def __init__(self, peft_model, tokenizer, config: MoCaEConfig, router: nn.Module, calibrator):
        super().__init__()
        self.peft_model = peft_model
        self.tokenizer = tokenizer
        self.mocae_config = config
        self.axes = list(config.experts)
        self.router = router
        self.calibrator = calibrator
        self.mixer = LoraMixer(peft_model, self.axes)
        self._token_hooks = []
        if isinstance(router, TokenRouter):
            for i, layer in enumerate(decoder_layers(peft_model)):
                self._token_hooks.append(layer.register_forward_pre_hook(self._token_hook(i), with_kwargs=True))
        self._forced: torch.Tensor | None = None
        self._template: tuple[list[int], int] | None = None
        # Optional input_ids -> (B, E) weights, for callers whose inputs are not chat requests
        # (lm-eval's few-shot MC contexts: route on the question, as a chat request would).
        self.routing_override = None

    # construction -----------------------------------------------------------------------------
    @classmethod
    def build(cls, config: MoCaEConfig, model_and_tokenizer=None, calibrator=None,
              rebuild: str | None = None) -> "MoCaEModel":
        """Load the backbone and experts and make an (untrained) router of the configured kind.

        Args:
            config: backbone, expert folders and routing.
            model_and_tokenizer: an already loaded backbone (else ``load_backbone``).
            calibrator: the router's calibrator (default: none, the plain softmax).
            rebuild: the command named when an expert folder is damaged (default: retrain it).

        Raises:
            FileNotFoundError / LoadError / ValueError: an expert that is missing, damaged or does
                not fit the backbone, named, before peft loads it.
        """
        from mocae.backbones import load_backbone
        from mocae.mixture.calibration import build_calibrator

        check_experts(config.backbone, config.experts, rebuild=rebuild)  # before the backbone loads
        base, tokenizer = model_and_tokenizer or load_backbone(config.backbone)
        check_experts(config.backbone, config.experts, base, rebuild)  # shapes, before peft sees them
        check_expert_names(list(config.experts), base)
        peft_model = _load_adapters(base, config.experts, rebuild)
        router = make_router(config, base.config)
        # Until fit_router fits one, routing probabilities are the plain softmax.
        return cls(peft_model, tokenizer, config, router, calibrator or build_calibrator("none"))

    @classmethod
    def from_experts(cls, model, tokenizer, experts: dict[str, str | Path], backbone: str | None = None,
                     **routing) -> "MoCaEModel":
        """A MoCaE over an already loaded backbone, the way ``PeftModel.from_pretrained(model, path)`` works.

        Args:
            model, tokenizer: the backbone the experts were trained on (peft wraps ``model`` in place).
            experts: expert name -> peft adapter folder (two or more, any peft LoRA adapters of
                ``model`` that target the same modules), in router output order.
            backbone: its name (default: the one the first expert records); every adapter tensor
                is checked against ``model`` either way.
            routing: further MoCaEConfig fields (``routing="token"``, ``top_k=2``, ``pooling=...``).
        """
        experts = {axis: str(path) for axis, path in experts.items()}
        if backbone is None:
            first = Path(next(iter(experts.values())))
            record, adapter = first / TRAINING_FILE, first / "adapter_config.json"
            backbone = (read_json(record).get("backbone") if record.is_file() else None) or (
                read_json(adapter).get("base_model_name_or_path") if adapter.is_file() else None) or (
                model.config.name_or_path)
        return cls.build(MoCaEConfig(backbone=backbone, experts=experts, **routing), (model, tokenizer))

    # routing ----------------------------------------------------------------------------------
    def _token_hook(self, index: int):
        def hook(module, args, kwargs):
            if self._forced is None:
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                self.mixer.token_weights[index] = self.router.weights(index, hidden)
        return hook

    def router_features(self, input_ids, attention_mask) -> torch.Tensor:
        """The base model's pooled features that the sequence router reads (mixture off)."""
        if self._template is None:
            self._template = template_margins(self.tokenizer)
        margins = content_margins(input_ids, attention_mask, self._template)
        pool = pooling_mask(attention_mask, self.router.pooling, margins)
        if self.mocae_config.router_input == "embedding":
            texts = [self.tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
                     for ids, m in zip(input_ids, pool)]
            return sentence_embeddings(texts).to(input_ids.device)  # the encoder runs on the CPU
        with self.mixer.weights(None):
            return pooled_hidden_states(self.peft_model, input_ids, attention_mask, self.router.feature_layer, pool)

    def router_logits(self, input_ids, attention_mask) -> torch.Tensor:
        """Uncalibrated router logits (B, E) for sequence or static routing."""
        if isinstance(self.router, TokenRouter):
            raise ValueError("token routing has no per-request logits")
        if isinstance(self.router, StaticRouter):
            return self.router(torch.zeros(input_ids.shape[0], 1))
        return self.router(self.router_features(input_ids, attention_mask))

    @torch.no_grad()
    def route(self, input_ids, attention_mask, prior=None, decide: bool = True) -> torch.Tensor:
        """Routing weights (B, E): the calibrated probabilities, optionally tilted by a prior over
        axes, then ``mocae_config.decision`` (soft / top1 / harm gate; ``decide=False`` or
        ``routing_probs``: the probabilities themselves). The gate reads P(harmful) before the prior."""
        if isinstance(self.router, SequenceRouter):
            features = self.router_features(input_ids, attention_mask)
            logits = self.router(features)
            if not torch.isfinite(logits).all():
                raise ValueError("router logits are not finite (NaN/inf): the router's weights "
                                 "(router.safetensors) or its input features are damaged")
            probs = self.calibrator.probs(logits, features)
        else:
            probs = self.router_logits(input_ids, attention_mask).softmax(-1)
        calibrated = probs
        if prior is not None:
            probs = probs * self._axis_vector(prior, "prior")
            probs = probs / probs.sum(-1, keepdim=True)
        return self.decide(probs, calibrated) if decide else probs

    def routing_probs(self, input_ids, attention_mask, prior=None) -> torch.Tensor:
        """Calibrated routing probabilities (B, E), optionally tilted by a prior (no decision)."""
        return self.route(input_ids, attention_mask, prior, decide=False)

    @property
    def base_rows_allowed(self) -> bool:
        """True when routing may give all-zero weights (top1's ``base`` fallback: the backbone alone)."""
        return self.mocae_config.decision.base_fallback

    def decide(self, probs: torch.Tensor, gate_probs: torch.Tensor | None = None) -> torch.Tensor:
        """Mixture weights from calibrated probabilities under ``mocae_config.decision``."""
        return decide_weights(probs, self.mocae_config.decision, self.axes, gate_probs)

    def _axis_vector(self, weights, field: str = "axis_weights") -> torch.Tensor:
        """Steering weights or a prior, checked before anything is merged.

        Raises:
            ValueError: unknown axes, a wrong count, or a value that is not finite and >= 0, or
                all zero, naming ``field`` and the values.
        """
        if isinstance(weights, dict):
            unknown = set(weights) - set(self.axes)
            if unknown:
                raise ValueError(f"{field}: unknown axes {sorted(unknown)}; experts are {self.axes}")
            given = weights
            weights = [weights.get(a, 0.0) for a in self.axes]
        else:
            given = weights
        try:
            w = torch.as_tensor([float(x) for x in weights], dtype=torch.float32)
        except (TypeError, ValueError):
            raise ValueError(f"{field} must be numbers, one per axis {self.axes}, got {given!r}") from None
        if w.shape != (len(self.axes),):
            raise ValueError(f"{field} must have {len(self.axes)} values (axes {self.axes}), got {given!r}")
        if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"{field} must be finite numbers >= 0 with a positive sum, got {given!r}")
        return w

    # forward and generation ---------------------------------------------------------------------
    def _weights_for(self, input_ids, attention_mask, axis_weights=None, prior=None):
        if axis_weights is not None:
            w = self._axis_vector(axis_weights)
            return (w / w.sum()).expand(input_ids.shape[0], -1)
        if isinstance(self.router, TokenRouter):
            return None
        if prior is not None:
            self._axis_vector(prior, "prior")  # before the router's features are computed
        weights = self.route(input_ids, attention_mask, prior)
        # A damaged router or calibrator (NaN parameters) must fail here, not merge NaN into W0.
        check_weights(weights, "routing probabilities from the router (are router.safetensors and "
                               "the calibrator state finite?)", allow_zero_rows=self.base_rows_allowed)
        return weights

    def forward(self, input_ids, attention_mask=None, axis_weights=None, prior=None,
                routing_weights: torch.Tensor | None = None, **kwargs):
        """A routed forward pass, returning the backbone's output.

        Routing comes from these inputs unless ``routing_weights`` (B, E) are given, e.g. weights
        routed on the prompt alone when scoring an answer appended to it.
        """
        if routing_weights is None and self.routing_override is not None:
            routing_weights = self.routing_override(input_ids)
        if routing_weights is not None:
            weights = routing_weights
        else:  # route on these tokens (a mask made up here would not cover a past KV cache: not passed on)
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            weights = self._weights_for(input_ids, mask, axis_weights, prior)
        self._forced = weights if (weights is not None and isinstance(self.router, TokenRouter)) else None
        try:
            with self.mixer.weights(weights, allow_zero_rows=self.base_rows_allowed):
                return self.peft_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self._forced = None
            self.mixer.token_weights.clear()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, axis_weights=None, prior=None,
                 return_routing: bool = False, **kwargs):
        """HF-style generate: route once at prefill, then decode with the KV cache.

        With one request and sequence weights the mixture is merged into W0 for the decode when
        the answer is long enough for the merge to pay (``LoraMixer.merge_pays``: a short answer,
        a 1-token prefill above all, decodes faster unmerged than a merge takes); the base
        weights are restored bit for bit afterwards, also when the decode raises.
        """
        from mocae.generation import check_max_new_tokens

        if kwargs.get("max_new_tokens") is not None:
            check_max_new_tokens(kwargs["max_new_tokens"])
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        weights = self._weights_for(input_ids, attention_mask, axis_weights, prior)
        self._forced = weights if (weights is not None and isinstance(self.router, TokenRouter)) else None
        try:
            merge = self.mocae_config.merge_single_request and self.mixer.merge_pays(kwargs.get("max_new_tokens"))
            with self.mixer.weights(weights, merge=merge, allow_zero_rows=self.base_rows_allowed):
                out = self.peft_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self._forced = None
            self.mixer.token_weights.clear()
        return (out, weights) if return_routing else out

    def chat(self, prompts: list[str] | str, max_new_tokens: int = 128, axis_weights=None, prior=None,
             system: str | None = None, truncate_prompt: bool = False) -> list[dict]:
        """Answer chat prompts; each answer carries its routing weights per expert.

        Args:
            prompts: user messages (or one); empty ones are rejected.
            max_new_tokens: the answer's budget (at most ``generation.MAX_NEW_TOKENS`` and what
                the context leaves after the prompt).
            axis_weights: fixed weights by expert name (steering; experts left out get 0), instead
                of the router.
            prior: multiplies the router's probabilities (tilting), then renormalised.
            system: optional system message.
            truncate_prompt: keep the end of a prompt too long for the context, with a warning
                (default: refuse it with a ValueError).

        Raises:
            ValueError: an empty or over-long prompt, a bad budget, bad weights or prior.
        """
        from mocae.generation import chat_inputs, context_window

        if axis_weights is not None:
            self._axis_vector(axis_weights)
        if prior is not None:
            self._axis_vector(prior, "prior")
        texts = chat_inputs(self.tokenizer, prompts, system, max_new_tokens, context_window(self), truncate_prompt)
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        try:
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        finally:
            self.tokenizer.padding_side = side
        out, weights = self.generate(**batch, axis_weights=axis_weights, prior=prior, return_routing=True,
                                     max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        results = []
        for i, row in enumerate(new):
            routing = None if weights is None else dict(zip(self.axes, weights[i].tolist()))
            results.append({"text": self.tokenizer.decode(row, skip_special_tokens=True).strip(),
                            "routing": routing})
        return results

    @property
    def routes_per_request(self) -> bool:
        """True when routing gives one weight vector per request (sequence or static routing)."""
        return not isinstance(self.router, TokenRouter)

    @property
    def mocae_capabilities(self):
        """A router over ``axes``, per request unless it routes per token (``mocae.spec``); a caller
        that steers the routing may declare others (``mocae.spec.declare``)."""
        from mocae.spec import Capabilities

        declared = self.__dict__.get("_declared_capabilities")
        return declared or Capabilities(router=True, per_request_routing=self.routes_per_request)

    @mocae_capabilities.setter
    def mocae_capabilities(self, value) -> None:
        self.__dict__["_declared_capabilities"] = value

    # save / load --------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        """Write adapters, router weights and config; atomically replaces ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_directory(path) as tmp:
            for axis in self.axes:
                self.peft_model.save_pretrained(tmp / "experts", selected_adapters=[axis])
            # peft writes non-default adapters under a subfolder named after the adapter.
            experts = {a: f"experts/{a}" if (tmp / "experts" / a).is_dir() else "experts" for a in self.axes}
            for axis, rel in experts.items():  # the training record says which backbone: checked at load
                record = Path(self.mocae_config.experts[axis]) / TRAINING_FILE
                if record.is_file():
                    shutil.copyfile(record, tmp / rel / TRAINING_FILE)
            save_file({k: v.contiguous() for k, v in self.router.state_dict().items()}, str(tmp / ROUTER_FILE))
            meta = {"config": {**self.mocae_config.model_dump(), "experts": experts},
                    "num_experts": len(self.axes),
                    "feature_layer": getattr(self.router, "feature_layer", None),
                    "calibrator": self.calibrator.state_dict()}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
            write_marker(tmp, "mocae")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, model_and_tokenizer=None) -> "MoCaEModel":
        """Restore a saved model exactly (same adapters, router and calibrator).

        Every file is checked before the backbone loads where it can be (``check_saved``), and
        the adapters' tensor shapes after it, before peft loads them.

        Raises:
            FileNotFoundError: not a MoCaE folder. LoadError: a damaged or mismatched file, named.
        """
        path = Path(path)
        config, calibrator = check_saved(path)
        rebuild = _rebuild_command(path)
        model = cls.build(config, model_and_tokenizer, calibrator=calibrator, rebuild=rebuild)
        router_file = path / ROUTER_FILE
        state = load_safetensors(router_file, rebuild)
        expected = {k: tuple(v.shape) for k, v in model.router.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if expected != got:
            raise LoadError(router_file, f"does not fit {len(model.axes)} experts: router tensors "
                                         f"{got} vs expected {expected}", rebuild)
        model.router.load_state_dict(state)
        return model


def _rebuild_command(path: Path) -> str:
    return f"mocae fit-router --out {path}"


def check_saved(path: str | Path):
    """Check a saved MoCaE folder without loading the backbone: the config's schema, its
    backbone against the experts' records, each expert's files and the router file's header.

    Returns:
        (MoCaEConfig with absolute expert paths, the calibrator).

    Raises:
        FileNotFoundError: not a MoCaE folder. LoadError: the file at fault, what is wrong with
            it, and the command that rebuilds it.
    """
    from pydantic import ValidationError

    from mocae.errors import safetensors_shapes
    from mocae.experts.checks import names_backbone, recorded_backbone
    from mocae.mixture.calibration import Calibrator

    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a MoCaE model folder (no {CONFIG_FILE})")
    rebuild = _rebuild_command(path)
    meta = read_json(config_file, rebuild)
    if not isinstance(meta.get("config"), dict) or not isinstance(meta["config"].get("experts"), dict) \
            or "calibrator" not in meta:
        raise LoadError(config_file, "wrong schema: expected 'config' (with 'experts') and 'calibrator'", rebuild)
    cfg = dict(meta["config"])
    cfg["experts"] = {a: str(path / rel) for a, rel in cfg["experts"].items()}
    try:
        config = MoCaEConfig.model_validate(cfg)
        calibrator = Calibrator.from_state_dict(meta["calibrator"])
    except (ValidationError, ValueError, KeyError, TypeError) as err:
        problem = str(err).replace("\n", " ")
        raise LoadError(config_file, f"wrong schema ({problem})", rebuild) from None
    for axis, expert in config.experts.items():  # the config's backbone against the experts' records
        trained_on = recorded_backbone(expert, rebuild)
        if trained_on and not names_backbone(trained_on, config.backbone):
            raise LoadError(config_file, f"backbone {config.backbone!r} is not the one expert {axis!r} was "
                                         f"trained on ({trained_on!r})", rebuild)
    check_experts(config.backbone, config.experts, rebuild=rebuild)
    safetensors_shapes(path / ROUTER_FILE, rebuild)  # a truncated router fails before the backbone loads
    return config, calibrator


EMBEDDING_SIZE = 384  # all-MiniLM-L6-v2


def make_router(config: MoCaEConfig, model_config) -> nn.Module:
    """An untrained router of the configured kind for a backbone config."""
    hidden, layers, n = model_config.hidden_size, model_config.num_hidden_layers, len(config.experts)
    if config.routing == "sequence" and config.router_input == "embedding":
        hidden = EMBEDDING_SIZE
    if config.routing == "sequence":
        layer = layers // 2 if config.feature_layer is None else config.feature_layer
        return SequenceRouter(hidden, n, layer, pooling=config.pooling)
    if config.routing == "token":
        return TokenRouter(hidden, n, layers, top_k=config.top_k, temperature=config.token_temperature)
    if not config.static_weights or len(config.static_weights) != n:
        raise ValueError(f"static routing needs static_weights with {n} values")
    return StaticRouter(config.static_weights)
