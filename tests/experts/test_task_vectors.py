import copy
import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from mocae.experts.task_vectors import (
    TaskVector,
    apply_task_vector,
    importance_weights,
    load_task_vector,
    similarity_matrix,
    task_vector_from_peft,
)

Q0 = "model.layers.0.self_attn.q_proj"
Q1 = "model.layers.1.self_attn.q_proj"


def _lora(module, adapter):
    return module.lora_A[adapter].weight, module.lora_B[adapter].weight


def _randomise(peft_model, seed=0, std=0.1):
    """peft starts lora_B at zero (a zero task vector): give every LoRA weight random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


@pytest.fixture
def hand_model(tiny):
    """q_proj LoRA r=2, alpha=4 (scaling 2), adapters "first"/"second" set by hand on layer 0."""
    model, _ = tiny
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg, adapter_name="first")
    peft_model.add_adapter("second", cfg)
    q0 = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        for adapter, b_values in (("first", (1.0, 2.0)), ("second", (2.0, -1.0))):
            A, B = _lora(q0, adapter)
            A.zero_(), B.zero_()
            A[0, 0], A[0, 1], A[1, 2] = 1.0, 2.0, 3.0
            B[0, 0], B[1, 1] = b_values
    return peft_model


def test_delta_is_scaling_times_B_at_A_by_hand(hand_model):
    tau = task_vector_from_peft(hand_model, "first")
    assert tau.names == [Q0, Q1]  # peft's base_model.model. prefix stripped
    # B@A: row 0 = 1*A[0] = [1, 2, 0], row 1 = 2*A[1] = [0, 0, 6]; times scaling 4/2 = 2.
    expected = torch.zeros(64, 64)
    expected[0, 0], expected[0, 1], expected[1, 2] = 2.0, 4.0, 12.0
    assert tau[Q0].dtype == torch.float32
    assert torch.equal(tau[Q0], expected)
    assert torch.equal(tau[Q1], torch.zeros(64, 64))  # layer 1 keeps peft's zero lora_B


def test_dot_norm_cosine_by_hand(hand_model):
    a = task_vector_from_peft(hand_model, "first")
    b = task_vector_from_peft(hand_model, "second")
    # b's layer-0 delta: row 0 = 2*[1, 2]*2 = [4, 8]; row 1 = -1*[0, 0, 3]*2 -> (1, 2) = -6.
    assert b[Q0][0, 0] == 4.0 and b[Q0][0, 1] == 8.0 and b[Q0][1, 2] == -6.0
    assert a.dot(b) == 2 * 4 + 4 * 8 + 12 * -6 == -32
    assert a.norm() == pytest.approx(math.sqrt(164))
    assert b.norm() == pytest.approx(math.sqrt(116))
    assert a.cosine(b) == pytest.approx(-32 / math.sqrt(164 * 116))
    assert a.cosine(a) == pytest.approx(1.0)
    assert torch.dot(a.flatten(), b.flatten()).item() == -32  # flatten lines up with dot
    assert a.flatten().numel() == 2 * 64 * 64


def test_rslora_uses_peft_scaling(tiny):
    model, _ = tiny
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_rslora=True)
    peft_model = get_peft_model(model, cfg)
    _randomise(peft_model)
    q0 = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    A, B = _lora(q0, "default")
    expected = (B @ A) * (4 / math.sqrt(2))  # rsLoRA: alpha/sqrt(r), not alpha/r
    assert torch.allclose(task_vector_from_peft(peft_model)[Q0], expected, atol=1e-7)


def test_negation_and_scalar_arithmetic(tiny):
    model, _ = tiny
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomise(peft_model)
    tau = task_vector_from_peft(peft_model)
    assert len(tau) == 4 and tau.norm() > 0
    zero = tau + (-tau)
    assert all(torch.count_nonzero(zero[n]) == 0 for n in zero)
    assert 2 * tau == tau + tau
    assert tau * 2 == tau + tau
    assert (tau - tau).norm() == 0.0
    assert (tau - 0.5 * tau).allclose(0.5 * tau)
    assert (-tau).dot(tau) == pytest.approx(-tau.norm() ** 2)


def test_task_vector_reproduces_the_adapter(tiny):
    model, _ = tiny
    base = copy.deepcopy(model)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg).eval()
    _randomise(peft_model, seed=1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=gen)
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        before = base(input_ids=ids).logits
        apply_task_vector(base, task_vector_from_peft(peft_model))
        got = base.eval()(input_ids=ids).logits
    assert (want - before).abs().max() > 1e-3  # the adapter does change the output
    assert (want - got).abs().max() < 1e-5


def test_apply_task_vector_on_peft_model_and_missing_modules(tiny):
    model, _ = tiny
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    _randomise(peft_model)
    tau = task_vector_from_peft(peft_model)
    base_q0 = peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    old = base_q0.detach().clone()
    apply_task_vector(peft_model, tau, weight=-0.5)  # updates the wrapped base Linear
    assert torch.allclose(base_q0, old - 0.5 * tau[Q0])
    stray = TaskVector({"model.layers.9.self_attn.q_proj": torch.zeros(64, 64)})
    with pytest.raises(ValueError, match=r"model\.layers\.9\.self_attn\.q_proj"):
        apply_task_vector(peft_model, stray)


def test_load_task_vector_matches_memory_and_leaves_base_untouched(tiny, tmp_path):
    model, _ = tiny
    base = copy.deepcopy(model)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, cfg)
    _randomise(peft_model, seed=2)
    in_memory = task_vector_from_peft(peft_model)
    peft_model.save_pretrained(tmp_path / "expert")

    state = {k: v.clone() for k, v in base.state_dict().items()}
    loaded = load_task_vector(tmp_path / "expert", base)
    assert loaded.names == in_memory.names
    assert loaded.allclose(in_memory, atol=0, rtol=0)
    assert base.state_dict().keys() == state.keys()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in state.items())
    assert not any(isinstance(m, LoraLayer) for m in base.modules())
    assert not hasattr(base, "peft_config")
    # loading twice works: nothing left behind that a second injection trips over
    assert load_task_vector(tmp_path / "expert", base) == loaded


def _vec(**values):
    """One-module task vectors with given scalar entries, for weight tests."""
    return TaskVector({"m": torch.tensor([values.get("x", 0.0), values.get("y", 0.0)])})


def test_importance_weights_positive_normalised_and_ordered():
    experts = {"helpful": _vec(x=1.0), "harmless": _vec(x=-2.0), "honest": _vec(x=0.5, y=3.0)}
    ref = _vec(x=1.0, y=0.1)
    ips = {n: v.dot(ref) for n, v in experts.items()}  # 1.0, -2.0, 0.8
    gamma = importance_weights(experts, ref)
    assert sum(gamma.values()) == pytest.approx(1.0)
    assert all(g > 0 for g in gamma.values())
    assert sorted(ips, key=ips.get) == ["harmless", "honest", "helpful"]
    assert sorted(gamma, key=gamma.get) == sorted(ips, key=ips.get)
    # softmax(ip / max|ip|) written out
    z = sum(math.exp(ip / 2.0) for ip in ips.values())
    assert gamma["helpful"] == pytest.approx(math.exp(1.0 / 2.0) / z)
    # a lower temperature sharpens towards the best-aligned expert
    assert importance_weights(experts, ref, temperature=0.1)["helpful"] > gamma["helpful"]


def test_importance_weights_reference_equal_to_expert(tiny):
    model, _ = tiny
    cfg = LoraConfig(r=2, target_modules=["q_proj"])
    peft_model = get_peft_model(model, cfg, adapter_name="helpful")
    for name in ("harmless", "honest"):
        peft_model.add_adapter(name, cfg)
    _randomise(peft_model, seed=3)
    experts = {n: task_vector_from_peft(peft_model, n) for n in ("helpful", "harmless", "honest")}
    for name, tau in experts.items():
        gamma = importance_weights(experts, tau)
        assert max(gamma, key=gamma.get) == name


def test_importance_weights_errors():
    with pytest.raises(ValueError, match="zero"):
        importance_weights({"a": _vec(x=1.0)}, _vec())
    with pytest.raises(ValueError):
        importance_weights({}, _vec(x=1.0))
    with pytest.raises(ValueError):
        importance_weights({"a": _vec(x=1.0)}, _vec(x=1.0), temperature=0.0)


def test_dot_on_mismatched_modules_names_the_missing_one():
    a = TaskVector({"m": torch.ones(2), "only_in_a": torch.ones(3)})
    b = TaskVector({"m": torch.ones(2)})
    with pytest.raises(ValueError, match="only_in_a"):
        a.dot(b)
    with pytest.raises(ValueError, match="only_in_a"):
        b.dot(a)
    with pytest.raises(ValueError, match="only_in_a"):
        a + b


def test_similarity_matrix_is_json_and_symmetric():
    vectors = {"a": _vec(x=1.0), "b": _vec(x=3.0, y=4.0), "c": _vec(y=-2.0)}
    sim = json.loads(json.dumps(similarity_matrix(vectors)))
    assert sim["names"] == ["a", "b", "c"]
    assert sim["inner_products"] == [[1.0, 3.0, 0.0], [3.0, 25.0, -8.0], [0.0, -8.0, 4.0]]
    assert sim["cosine"][0][1] == pytest.approx(0.6)
    assert sim["cosine"][1][2] == pytest.approx(-0.8)
    assert all(sim["cosine"][i][i] == pytest.approx(1.0) for i in range(3))
