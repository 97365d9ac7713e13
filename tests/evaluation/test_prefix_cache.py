"""SharedPrefixLM: the cached-prefix forward gives the plain forward's logits."""

import torch

from mocae.evaluation.prefix_cache import MIN_PREFIX, SharedPrefixLM


def _rows(prefix_len=40, suffixes=(7, 12, 3, 9), seed=0):
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(5, 200, (prefix_len,), generator=gen)
    rows = [torch.cat([prefix, torch.randint(5, 200, (n,), generator=gen)]) for n in suffixes]
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, torch.zeros(width - len(r), dtype=torch.long)]) for r in rows])  # right-padded


@torch.no_grad()
def test_cached_prefix_matches_plain_forward(tiny):
    model, _ = tiny
    model.eval()
    batch = _rows()
    wrapped = SharedPrefixLM(model)
    assert torch.allclose(wrapped(batch).logits, model(batch).logits, atol=1e-4)
    # a second batch reuses the prefix cache: only the suffixes are computed
    again = wrapped(batch[:2]).logits
    assert torch.allclose(again, model(batch[:2]).logits[:, :again.shape[1]], atol=1e-4)
    assert wrapped.prefix.shape[0] >= 40 and wrapped.stats["cached_calls"] == 2
    assert wrapped.stats["tokens_computed"] < wrapped.stats["tokens"] / 3


@torch.no_grad()
def test_prefix_shrinks_when_a_row_differs_earlier(tiny):
    model, _ = tiny
    model.eval()
    wrapped = SharedPrefixLM(model)
    first = _rows(prefix_len=40)
    wrapped(first)
    other = first.clone()
    other[1, 25] = (other[1, 25] + 1) % 200 + 5  # shares only 25 tokens now
    assert torch.allclose(wrapped(other).logits, model(other).logits, atol=1e-4)
    assert wrapped.prefix.shape[0] == 25


@torch.no_grad()
def test_short_shared_prefix_runs_the_plain_forward(tiny):
    model, _ = tiny
    model.eval()
    batch = _rows(prefix_len=MIN_PREFIX - 4)
    wrapped = SharedPrefixLM(model)
    assert torch.allclose(wrapped(batch).logits, model(batch).logits, atol=1e-5)
    assert wrapped.stats["cached_calls"] == 0


@torch.no_grad()
def test_per_request_routing_keeps_one_prefix_cache_per_weight_vector(tiny, expert_dirs):
    from mocae.mixture.model import MoCaEConfig, MoCaEModel

    mocae = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs, routing="static",
                                         static_weights=[1, 1, 1]), tiny)
    batch = _rows()
    weights = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [0.2, 0.3, 0.5]])
    mocae.routing_override = lambda ids: weights[:len(ids)]
    try:
        wrapped = SharedPrefixLM(mocae)
        cached = wrapped(batch).logits
        plain = mocae(batch).logits  # forward applies the same override
    finally:
        mocae.routing_override = None
    assert torch.allclose(cached, plain, atol=1e-4)
    assert len(wrapped._caches) == 3  # rows 0 and 2 share one
