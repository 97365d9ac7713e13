"""The held-out splits: XSTest by model (unsafe prompts only for training), AlpacaEval annotations by
THE AlpacaEval split with balanced order, metrics by hand."""

from __future__ import annotations

import pytest

from mocae.data import DataError, alpaca_eval_split_map, load_xstest, normalise_text
from mocae.evaluation.judges import metrics
from mocae.evaluation.judges.harmless import split_by_model, training_rows
from mocae.evaluation.judges.helpful import balanced_pairs, split_annotations, validation_pairs
from mocae.evaluation.judges.sources import (load_alpaca_eval_annotations, load_pyrit_refusal,
                                             load_xstest_completions)
from tiny_judges import write_fixture_data


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


def test_alpaca_eval_annotations_follow_the_split_and_are_balanced(data):
    rows = load_alpaca_eval_annotations(data)
    split = alpaca_eval_split_map(data)
    sides = split_annotations(rows, split)
    assert all(sides.values())  # every side has annotations
    for side, side_rows in sides.items():
        assert {split[normalise_text(r["instruction"])] for r in side_rows} == {side}
    assert sum(len(v) for v in sides.values()) == len(rows)
    pairs = balanced_pairs(rows, seed=0)
    assert len(pairs) == len(rows) - 1  # the draw is dropped
    assert sum(p["b_better"] for p in pairs) == len(pairs) // 2
    # Swapping moved davinci-003's output into position b in some pairs and kept it in a in others.
    good = [p for p in pairs if p["b"].startswith("1.")]
    assert 0 < len(good) < len(pairs)
    assert all(p["b_better"] == p["b"].startswith("1.") for p in pairs)


def test_annotation_outside_alpaca_eval_names_file_and_line(data):
    rows = load_alpaca_eval_annotations(data)
    rows[4] = dict(rows[4], instruction="an instruction AlpacaEval does not have")
    with pytest.raises(DataError, match=r"annotations_alpaca_eval_gpt4_vs_davinci003.jsonl.gz line 5: "
                                        r"field 'instruction' is not an instruction of"):
        split_annotations(rows, alpaca_eval_split_map(data))


def test_validation_pairs_add_every_length_matched_pair():
    rows = [{"instruction": f"i{k}", "output_1": "x" * 10, "output_2": "y" * (11 if k % 2 else 40),
             "preference": 2.0} for k in range(40)]
    pairs, n_overall = validation_pairs(rows, 10, None, seed=0)
    matched = metrics.length_ratio([p["a"] for p in pairs], [p["b"] for p in pairs]) < 1.5
    assert n_overall == 10 and int(matched.sum()) == 20  # the sample's matched pairs plus all the others
    assert len(pairs) == 10 + 20 - int(matched[:10].sum())
    capped, _ = validation_pairs(rows, 10, 12, seed=0)
    assert int((metrics.length_ratio([p["a"] for p in capped], [p["b"] for p in capped]) < 1.5).sum()) == 12
    everything, n_all = validation_pairs(rows, None, None, seed=0)
    assert n_all == len(everything) == 40


def test_harmless_training_rows_never_read_a_safe_xstest_prompt(data):
    rows = training_rows(data, n_extra=1)
    safe = {normalise_text(ex.prompt) for ex in load_xstest(data, label="safe")}
    assert not {normalise_text(r["prompt"]) for r in rows} & safe
    xs = [r for r in rows if r["source"] == "xstest"]
    assert len(xs) == 4 * 3 and all(r["prompt_unsafe"] for r in xs)
    assert "mistralinstruct" not in {r["model"] for r in xs}
    assert sorted(r["source"] for r in rows if r["source"] != "xstest") == ["alpaca", "safety_tuned_llamas"]


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
    sides = split_annotations(load_alpaca_eval_annotations(real_data_dir), alpaca_eval_split_map(real_data_dir))
    ins = {k: {normalise_text(r["instruction"]) for r in v} for k, v in sides.items()}
    assert {k: len(v) for k, v in ins.items()} == {"judge_train": 363, "judge_dev": 81, "eval": 361}
    rows = training_rows(real_data_dir, n_extra=0)
    # two unsafe contrasts nearly duplicate an evaluated safe prompt (mocae.data.heldout): dropped
    assert len(rows) == 4 * (200 - 2) and all(r["prompt_unsafe"] for r in rows)
