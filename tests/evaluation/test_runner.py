import json

import pytest
import torch

from mocae.evaluation.runner import GenerationConfig, generate_cached, model_fingerprint, write_alpaca_eval_outputs


class ExplodingModel:
    """A model that fails if generation is attempted: proves a cache hit does no work."""

    device = torch.device("cpu")

    def generate(self, *args, **kwargs):
        raise AssertionError("generate was called on a cache hit")


def test_cache_hit_does_not_call_the_model(tiny, tmp_path):
    model, tokenizer = tiny
    gen = GenerationConfig(max_new_tokens=4, batch_size=2)
    prompts = ["hello", "what is water", "the capital of France"]
    first = generate_cached(model, tokenizer, "tiny-a", "set", prompts, gen, tmp_path, progress=False)
    assert len(first) == 3 and all(isinstance(o, str) for o in first)
    files = list(tmp_path.glob("set-*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["outputs"] == first and record["generation"]["max_new_tokens"] == 4
    again = generate_cached(ExplodingModel(), tokenizer, "tiny-a", "set", prompts, gen, tmp_path, progress=False)
    assert again == first


@pytest.mark.parametrize("change", ["model_id", "prompts", "gen"])
def test_cache_key_covers_model_prompts_and_config(tiny, tmp_path, change):
    model, tokenizer = tiny
    gen = GenerationConfig(max_new_tokens=2, batch_size=2)
    generate_cached(model, tokenizer, "tiny-a", "set", ["hi"], gen, tmp_path, progress=False)
    args = {"model_id": "tiny-a", "prompts": ["hi"], "gen": gen}
    args[change] = {"model_id": "tiny-b", "prompts": ["hello"], "gen": gen.model_copy(update={"max_new_tokens": 3})}[change]
    with pytest.raises(AssertionError, match="cache hit"):
        generate_cached(ExplodingModel(), tokenizer, args["model_id"], "set", args["prompts"], args["gen"], tmp_path,
                        progress=False)


def test_empty_prompt_set_raises(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="'harmful' is empty"):
        generate_cached(model, tokenizer, "m", "harmful", [], GenerationConfig(), tmp_path)


def test_alpaca_eval_model_outputs_format(tmp_path):
    path = write_alpaca_eval_outputs(["Say hi", "Count"], ["Hi!", "1 2 3"], "mocae-test", tmp_path / "model_outputs.json",
                                     datasets=["helpful_base", "vicuna"])
    records = json.loads(path.read_text())
    assert records == [
        {"instruction": "Say hi", "output": "Hi!", "generator": "mocae-test", "dataset": "helpful_base"},
        {"instruction": "Count", "output": "1 2 3", "generator": "mocae-test", "dataset": "vicuna"},
    ]
    with pytest.raises(ValueError, match="2 instructions but 1 outputs"):
        write_alpaca_eval_outputs(["a", "b"], ["x"], "g", tmp_path / "bad.json")


def test_fingerprint_changes_with_the_weights(tiny):
    model, _ = tiny
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-3
    assert model_fingerprint(model) != before
