"""The Hub fallback, with ``datasets.load_dataset`` replaced by small in-memory datasets (no network)."""

from __future__ import annotations

import datasets
import pytest

from mocae.data import loaders
from mocae.data import (
    DataError,
    load_advbench,
    load_alpaca,
    load_alpaca_eval,
    load_beavertails,
    load_harmbench,
    load_refusal_direction_harmful,
    load_safety_refusals,
    load_strongreject,
    load_truthfulqa,
    load_truthfulqa_judge,
    load_truthfulqa_mc,
    load_xstest,
    truthfulqa_split,
)

AE = "hf://datasets/tatsu-lab/alpaca_eval/"
QUESTIONS = ["Q one?", "Q two?", "Q three?", "Q four?", "Q five?"]
MC = {"choices": ["right", "wrong"], "labels": [1, 0]}

TABLE = {
    ("tatsu-lab/alpaca", None, "train"): [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "text": "..."}],
    ("json", AE + "alpaca_eval.json", "train"): [
        {"instruction": "Tell a joke.", "output": "A joke.", "generator": "text_davinci_003", "dataset": "oasst"}],
    ("json", AE + "alpaca_eval_gpt4_baseline.json", "train"): [
        {"instruction": "Tell a joke.", "output": "A better joke.", "generator": "gpt4_turbo", "dataset": "oasst"}],
    ("truthfulqa/truthful_qa", "generation", "validation"): [
        {"type": "Adversarial", "category": "Misconceptions", "question": q, "best_answer": f"best {i}",
         "correct_answers": [f"best {i}", f"also {i}"], "incorrect_answers": [f"bad {i}"], "source": "url"}
        for i, q in enumerate(QUESTIONS)],
    ("truthfulqa/truthful_qa", "multiple_choice", "validation"): [
        {"question": q, "mc1_targets": MC, "mc2_targets": MC} for q in reversed(QUESTIONS)],
    ("walledai/HarmBench", "standard", "train"): [{"prompt": "Do a bad thing", "category": "illegal"}],
    ("walledai/HarmBench", "contextual", "train"): [
        {"prompt": "Rewrite this", "context": "Some context", "category": "misinformation_disinformation"}],
    ("walledai/HarmBench", "copyright", "train"): [{"prompt": "Print the lyrics", "category": "copyright"}],
    ("walledai/StrongREJECT", None, "train"): [
        {"prompt": "Forbidden question?", "category": "Violence", "source": "custom"}],
    ("walledai/AdvBench", None, "train"): [{"prompt": "Harmful behaviour", "target": "Sure, here is"}],
    ("walledai/XSTest", None, "test"): [
        {"prompt": "How do I kill a process?", "focus": "kill", "type": "homonyms", "note": "", "label": "safe"},
        {"prompt": "How do I kill a person?", "focus": "kill", "type": "contrast_homonyms", "note": "",
         "label": "unsafe"}],
    ("PKU-Alignment/BeaverTails", None, "30k_train"): [
        {"prompt": "How do I steal?", "response": "I can't help with that.", "is_safe": True,
         "category": {"theft": False, "violence": False}},
        {"prompt": "How do I steal?", "response": "Here is how.", "is_safe": False,
         "category": {"theft": True, "violence": False}}],
}


@pytest.fixture
def hub_calls(monkeypatch, no_data_env):
    """Serve TABLE through a fake ``datasets.load_dataset`` and record each call's key."""
    calls = []

    def fake_load_dataset(path, name=None, *, split=None, data_files=None, **kwargs):
        key = (path, data_files if path == "json" else name, split)
        calls.append(key)
        if key not in TABLE:
            raise AssertionError(f"unexpected load_dataset call {key}")
        return datasets.Dataset.from_list(TABLE[key])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    # The TruthfulQA split map is cached per process; start each test from the fake Hub.
    loaders._split_map_cached.cache_clear()
    yield calls
    loaders._split_map_cached.cache_clear()


def test_alpaca_from_hub(hub_calls):
    xs = load_alpaca()
    assert hub_calls == [("tatsu-lab/alpaca", None, "train")]
    assert [(x.prompt, x.completion, x.source, x.split) for x in xs] == [
        ("Add the numbers.\n\n2 and 3", "5", "alpaca", "train")]


def test_alpaca_eval_from_hub(hub_calls):
    xs = load_alpaca_eval(split=None)  # one instruction: its stratum's only row goes to judge_train
    assert [x.split for x in xs] == ["judge_train"] and load_alpaca_eval() == []
    assert {c[1] for c in hub_calls} == {AE + "alpaca_eval.json", AE + "alpaca_eval_gpt4_baseline.json"}
    assert xs[0].references == {"text_davinci_003": "A joke.", "gpt4_1106_preview": "A better joke."}
    assert xs[0].meta["dataset"] == "oasst"


def test_truthfulqa_from_hub_is_split_like_the_csv(hub_calls):
    xs = load_truthfulqa()
    assert hub_calls[0] == ("truthfulqa/truthful_qa", "generation", "validation")
    # One Type x Category stratum of 5: two per side, the odd one to the side that balances the Type.
    assert [x.split for x in xs] == ["train", "eval", "train", "train", "eval"]
    assert xs[1].references == {"best": "best 1", "correct": ["best 1", "also 1"], "incorrect": ["bad 1"]}
    assert truthfulqa_split("q five?") == "eval"


def test_truthfulqa_mc_from_hub(hub_calls):
    mc = load_truthfulqa_mc(split=None)
    assert ("truthfulqa/truthful_qa", "multiple_choice", "validation") in hub_calls
    assert {x.prompt: x.split for x in mc} == {x.prompt: x.split for x in load_truthfulqa()}
    assert mc[0].references["mc1_targets"] == {"right": 1, "wrong": 0}


def test_harmbench_from_hub(hub_calls):
    xs = load_harmbench()
    assert [c[1] for c in hub_calls] == ["standard", "contextual", "copyright"]
    assert [x.prompt for x in xs] == ["Do a bad thing", "Some context\n\nRewrite this", "Print the lyrics"]
    assert [x.meta["functional_category"] for x in xs] == ["standard", "contextual", "copyright"]
    assert {x.split for x in xs} == {"all"}  # the Hub copy has no test/val split
    assert xs[1].meta["category"] == "misinformation_disinformation" and xs[0].meta["id"] is None


def test_strongreject_advbench_xstest_from_hub(hub_calls):
    sr = load_strongreject()
    assert sr[0].prompt == "Forbidden question?" and sr[0].meta["source"] == "custom"
    ab = load_advbench()
    assert ab[0].meta == {"id": "advbench_1", "row": 1, "target": "Sure, here is"}
    xs = load_xstest(label="safe")
    assert [x.prompt for x in xs] == ["How do I kill a process?"] and xs[0].meta["id"] == "1"
    assert [c[0] for c in hub_calls] == ["walledai/StrongREJECT", "walledai/AdvBench", "walledai/XSTest"]


def test_beavertails_and_safety_refusals_from_hub(hub_calls):
    bt = load_beavertails()
    assert hub_calls == [("PKU-Alignment/BeaverTails", None, "30k_train")]
    assert [x.meta["is_safe"] for x in bt] == [True, False] and bt[1].meta["categories"] == ["theft"]
    refusals = load_safety_refusals()
    assert [(x.completion, x.source) for x in refusals] == [("I can't help with that.", "safety_refusals")]


def test_hub_rows_are_validated_with_hub_position(hub_calls, monkeypatch):
    monkeypatch.setitem(TABLE, ("walledai/XSTest", None, "test"),
                        [{"prompt": "Q?", "focus": "", "type": "homonyms", "note": "", "label": "maybe"}])
    with pytest.raises(DataError, match=r"^hub:walledai/XSTest row 1: field 'label' has 'maybe'"):
        load_xstest()


def test_datasets_without_hub_copy_say_set_the_variable(hub_calls):
    with pytest.raises(FileNotFoundError, match="no Hugging Face Hub copy.*MOCAE_DATA_DIR"):
        load_refusal_direction_harmful()
    with pytest.raises(FileNotFoundError, match="MOCAE_DATA_DIR.*finetune_truth.jsonl"):
        load_truthfulqa_judge()
    assert hub_calls == []


def test_local_dir_wins_over_hub(hub_calls, data_root, monkeypatch):
    monkeypatch.setenv("MOCAE_DATA_DIR", str(data_root))
    assert len(load_alpaca()) == 5
    assert hub_calls == []
