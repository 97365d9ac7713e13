"""Training data for each axis' expert, as conversational prompt/completion rows for trl.

- helpful: Alpaca instructions and answers.
- harmless: safe refusals of harmful instructions, mixed with benign Alpaca instructions
  (``benign_fraction``) so the expert learns *when* to refuse instead of refusing everything.
  The benign rows come from the far end of the same shuffled Alpaca order as the helpful
  expert's rows, so the two experts never share an example.
- honest: TruthfulQA training-half questions, one row per correct reference answer.
- multitask (baseline): the union of the three experts' exact training sets.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from mocae.data import (
    Example,
    expand_truthfulqa_answers,
    inject_axis_prompt,
    load_alpaca,
    load_safety_refusals,
    load_truthfulqa,
)
from mocae.experts.config import ExpertConfig, MultitaskConfig


def _shuffled(rows: list[Example], seed: int) -> list[Example]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def select_examples(cfg: ExpertConfig, data_dir: Path | None = None) -> list[Example]:
    """The examples ``cfg``'s expert trains on, in training order.

    Returns:
        A list of Examples with completions (shuffled with ``cfg.seed``).

    Raises:
        ValueError: the axis' data came back empty (e.g. an empty file or too strict a cap).
    """
    if isinstance(cfg, MultitaskConfig):
        rows = []
        for axis in cfg.union_caps:  # each axis' expert rows, tagged so injection knows the axis
            rows += [replace(r, meta={**r.meta, "expert": axis})
                     for r in select_examples(cfg.axis_config(axis), data_dir)]
        return _shuffled(rows, cfg.seed + 2)
    cap = cfg.max_examples
    if cfg.axis == "helpful":
        rows = _shuffled(load_alpaca(data_dir), cfg.seed)[:cap]
    elif cfg.axis == "harmless":
        refusals = _shuffled(load_safety_refusals(data_dir), cfg.seed)
        n_refusal = len(refusals) if cap is None else min(len(refusals), round(cap * (1 - cfg.benign_fraction)))
        n_benign = round(n_refusal * cfg.benign_fraction / (1 - cfg.benign_fraction))
        benign = _shuffled(load_alpaca(data_dir), cfg.seed)[::-1][:n_benign]
        rows = _shuffled(refusals[:n_refusal] + benign, cfg.seed + 1)
    elif cfg.axis == "honest":
        rows = _shuffled(expand_truthfulqa_answers(load_truthfulqa(data_dir, split="train")), cfg.seed)[:cap]
    else:  # pydantic already restricts the axis; kept for direct callers
        raise ValueError(f"unknown axis {cfg.axis!r}; expected helpful, harmless or honest")
    rows = [r for r in rows if r.completion]
    if not rows:
        raise ValueError(f"no training examples for axis {cfg.axis!r} (check the data files and max_examples)")
    return rows


def to_sft_rows(examples: list[Example], axis: str, inject_prompt: bool) -> list[dict]:
    """Conversational prompt/completion rows; trl applies the chat template and masks the prompt.

    The injected instruction (AlignX Stage 1) goes in the user turn, not the system turn, so the
    backbone's own default system prompt stays as it is at inference time.
    """
    rows = []
    for ex in examples:
        # multitask rows carry the expert set they came from; inject that axis' instruction
        row_axis = ex.meta.get("expert", axis)
        prompt = inject_axis_prompt(ex.prompt, row_axis) if inject_prompt else ex.prompt
        rows.append({
            "prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": ex.completion}],
        })
    return rows


def data_counts(examples: list[Example]) -> dict[str, int]:
    """Rows per source dataset, for training.json."""
    counts: dict[str, int] = {}
    for ex in examples:
        counts[ex.source] = counts.get(ex.source, 0) + 1
    return counts
