"""Fixtures for the data tests: the fixture data directory and a tiny chat tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture
def data_root() -> Path:
    """The committed fixture data directory (same layout as the real one)."""
    return FIXTURES


@pytest.fixture
def data_copy(tmp_path) -> Path:
    """A writable copy of the fixture data directory, for tests that break a file."""
    dst = tmp_path / "data"
    shutil.copytree(FIXTURES, dst)
    return dst


@pytest.fixture
def no_data_env(monkeypatch):
    """No MOCAE_DATA_DIR: loaders fall back to the Hub."""
    monkeypatch.delenv("MOCAE_DATA_DIR", raising=False)


def build_chat_tokenizer(chat_template: str | None = CHATML):
    """A word-level tokenizer trained in memory, with a ChatML template and eos "<|im_end|>"."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator(["you are a helpful assistant", "what is the answer", "hello world"], trainer)
    kwargs = {"chat_template": chat_template} if chat_template is not None else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<unk>", **kwargs)


@pytest.fixture(scope="session")
def chat_tokenizer():
    return build_chat_tokenizer()


@pytest.fixture
def make_chat_tokenizer():
    """``build_chat_tokenizer`` itself, for tests that need another template (or none)."""
    return build_chat_tokenizer
