"""Routers: who decides the expert weights, and from what.

- ``SequenceRouter`` (default, "task-adaptive"): one weight vector per request from the *base*
  model's hidden state at layer ``feature_layer``, mean-pooled over the prompt's tokens. The
  features are computed once at prefill by a partial forward that stops at that layer.
- ``TokenRouter`` (H3Fusion/TrinityX style): a linear router per decoder layer on that layer's
  input hidden state, weights per token, optional top-k with renormalisation.
- ``StaticRouter``: fixed weights (soups, user steering).
All return logits; probabilities come from a calibrator (mocae.mixture.calibration).
"""

from __future__ import annotations

import torch
from torch import nn


class _StopForward(Exception):
    def __init__(self, hidden):
        self.hidden = hidden


def decoder_layers(model) -> nn.ModuleList:
    """The list of decoder blocks of a (possibly peft-wrapped) causal LM."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(inner, "model", inner), "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers in {type(inner).__name__}")
    return layers


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore padding, so left- and right-padded prompts see identical positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def template_margins(tokenizer) -> tuple[list[int], int]:
    """Token ids the chat template puts before the user's message, and how many tokens after it.

    Every request shares them (SmolLM2 adds a 20-token default system prompt), so pooling them
    in drowns the part that tells prompts apart.
    """
    from mocae.generation import chat_prompt

    a, b = chat_prompt(tokenizer, "\x00A"), chat_prompt(tokenizer, "\x00B")
    cut = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) - 1
    before = tokenizer(a[:cut], add_special_tokens=False)["input_ids"]
    after = len(tokenizer(a[cut + 2:], add_special_tokens=False)["input_ids"])
    return before, after


def content_margins(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    template: tuple[list[int], int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (before, after) template token counts: zero for rows not in the chat template
    (e.g. lm-eval's few-shot contexts), so no real text is trimmed from them."""
    prefix, after = template
    before = torch.zeros(input_ids.shape[0], dtype=torch.long)
    if prefix:
        for i, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            real = ids[mask.bool()]
            if real[: len(prefix)].tolist() == prefix:
                before[i] = len(prefix)
    return before, torch.where(before > 0, after, 0)


def pooling_mask(attention_mask: torch.Tensor, pooling: str, margins=(0, 0)) -> torch.Tensor:
    """Which tokens a sequence's feature averages over (works for left and right padding).

    Args:
        attention_mask: (B, T) 1 for real tokens.
        pooling: "mean" (all real tokens), "content" (real tokens minus the template's
            ``margins`` (before, after), ints or per-row tensors; all real tokens for a row that
            would be left empty) or "last".
    """
    mask = attention_mask.long()
    position = mask.cumsum(-1) - 1  # index among the row's real tokens
    length = mask.sum(-1, keepdim=True)
    if pooling == "mean":
        return mask
    if pooling == "last":
        return mask * (position == length - 1)
    if pooling == "content":
        before, after = (torch.as_tensor(m).reshape(-1, 1) for m in margins)
        content = mask * (position >= before) * (position < length - after)
        empty = content.sum(-1, keepdim=True) == 0
        return torch.where(empty, mask, content)
    raise ValueError(f"pooling must be mean, content or last, got {pooling!r}")


@torch.no_grad()
def pooled_hidden_states(model, input_ids, attention_mask, layer: int,
                         pool_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over ``pool_mask`` (default: non-padding) tokens of the hidden state entering block ``layer``.

    The forward stops there, so it costs ``layer / num_layers`` of a prefill. Callers run it
    with the mixture off, so the features are the base model's.

    Returns:
        (B, hidden) float32 features.
    """
    layers = decoder_layers(model)
    if not 0 <= layer <= len(layers):
        raise ValueError(f"feature_layer {layer} outside 0..{len(layers)}")

    def stop(module, args, kwargs):
        raise _StopForward(kwargs.get("hidden_states", args[0] if args else None))

    if layer == len(layers):  # after the last block: the final norm's input
        handle = getattr(getattr(model.get_base_model() if hasattr(model, "get_base_model") else model,
                                 "model"), "norm").register_forward_pre_hook(
            lambda m, args: (_ for _ in ()).throw(_StopForward(args[0])))
    else:
        handle = layers[layer].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask,
              position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        raise RuntimeError("the forward pass did not reach the feature layer")
    except _StopForward as stopped:
        hidden = stopped.hidden
    finally:
        handle.remove()
    mask = (attention_mask if pool_mask is None else pool_mask).to(hidden.dtype)[..., None]
    return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float()


class SequenceRouter(nn.Module):
    """Linear router on standardised pooled features: logits (B, E) per request.

    Args:
        hidden_size: feature width.
        num_experts: E.
        feature_layer: decoder block whose input is pooled.
        pooling: which tokens are averaged (see ``pooling_mask``).
    """

    def __init__(self, hidden_size: int, num_experts: int, feature_layer: int, pooling: str = "content"):
        super().__init__()
        self.feature_layer = feature_layer
        self.pooling = pooling
        self.register_buffer("mean", torch.zeros(hidden_size))
        self.register_buffer("std", torch.ones(hidden_size))
        self.linear = nn.Linear(hidden_size, num_experts)

    def set_normalisation(self, features: torch.Tensor) -> None:
        """Standardise with statistics of the training features (makes lr and init scale-free)."""
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp(min=1e-4))

    def init_centroids(self, features: torch.Tensor, labels: torch.Tensor, scale: float = 5.0) -> None:
        """Unit-norm class centroids as weight rows (mergekit-moe's `hidden` gate idea)."""
        z = self.normalise(features)
        with torch.no_grad():
            for e in range(self.linear.out_features):
                if (labels == e).any():
                    c = z[labels == e].mean(0)
                    self.linear.weight[e] = scale * c / c.norm().clamp(min=1e-6) / z.norm(dim=1).mean()
            self.linear.bias.zero_()

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.normalise(features))


class TokenRouter(nn.Module):
    """One linear router per decoder layer; weights per token, optional top-k renormalised.

    Args:
        hidden_size: model width.
        num_experts: E.
        num_layers: decoder layers (one router each).
        top_k: keep the k largest weights per token and renormalise (None = dense softmax).
        temperature: softmax temperature (TrinityX uses 0.7).
    """

    def __init__(self, hidden_size: int, num_experts: int, num_layers: int,
                 top_k: int | None = None, temperature: float = 1.0):
        super().__init__()
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
        self.routers = nn.ModuleList(nn.Linear(hidden_size, num_experts) for _ in range(num_layers))
        for r in self.routers:
            nn.init.zeros_(r.weight)
            nn.init.zeros_(r.bias)
        self.top_k = top_k
        self.temperature = temperature

    def weights(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, E) mixing weights for the tokens entering ``layer``."""
        return top_k_softmax(self.routers[layer](hidden.float()) / self.temperature, self.top_k)


def top_k_softmax(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Softmax over the k largest logits per row (others get weight 0); k=None is plain softmax."""
    if k is None or k >= logits.shape[-1]:
        return logits.softmax(-1)
    top = logits.topk(k, dim=-1)
    masked = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)
    return masked.softmax(-1)


class StaticRouter(nn.Module):
    """Fixed weights for every request (model soups, user steering)."""

    def __init__(self, weights: list[float]):
        super().__init__()
        w = torch.tensor(weights, dtype=torch.float32)
        if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"static_weights must be finite, non-negative and with a positive sum, got {weights}")
        self.register_buffer("probs", w / w.sum())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Log-weights broadcast to the batch (so softmax gives back the weights)."""
        return self.probs.clamp(min=1e-12).log().expand(features.shape[0], -1)
