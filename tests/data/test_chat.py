"""Chat formatting: axis prompt injection, messages, and trl's prompt/completion format."""

from __future__ import annotations

import pytest

from mocae import AXES
from mocae.data import (
    AXIS_INSTRUCTIONS,
    Example,
    inject_axis_prompt,
    load_truthfulqa,
    to_chat_messages,
    to_prompt_completion,
)

EX = Example("What is the answer?", "hello world", "helpful", "alpaca", "train")


def test_every_axis_has_an_instruction():
    assert set(AXIS_INSTRUCTIONS) == set(AXES)
    for axis in AXES:
        assert inject_axis_prompt("Q?", axis) == f"{AXIS_INSTRUCTIONS[axis]}\n\nQ?"


def test_unknown_axis_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown axis 'funny'.*'helpful', 'harmless', 'honest'"):
        inject_axis_prompt("Q?", "funny")


def test_chat_messages():
    assert to_chat_messages(EX) == [{"role": "user", "content": "What is the answer?"},
                                    {"role": "assistant", "content": "hello world"}]
    prompt_only = Example("Q?", None, "harmless", "xstest", "test")
    assert to_chat_messages(prompt_only, system="Be brief.") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}]
    injected = to_chat_messages(EX, inject=True)
    assert injected[0]["content"] == AXIS_INSTRUCTIONS["helpful"] + "\n\nWhat is the answer?"


def test_prompt_completion_with_chatml(chat_tokenizer):
    out = to_prompt_completion(EX, chat_tokenizer)
    assert out == {"prompt": "<|im_start|>user\nWhat is the answer?<|im_end|>\n<|im_start|>assistant\n",
                   "completion": "hello world<|im_end|>\n"}
    full = chat_tokenizer.apply_chat_template(to_chat_messages(EX), tokenize=False)
    assert out["prompt"] + out["completion"] == full


def test_prompt_completion_injects_and_takes_system(chat_tokenizer, data_root):
    ex = load_truthfulqa(data_root)[0]
    out = to_prompt_completion(ex, chat_tokenizer, inject=True, system="S")
    assert out["prompt"].startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n" + AXIS_INSTRUCTIONS["honest"])
    assert out["completion"] == ex.completion + "<|im_end|>\n"


def test_prompt_completion_falls_back_to_eos(make_chat_tokenizer):
    # A template that renders earlier turns differently once an assistant turn exists.
    template = ("{% if messages[-1]['role'] == 'assistant' %}[train]{% endif %}"
                "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    tok = make_chat_tokenizer(template)
    out = to_prompt_completion(EX, tok)
    assert out == {"prompt": "user: What is the answer?\nassistant: ", "completion": "hello world<|im_end|>"}


def test_tokenizer_without_chat_template(make_chat_tokenizer):
    tok = make_chat_tokenizer(None)
    with pytest.raises(ValueError, match="no chat_template"):
        to_prompt_completion(EX, tok)


def test_prompt_only_example_is_rejected(chat_tokenizer):
    with pytest.raises(ValueError, match="no completion"):
        to_prompt_completion(Example("Q?", None, "harmless", "xstest", "test"), chat_tokenizer)
