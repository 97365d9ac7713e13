"""The held-out splits: XSTest by model, AlpacaEval by instruction with balanced order, metrics by hand."""

from __future__ import annotations

import pytest

from mocae.data import DataError
from mocae.evaluation.judges import metrics
from mocae.evaluation.judges.harmless import split_by_model
from mocae.evaluation.judges.helpful import balanced_pairs, split_by_instruction
from mocae.evaluation.judges.sources import (load_alpaca_eval_annotations, load_pyrit_refusal,
                                             load_xstest_completions)
from mocae.evaluation.judges.tiny import write_fixture_data


@pytest.fixture
def data(tmp_path):
    return write_fixture_data(tmp_path / "data")


def test_xstest_heldout_model_is_excluded_from_training(data):
    rows = load_xstest_completions(data)
    train, held = split_by_model(rows, "mistralinstruct")
    assert {r["model"] for r in held} == {"mistralinstruct"}
    assert "mistralinstruct" not in {r["model"] for r in train}
    assert len(train) + len(held) == len(rows) == 30


def test_xstest_safe_label(data):
    rows = {(r["model"], r["prompt"]): r for r in load_xstest_completions(data)}
    assert rows[("mistralinstruct", "kill my neighbour")]["safe"] is False  # complies with unsafe
    assert rows[("gpt4", "kill my neighbour")]["safe"] is True  # refuses unsafe
    assert rows[("llama2orig", "kill a python process")]["safe"] is True  # over-refusal is still safe
    assert rows[("llama2orig", "kill a python process")]["refusal"] is True


def test_xstest_bad_label_names_file_row_field(data):
    import csv

    path = data / "xstest" / "xstest_v2_completions_gpt4_gpteval.csv"
    rows = list(csv.reader(path.open(newline="")))
    rows[2][rows[0].index("final_label")] = "4_maybe"  # data row 2
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError, match=r"xstest_v2_completions_gpt4_gpteval.csv row 2: field 'final_label'"):
        load_xstest_completions(data)


def test_pyrit_skips_comment_and_checks_score(data):
    rows = load_pyrit_refusal(data)
    assert [r["refusal"] for r in rows] == [True, False, True, False]
    path = data / "pyrit_scorer_evals" / "refusal_scorer" / "refusal.csv"
    path.write_text(path.read_text().replace(",0,text", ",maybe,text"))
    with pytest.raises(DataError, match=r"refusal.csv row 2: field 'human_score'"):
        load_pyrit_refusal(data)


def test_alpaca_eval_split_by_instruction_and_balanced(data):
    rows = load_alpaca_eval_annotations(data)
    sides = split_by_instruction(rows, seed=0)
    ins = {k: {r["instruction"] for r in v} for k, v in sides.items()}
    assert not ins["train"] & ins["dev"] and not ins["train"] & ins["test"] and not ins["dev"] & ins["test"]
    assert sum(len(v) for v in sides.values()) == len(rows)
    pairs = balanced_pairs(rows, seed=0)
    assert len(pairs) == len(rows) - 1  # the draw is dropped
    assert sum(p["b_better"] for p in pairs) == len(pairs) // 2
    # Swapping moved davinci-003's output into position b in some pairs and kept it in a in others.
    good = [p for p in pairs if p["b"].startswith("1.")]
    assert 0 < len(good) < len(pairs)
    assert all(p["b_better"] == p["b"].startswith("1.") for p in pairs)


def test_alpaca_eval_bad_preference(tmp_path):
    import gzip

    root = tmp_path / "d"
    (root / "alpaca_eval").mkdir(parents=True)
    with gzip.open(root / "alpaca_eval" / "annotations_alpaca_eval_gpt4_vs_davinci003.jsonl.gz", "wt") as f:
        f.write('{"instruction": "i", "output_1": "a", "output_2": "b", "preference": 3}\n')
    with pytest.raises(DataError, match=r"line 1: field 'preference'"):
        load_alpaca_eval_annotations(root)


def test_length_baseline_by_hand():
    a = ["short", "a much longer answer", "same", ""]
    b = ["longer one", "tiny", "four", "x"]
    assert metrics.length_preference(a, b).tolist() == [1.0, 0.0, 0.5, 1.0]
    # labels: b better, a better, b better, a better -> hits 1, 1, 0.5 (tie), 0
    assert metrics.agreement(metrics.length_preference(a, b), [True, False, True, False]) == pytest.approx(2.5 / 4)
    assert metrics.length_ratio(["abcd"], ["ab"]).tolist() == [2.0]


def test_auc_by_hand():
    assert metrics.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert metrics.auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        metrics.auc([1, 1], [0.1, 0.2])


def test_real_splits(real_data_dir):
    """On the real files: the held-out model and instruction splits hold (skipped without data)."""
    train, held = split_by_model(load_xstest_completions(real_data_dir))
    assert len(held) == 450 and len(train) == 1800
    sides = split_by_instruction(load_alpaca_eval_annotations(real_data_dir))
    ins = {k: {r["instruction"] for r in v} for k, v in sides.items()}
    assert sum(map(len, ins.values())) == 805 and not ins["train"] & ins["test"]
