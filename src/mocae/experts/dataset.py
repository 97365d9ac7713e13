"""Training data for each axis' expert, as conversational prompt/completion rows for trl.

- helpful: Alpaca instructions and answers.
- harmless: safe refusals of harmful instructions, mixed with benign requests
  (``benign_fraction``, drawn from ``benign_sources``) so the expert learns *when* to refuse
  instead of refusing everything. Random Alpaca rows are too easy a contrast: at 2,000 examples
  the expert learns "sensitive topic -> refuse" and refuses almost every XSTest safe prompt.
  ``alpaca_nearest`` (benign rows closest to the refusal prompts) and ``truthfulqa`` (benign
  questions that sound risky) are the hard negatives that teach the boundary. Alpaca rows come
  from the far half of the same shuffled order as the helpful expert's rows, so the two experts
  never share an example.
- honest: TruthfulQA training-half questions, one row per correct reference answer.
- multitask (baseline): the union of the three experts' exact training sets.
"""

from __future__ import annotations

import random
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from mocae.data import (
    Example,
    expand_truthfulqa_answers,
    inject_axis_prompt,
    load_alpaca,
    load_safety_refusals,
    load_truthfulqa,
)
from mocae.data.heldout import drop_evaluated
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
        benign = benign_examples(cfg, n_benign, refusals[:n_refusal], data_dir)
        rows = _shuffled(refusals[:n_refusal] + benign, cfg.seed + 1)
    elif cfg.axis == "honest":
        rows = _shuffled(expand_truthfulqa_answers(load_truthfulqa(data_dir, split="train")), cfg.seed)[:cap]
    else:  # pydantic already restricts the axis; kept for direct callers
        raise ValueError(f"unknown axis {cfg.axis!r}; expected helpful, harmless or honest")
    # Rows that meet an evaluated set by accident (an Alpaca instruction that is a TruthfulQA eval
    # question, an answer shared with an eval-side question) are never trained on.
    rows = drop_evaluated([r for r in rows if r.completion], data_dir)
    if not rows:
        raise ValueError(f"no training examples for axis {cfg.axis!r} (check the data files and max_examples)")
    return rows


def benign_examples(cfg: ExpertConfig, n: int, refusals: list[Example], data_dir: Path | None = None,
                    embed=None) -> list[Example]:
    """``n`` benign rows for the harmless expert, split equally over ``cfg.benign_sources``.

    Args:
        refusals: the refusal rows being trained on; ``alpaca_nearest`` ranks against their prompts.
        embed: texts -> unit-norm (N, D) tensor; default the MiniLM sentence embedding.

    Returns:
        Examples with completions; a source with fewer rows than its share leaves the rest to the next.
    """
    alpaca = [e for e in _shuffled(load_alpaca(data_dir), cfg.seed)[::-1] if e.completion]
    alpaca = alpaca[:max(n, len(alpaca) // 2)]  # the far half, unless more rows are asked for
    out: list[Example] = []
    used: set[str] = set()
    for i, source in enumerate(cfg.benign_sources):
        want = (n - len(out)) // (len(cfg.benign_sources) - i)
        if source == "truthfulqa":
            pool = [e for e in _shuffled(load_truthfulqa(data_dir, split="train"), cfg.seed) if e.completion]
        elif source == "alpaca_nearest":
            pool = nearest_examples([e for e in alpaca if e.prompt not in used], [r.prompt for r in refusals], embed)
        else:
            pool = alpaca
        picked = [e for e in pool if e.prompt not in used][:want]
        used.update(e.prompt for e in picked)
        out += picked
    return out


def training_prompts(cfg: ExpertConfig, data_dir: Path | None = None) -> set[str]:
    """The normalised prompts ``cfg``'s expert trains on: its SFT rows, or the prompts its preference
    pairs are built from (a superset for harmless). What measures a recipe must avoid them."""
    from mocae.data import normalise_text

    if getattr(cfg, "trainer", "sft") == "dpo":
        from mocae.experts.preference import preference_prompts

        pairs = {normalise_text(r["prompt"]) for r in preference_prompts(cfg, data_dir)}
        # an SFT twin (whose answers make the pairs, or where DPO starts) trains on its own rows too
        return pairs | (training_prompts(cfg.sft_twin(), data_dir) if cfg.uses_twin() else set())
    return {normalise_text(e.prompt) for e in select_examples(cfg, data_dir)}


def nearest_examples(candidates: list[Example], anchors: list[str], embed=None, k: int = 5) -> list[Example]:
    """``candidates`` sorted by mean cosine similarity of their prompt to its ``k`` nearest ``anchors``.

    Args:
        embed: texts -> unit-norm (N, D) tensor; default the MiniLM sentence embedding (its ranking
            is memoised: the fusion stages select an expert's rows again).
    """
    if not candidates or not anchors:
        return list(candidates)
    prompts = tuple(c.prompt for c in candidates)
    order = (_minilm_order(prompts, tuple(anchors), k) if embed is None
             else _similarity_order(embed, prompts, anchors, k))
    return [candidates[i] for i in order]


@lru_cache(maxsize=4)
def _minilm_order(prompts: tuple[str, ...], anchors: tuple[str, ...], k: int) -> list[int]:
    from mocae.encoder import sentence_embeddings

    return _similarity_order(sentence_embeddings, prompts, anchors, k)


def _similarity_order(embed, prompts, anchors, k: int) -> list[int]:
    sims = embed(list(prompts)) @ embed(list(anchors)).T
    return sims.topk(min(k, len(anchors)), dim=1).values.mean(1).argsort(descending=True).tolist()


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
