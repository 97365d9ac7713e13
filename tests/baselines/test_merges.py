"""Dense-delta merges (task arithmetic, TIES, DARE) checked against hand computations."""

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mocae.backbones import load_backbone
from mocae.baselines.merges import (
    MERGE_FILE,
    MergeConfig,
    build_merged,
    merge_module,
    merge_task_vectors,
    merged_deltas,
    save_merged,
)
from mocae.experts.task_vectors import TaskVector

PREFIX = "base_model.model."


def hand_deltas(adapter_dir) -> dict[str, torch.Tensor]:
    """scaling * B @ A per module, read straight from the saved adapter files."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    out = {}
    for key, a in weights.items():
        if key.endswith("lora_A.weight"):
            module = key[len(PREFIX):-len(".lora_A.weight")]
            b = weights[key.replace("lora_A", "lora_B")]
            out[module] = scaling * b.float() @ a.float()
    return out


def test_task_arithmetic_equals_hand_sum(expert_dirs):
    experts = {k: expert_dirs[k] for k in ("helpful", "harmless")}
    a, b = 0.7, -0.4
    base, _ = load_backbone("tiny-random")
    base_weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    model, _ = build_merged("tiny-random", experts, MergeConfig(method="task_arithmetic", weights=[a, b]))
    d1, d2 = hand_deltas(Path(experts["helpful"])), hand_deltas(Path(experts["harmless"]))
    assert len(d1) == 8  # 2 layers x (q, v, up, down)
    params = dict(model.named_parameters())
    for module in d1:
        expected = base_weights[module + ".weight"] + a * d1[module] + b * d2[module]
        torch.testing.assert_close(params[module + ".weight"], expected, atol=1e-5, rtol=0)
    untouched = [n for n in params if not any(n.startswith(m + ".") for m in d1)]
    assert untouched and all(torch.equal(params[n], base_weights[n]) for n in untouched)
    assert model.merge_config["method"] == "task_arithmetic"


def test_default_weights_are_documented():
    assert MergeConfig(method="task_arithmetic").expert_weights(4) == [0.25] * 4
    assert MergeConfig(method="dare_linear").expert_weights(2) == [0.5, 0.5]
    assert MergeConfig(method="ties").expert_weights(3) == [1.0] * 3
    assert MergeConfig(method="dare_ties").expert_weights(3) == [1.0] * 3


def test_ties_trims_elects_and_averages_by_hand():
    d1 = torch.tensor([3.0, -1.0, 0.5, 2.0])
    d2 = torch.tensor([1.0, 2.0, -0.2, -4.0])
    # density 0.5 keeps the 2 largest magnitudes: d1 -> [3, 0, 0, 2], d2 -> [0, 2, 0, -4].
    # "total": signs of the sum [3, 2, 0, -2] -> [+, +, +, -]; d1's 2 disagrees at the end.
    total = merge_module([d1, d2], [1.0, 1.0], MergeConfig(method="ties", density=0.5))
    torch.testing.assert_close(total, torch.tensor([3.0, 2.0, 0.0, -4.0]))
    # "frequency": one + and one - at the end ties to +, so d2's -4 is dropped instead.
    freq = merge_module([d1, d2], [1.0, 1.0],
                        MergeConfig(method="ties", density=0.5, majority_sign_method="frequency"))
    torch.testing.assert_close(freq, torch.tensor([3.0, 2.0, 0.0, 2.0]))
    # weights scale before the disjoint mean: entry 0 only d1 survives -> 0.5 * 3.
    weighted = merge_module([d1, d2], [0.5, 2.0], MergeConfig(method="ties", density=0.5))
    torch.testing.assert_close(weighted, torch.tensor([1.5, 4.0, 0.0, -8.0]))


def test_ties_density_one_same_signs_is_weighted_mean():
    gen = torch.Generator().manual_seed(0)
    vectors = {f"e{i}": TaskVector({"m.a": torch.rand(3, 4, generator=gen) + 0.1,
                                    "m.b": -torch.rand(5, generator=gen) - 0.1}) for i in range(3)}
    weights = [1.0, 0.5, 2.0]
    merged = merge_task_vectors(vectors, MergeConfig(method="ties", density=1.0, weights=weights))
    for module in ("m.a", "m.b"):
        expected = sum(w * v[module] for w, v in zip(weights, vectors.values())) / 3
        torch.testing.assert_close(merged[module], expected)


def test_missing_module_counts_as_zero():
    vectors = {"a": TaskVector({"x": torch.ones(2), "y": torch.ones(2)}), "b": TaskVector({"x": torch.ones(2)})}
    merged = merge_task_vectors(vectors, MergeConfig(method="task_arithmetic"))
    torch.testing.assert_close(merged["y"], torch.full((2,), 0.5))
    with pytest.raises(ValueError, match="different shapes"):
        merge_task_vectors({"a": TaskVector({"x": torch.ones(2)}), "b": TaskVector({"x": torch.ones(3)})},
                           MergeConfig(method="task_arithmetic"))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_seeded(method):
    gen = torch.Generator().manual_seed(1)
    vectors = {f"e{i}": TaskVector({"m": torch.randn(16, 16, generator=gen)}) for i in range(3)}
    first = merge_task_vectors(vectors, MergeConfig(method=method, density=0.3, seed=0))
    torch.rand(5)  # the global RNG state must not matter
    again = merge_task_vectors(vectors, MergeConfig(method=method, density=0.3, seed=0))
    other = merge_task_vectors(vectors, MergeConfig(method=method, density=0.3, seed=1))
    assert first == again
    assert not first.allclose(other)
    # rescaling by 1/density: a kept entry of a single expert is delta / density
    single = merge_task_vectors({"e0": vectors["e0"]}, MergeConfig(method="dare_linear", density=0.3, weights=[1.0]))
    kept = single["m"] != 0
    torch.testing.assert_close(single["m"][kept], vectors["e0"]["m"][kept] / 0.3)
    assert 0.1 < kept.float().mean() < 0.5


def test_dare_density_one_is_task_arithmetic():
    gen = torch.Generator().manual_seed(2)
    vectors = {f"e{i}": TaskVector({"m": torch.randn(4, 4, generator=gen)}) for i in range(2)}
    dare = merge_task_vectors(vectors, MergeConfig(method="dare_linear", density=1.0))
    ta = merge_task_vectors(vectors, MergeConfig(method="task_arithmetic"))
    assert dare.allclose(ta)


def test_merged_model_generates_and_saves(expert_dirs, tmp_path):
    cfg = MergeConfig(method="dare_ties", density=0.5)
    model, tok = build_merged("tiny-random", expert_dirs, cfg)
    batch = tok(["hello there friend", "hi"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0  # left padded
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)

    target = save_merged(model, tok, tmp_path / "merged", {"backbone": "tiny-random", "experts": expert_dirs})
    record = json.loads((target / MERGE_FILE).read_text())
    assert record["merge_config"]["method"] == "dare_ties" and record["experts"] == expert_dirs
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


def test_clear_errors(expert_dirs, tmp_path):
    with pytest.raises(ValidationError, match="method"):
        MergeConfig(method="slerp")
    with pytest.raises(ValidationError, match="density"):
        MergeConfig(method="ties", density=0.0)
    base, _ = load_backbone("tiny-random")
    with pytest.raises(ValueError, match="2 entries for 3 experts"):
        merged_deltas(expert_dirs, base, MergeConfig(method="ties", weights=[1.0, 1.0]))
    with pytest.raises(FileNotFoundError, match="'ghost'"):
        merged_deltas({"ghost": str(tmp_path / "nowhere")}, base, MergeConfig(method="ties"))
    with pytest.raises(ValueError, match="'helpful' was trained on backbone 'tiny-random'"):
        build_merged("smollm2-135m", expert_dirs, MergeConfig(method="ties"))
