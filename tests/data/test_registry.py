"""The dataset registry, ``check_data`` on fixtures, and the expected counts on the real data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mocae import AXES
from mocae.data import (
    DATASETS,
    DataError,
    check_data,
    format_check_table,
    load_truthfulqa,
    load_truthfulqa_judge,
    load_truthfulqa_mc,
)

FIXTURE_COUNTS = {
    ("alpaca", "train"): 5, ("alpaca_seed_tasks", "val"): 4,
    ("alpaca_eval", "judge_train"): 12, ("alpaca_eval", "judge_dev"): 3, ("alpaca_eval", "eval"): 9,
    ("jailbreak", "test"): 9,
    ("truthfulqa", "train"): 4, ("truthfulqa", "eval"): 3,
    ("truthfulqa_mc", "train"): 4, ("truthfulqa_mc", "eval"): 3, ("truthfulqa_judge_truth", "train"): 2,
    ("truthfulqa_judge_truth", "eval"): 2, ("truthfulqa_judge_info", "train"): 1,
    ("truthfulqa_judge_info", "eval"): 1, ("harmbench", "test"): 4, ("harmbench", "val"): 2,
    ("strongreject", "test"): 3, ("advbench", "test"): 3, ("xstest", "test"): 5, ("safety_refusals", "train"): 3,
    ("refusal_direction_harmless", "train"): 2, ("refusal_direction_harmless", "val"): 1,
    ("refusal_direction_harmless", "test"): 2, ("refusal_direction_harmful", "train"): 2,
    ("refusal_direction_harmful", "val"): 1, ("refusal_direction_harmful", "test"): 2,
}


JUDGE_FILE_SETS = {"alpaca_eval_annotations", "xstest_completions", "pyrit_refusal", "hh_rlhf_harmless"}


def test_specs_are_consistent(data_root):
    assert {"alpaca", "alpaca_eval", "truthfulqa", "truthfulqa_mc", "harmbench", "strongreject", "advbench",
            "xstest", "safety_refusals", "refusal_direction_harmless", "refusal_direction_harmful"} <= set(DATASETS)
    for name, spec in DATASETS.items():
        assert spec.name == name and spec.axis in AXES and spec.description
        for split, files in spec.files.items():
            if name in JUDGE_FILE_SETS:  # not in the fixture dir; tests/evaluation/judges builds them
                continue
            for rel in files:  # the fixtures mirror the real layout
                assert (data_root / rel).is_file(), rel
            examples = spec.load(data_root, split)
            assert {(x.source, x.axis, x.split) for x in examples} <= {(name, spec.axis, split)}
            assert examples or name == "alpaca_eval"  # only its single-row strata leave sides empty


def test_check_data_on_fixtures(data_root):
    rows = check_data(data_root)
    counts = {(r["dataset"], r["split"]): r["rows"] for r in rows if r["status"] == "ok"}
    assert counts == FIXTURE_COUNTS
    xstest = next(r for r in rows if r["dataset"] == "xstest")
    assert (xstest["safe"], xstest["unsafe"]) == (3, 2)
    assert xstest["file"] == "xstest/xstest_prompts.csv" and xstest["axis"] == "harmless"
    missing = {r["dataset"] for r in rows if r["status"] == "missing"}
    assert missing == JUDGE_FILE_SETS
    hub_only = [r for r in rows if r["status"] == "hub only"]
    assert [(r["dataset"], r["file"]) for r in hub_only] == [("beavertails", "hub:PKU-Alignment/BeaverTails")]


def test_check_data_reports_missing_files(tmp_path, data_root):
    (tmp_path / "alpaca").mkdir()
    (tmp_path / "alpaca/alpaca_5000.json").write_bytes((data_root / "alpaca/alpaca_5000.json").read_bytes())
    rows = check_data(tmp_path)
    ok = [(r["dataset"], r["rows"]) for r in rows if r["status"] == "ok"]
    assert ok == [("alpaca", 5)]
    missing = {(r["dataset"], r["split"]): r for r in rows if r["status"] == "missing"}
    assert missing[("truthfulqa_mc", "eval")]["file"] == "truthfulqa/mc_task.json"
    assert missing[("harmbench", "val")]["rows"] is None


def test_check_data_propagates_data_errors(data_copy):
    path = data_copy / "alpaca_eval/reference_text_davinci_003.json"
    rows = json.loads(path.read_text())
    del rows[1]["dataset"]
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"reference_text_davinci_003.json row 2: field 'dataset' is missing"):
        check_data(data_copy)


def test_check_data_needs_a_directory(no_data_env, tmp_path):
    with pytest.raises(FileNotFoundError, match="MOCAE_DATA_DIR"):
        check_data()
    with pytest.raises(FileNotFoundError):
        check_data(tmp_path / "absent")


def test_format_check_table_is_aligned(data_root):
    rows = check_data(data_root)
    text = format_check_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["dataset", "axis", "split", "rows", "status", "file"]
    assert set(lines[1]) <= {"-", " "} and len(lines) == len(rows) + 2
    xstest = next(line for line in lines if line.startswith("xstest"))
    assert "5 (3 safe)" in xstest
    # Every column starts at the same offset on every line.
    file_col = lines[0].index("file")
    assert all(line[file_col - 2:file_col] == "  " for line in lines[2:])
    assert format_check_table([{"dataset": "a", "axis": "helpful", "split": "train", "rows": 1234,
                                "file": "f", "status": "ok"}]).splitlines()[2].split()[3] == "1,234"


# Real data ------------------------------------------------------------------------------------

REAL = os.environ.get("MOCAE_DATA_DIR")
needs_real_data = pytest.mark.skipif(not REAL or not Path(REAL).is_dir(),
                                     reason="MOCAE_DATA_DIR is unset or not a directory")

REAL_COUNTS = {
    ("alpaca", "train"): 5000, ("alpaca_seed_tasks", "val"): 175,
    ("alpaca_eval", "judge_train"): 363, ("alpaca_eval", "judge_dev"): 81, ("alpaca_eval", "eval"): 361,
    ("jailbreak", "test"): 9,
    ("alpaca_eval_annotations", "all"): 34557, **{("xstest_completions", m): 450 for m in
    ("gpt4", "llama2new", "llama2orig", "mistralguard", "mistralinstruct")},
    ("pyrit_refusal", "refusal"): 105, ("pyrit_refusal", "refusal_extra"): 64,
    ("hh_rlhf_harmless", "all"): 2312,
    ("truthfulqa", "train"): 408,
    ("truthfulqa", "eval"): 409, ("truthfulqa_mc", "train"): 408, ("truthfulqa_mc", "eval"): 409,
    ("harmbench", "test"): 320, ("harmbench", "val"): 80, ("strongreject", "test"): 313,
    ("advbench", "test"): 520, ("xstest", "test"): 450, ("safety_refusals", "train"): 2483,
    ("refusal_direction_harmless", "train"): 18793, ("refusal_direction_harmless", "val"): 6264,
    ("refusal_direction_harmless", "test"): 6266, ("refusal_direction_harmful", "train"): 260,
    ("refusal_direction_harmful", "val"): 39, ("refusal_direction_harmful", "test"): 572,
    ("truthfulqa_judge_truth", "train"): 11173, ("truthfulqa_judge_truth", "eval"): 11261,
    ("truthfulqa_judge_info", "train"): 11173, ("truthfulqa_judge_info", "eval"): 11261,
}


@needs_real_data
def test_real_data_counts():
    rows = check_data(Path(REAL))
    counts = {(r["dataset"], r["split"]): r["rows"] for r in rows if r["status"] == "ok"}
    assert counts == REAL_COUNTS
    xstest = next(r for r in rows if r["dataset"] == "xstest")
    assert (xstest["safe"], xstest["unsafe"]) == (250, 200)


@needs_real_data
def test_real_truthfulqa_split_is_shared():
    root = Path(REAL)
    csv_split = {x.prompt: x.split for x in load_truthfulqa(root)}
    assert len(csv_split) == 817
    mc_split = {x.prompt: x.split for x in load_truthfulqa_mc(root, split=None)}
    assert mc_split == csv_split
    judge = load_truthfulqa_judge(root, split=None)
    assert {x.prompt for x in judge} == set(csv_split)
    assert all(csv_split[x.prompt] == x.split for x in judge)


def test_check_data_names_an_empty_judge_file(data_copy):
    rel = "xstest/xstest_v2_completions_llama2new_gpteval.csv"
    (data_copy / rel).write_text("id,type,prompt,completion,final_label\n")
    with pytest.raises(DataError, match=rf"{rel}: has no rows \(dataset xstest_completions, split llama2new\)"):
        check_data(data_copy)


def test_split_summary_counts_each_side(data_root):
    from mocae.data.registry import format_split_summary, split_summary

    summary = split_summary(data_root)
    types = summary["truthfulqa"]["type"]
    assert sum(c["train"] for c in types.values()) == 4 and sum(c["eval"] for c in types.values()) == 3
    assert summary["truthfulqa"]["unbalanced"] == []
    assert summary["alpaca_eval"]["total"] == {"judge_train": 12, "judge_dev": 3, "eval": 9}
    text = format_split_summary(summary)
    assert "Misconceptions" in text and "balanced within one question: yes" in text


def test_split_summary_flags_an_unbalanced_stratum(data_root, monkeypatch):
    from dataclasses import replace

    from mocae.data import loaders
    from mocae.data.registry import format_split_summary, split_summary

    skewed = [replace(x, split="train") for x in load_truthfulqa(data_root)]  # the old first-half failure mode
    monkeypatch.setattr(loaders, "load_truthfulqa", lambda root, split=None: skewed)
    summary = split_summary(data_root)
    assert "type Adversarial" in summary["truthfulqa"]["unbalanced"]
    assert "stratum Adversarial x Misconceptions" in summary["truthfulqa"]["unbalanced"]
    assert "<- differs by more than one" in format_split_summary(summary)
