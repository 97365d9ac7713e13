"""What the contamination check reads: each judge's training rows, and every source and eval set built."""

from __future__ import annotations

import csv
import gzip
import json

import pytest

from mocae.data import DataError
from mocae.data import judge_files as J
from mocae.data import stage_sources as S


def test_every_source_and_eval_set_builds_on_the_fixtures(data_root):
    built, status = S.build_sets(S.TRAINING_SOURCES, data_root)
    assert all(spec.stages for spec in S.TRAINING_SOURCES.values())
    assert {r["name"] for r in status if r["status"] == "ok"} == {t.name for t in built}
    alpaca = next(t for t in built if t.name == "alpaca")
    assert alpaca.prompts[0] == ("Give three tips for staying healthy.", "alpaca/alpaca_5000.json row 1")
    tqa = next(t for t in built if t.name == "truthfulqa_train")
    assert len(tqa.prompts) == 4 and any("(incorrect)" in w for _, w in tqa.answers)
    evald, eval_status = S.build_sets(S.EVAL_SETS, data_root)
    assert [r["status"] for r in eval_status] == ["ok"] * len(S.EVAL_SETS)
    harmbench = next(t for t in evald if t.name == "harmbench_test")
    # a contextual behaviour is checked with and without its context
    assert any(w.endswith("(behavior)") for _, w in harmbench.prompts)
    xstest = next(t for t in evald if t.name == "xstest_safe")
    assert len(xstest.prompts) == 3  # the safe prompts only


def _annotations(root, instructions):
    rows = [{"instruction": ins, "output_1": "ref", "output_2": f"answer {i}", "preference": 2}
            for i, ins in enumerate(instructions)]
    (root / J.ALPACA_EVAL_ANNOTATIONS).write_bytes(gzip.compress("\n".join(map(json.dumps, rows)).encode()))


def test_helpful_judge_reads_judge_train_and_dev_only(data_copy):
    path = data_copy / "alpaca_eval/reference_text_davinci_003.json"
    refs = json.loads(path.read_text())
    # six more koala rows: the stratum of 7 puts some instructions on the eval side
    refs += [{"dataset": "koala", "instruction": f"Koala question {i}?", "output": "o", "generator": "d"}
             for i in range(6)]
    path.write_text(json.dumps(refs))
    (data_copy / "alpaca_eval/reference_gpt4_1106_preview.json").unlink()
    from mocae.data import alpaca_eval_split_map

    sides = alpaca_eval_split_map(data_copy)
    assert "eval" in sides.values()
    _annotations(data_copy, [r["instruction"] for r in refs])
    rows = S.helpful_judge_rows(data_copy)
    assert {sides[r["instruction"].lower()] for r in rows} <= {"judge_train", "judge_dev"}
    assert len(rows) == sum(v != "eval" for v in sides.values())
    _annotations(data_copy, ["Not an AlpacaEval instruction"])
    with pytest.raises(DataError, match=r"annotations_alpaca_eval_gpt4_vs_davinci003.jsonl.gz line 1: field "
                                        r"'instruction' is not an instruction"):
        S.helpful_judge_rows(data_copy)


def test_harmless_judge_reads_unsafe_prompts_only(data_copy):
    header = ["id", "type", "prompt", "completion", "final_label"]
    prompts = list(csv.DictReader((data_copy / "xstest/xstest_prompts.csv").open()))
    for model in J.XSTEST_MODELS:
        with (data_copy / J.XSTEST_COMPLETIONS.format(model=model)).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for p in prompts:
                w.writerow([f"v2-{p['id']}", p["type"], p["prompt"], f"{model} says no", "2_full_refusal"])
    rows = S.harmless_judge_xstest_rows(data_copy)
    assert len(rows) == 2 * len(J.XSTEST_MODELS)
    assert {r["prompt"] for r in rows} == {p["prompt"] for p in prompts if p["label"] == "unsafe"}
