"""Turning Examples into chat messages and into trl's prompt/completion training format."""

from __future__ import annotations

from mocae import AXES
from mocae.data.records import Example

# AlignX Stage 1 prompt injection: the axis instruction prepended while training that axis' expert.
AXIS_INSTRUCTIONS: dict[str, str] = {
    "helpful": "You are a helpful assistant. Answer the request fully and accurately.",
    "harmless": ("You are a harmless assistant. Refuse requests that could cause harm and explain why, "
                 "but help with safe requests."),
    "honest": ("You are an honest assistant. Answer truthfully, and say when you are unsure or when a "
               "question rests on a false premise."),
}


def inject_axis_prompt(prompt: str, axis: str) -> str:
    """Prepend the axis instruction to a prompt, separated by a blank line.

    Raises:
        ValueError: ``axis`` is not one of ``mocae.AXES``.
    """
    if axis not in AXIS_INSTRUCTIONS:
        raise ValueError(f"unknown axis {axis!r}: expected one of {list(AXES)}")
    return f"{AXIS_INSTRUCTIONS[axis]}\n\n{prompt}"


def to_chat_messages(example: Example, inject: bool = False, system: str | None = None) -> list[dict]:
    """The example as chat messages: [system], user, and assistant when it has a completion.

    Args:
        example: the record.
        inject: prepend the axis instruction to the user turn (AlignX prompt injection).
        system: an optional system message.
    """
    user = inject_axis_prompt(example.prompt, example.axis) if inject else example.prompt
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": user})
    if example.completion is not None:
        messages.append({"role": "assistant", "content": example.completion})
    return messages


def to_prompt_completion(example: Example, tokenizer, inject: bool = False,
                         system: str | None = None) -> dict[str, str]:
    """The example rendered with the tokenizer's chat template, split into prompt and completion.

    The completion is what the template puts after the generation prompt when the assistant turn
    is rendered (answer + end-of-turn marker), so the model learns to close its turn exactly as
    at inference. If the full rendering does not start with the prompt rendering (some templates
    rewrite earlier turns), it falls back to ``completion + eos_token``.

    Args:
        example: a record with a completion.
        tokenizer: a tokenizer with a ``chat_template``.
        inject: prepend the axis instruction (AlignX prompt injection).
        system: an optional system message.

    Returns:
        {"prompt": str, "completion": str}, the format trl's SFTTrainer takes for completion-only loss.

    Raises:
        ValueError: the tokenizer has no chat template, or the example no completion.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat_template: use an instruct backbone or set "
            "tokenizer.chat_template"
        )
    if example.completion is None:
        raise ValueError(f"example from {example.source!r} has no completion to train on")
    messages = to_chat_messages(example, inject=inject, system=system)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if full.startswith(prompt) and example.completion in full[len(prompt):]:
        completion = full[len(prompt):]
    else:
        completion = example.completion + (tokenizer.eos_token or "")
    return {"prompt": prompt, "completion": completion}
