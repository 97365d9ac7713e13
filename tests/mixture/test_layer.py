"""The mixing layer against peft itself and against the dense merge W0 + sum w_e dW_e."""

import pytest
import torch
from peft import PeftModel

from mocae.backbones import load_backbone
from mocae.experts.task_vectors import apply_task_vector, load_task_vector
from mocae.mixture.layer import LoraMixer
from mocae.mixture.router import top_k_softmax

IDS = torch.tensor([[5, 9, 13, 2, 7, 30], [8, 3, 3, 11, 40, 6]])


def peft_with_all(expert_dirs):
    base, _ = load_backbone("tiny-random")
    items = list(expert_dirs.items())
    model = PeftModel.from_pretrained(base, items[0][1], adapter_name=items[0][0])
    for axis, path in items[1:]:
        model.load_adapter(path, adapter_name=axis)
    return model.eval()


@pytest.mark.parametrize("index", [0, 1, 2])
def test_one_hot_weights_equal_that_single_peft_adapter(expert_dirs, index):
    model = peft_with_all(expert_dirs)
    axis = list(expert_dirs)[index]
    model.set_adapter(axis)
    with torch.no_grad():
        expected = model(IDS).logits
    mixer = LoraMixer(model, list(expert_dirs))
    one_hot = torch.nn.functional.one_hot(torch.tensor([index, index]), 3).float()
    with torch.no_grad(), mixer.weights(one_hot):
        got = model(IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no weights set: the base model
        base = model(IDS).logits
    assert not torch.allclose(base, expected, atol=1e-3)


def test_weighted_mixture_equals_dense_merge(expert_dirs):
    weights = [0.5, 0.3, 0.2]
    dense, _ = load_backbone("tiny-random")
    for w, path in zip(weights, expert_dirs.values()):
        reference, _ = load_backbone("tiny-random")
        apply_task_vector(dense, load_task_vector(path, reference), weight=w)
    with torch.no_grad():
        expected = dense(IDS).logits
    model = peft_with_all(expert_dirs)
    mixer = LoraMixer(model, list(expert_dirs))
    with torch.no_grad(), mixer.weights(torch.tensor([weights, weights])):
        got = model(IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # merged into W0 (the batch-1 fast path) gives the same numbers, and unmerging restores W0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), mixer.weights(torch.tensor([weights]), merge=True):
        merged = model(IDS[:1]).logits
    torch.testing.assert_close(merged, expected[:1], atol=1e-5, rtol=1e-5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=1e-6)


def test_per_row_weights_mix_each_sequence_separately(expert_dirs):
    model = peft_with_all(expert_dirs)
    mixer = LoraMixer(model, list(expert_dirs))
    w = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    with torch.no_grad(), mixer.weights(w):
        both = model(IDS).logits
    for row in range(2):
        with torch.no_grad(), mixer.weights(w[row:row + 1]):
            single = model(IDS[row:row + 1]).logits
        torch.testing.assert_close(both[row:row + 1], single, atol=1e-5, rtol=1e-5)


def test_per_token_weights(expert_dirs):
    model = peft_with_all(expert_dirs)
    mixer = LoraMixer(model, list(expert_dirs))
    constant = torch.tensor([0.2, 0.3, 0.5])
    for layer in {m.layer_index for m in mixer.modules}:
        mixer.token_weights[layer] = constant.expand(2, IDS.shape[1], 3)
    with torch.no_grad():
        per_token = model(IDS).logits
    mixer.token_weights.clear()
    with torch.no_grad(), mixer.weights(constant.expand(2, 3)):
        per_sequence = model(IDS).logits
    torch.testing.assert_close(per_token, per_sequence, atol=1e-5, rtol=1e-5)


def test_top_k_renormalises():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]])
    w = top_k_softmax(logits, 2)
    assert (w > 0).sum(-1).tolist() == [2, 2]
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    torch.testing.assert_close(w[0, :2], torch.tensor([2.0, 1.0]).softmax(-1))
    torch.testing.assert_close(top_k_softmax(logits, None), logits.softmax(-1))


def test_remove_restores_peft(expert_dirs):
    model = peft_with_all(expert_dirs)
    model.set_adapter("harmless")
    with torch.no_grad():
        expected = model(IDS).logits
    mixer = LoraMixer(model, list(expert_dirs))
    mixer.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected)


def test_wrong_weight_shape_is_an_error(expert_dirs):
    mixer = LoraMixer(peft_with_all(expert_dirs), list(expert_dirs))
    with pytest.raises(ValueError, match=r"weights must be \(batch, 3\)"):
        with mixer.weights(torch.ones(2, 2)):
            pass


def base_copy(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_merge_unmerge_restores_w0_bit_for_bit(expert_dirs):
    model = peft_with_all(expert_dirs)
    mixer = LoraMixer(model, list(expert_dirs))
    saved = base_copy(model)
    weights = torch.tensor([0.2, 0.3, 0.5])
    mixer.merge(weights)
    first = mixer.modules[0].module.get_base_layer().weight
    assert not torch.equal(first, saved[next(n for n in saved if n.endswith("base_layer.weight"))])
    assert sum(len(lost) for lost, _ in mixer._kept) > 0  # plain subtraction would not have been exact
    mixer.unmerge()
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], w) for n, w in saved.items())


def test_a_merge_that_fails_half_way_leaves_w0_unchanged(expert_dirs, monkeypatch):
    model = peft_with_all(expert_dirs)
    mixer = LoraMixer(model, list(expert_dirs))
    saved = base_copy(model)
    bad = mixer.modules[len(mixer.modules) // 2]
    monkeypatch.setattr(bad, "delta", lambda w, out=None: (_ for _ in ()).throw(MemoryError("injected")))
    with pytest.raises(MemoryError):
        mixer.merge(torch.tensor([1.0, 1.0, 1.0]))
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], w) for n, w in saved.items())
    assert mixer._merged is None and mixer._kept == []


@pytest.mark.parametrize("weights", [[float("nan"), 1, 1], [1, float("inf"), 1], [-1, 1, 1], [0, 0, 0]])
def test_non_finite_or_negative_weights_are_never_mixed_or_merged(expert_dirs, weights):
    model = peft_with_all(expert_dirs)
    mixer = LoraMixer(model, list(expert_dirs))
    saved = base_copy(model)
    w = torch.tensor([weights], dtype=torch.float32)
    with pytest.raises(ValueError, match="finite and >= 0 with a positive sum"):
        with mixer.weights(w, merge=True):
            pass
    with pytest.raises(ValueError, match="finite and >= 0"):
        mixer.merge(w[0])
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in saved.items())


def test_zero_rows_are_the_base_model_only_when_allowed(expert_dirs):
    from mocae.mixture.layer import check_weights

    check_weights(torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.3, 0.5]]), allow_zero_rows=True)
    with pytest.raises(ValueError, match="positive sum"):
        check_weights(torch.tensor([[0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="finite and >= 0"):
        check_weights(torch.tensor([[float("nan"), 0.0, 0.0]]), allow_zero_rows=True)
    model = peft_with_all(expert_dirs)
    mixer = LoraMixer(model, list(expert_dirs))
    with torch.no_grad():
        base = model(IDS).logits  # no weights: the base model
        with mixer.weights(torch.zeros(1, 3), merge=True, allow_zero_rows=True):
            assert mixer._merged is None  # nothing folded into W0
            merged = model(IDS[:1]).logits
    torch.testing.assert_close(merged, base[:1])


def test_inference_update_in_place_equals_the_autograd_product(expert_dirs):
    """The decode path (one matmul pair, added into the base output in place, rank weights
    repeated once per forward) gives the numbers of the plain out-of-place product, and with
    autograd on the product is out of place so gradients reach the weights."""
    model = peft_with_all(expert_dirs)
    mixer = LoraMixer(model, list(expert_dirs))
    w = torch.tensor([[0.6, 0.1, 0.3], [0.0, 0.5, 0.5]])
    with torch.inference_mode(), mixer.weights(w):
        fast = model(IDS).logits
        assert len(mixer._rank_weights) == 1  # one repeat of the weights for every module (same ranks)
    assert mixer._rank_weights == {}  # and released with the weights
    trainable = w.clone().requires_grad_(True)
    with mixer.weights(trainable):
        slow = model(IDS).logits
    torch.testing.assert_close(fast, slow.detach(), atol=1e-5, rtol=1e-5)
    slow.sum().backward()
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0
    module = mixer.modules[0]
    x = torch.randn(2, 3, module.AT.shape[0])
    base = module.module.get_base_layer()(x)
    with torch.no_grad():
        expected = base + module.mixed_update(x, w)
        torch.testing.assert_close(module.add_update(base.clone(), x, module.rank_weights(w)), expected)


def test_mixer_replaces_the_lora_forward_without_hooks(expert_dirs):
    """The mixer runs as each LoRA layer's own forward (no forward hook, no peft wrapper per
    call); removing it gives peft its forward back."""
    model = peft_with_all(expert_dirs)
    mixer = LoraMixer(model, list(expert_dirs))
    for m in mixer.modules:
        assert not m.module._forward_hooks and "forward" in m.module.__dict__
    mixer.remove()
    assert all("forward" not in m.module.__dict__ for m in mixer.modules)


def test_weights_changed_between_forwards_are_not_served_stale(expert_dirs):
    model = peft_with_all(expert_dirs)
    mixer = LoraMixer(model, list(expert_dirs))
    a, b = torch.tensor([[1.0, 0, 0]]), torch.tensor([[0, 0, 1.0]])
    with torch.inference_mode():
        with mixer.weights(a):
            first = model(IDS[:1]).logits
        with mixer.weights(b):
            second = model(IDS[:1]).logits
        with mixer.weights(b[None].expand(1, IDS.shape[1], 3)):  # per token, the same weights
            per_token = model(IDS[:1]).logits
    assert not torch.allclose(first, second, atol=1e-4)
    torch.testing.assert_close(per_token, second, atol=1e-5, rtol=1e-5)
