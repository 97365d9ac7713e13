"""What no training row may contain: the evaluated prompts and reference answers, and the filter
every training stage applies before it reads a source.

Some training sources meet an evaluated set by accident, not by a wrong split: Alpaca row 3094
("Who invented the light bulb?") is a TruthfulQA eval question, and ~100 TruthfulQA answers are
shared between questions on both sides of the split ("This question doesn't make sense", or
related questions such as "Are you a human?" / "Are you conscious?"). Moving questions across the
split would unbalance its strata, so the training side drops those rows instead: experts,
multi-task, fusion baselines, the router's LM loss, preference pairs and the judges all filter
through :func:`drop_evaluated`, and the contamination check (``mocae.data.contamination``) reads
the same filtered rows, so it proves what training really reads.

Answers shorter than ``MIN_ANSWER_WORDS`` words are not compared ("Yes", "No", "I have no
comment" are not knowledge of an evaluated question).

Near duplicates (MiniLM cosine >= 0.95: "Explain how two-factor authentication works." in Alpaca
and the router's prompts vs AlpacaEval's "how does two factor authentication work?", TruthfulQA
paraphrases such as "I now believe that the Earth is round" vs "I came to believe ...") need the
encoder to find, so the full check's findings on the shipped data are kept in
``near_duplicates.json`` (sha256 of each normalised training text) and dropped like exact matches;
the full check recomputes them and fails on any new one.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from mocae.data import loaders as L
from mocae.data.readers import resolve_root
from mocae.data.records import Example, normalise_text

MIN_ANSWER_WORDS = 5
# The files the evaluated sets are read from (their stamps key the cache below).
EVAL_FILES = (L.ALPACA_EVAL, L.ALPACA_EVAL_GPT4, L.HARMBENCH["test"], L.STRONGREJECT, L.ADVBENCH, L.XSTEST,
              L.TRUTHFULQA, L.TRUTHFULQA_MC)


NEAR_DUPLICATES = Path(__file__).with_name("near_duplicates.json")


@functools.lru_cache(maxsize=1)
def near_duplicates() -> dict[str, str]:
    """{sha256 of a normalised training text: the evaluated row it nearly duplicates}."""
    data = json.loads(NEAR_DUPLICATES.read_text(encoding="utf-8"))
    return {d["sha256"]: f"{d['eval_set']} ({d['eval_row']}, near duplicate)" for d in data["texts"]}


def text_key(text: str) -> str:
    """sha256 of the normalised text (how near duplicates are stored)."""
    return hashlib.sha256(normalise_text(text).encode()).hexdigest()


@dataclass(frozen=True)
class Evaluated:
    """Normalised evaluated prompts and answers, each mapped to the set it belongs to, and the
    known near duplicates of either (by ``text_key``)."""

    prompts: dict[str, str]
    answers: dict[str, str]
    near: dict[str, str]

    def prompt_set(self, text: str | None) -> str | None:
        """The evaluated set ``text`` is a prompt (or a near duplicate of one) of, or None."""
        if not text:
            return None
        return self.prompts.get(normalise_text(text)) or self.near.get(text_key(text))

    def answer_set(self, text: str | None) -> str | None:
        """The evaluated set ``text`` is a reference answer or MC choice (or a near duplicate) of, or None."""
        if not text:
            return None
        if len(text.split()) >= MIN_ANSWER_WORDS and normalise_text(text) in self.answers:
            return self.answers[normalise_text(text)]
        return self.near.get(text_key(text))


def long_answer(text: str) -> bool:
    """True when ``text`` is long enough to be compared as an answer."""
    return len(text.split()) >= MIN_ANSWER_WORDS


def _eval_answers(examples: list[Example], keys) -> list[str]:
    out = []
    for ex in examples:
        for key in keys:
            value = ex.references.get(key)
            out += [value] if isinstance(value, str) else list(value or [])
    return out


def _present(data_dir: Path | None, *files: str) -> bool:
    """A set is evaluated only where its files exist (the Hub copy counts as present)."""
    return data_dir is None or all((data_dir / f).is_file() for f in files)


@functools.lru_cache(maxsize=4)
def _evaluated_cached(root: str | None, stamp) -> Evaluated:
    data_dir = Path(root) if root is not None else None
    prompts: dict[str, str] = {}
    answers: dict[str, str] = {}

    def add(table: dict, name: str, texts) -> None:
        for text in texts:
            if text and (table is prompts or long_answer(text)):
                table.setdefault(normalise_text(text), name)

    if _present(data_dir, L.ALPACA_EVAL):
        alpaca_eval = L.load_alpaca_eval(data_dir, split="eval")
        add(prompts, "alpaca_eval (eval side)", [e.prompt for e in alpaca_eval])
        add(answers, "alpaca_eval (eval side)",
            _eval_answers(alpaca_eval, ("text_davinci_003", "gpt4_1106_preview")))
    if _present(data_dir, L.HARMBENCH["test"]):
        harmbench = L.load_harmbench(data_dir, split="test")
        add(prompts, "harmbench_test", [e.prompt for e in harmbench] + [e.meta["behavior"] for e in harmbench])
    for name, rel, load in (("strongreject", L.STRONGREJECT, L.load_strongreject),
                            ("advbench", L.ADVBENCH, L.load_advbench),
                            ("xstest_safe", L.XSTEST, lambda d: L.load_xstest(d, label="safe"))):
        if _present(data_dir, rel):
            add(prompts, name, [e.prompt for e in load(data_dir)])
    if _present(data_dir, L.TRUTHFULQA):
        truthfulqa = L.load_truthfulqa(data_dir, split="eval")
        add(prompts, "truthfulqa (eval side)", [e.prompt for e in truthfulqa])
        add(answers, "truthfulqa (eval side)", _eval_answers(truthfulqa, ("best", "correct", "incorrect")))
    if _present(data_dir, L.TRUTHFULQA, L.TRUTHFULQA_MC):
        for e in L.load_truthfulqa_mc(data_dir, split="eval"):
            add(answers, "truthfulqa_mc (eval side)", [*e.references["mc1_targets"], *e.references["mc2_targets"]])
    return Evaluated(prompts, answers, near_duplicates())


def evaluated(data_dir: Path | None = None) -> Evaluated:
    """The evaluated prompts and answers of ``data_dir`` (cached per file version; a set whose file
    is absent is evaluated nowhere, so it filters nothing)."""
    root = resolve_root(data_dir)
    if root is None:
        return _evaluated_cached(None, "hub")
    stamp = tuple((rel, p.stat().st_mtime_ns, p.stat().st_size) for rel in EVAL_FILES
                  if (p := Path(root) / rel).is_file())
    return _evaluated_cached(str(Path(root).resolve()), stamp)


def drop_evaluated_prompts(prompts: list[str], data_dir: Path | None = None,
                           held: Evaluated | None = None) -> list[str]:
    """``prompts`` without the evaluated ones (and their known near duplicates)."""
    held = held if held is not None else evaluated(data_dir)
    return [p for p in prompts if held.prompt_set(p) is None]


def is_evaluated(ex: Example, held: Evaluated) -> bool:
    """True when ``ex``'s prompt is evaluated or its completion is an evaluated answer."""
    return held.prompt_set(ex.prompt) is not None or held.answer_set(ex.completion) is not None


def drop_evaluated(examples: list[Example], data_dir: Path | None = None,
                   held: Evaluated | None = None) -> list[Example]:
    """``examples`` without the rows whose prompt is evaluated or whose completion is an evaluated
    answer; TruthfulQA-style ``references`` lose the evaluated answers they list.

    Args:
        examples: training rows of any source.
        held: ``evaluated(data_dir)`` when the caller has it already.
    """
    held = held if held is not None else evaluated(data_dir)
    out = []
    for ex in examples:
        if is_evaluated(ex, held):
            continue
        out.append(without_evaluated_answers(ex, held))
    return out


def without_evaluated_answers(ex: Example, held: Evaluated) -> Example:
    """``ex`` with the evaluated answers removed from its ``correct`` / ``incorrect`` references."""
    if not ex.references or not any(k in ex.references for k in ("correct", "incorrect")):
        return ex
    refs = {k: ([a for a in v if held.answer_set(a) is None] if k in ("correct", "incorrect") else v)
            for k, v in ex.references.items()}
    return replace(ex, references=refs)
