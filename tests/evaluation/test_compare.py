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


def _hhh_system(name, safe, refused, mc2, pref_vs_base, rng_chars=None):
    """A system with the four HHH parts per prompt and metric values computed from them."""
    import numpy as np

    from mocae.evaluation import metrics as M

    chars = rng_chars or [100 + 10 * (i % 7) for i in range(len(pref_vs_base))]
    per_prompt = {"harmless/safety_score": {"set": "harmful", "scale": 100.0, "values": safe},
                  "harmless/over_refusal_xstest": {"set": "xstest_safe", "scale": 100.0, "values": refused},
                  "honest/mc2": {"set": "truthfulqa_mc", "scale": 100.0, "values": mc2}}
    metrics = {"harmless": {"safety_score": {"value": 100 * np.mean(safe)},
                            "over_refusal_xstest": {"value": 100 * np.mean(refused)}},
               "honest": {"mc2": {"value": 100 * np.mean(mc2)}}, "helpful": {}}
    if name != "base":
        other = [110] * len(chars)
        per_prompt["helpful/lc_win_rate_vs_base"] = {"set": "alpaca_eval", "lc": True, "pref": pref_vs_base,
                                                     "chars": chars, "other_chars": other}
        metrics["helpful"]["lc_win_rate_vs_base"] = {"value": 100 * M.lc_stat(M.lc_rows(pref_vs_base, chars, other))}
    sets = {"harmful": "h", "xstest_safe": "x", "truthfulqa_mc": "t", "alpaca_eval": "a"}
    return {"name": name, "prompt_sets": sets, "per_prompt": per_prompt, "metrics": metrics}


def test_hhh_mean_and_its_paired_difference():
    import numpy as np

    from mocae.evaluation.compare import hhh_difference, hhh_mean

    rng = np.random.default_rng(0)
    n = 40
    base = _hhh_system("base", [0.0] * n, [0.0] * n, list(rng.uniform(0.3, 0.5, n)), [0.5] * n)
    prefs = list(rng.uniform(0.3, 0.9, n))
    mocae = _hhh_system("mocae", [1.0] * 30 + [0.0] * 10, [1.0] * 4 + [0.0] * 36, list(rng.uniform(0.4, 0.7, n)), prefs)
    # base: (50 + 0 + 100 + MC2) / 4, its LC win rate vs itself being 50 by definition
    assert hhh_mean(base) == pytest.approx((50 + 0 + 100 + base["metrics"]["honest"]["mc2"]["value"]) / 4)
    diff = hhh_difference(mocae, base, n_boot=300)
    assert diff["value"] == pytest.approx(hhh_mean(mocae) - hhh_mean(base))
    assert diff["ci"][0] < diff["value"] < diff["ci"][1] and diff["verdict"] == "better"  # safety +75 dominates
    assert diff["n"] == 4 * n
    same = hhh_difference(mocae, mocae, n_boot=50)
    assert same["value"] == pytest.approx(0.0) and same["ci"] == pytest.approx([0.0, 0.0])
    other = {**mocae, "prompt_sets": {**mocae["prompt_sets"], "xstest_safe": "another config"}}
    assert hhh_difference(other, base, n_boot=10) is None  # never paired over other prompts
