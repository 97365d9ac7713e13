"""The mixing layer: several peft LoRA experts combined as one rank-E*r update.

For every LoRA-targeted linear layer and expert weights ``w`` (per sequence or per token):

    y = W0 x + sum_e w[e] * scale_e * B_e A_e x

The A's are stacked into one (E*r x d_in) matrix and the scaled B's into one (d_out x E*r), so
mixing costs one low-rank product, not E forward passes. The expert weights stay where peft
keeps them (``lora_A``/``lora_B``/``scaling`` of each ``lora.Linear``); peft's own LoRA path is
switched off while the mixer is attached and the mixed update is added by a forward of the
mixer's own set on each LoRA layer.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
MERGE_MIN_TOKENS = 64  # merge + exact unmerge vs the unmerged per-token cost, see merge_pays


class _MixedModule:
    """Stacked expert factors of one LoRA linear layer.

    ``live``: re-read the factors from peft's parameters on every call, so gradients reach them
    (training a mixture, MoTE); otherwise they are stacked once, detached and kept transposed
    (``AT`` (d_in, E*r), ``BT`` (E*r, d_out)), the layout the per-step product reads.
    """

    def __init__(self, module, adapters: list[str], layer_index: int | None, live: bool = False):
        self.module = module
        self.adapters = list(adapters)
        self.layer_index = layer_index
        self.live = live
        self.ranks = [module.r[a] for a in adapters]
        if not live:
            with torch.no_grad():
                A, B = (t.detach() for t in self._stack())
                self.AT, self.BT = A.T.contiguous(), B.T.contiguous()
        self.rank_index = torch.repeat_interleave(torch.arange(len(adapters)), torch.tensor(self.ranks))

    def _stack(self) -> tuple[torch.Tensor, torch.Tensor]:
        m, names = self.module, self.adapters
        return (torch.cat([m.lora_A[a].weight for a in names], dim=0),
                torch.cat([m.lora_B[a].weight * m.scaling[a] for a in names], dim=1))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (E*r, d_in), scaled B (d_out, E*r))."""
        return self._stack() if self.live else (self.AT.T, self.BT.T)

    def delta(self, weights: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Dense ``sum_e w[e] scale_e B_e A_e`` for one weight vector (E,): used to merge.
        ``out``: a buffer of the base weight's shape to write it into."""
        A, B = self.factors()
        return torch.mm(B * weights[self.rank_index].to(B.dtype), A, out=out)

    def rank_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """Weights (B, E) or (B, T, E) repeated over each expert's rank: (B, 1 or T, E*r)."""
        w = weights[..., self.rank_index]
        return w[:, None, :] if w.dim() == 2 else w

    def add_update(self, output: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``output`` plus the mixture's contribution for input ``x`` (..., T, d_in) and rank
        weights ``w`` (``rank_weights``).

        At inference (no autograd, one dtype) that is one matmul pair with the product added into
        ``output`` in place (``addmm_``); otherwise the out-of-place product, so gradients flow.
        """
        if (not self.live and not torch.is_grad_enabled() and x.dtype == self.AT.dtype == output.dtype
                and output.is_contiguous()):
            h = torch.matmul(x, self.AT)  # (B, T, E*r)
            h.mul_(w)
            output.view(-1, output.shape[-1]).addmm_(h.view(-1, h.shape[-1]), self.BT)
            return output
        A, B = self.factors()
        h = x @ A.to(x.dtype).T
        return output + (h * w.to(h.dtype)) @ B.to(x.dtype).T

    def mixed_update(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The mixture's contribution for input ``x`` (..., T, d_in) and weights (B, E) or (B, T, E)."""
        A, B = self.factors()
        h = x @ A.to(x.dtype).T  # (B, T, E*r)
        return (h * self.rank_weights(weights).to(h.dtype)) @ B.to(x.dtype).T


def check_weights(weights: torch.Tensor, field: str = "expert weights", allow_zero_rows: bool = False) -> None:
    """Mixing weights must be finite and non-negative with a positive sum per row: one NaN merged
    into W0 would poison every later answer of the model.

    Args:
        allow_zero_rows: an all-zero row is the base model (a top1 router's documented fallback,
            ``mocae.mixture.decide``); without it such a row is an error, as a user's all-zero
            weights are.

    Raises:
        ValueError: naming ``field`` and the offending values.
    """
    w = weights.detach()
    sums = w.sum(-1)
    if not torch.isfinite(w).all() or (w < 0).any() or ((sums < 0) if allow_zero_rows else (sums <= 0)).any():
        shown = w.reshape(-1, w.shape[-1])[:2].tolist()
        rule = "with a positive sum per row" if not allow_zero_rows else "(all-zero rows: the base model)"
        raise ValueError(f"{field} must be finite and >= 0 {rule}, got {shown}"
                         + (" ..." if w.reshape(-1, w.shape[-1]).shape[0] > 2 else ""))


class LoraMixer:
    """Attach to a PeftModel that holds the expert adapters and mix them per sequence or token.

    Args:
        peft_model: a ``peft.PeftModel`` with every name in ``adapters`` loaded.
        adapters: adapter names in expert order (the router's output order).
        trainable: keep the experts' LoRA factors live so a loss through the mixture trains them.

    Set ``sequence_weights`` (B, E), or (B, T, E) for weights per token shared by every layer,
    before a forward pass, or ``token_weights[layer]`` (B, T, E) from per-layer routers; with
    none set, the model behaves as the base model.
    """

    def __init__(self, peft_model, adapters: list[str], trainable: bool = False):
        from peft.tuners.lora import LoraLayer

        self.peft_model = peft_model
        self.adapters = list(adapters)
        self.sequence_weights: torch.Tensor | None = None
        self.token_weights: dict[int, torch.Tensor] = {}
        self.modules: list[_MixedModule] = []
        self._merged: torch.Tensor | None = None
        self._kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # per merged module: (index, W0 value)
        self._rank_weights: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # ranks -> (weights, repeated)
        self._buffers: list[torch.Tensor] | None = None  # merge scratch, freed by unmerge
        self.merge_min_tokens = MERGE_MIN_TOKENS
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer) or not isinstance(module, nn.Module):
                continue
            missing = [a for a in self.adapters if a not in module.lora_A]
            if missing:
                raise ValueError(f"module {name} has no LoRA for expert(s) {missing}: experts must target "
                                 "the same modules")
            match = _LAYER_INDEX.search(name + ".")
            self.modules.append(_MixedModule(module, self.adapters, int(match.group(1)) if match else None,
                                             live=trainable))
        if not self.modules:
            raise ValueError("the model has no LoRA layers to mix")
        # peft's own LoRA path off: the mixer adds the (mixed) update itself.
        peft_model.base_model.disable_adapter_layers()
        if trainable:  # disabling peft's path also froze the factors
            for m in self.modules:
                for a in self.adapters:
                    m.module.lora_A[a].weight.requires_grad_(True)
                    m.module.lora_B[a].weight.requires_grad_(True)
        for m in self.modules:  # an instance forward, not a hook: no hook dispatch, no peft wrapper per call
            m.module.forward = self._forward(m)

    @property
    def num_experts(self) -> int:
        return len(self.adapters)

    def _forward(self, mixed: _MixedModule):
        """The LoRA layer's forward while the mixer is attached: its base layer plus the mixed
        update. It replaces peft's (whose LoRA path is off anyway) on the instance, so a decode
        step pays one Python call per layer rather than peft's wrapper and a forward hook."""
        base = mixed.module.get_base_layer()

        def forward(x, *args, **kwargs):
            kwargs.pop("adapter_names", None)
            output = base(x, *args, **kwargs)
            if self._merged is not None:
                return output
            weights = self.token_weights.get(mixed.layer_index, self.sequence_weights)
            if weights is None:
                return output
            return mixed.add_update(output, x, self._repeated(weights, mixed))

        return forward

    def _repeated(self, weights: torch.Tensor, mixed: _MixedModule) -> torch.Tensor:
        """``mixed.rank_weights(weights)``, computed once per forward pass for all modules of the
        same ranks rather than once per module (a gather per module and step adds up at decode).
        Not cached for weights that carry gradients (a router trained through the mixture)."""
        if weights.requires_grad:
            return mixed.rank_weights(weights)
        key = tuple(mixed.ranks)
        hit = self._rank_weights.get(key)
        if hit is None or hit[0] is not weights:  # `is`: the cache holds the tensor, so its id is not reused
            hit = self._rank_weights[key] = (weights, mixed.rank_weights(weights))
        return hit[1]

    def merge_pays(self, new_tokens: int | None) -> bool:
        """Whether folding one request's mixture into W0 is worth it for a decode of ``new_tokens``.

        A merge and its exact unmerge pass over every adapted weight several times (about 0.5 s on
        SmolLM2-135M, one thread), while the unmerged path costs a few percent per token, so
        merging pays only for longer answers: from ``merge_min_tokens`` on (``MERGE_MIN_TOKENS``,
        measured by ``benchmarks/serve_load.py``'s merge phase). Unknown length: merge.
        """
        return new_tokens is None or new_tokens >= self.merge_min_tokens

    def remove(self) -> None:
        """Give peft back its own forward and LoRA path."""
        if self._merged is not None:
            self.unmerge()
        for m in self.modules:
            m.module.__dict__.pop("forward", None)
        self.peft_model.base_model.enable_adapter_layers()

    def merge(self, weights: torch.Tensor) -> None:
        """Fold one weight vector (E,) into the base weights: zero decode overhead for one request.

        In floating point ``(W0 + d) - d`` is not always ``W0`` (about 8% of entries differ for
        typical LoRA updates), so the entries where subtracting ``d`` again would not give them
        back are kept aside (index and value, ~0.6 byte per weight instead of a 4-byte copy) and
        ``unmerge`` restores ``W0`` bit for bit.

        Raises:
            ValueError: weights not finite, negative or all zero (nothing is merged then).
        """
        if self._merged is not None:
            raise RuntimeError("mixture already merged; unmerge first")
        check_weights(weights)
        self._merged = weights.detach().clone()
        try:
            with torch.no_grad():
                for m in self.modules:
                    w = m.module.get_base_layer().weight.data
                    d = self._delta(m, w)
                    merged = torch.add(w, d, out=self._scratch(w, 1))
                    back = d.neg_().add_(merged)  # merged - d, what unmerge will compute (in d's buffer)
                    lost = back.ne(w).view(-1).nonzero().squeeze(1).to(torch.int32)
                    self._kept.append((lost, w.view(-1)[lost]))
                    w.copy_(merged)
        except BaseException:
            self.unmerge()  # the modules merged so far
            raise

    def unmerge(self) -> None:
        """Subtract what ``merge`` added and put back the entries it kept: ``W0`` bit for bit."""
        if self._merged is None:
            return
        with torch.no_grad():
            for m, (lost, values) in zip(self.modules, self._kept):
                w = m.module.get_base_layer().weight.data
                w -= self._delta(m, w)  # the same delta, so the same rounding as in merge
                w.view(-1)[lost] = values
        self._kept = []
        self._merged = None
        self._buffers = None

    def _scratch(self, w: torch.Tensor, slot: int) -> torch.Tensor:
        """A reused buffer shaped like ``w``: a fresh multi-MB tensor per module and pass (page
        faults included) cost about as much as the arithmetic of a merge."""
        buffers = self._buffers
        if buffers is None or buffers[slot].numel() < w.numel() or buffers[slot].dtype != w.dtype:
            size = max(m.module.get_base_layer().weight.numel() for m in self.modules)
            buffers = self._buffers = [torch.empty(size, dtype=w.dtype) for _ in range(2)]
        return buffers[slot][:w.numel()].view_as(w)

    def _delta(self, m: _MixedModule, w: torch.Tensor) -> torch.Tensor:
        """``m.delta(self._merged)`` in ``w``'s dtype, written into scratch buffer 0."""
        if m.factors()[0].dtype != w.dtype:
            return m.delta(self._merged).to(w.dtype)
        return m.delta(self._merged, out=self._scratch(w, 0))

    @contextmanager
    def weights(self, sequence_weights: torch.Tensor | None = None, merge: bool = False,
                allow_zero_rows: bool = False):
        """Context with fixed weights: (B, E) per sequence or (B, T, E) per token (every layer alike).

        ``merge`` folds per-sequence weights into W0 when B == 1. ``allow_zero_rows``: all-zero
        rows are accepted as the base model (no update); weights that are all zero mix nothing.
        """
        if sequence_weights is not None and (sequence_weights.dim() not in (2, 3)
                                             or sequence_weights.shape[-1] != self.num_experts):
            raise ValueError(f"weights must be (batch, {self.num_experts}) or (batch, tokens, {self.num_experts}), "
                             f"got {tuple(sequence_weights.shape)}")
        if sequence_weights is not None:
            check_weights(sequence_weights, allow_zero_rows=allow_zero_rows)
            if allow_zero_rows and not sequence_weights.detach().any():
                sequence_weights = None  # every row is the base model: nothing to mix or merge
        merge = merge and sequence_weights is not None and sequence_weights.dim() == 2 and sequence_weights.shape[0] == 1
        previous = self.sequence_weights
        self.sequence_weights = sequence_weights
        self._rank_weights.clear()  # weights are constants while set: the repeated copies live as long
        try:
            if merge:
                self.merge(sequence_weights[0])
            yield self
        finally:
            if merge:
                self.unmerge()
            self.sequence_weights = previous
            self._rank_weights.clear()


class PeftBackedModel(nn.Module):
    """Base of models that wrap a ``peft_model`` with a mixer (MoCaE, MoTE).

    Anything the wrapper does not define (tie_weights, generation_config, ...) is the backbone's,
    so code written for HF causal LMs (lm-eval's HFLM, generate helpers) runs unchanged.
    """

    peft_model: nn.Module

    @property
    def device(self):
        return self.peft_model.device

    @property
    def config(self):
        """The backbone's HF config, so tools that expect a causal LM (lm-eval's HFLM) accept the model."""
        return self.peft_model.config

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            peft_model = self._modules.get("peft_model")
            if peft_model is None:
                raise
            return getattr(peft_model, name)
