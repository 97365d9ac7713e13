"""Chat-formatted generation, streamed to a terminal or batched for evaluation."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import torch
from transformers import TextStreamer

from mocae.device import inference_autocast
from mocae.spec import capabilities_of


log = logging.getLogger("mocae")

# Far beyond any answer worth waiting for on a CPU; a typo such as 1000000000000 fails at once
# instead of after the model loads. Each model's context window (minus the prompt) bounds it further.
MAX_NEW_TOKENS = 32768


class _FileStreamer(TextStreamer):
    """TextStreamer that writes to any text stream (stdout by default) and flushes."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def chat_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """Render one user turn (and optional system turn) with the tokenizer's chat template.

    Raises:
        ValueError: the tokenizer has no chat template (a base model such as gemma3-270m).
    """
    if not tokenizer.chat_template:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "set tokenizer.chat_template or use an instruct backbone"
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def check_max_new_tokens(value, field: str = "max_new_tokens") -> int:
    """The generation budget as an int in ``1..MAX_NEW_TOKENS``.

    Raises:
        ValueError: naming ``field`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NEW_TOKENS:
        raise ValueError(f"{field} must be an integer in 1..{MAX_NEW_TOKENS}, got {value!r}")
    return value


def check_prompts(prompts) -> list[str]:
    """A non-empty list of prompts, none empty or only whitespace (a str is one prompt).

    Raises:
        ValueError: naming the first bad prompt's index.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} is a {type(p).__name__}, not a string")
        if not p.strip():
            raise ValueError(f"prompt {i} is empty" + (" (whitespace only)" if p else ""))
    return prompts


def context_window(model) -> int | None:
    """The number of positions ``model`` can attend to, from its HF config (None if unknown)."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def chat_inputs(tokenizer, prompts, system: str | None = None, max_new_tokens: int = 128,
                context: int | None = None, truncate_prompt: bool = False) -> list[str]:
    """Chat-formatted prompts, checked: none empty, each leaving ``max_new_tokens`` of room.

    Args:
        tokenizer: a chat tokenizer.
        prompts: user messages (or one message).
        system: optional system message.
        max_new_tokens: the answer's budget.
        context: the model's context window (``context_window(model)``); None skips the length check.
        truncate_prompt: cut an over-long user message from the front (keeping its end, where
            the question usually is) with a warning, instead of refusing it.

    Returns:
        One rendered chat prompt per message.

    Raises:
        ValueError: an empty prompt, a bad budget, or a prompt that does not fit (without
            ``truncate_prompt``), naming the prompt.
    """
    prompts = check_prompts(prompts)
    check_max_new_tokens(max_new_tokens)
    texts = [chat_prompt(tokenizer, p, system) for p in prompts]
    if context is None:
        return texts
    room = context - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"{context}-token context window")
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    for i, n in enumerate(lengths):
        if n <= room:
            continue
        if not truncate_prompt:
            raise ValueError(
                f"prompt {i} ({prompts[i][:40]!r}...) is {n} tokens in chat format, but the model's {context}-token "
                f"context with max_new_tokens={max_new_tokens} leaves room for {room}: shorten it, lower "
                "max_new_tokens, or keep its end with truncate_prompt=True (CLI: --truncate-prompt)")
        texts[i] = _truncated(tokenizer, prompts[i], system, room, i)
        log.warning("prompt %d was %d tokens: kept its last part so it fits %d tokens (truncate_prompt)", i, n, room)
    return texts


def _truncated(tokenizer, prompt: str, system: str | None, room: int, index: int) -> str:
    """The chat prompt of the longest end of ``prompt`` that fits ``room`` tokens."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    keep = len(ids)
    while keep > 0:
        text = chat_prompt(tokenizer, tokenizer.decode(ids[-keep:]), system)
        over = len(tokenizer(text, add_special_tokens=False)["input_ids"]) - room
        if over <= 0:
            return text
        keep -= over  # re-tokenising a cut text can merge tokens differently: loop until it fits
    raise ValueError(f"prompt {index}: the chat template alone does not fit {room} tokens; lower max_new_tokens")


@torch.inference_mode()
def generate_streamed(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 256,
    system: str | None = None,
    out: TextIO | None = None,
    truncate_prompt: bool = False,
    **generate_kwargs,
) -> str:
    """Answer one chat prompt greedily, writing tokens to ``out`` as they are produced.

    Args:
        model, tokenizer: a causal LM and its tokenizer (chat template required).
        prompt: the user message.
        max_new_tokens: generation budget.
        system: optional system message.
        out: text stream for the live answer (default stdout); None-like sinks allowed.
        truncate_prompt: keep the end of a prompt too long for the context (else: ValueError).
        generate_kwargs: passed to ``model.generate`` (e.g. ``do_sample=True``).

    Returns:
        The answer text without special tokens.
    """
    [text] = chat_inputs(tokenizer, [prompt], system, max_new_tokens, context_window(model), truncate_prompt)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = _FileStreamer(tokenizer, out if out is not None else sys.stdout)
    generate_kwargs.setdefault("do_sample", False)
    with inference_autocast(model.device):
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, streamer=streamer,
            pad_token_id=tokenizer.pad_token_id, **generate_kwargs,
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.inference_mode()
def generate_batch(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    system: str | None = None,
    progress: bool = True,
    desc: str = "generating",
    details: bool = False,
    truncate_prompt: bool = False,
) -> list[str] | tuple[list[str], list[int], list[bool]]:
    """Answer many chat prompts greedily in left-padded batches.

    Prompts are sorted by length so each batch carries little padding (batch 16 decodes ~8x
    faster than batch 1 here); answers come back in the input order. A model that reasons
    before answering (``Capabilities.step_decoding``: MoTE) gets ``reasoning_tokens`` more budget
    and only its ``final_answer(text)`` is returned and scored.

    Args:
        model, tokenizer: a causal LM and its chat tokenizer.
        prompts: user messages.
        max_new_tokens: generation budget per answer.
        batch_size: prompts per forward pass.
        system: optional system message for every prompt.
        progress: show a progress bar.
        details: also return, per answer, the tokens generated before EOS and whether EOS came
            (an answer without EOS ran out of budget: the truncated share is exact, not guessed).
        truncate_prompt: keep the end of prompts too long for the context (else: ValueError).

    Returns:
        One answer per prompt, special tokens removed; with ``details``, (answers, generated
        tokens, EOS reached).
    """
    from tqdm.auto import tqdm

    check_max_new_tokens(max_new_tokens)
    if not prompts:
        return ([], [], []) if details else []
    steps = capabilities_of(model).step_decoding  # a reasoning chain first (MoTE): only its answer is scored
    budget = max_new_tokens + (model.reasoning_tokens if steps else 0)
    texts = chat_inputs(tokenizer, prompts, system, budget, context_window(model), truncate_prompt)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers: list[str] = [""] * len(texts)
    n_tokens, reached_eos = [0] * len(texts), [False] * len(texts)
    eos_ids = _eos_ids(model, tokenizer)
    answer_of = model.final_answer if steps else str.strip
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        with tqdm(total=len(texts), desc=desc, disable=not progress, leave=False) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                                  add_special_tokens=False).to(model.device)
                with inference_autocast(model.device):  # fp32 on the CPU (mocae.device)
                    out = model.generate(**batch, max_new_tokens=budget, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
                new = out[:, batch["input_ids"].shape[1]:]
                for i, row in zip(idx, new):
                    answers[i] = answer_of(tokenizer.decode(row, skip_special_tokens=True)).strip()
                    hits = torch.isin(row, eos_ids.to(row.device)).nonzero()
                    reached_eos[i] = bool(len(hits))
                    # Finished rows are padded to the batch's length: count up to the first EOS only.
                    n_tokens[i] = int(hits[0, 0]) if len(hits) else int(row.shape[0])
                bar.update(len(idx))
    finally:
        tokenizer.padding_side = side
    return (answers, n_tokens, reached_eos) if details else answers


def _eos_ids(model, tokenizer) -> torch.Tensor:
    """Every token id that ends an answer: the model's generation config's EOS (often several) and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


def completion_batch(tokenizer, prompts: list[str], completions: list[str],
                     max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded chat prompt + completion rows for scoring or training on the completion.

    Args:
        prompts: user messages (chat-formatted here).
        completions: answers; the tokenizer's eos token is appended.
        max_length: truncate each row to this many tokens.

    Returns:
        input_ids, attention_mask, labels (-100 on prompt and padding) and prompt_mask
        (1 on each row's prompt tokens), all (B, T).
    """
    ids, prompt_lens = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        p = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        c = tokenizer(completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids.append((p + c)[:max_length])
        prompt_lens.append(min(len(p), len(ids[-1])))
    lengths = torch.tensor([len(x) for x in ids])
    width = int(lengths.max())
    input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids])
    positions = torch.arange(width)[None, :]
    attention_mask = (positions < lengths[:, None]).long()
    prompt_mask = (positions < torch.tensor(prompt_lens)[:, None]).long()
    labels = input_ids.masked_fill((attention_mask == 0) | (prompt_mask == 1), -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "prompt_mask": prompt_mask}


def completion_batches(tokenizer, examples: list[tuple], batch_size: int, steps: int, max_length: int,
                       seed: int = 0, desc: str = "train", progress: bool = True, device=None):
    """``steps`` training batches of (prompt, completion, label) examples, reshuffled every pass.

    Yields:
        (completion_batch dict, labels LongTensor) per step, with a tqdm bar when ``progress``.
    """
    import random

    from tqdm.auto import tqdm

    rng = random.Random(seed)
    order: list[int] = []
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        if len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        idx, order = order[:batch_size], order[batch_size:]
        batch = completion_batch(tokenizer, [examples[i][0] for i in idx], [examples[i][1] for i in idx],
                                 max_length=max_length)
        labels = torch.tensor([examples[i][2] for i in idx])
        if device is not None:
            batch, labels = {k: v.to(device) for k, v in batch.items()}, labels.to(device)
        yield batch, labels


def greedy_settings(generation_config, decoder: str, do_sample: bool, options: dict,
                    eos_token_id=None, pad_token_id: int | None = None) -> tuple:
    """EOS and pad ids for a greedy-only decoder, from the model's generation config by default.

    Raises:
        ValueError: sampling or any other generation option (``options``) was asked for.
    """
    unsupported = sorted(k for k, v in options.items() if v is not None and k != "use_cache")
    if do_sample or unsupported:
        raise ValueError(f"{decoder} is greedy only; unsupported options: "
                         f"{unsupported + (['do_sample'] if do_sample else [])}")
    eos = generation_config.eos_token_id if eos_token_id is None else eos_token_id
    pad = pad_token_id if pad_token_id is not None else (generation_config.pad_token_id or 0)
    return eos, pad


@torch.no_grad()
def greedy_decode(step, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                  eos_token_id: int | list[int] | None, pad_token_id: int, min_new_tokens: int = 0) -> torch.Tensor:
    """Greedy decoding around a cached forward of the caller's (left-padded batches welcome).

    Args:
        step: ``step(ids, mask, positions, generated) -> logits (B, V)`` of the last position;
            ``ids`` are the new tokens (the prompt first, then one token per row), ``mask`` the
            attention mask so far, ``positions`` the new tokens' position ids and ``generated``
            (B, k) the tokens generated before this call, the last of them being ``ids``. The
            step keeps its own KV cache(s).
        input_ids, attention_mask: the prompts.
        max_new_tokens, min_new_tokens: the budget (EOS is suppressed before the minimum).
        eos_token_id, pad_token_id: finished rows are padded with ``pad_token_id``.

    Returns:
        (B, prompt + generated) token ids, like ``transformers`` ``generate``.
    """
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                       device=input_ids.device)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
    ids, out = input_ids, [input_ids]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for k in range(max_new_tokens):
        logits = step(ids, mask, positions, torch.cat(out[1:], dim=1) if k else input_ids[:, :0])
        if k < min_new_tokens and eos.numel():
            logits[:, eos] = float("-inf")
        token = torch.where(done, torch.full_like(done, pad_token_id, dtype=torch.long), logits.argmax(-1))
        out.append(token[:, None])
        done |= torch.isin(token, eos)
        if done.all():
            break
        ids = token[:, None]
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        positions = positions[:, -1:] + 1
    return torch.cat(out, dim=1)
