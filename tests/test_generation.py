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


def test_chat_inputs_checks_prompts_and_budget(tiny):
    from mocae.generation import MAX_NEW_TOKENS, chat_inputs, context_window

    model, tokenizer = tiny
    assert context_window(model) == 512
    assert chat_inputs(tokenizer, "hi", None, 8, 512) == [chat_prompt(tokenizer, "hi")]
    with pytest.raises(ValueError, match="no prompts given"):
        chat_inputs(tokenizer, [], None, 8, 512)
    with pytest.raises(ValueError, match="prompt 0 is a int"):
        chat_inputs(tokenizer, [3], None, 8, 512)
    with pytest.raises(ValueError, match=f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}"):
        chat_inputs(tokenizer, "hi", None, MAX_NEW_TOKENS + 1, None)
    with pytest.raises(ValueError, match="leaves no room"):
        chat_inputs(tokenizer, "hi", None, 512, 512)


def test_truncation_keeps_the_end_and_fits_exactly(tiny):
    from mocae.generation import chat_inputs

    _, tokenizer = tiny
    prompt = "The capital of France is Paris. " * 40 + "So what is water?"
    with pytest.raises(ValueError, match=r"prompt 0 .* leaves room for 92"):
        chat_inputs(tokenizer, [prompt], None, 100, 192)
    [text] = chat_inputs(tokenizer, [prompt], None, 100, 192, truncate_prompt=True)
    assert text.endswith("So what is water?<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>user\n")
    assert 85 <= len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 92
    [system] = chat_inputs(tokenizer, [prompt], "be brief", 100, 192, truncate_prompt=True)
    assert system.startswith("<|im_start|>system\nbe brief<|im_end|>")


def test_streamed_generation_refuses_an_empty_prompt(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate_streamed(model, tokenizer, " ", max_new_tokens=2, out=io.StringIO())
