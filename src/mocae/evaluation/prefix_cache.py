"""Score few-shot requests with the shared prefix's KV cache computed once.

lm-eval's TruthfulQA context is a fixed 6-shot primer (~200 tokens) + one question (~20) + an
answer (~10): ~85% of every forward pass recomputes the same primer. ``SharedPrefixLM`` wraps a
causal LM for lm-eval's ``HFLM``: it finds the token prefix all requests share (the longest
common prefix of every row seen so far; it only shrinks), runs it once, and feeds each batch
only its suffix with that cache. The logits are those of the plain forward pass (tested to
1e-4); lm-eval's prompts, continuations and scoring are untouched.

A routed model (``routing_override``: one weight vector per request) changes the primer's KV
with the routing, so the prefix cache is kept per distinct weight vector (one per question).
"""

from __future__ import annotations

import torch

from mocae.spec import capabilities_of

MIN_PREFIX = 16  # shorter shared prefixes are not worth the bookkeeping


class SharedPrefixLM(torch.nn.Module):
    """A causal LM whose forward reuses the KV cache of the prefix all its inputs share.

    Args:
        model: a causal LM (transformers, peft, MoCaE, H3Fusion...) whose forward accepts
            ``past_key_values`` and ``use_cache``; models that cannot (X-LoRA) must not be wrapped.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.prefix: torch.Tensor | None = None
        self._caches: dict[bytes, tuple[list, torch.Tensor]] = {}
        self.stats = {"calls": 0, "cached_calls": 0, "tokens": 0, "tokens_computed": 0}

    def __getattr__(self, name: str):
        # lm-eval reads config, device, tie_weights, ... from the model: they are the wrapped one's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    @property
    def config(self):
        return self.model.config

    def _update_prefix(self, input_ids: torch.Tensor) -> None:
        """Shrink the shared prefix to what every row seen so far starts with."""
        first = input_ids[0] if self.prefix is None else self.prefix
        n = min(first.shape[0], input_ids.shape[1] - 1)  # keep >= 1 token per row to run
        same = (input_ids[:, :n] == first[:n]).all(0)
        k = int(same.long().cumprod(0).sum())
        if self.prefix is None or k < self.prefix.shape[0]:
            self.prefix = first[:k].clone()
            self._caches.clear()  # they hold a longer prefix

    def _prefix_cache(self, routing: torch.Tensor | None) -> tuple[list, torch.Tensor]:
        key = b"" if routing is None else routing.float().numpy().round(6).tobytes()
        if key not in self._caches:
            extra = {} if routing is None else {"routing_weights": routing[None]}
            out = self.model(input_ids=self.prefix[None], use_cache=True, **extra)
            layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            self._caches[key] = (layers, out.logits[0])
        return self._caches[key]

    def forward(self, input_ids: torch.Tensor, attention_mask=None, **kwargs):
        from transformers import DynamicCache
        from transformers.modeling_outputs import CausalLMOutputWithPast

        self.stats["calls"] += 1
        self.stats["tokens"] += input_ids.numel()
        if attention_mask is not None or kwargs or (len(input_ids) < 2 and self.prefix is None):
            self.stats["tokens_computed"] += input_ids.numel()
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        self._update_prefix(input_ids)
        prefix_len = self.prefix.shape[0]
        if prefix_len < MIN_PREFIX:
            self.stats["tokens_computed"] += input_ids.numel()
            return self.model(input_ids=input_ids)
        override = self.model.routing_override if capabilities_of(self.model).router else None
        routing = override(input_ids) if override is not None else None
        rows = [self._prefix_cache(None if routing is None else routing[i]) for i in range(len(input_ids))]
        n_layers = len(rows[0][0])
        cache = DynamicCache(ddp_cache_data=[
            (torch.cat([r[0][i][0] for r in rows]), torch.cat([r[0][i][1] for r in rows])) for i in range(n_layers)])
        extra = {} if routing is None else {"routing_weights": routing}
        out = self.model(input_ids=input_ids[:, prefix_len:], past_key_values=cache, use_cache=True, **extra)
        prefix_logits = torch.stack([r[1] for r in rows]).to(out.logits.dtype)
        self.stats["cached_calls"] += 1
        self.stats["tokens_computed"] += input_ids[:, prefix_len:].numel()
        return CausalLMOutputWithPast(logits=torch.cat([prefix_logits, out.logits], dim=1))
