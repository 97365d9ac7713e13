import json

import pytest
import torch

from mocae.generation_cache import GenerationConfig, generate_cached, model_fingerprint, write_alpaca_eval_outputs


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


# Verified on read: a stale, edited or broken cache file is regenerated, never reused ------------


def _one_cache_file(tmp_path):
    files = list(tmp_path.glob("set-*.json"))
    assert len(files) == 1
    return files[0]


def test_edited_outputs_with_a_zeroed_hash_are_regenerated(tiny, tmp_path):
    model, tokenizer = tiny
    gen = GenerationConfig(max_new_tokens=3, batch_size=2)
    prompts = ["hello", "what is water"]
    first = generate_cached(model, tokenizer, "tiny-a", "set", prompts, gen, tmp_path, progress=False)
    path = _one_cache_file(tmp_path)
    record = json.loads(path.read_text())
    record["outputs"] = ["forged answer", "another forged answer"]
    record["prompts_sha256"] = "0" * 64
    path.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match=rf"{path.name}.*prompts_sha256.*regenerating"):
        again = generate_cached(model, tokenizer, "tiny-a", "set", prompts, gen, tmp_path, progress=False)
    assert again == first and "forged answer" not in json.loads(path.read_text())["outputs"]
    # Outputs edited with every key field left intact: the answers' own hash catches it.
    record = json.loads(path.read_text())
    record["outputs"][0] = "forged answer"
    path.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match=rf"{path.name}.*stored hash"):
        assert generate_cached(model, tokenizer, "tiny-a", "set", prompts, gen, tmp_path, progress=False) == first


def test_truncated_json_is_regenerated_with_a_warning_naming_the_file(tiny, tmp_path):
    model, tokenizer = tiny
    gen = GenerationConfig(max_new_tokens=3, batch_size=2)
    first = generate_cached(model, tokenizer, "tiny-a", "set", ["hello"], gen, tmp_path, progress=False)
    path = _one_cache_file(tmp_path)
    path.write_text(path.read_text()[:25])
    with pytest.warns(UserWarning, match=rf"generation cache .*{path.name}: unreadable"):
        assert generate_cached(model, tokenizer, "tiny-a", "set", ["hello"], gen, tmp_path, progress=False) == first
    json.loads(path.read_text())  # rewritten whole


@pytest.mark.parametrize("field, value", [("model_id", "tiny-b"), ("prompt_set", "other"), ("schema", None),
                                          ("generation", {"max_new_tokens": 99, "batch_size": 2, "system": None})])
def test_a_mismatched_entry_is_a_miss(tiny, tmp_path, field, value):
    model, tokenizer = tiny
    gen = GenerationConfig(max_new_tokens=3, batch_size=2)
    generate_cached(model, tokenizer, "tiny-a", "set", ["hello"], gen, tmp_path, progress=False)
    path = _one_cache_file(tmp_path)
    record = json.loads(path.read_text())
    if value is None:
        del record[field]  # a file from before the schema field: an older mocae wrote it
    else:
        record[field] = value
    path.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match=field), pytest.raises(AssertionError, match="cache hit"):
        generate_cached(ExplodingModel(), tokenizer, "tiny-a", "set", ["hello"], gen, tmp_path, progress=False)


def test_truncated_share_is_exact(tiny, tmp_path):
    """Token counts and EOS per answer, checked against one unbatched generate per prompt."""
    from mocae.generation_cache import generate_records
    from mocae.generation import chat_prompt

    model, tokenizer = tiny
    prompts = ["hello", "what is water", "the capital of France", "name a colour"]
    budget = 5

    def alone(prompt):
        ids = tokenizer(chat_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
        return model.generate(**ids, max_new_tokens=budget, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:].tolist()

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the tiny model repeats one token whatever the prompt: make answers differ
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    # Make some answers end early: the token the model writes 2nd for the third prompt becomes EOS.
    eos = alone(prompts[2])[1]
    model.generation_config.eos_token_id = eos
    expected = []
    for prompt in prompts:
        row = alone(prompt)
        expected.append((row.index(eos), True) if eos in row else (len(row), False))
    assert any(e for _, e in expected) and not all(e for _, e in expected)  # both kinds: not vacuous
    gens = generate_records(model, tokenizer, "tiny-eos", "set", prompts, GenerationConfig(max_new_tokens=budget,
                                                                                            batch_size=4),
                            tmp_path, progress=False)
    assert list(zip(gens.n_tokens, gens.eos)) == expected
    assert gens.truncated == [not e and n == budget for n, e in expected]
    cached = generate_records(ExplodingModel(), tokenizer, "tiny-eos", "set", prompts,
                              GenerationConfig(max_new_tokens=budget, batch_size=4), tmp_path, progress=False)
    assert cached == gens  # counts survive the cache


def test_cached_records_reads_a_finished_request_and_never_generates(tiny, tmp_path):
    from mocae.generation_cache import cached_records, generate_records

    model, tokenizer = tiny
    gen = GenerationConfig(max_new_tokens=3, batch_size=2)
    assert cached_records("tiny-a", "set", ["hi", "yo"], gen, tmp_path) is None  # nothing there: no answers made
    made = generate_records(model, tokenizer, "tiny-a", "set", ["hi", "yo"], gen, tmp_path, progress=False)
    assert cached_records("tiny-a", "set", ["hi", "yo"], gen, tmp_path).outputs == made.outputs
    assert cached_records("tiny-a", "set", ["hi"], gen, tmp_path) is None  # another request: a miss
