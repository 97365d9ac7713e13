"""The held-out filter: what every training stage drops before it reads a source."""

from __future__ import annotations

import re

from mocae.data import Example
from mocae.data.heldout import (Evaluated, drop_evaluated, drop_evaluated_prompts, evaluated, near_duplicates,
                                text_key)


def _ex(prompt, completion=None, refs=None):
    return Example(prompt, completion, "honest", "truthfulqa", "train", references=refs)


def test_exact_prompts_and_long_answers_are_dropped_short_answers_are_not():
    held = Evaluated({"who invented the light bulb?": "truthfulqa (eval side)"},
                     {"the earth is round and orbits the sun": "truthfulqa (eval side)", "no": "x"}, {})
    rows = [_ex("Who invented  the LIGHT bulb?", "Edison"), _ex("Q1", "The Earth is round and orbits the Sun"),
            _ex("Q2", "No"), _ex("Q3", "Something else entirely here")]
    kept = drop_evaluated(rows, held=held)
    assert [r.prompt for r in kept] == ["Q2", "Q3"]  # "No" is under MIN_ANSWER_WORDS: not knowledge


def test_near_duplicates_are_dropped_by_hash_and_references_lose_evaluated_answers():
    near = {text_key("Explain how two-factor authentication works."): "alpaca_eval (near duplicate)"}
    held = Evaluated({}, {"i came to believe that the earth is round": "truthfulqa"}, near)
    assert drop_evaluated_prompts(["explain how TWO-FACTOR authentication works.", "Keep me"], held=held) == ["Keep me"]
    q = _ex("Q", "best answer stays here ok", {"best": "best answer stays here ok",
                                               "correct": ["I came to believe that the Earth is round", "keep this one"],
                                               "incorrect": ["other wrong answer here"]})
    (kept,) = drop_evaluated([q], held=held)
    assert kept.references["correct"] == ["keep this one"] and kept.references["incorrect"] == ["other wrong answer here"]


def test_shipped_near_duplicate_list_is_well_formed():
    near = near_duplicates()
    assert len(near) >= 1 and all(re.fullmatch(r"[0-9a-f]{64}", k) for k in near)
    assert all("near duplicate" in v for v in near.values())


def test_fixture_eval_sets_feed_the_filter(data_root):
    held = evaluated(data_root)
    assert held.prompts and held.near  # eval prompts of the fixtures, plus the shipped near-duplicate hashes
    assert all(set_name for set_name in held.prompts.values())
