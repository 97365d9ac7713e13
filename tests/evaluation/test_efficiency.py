import pytest

from mocae.evaluation.efficiency import measure_efficiency


def test_measure_efficiency_on_tiny(tiny):
    model, tokenizer = tiny
    out = measure_efficiency(model, tokenizer, ["hello", "what is water"], batch_sizes=(1, 3), new_tokens=4, repeats=2)
    for size in (1, 3):
        row = out[f"batch_{size}"]
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            rate = row[key]
            assert rate["value"] > 0 and rate["n"] == 2 and rate["ci"][0] <= rate["value"] <= rate["ci"][1]
        assert row["prompt_tokens"] > 0
    assert out["batch_3"]["prompt_tokens"] > out["batch_1"]["prompt_tokens"]  # prompts are cycled to fill a batch
    assert out["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert out["parameters"]["adapter"] == 0
    assert out["peak_rss_mb"] > 10 and out["new_tokens"] == 4
    assert not model.training


def test_measure_efficiency_rejects_no_prompts(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="at least one prompt"):
        measure_efficiency(model, tokenizer, [])
