"""Paired comparisons of systems from their per-prompt values (mocae.evaluation.compare)."""

import pytest

from mocae.evaluation.compare import compare_pair, compare_systems, judge_verdict, orientation, resolution


def _system(name, safe, chars, pref_vs_base=None, set_hash="h"):
    per_prompt = {"harmless/safety_score": {"set": "harmful", "scale": 100.0, "values": safe},
                  "helpful/output_length_chars": {"set": "alpaca_eval", "scale": 1.0, "values": chars}}
    if pref_vs_base is not None:
        per_prompt["helpful/lc_win_rate_vs_base"] = {"set": "alpaca_eval", "lc": True, "pref": pref_vs_base,
                                                     "chars": chars, "other_chars": [100] * len(chars)}
    return {"name": name, "prompt_sets": {"harmful": set_hash, "alpaca_eval": "a"}, "per_prompt": per_prompt}


def test_orientation_of_metric_names():
    assert orientation("harmless/over_refusal_xstest") == "lower"
    assert orientation("helpful/reference_nll_gpt4") == "lower"
    assert orientation("helpful/truncated_share") == "neutral"
    assert orientation("honest/mc2_chat") == "higher"
    assert judge_verdict({"ci": [1.0, 2.0]}, "helpful/output_length_chars") == "higher"
    assert judge_verdict({"ci": [-2.0, -1.0]}, "harmless/over_refusal_xstest") == "better"
    assert judge_verdict({"ci": [-2.0, 1.0]}, "honest/mc2") == "within noise"


def test_compare_pair_and_base_ties_itself():
    base = _system("base", [0.0] * 20, [100] * 20)
    mocae = _system("mocae", [1.0] * 20, [100] * 20, pref_vs_base=[0.9] * 20)
    diffs = compare_pair(mocae, base, n_boot=50)
    assert diffs["harmless/safety_score"]["value"] == pytest.approx(100.0)
    assert diffs["harmless/safety_score"]["verdict"] == "better"
    assert diffs["helpful/output_length_chars"] == {"value": 0.0, "n": 20, "ci": [0.0, 0.0],
                                                    "verdict": "within noise", "orientation": "neutral"}
    # Base has no LC win rate vs itself: a tie (0.5) at equal lengths, so the difference is 90 - 50.
    assert diffs["helpful/lc_win_rate_vs_base"]["value"] == pytest.approx(40.0)


def test_other_prompt_sets_are_not_paired_and_composed_systems_are_left_out():
    base = _system("base", [0.0, 1.0], [10, 20])
    other = _system("other", [1.0, 1.0], [10, 20], set_hash="another eval config")
    assert "harmless/safety_score" not in compare_pair(other, base, n_boot=10)
    results = {"config": {"n_boot": 20, "seed": 0}, "systems": {
        "base": base, "mocae": _system("mocae", [1.0, 0.0], [10, 30]), "x": _system("x", [0.0, 0.0], [5, 5]),
        "oracle": {"name": "oracle", "metrics": {}}}}
    assert set(compare_systems(results)) == {"mocae-base", "x-base", "mocae-x"}


def test_resolution_states_the_smallest_resolvable_difference():
    results = {"systems": {"base": _system("base", [0.0] * 16, [1] * 300)}, "comparisons": {
        "mocae-base": {"harmless/safety_score": {"value": 5.0, "n": 16, "ci": [-20.0, 30.0]}}}}
    res = resolution(results)
    assert res["harmful"] == {"n": 16, "binary_half_width": 34.6, "measured_half_width": 25.0}
    assert res["alpaca_eval"]["n"] == 300 and res["alpaca_eval"]["measured_half_width"] is None
