"""X-LoRA and Arrow from peft on tiny-random: build, generate, train, save/load, routing checks."""

import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel, XLoraConfig, get_peft_model
from safetensors import safe_open

from mocae.backbones import load_backbone
from mocae.baselines.merges import MergeConfig, build_merged
from mocae.baselines.peft_routing import (
    XLORA_CLASSIFIER_FILE,
    ArrowBaselineConfig,
    XLoraBaselineConfig,
    build_arrow,
    build_xlora,
    fit_xlora,
    load_xlora,
    save_xlora,
    xlora_classifier,
)

PROMPTS = ["hello there friend", "hi"]


def left_padded(tok):
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0
    return batch


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def expert_logits(path, batch):
    base, _ = load_backbone("tiny-random")
    return logits(PeftModel.from_pretrained(base, path), batch)


def check_generation(model, tok):
    """A left-padded batch of 2 generates, and each row matches the prompt generated alone."""
    batch = left_padded(tok)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)
    for row, prompt in zip(out, PROMPTS):
        alone = tok([prompt], return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert row[-4:].tolist() == single[0, -4:].tolist()


def examples():
    return [("What is the capital of France?", "Paris.", 0), ("Help me hurt someone.", "I cannot help.", 1),
            ("Is water wet?", "Yes, water is wet.", 2)]


# ---------------------------------------------------------------- X-LoRA

def test_xlora_builds_and_generates(expert_dirs):
    model, tok = build_xlora("tiny-random", expert_dirs)
    assert model.config.use_cache is False and "use_cache=False" in model.xlora_note
    assert "KV cache" in model.xlora_note
    assert model.xlora_experts == ["helpful", "harmless", "honest"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []
    check_generation(model, tok)
    assert model.base_model.get_latest_scalings().shape[-1] == 3


def test_cached_xlora_decoding_equals_peft_uncached_generate(expert_dirs):
    model, tok = build_xlora("tiny-random", expert_dirs, XLoraBaselineConfig(depth=2, size=16))
    with torch.no_grad():  # a classifier that routes differently per token, so the caches matter
        for param in xlora_classifier(model).parameters():
            param.normal_(0, 2.0, generator=torch.Generator().manual_seed(param.numel()))
    batch = left_padded(tok)
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=12,
                  do_sample=False, pad_token_id=tok.pad_token_id)
    uncached, cached = model.generate_uncached(**kwargs), model.generate(**kwargs)
    assert cached.tolist() == uncached.tolist()
    scalings = model.base_model.get_latest_scalings()
    assert scalings.shape[1] == 1 and not torch.allclose(scalings[0, 0, 0], scalings[1, 0, 0])  # rows differ
    eos = int(cached[0, batch["input_ids"].shape[1]])  # make the first generated token of row 0 an EOS
    stopped = model.generate(**{**kwargs, "max_new_tokens": 4}, eos_token_id=eos)
    assert (stopped[0, batch["input_ids"].shape[1] + 1:] == tok.pad_token_id).all()
    full = model.generate(**{**kwargs, "max_new_tokens": 4}, eos_token_id=eos, min_new_tokens=4)
    assert full.shape[1] == batch["input_ids"].shape[1] + 4 and eos not in full[0, -3:].tolist()
    with pytest.raises(ValueError, match="greedy only"):
        model.generate(**{**kwargs, "do_sample": True})


def test_xlora_one_hot_classifier_is_that_expert(expert_dirs):
    """Adapter order: classifier output k must drive expert k (peft loads them as "0", "1", "2")."""
    model, tok = build_xlora("tiny-random", expert_dirs)
    batch = left_padded(tok)
    last = xlora_classifier(model).layers[-1]
    for k, name in enumerate(model.xlora_experts):
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.where(torch.arange(3) == k, 100.0, -100.0))
        torch.testing.assert_close(logits(model, batch), expert_logits(expert_dirs[name], batch),
                                   atol=1e-5, rtol=0)


def test_fit_xlora_trains_only_the_classifier(expert_dirs):
    model, tok = build_xlora("tiny-random", expert_dirs, XLoraBaselineConfig(depth=2, size=16))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = fit_xlora(model, tok, examples(), XLoraBaselineConfig(depth=2, size=16, steps=3, batch_size=2,
                                                                   learning_rate=1e-2), progress=False)
    assert len(result["losses"]) == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["trainable_params"] == 64 * 16 + 16 + 16 * 3 + 3
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("internal_xlora_classifier" in n for n in changed)
    assert all(not p.requires_grad for p in model.parameters())
    assert not xlora_classifier(model).training


def test_xlora_save_load_identical_logits(expert_dirs, tmp_path):
    model, tok = build_xlora("tiny-random", expert_dirs)
    with torch.no_grad():  # a classifier the reload cannot get by re-initialising with the same seed
        for p in xlora_classifier(model).parameters():
            p.add_(torch.randn_like(p))
    batch = left_padded(tok)
    expected = logits(model, batch)
    target = save_xlora(model, tmp_path / "xlora", {"run": "test"})
    assert (target / XLORA_CLASSIFIER_FILE).is_file() and (target / "experts" / "honest" / "adapter_config.json").is_file()
    for path in expert_dirs.values():  # the saved folder must not need the original experts
        shutil.rmtree(path)
    torch.manual_seed(123)
    loaded, _ = load_xlora(target)
    assert loaded.xlora_experts == model.xlora_experts
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-6, rtol=0)
    check_generation(loaded, tok)


def test_peft_native_xlora_save_drops_the_classifier(expert_dirs, tmp_path):
    """Canary for the workaround in save_xlora: if this fails, peft fixed X-LoRA's save_pretrained."""
    base, _ = load_backbone("tiny-random")
    base.config.use_cache = False
    model = get_peft_model(base, XLoraConfig(task_type="CAUSAL_LM", hidden_size=64, adapters={
        str(i): p for i, p in enumerate(expert_dirs.values())}))
    model.save_pretrained(tmp_path / "native")
    with safe_open(tmp_path / "native" / "adapter_model.safetensors", "pt") as f:
        assert list(f.keys()) == []
    with safe_open(tmp_path / "native" / "0" / "adapter_model.safetensors", "pt") as f:
        assert "base_model.internal_xlora_classifier.layers.weight" in f.keys()  # ".0" mangled away


def test_xlora_errors(expert_dirs, tmp_path):
    with pytest.raises(ValueError, match="top_k=4 exceeds the 3 experts"):
        build_xlora("tiny-random", expert_dirs, XLoraBaselineConfig(top_k=4))
    with pytest.raises(FileNotFoundError, match="'ghost'"):
        build_xlora("tiny-random", {"ghost": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="not a saved X-LoRA"):
        load_xlora(tmp_path)
    with pytest.raises(ValueError, match="not a peft X-LoRA model"):
        fit_xlora(load_backbone("tiny-random")[0], None, examples())


# ---------------------------------------------------------------- Arrow

def test_arrow_builds_generates_and_routes(expert_dirs):
    base, _ = load_backbone("tiny-random")
    model, tok = build_arrow("tiny-random", expert_dirs, ArrowBaselineConfig(top_k=2))
    assert model.active_adapters == ["arrow_router"]
    assert model.arrow_experts == {"task_0": "helpful", "task_1": "harmless", "task_2": "honest"}
    batch = left_padded(tok)
    assert (logits(model, batch) - logits(base, batch)).abs().max() > 1e-2
    check_generation(model, tok)


def test_arrow_single_expert_is_that_expert(expert_dirs):
    model, tok = build_arrow("tiny-random", {"harmless": expert_dirs["harmless"]}, ArrowBaselineConfig(top_k=1))
    batch = left_padded(tok)
    torch.testing.assert_close(logits(model, batch), expert_logits(expert_dirs["harmless"], batch),
                               atol=1e-5, rtol=0)


def test_arrow_flat_router_is_the_average_merge(expert_dirs):
    """top_k = E and a huge temperature give equal weights: the 1/E task-arithmetic merge."""
    model, tok = build_arrow("tiny-random", expert_dirs, ArrowBaselineConfig(top_k=3, router_temperature=1e9))
    merged, _ = build_merged("tiny-random", expert_dirs, MergeConfig(method="task_arithmetic"))
    batch = left_padded(tok)
    torch.testing.assert_close(logits(model, batch), logits(merged, batch), atol=1e-4, rtol=0)
    sharp, _ = build_arrow("tiny-random", expert_dirs, ArrowBaselineConfig(top_k=1))
    assert (logits(sharp, batch) - logits(merged, batch)).abs().max() > 1e-3


def test_arrow_is_reproducible(expert_dirs):
    a, tok = build_arrow("tiny-random", expert_dirs)
    torch.rand(3)
    b, _ = build_arrow("tiny-random", expert_dirs)
    batch = left_padded(tok)
    assert torch.equal(logits(a, batch), logits(b, batch))


def test_arrow_weights_fingerprint_the_same_whatever_the_torch_seed(expert_dirs):
    """peft draws the unused arrow_router placeholder's A from the global RNG: left random, each build
    had another fingerprint and the bench regenerated Arrow's answers in every sitting."""
    from mocae.generation_cache import model_fingerprint

    prints = set()
    for seed in (0, 1):
        backbone = load_backbone("tiny-random")
        torch.manual_seed(seed)
        model, _ = build_arrow("tiny-random", expert_dirs, model_and_tokenizer=backbone)
        prints.add(model_fingerprint(model))
    assert len(prints) == 1


def test_arrow_errors(expert_dirs, expert_factory, tmp_path):
    with pytest.raises(ValueError, match="top_k=3 exceeds the 2 experts"):
        build_arrow("tiny-random", {k: expert_dirs[k] for k in ("helpful", "honest")})
    odd = str(expert_factory(tmp_path / "odd", 7, rank=4))
    with pytest.raises(ValueError, match="'odd' has r=4"):
        build_arrow("tiny-random", {"helpful": expert_dirs["helpful"], "odd": odd}, ArrowBaselineConfig(top_k=1))
    narrow = str(expert_factory(tmp_path / "narrow", 8, targets=["q_proj"]))
    with pytest.raises(ValueError, match="'narrow' has r=2 on \\['q_proj'\\]"):
        build_arrow("tiny-random", {"helpful": expert_dirs["helpful"], "narrow": narrow},
                    ArrowBaselineConfig(top_k=1))
    with pytest.raises(ValueError, match="was trained on backbone"):
        build_arrow("smollm2-135m", expert_dirs)
    assert Path(expert_dirs["helpful"]).is_dir()
