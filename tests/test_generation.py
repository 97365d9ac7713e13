import io

import pytest

from mocae.generation import chat_prompt, generate_streamed


def test_streamed_text_equals_returned_answer(tiny):
    model, tokenizer = tiny
    sink = io.StringIO()
    answer = generate_streamed(model, tokenizer, "hello there", max_new_tokens=8, out=sink)
    assert sink.getvalue().strip() == answer.strip()
    assert len(answer) > 0


def test_chat_prompt_includes_system_message(tiny):
    _, tokenizer = tiny
    text = chat_prompt(tokenizer, "q", system="be brief")
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")


def test_tokenizer_without_template_is_a_clear_error(tiny):
    _, tokenizer = tiny
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        chat_prompt(tokenizer, "q")


def test_batched_generation_keeps_input_order(tiny):
    from mocae.generation import generate_batch

    model, tokenizer = tiny
    prompts = ["a much longer prompt than the others here", "hi", "medium prompt"]
    batched = generate_batch(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, progress=False)
    singles = [generate_batch(model, tokenizer, [p], max_new_tokens=6, progress=False)[0] for p in prompts]
    assert batched == singles
    assert tokenizer.padding_side == "left"
