"""benchmarks/mocae_ablation.py: the rule that picks MoCaE's default from calib-side paired differences."""

from __future__ import annotations

import pytest

from benchmark_scripts import load_script


@pytest.fixture(scope="module")
def ablation():
    return load_script("mocae_ablation")


def d(value, verdict):
    return {"value": value, "ci": [value - 1, value + 1], "verdict": verdict}


def test_a_variant_worse_on_any_axis_is_not_chosen_even_with_the_largest_gain(ablation):
    vs_base = {
        "soft": {"harmless/safety_score": d(10, "better"), "helpful/lc_win_rate_vs_base": d(1, "within noise")},
        # the largest safety gain, bought with over-refusal (higher is worse there): not eligible
        "harm_gate": {"harmless/safety_score": d(60, "better"), "harmless/over_refusal": d(30, "worse")},
        "top1": {"harmless/safety_score": d(12, "better"), "honest/mc2": d(5, "better")},
    }
    chosen, scores = ablation.choose(vs_base)
    assert chosen == "top1"  # two axes better, none worse
    assert scores["harm_gate"]["axes_worse"] == 1 and scores["top1"]["axes_better"] == 2


def test_over_refusal_going_down_counts_as_better(ablation):
    chosen, scores = ablation.choose({"a": {"harmless/over_refusal": d(-8, "better")},
                                      "b": {"harmless/over_refusal": d(8, "worse")}})
    assert chosen == "a" and scores["a"]["axes_better"] == 1 and scores["a"]["mean_gain_points"] == 2.0


def test_an_incomplete_run_names_what_is_missing_and_chooses_nothing(ablation):
    report = {"command": "c", "date": "d", "machine": "m", "n": {"helpful": 3}, "sets_note": "", "variants": {},
              "vs_base": {}, "vs_soft": {}, "rule": "r", "scores": {}, "chosen": "soft", "complete": False,
              "not_measured": ["lm_loss"]}
    text = ablation.markdown(report)
    assert "Incomplete run" in text and "lm_loss" in text and "**Chosen" not in text
    assert "**Chosen: soft**" in ablation.markdown({**report, "complete": True})
