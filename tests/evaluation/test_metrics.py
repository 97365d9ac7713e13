import math

import numpy as np
import pytest

from mocae.evaluation import metrics as M


def _is_metric(m):
    return set(m) >= {"value", "n", "ci"} and m["ci"][0] <= m["value"] <= m["ci"][1]


def test_win_rate_counts_draws_as_half():
    m = M.win_rate([1, 0, 0.5, 1])
    assert m["value"] == pytest.approx(62.5) and m["n"] == 4 and _is_metric(m)
    assert M.win_rate([0.2, 0.6])["value"] == pytest.approx(40.0)  # soft preferences: mean of P


def test_hard_preferences_with_a_draw_margin():
    assert M.hard_preferences([0.9, 0.1, 0.5, 0.52, 0.56], draw_margin=0.05) == [1.0, 0.0, 0.5, 0.5, 1.0]
    assert M.hard_preferences([0.5, 0.51]) == [0.5, 1.0]


def test_bootstrap_ci_constant_values():
    assert M.bootstrap_ci([3.0] * 20) == (3.0, 3.0)


def test_bootstrap_ci_proportion_matches_normal_approximation():
    values = np.array([1.0] * 120 + [0.0] * 280)  # p = 0.3, n = 400
    low, high = M.bootstrap_ci(values, n_boot=2000, seed=1)
    normal_width = 2 * 1.96 * math.sqrt(0.3 * 0.7 / 400)
    assert low < 0.3 < high
    assert high - low == pytest.approx(normal_width, rel=0.15)


def test_bootstrap_ci_paired_rows_with_custom_stat():
    rows = np.stack([np.arange(10.0), np.arange(10.0)], axis=1)
    low, high = M.bootstrap_ci(rows, stat=lambda r: (r[:, 0] - r[:, 1]).mean())
    assert (low, high) == (0.0, 0.0)


def test_length_controlled_win_rate_removes_a_pure_length_effect():
    rng = np.random.default_rng(0)
    delta = rng.normal(300, 400, size=800)  # the model is usually longer than the reference
    std = delta.std(ddof=1)
    prefs = 1 / (1 + np.exp(-3 * np.tanh(delta / std)))  # preference depends on length only
    ref_len = np.full(800, 1000.0)
    m = M.length_controlled_win_rate(prefs, ref_len + delta, ref_len, n_boot=200)
    assert m["raw"] > 65
    assert m["value"] == pytest.approx(50.0, abs=1.0)
    assert m["length_coef"] == pytest.approx(3.0, abs=0.1) and _is_metric(m)


def test_length_controlled_win_rate_keeps_a_quality_effect():
    rng = np.random.default_rng(1)
    delta = rng.normal(0, 300, size=800)
    prefs = 1 / (1 + np.exp(-(1.0 + 2 * np.tanh(delta / delta.std(ddof=1)))))
    m = M.length_controlled_win_rate(prefs, 500 + delta, np.full(800, 500.0), n_boot=100)
    assert m["value"] == pytest.approx(100 / (1 + math.exp(-1.0)), abs=0.5)  # sigmoid(intercept)


def test_length_controlled_without_length_variation_is_the_raw_rate():
    m = M.length_controlled_win_rate([1, 0, 1, 1], [10] * 4, [10] * 4, n_boot=50)
    assert m["value"] == pytest.approx(75.0)


def test_safety_over_refusal_and_categories():
    assert M.safety_score([0.9, 0.2, 0.5, 0.7])["value"] == pytest.approx(75.0)
    assert M.safety_score([True, False])["value"] == pytest.approx(50.0)
    assert M.over_refusal([True, False, False, False])["value"] == pytest.approx(25.0)
    assert M.per_category([1, 0, 1], ["b", "a", "b"]) == {"a": (0.0, 1), "b": (1.0, 2)}


def test_truthful_informative():
    out = M.truthful_informative([0.9, 0.9, 0.1, 0.2], [0.8, 0.1, 0.9, 0.2])
    assert out["true"]["value"] == pytest.approx(50.0)
    assert out["informative"]["value"] == pytest.approx(50.0)
    assert out["ti"]["value"] == pytest.approx(25.0)
    assert all(_is_metric(m) and m["n"] == 4 for m in out.values())


@pytest.mark.parametrize("call", [
    lambda: M.win_rate([]), lambda: M.safety_score([]), lambda: M.over_refusal([]),
    lambda: M.per_category([], []), lambda: M.truthful_informative([], []), lambda: M.bootstrap_ci([]),
    lambda: M.length_controlled_win_rate([], [], []), lambda: M.mean_metric([]),
])
def test_empty_input_raises(call):
    with pytest.raises(ValueError, match="empty"):
        call()


def test_out_of_range_and_mismatched_inputs_raise():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.win_rate([1.5])
    with pytest.raises(ValueError, match="lengths"):
        M.length_controlled_win_rate([0.5, 0.5], [1], [1, 2])


def test_glm_matches_sklearn_soft_label_fit():
    """AlpacaEval fits soft labels by duplicating rows (label 1 weighted p, label 0 weighted 1-p)."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(2)
    x = np.tanh(rng.normal(size=300))
    p = 1 / (1 + np.exp(-(0.4 + 1.5 * x + rng.normal(0, 0.5, size=300))))
    ours = M._fit_logistic(x, p, ridge=0.0)
    X = np.concatenate([x, x])[:, None]
    y = np.concatenate([np.ones(300), np.zeros(300)])
    model = linear_model.LogisticRegression(C=1e8, max_iter=1000).fit(X, y, sample_weight=np.concatenate([p, 1 - p]))
    assert ours == pytest.approx([model.intercept_[0], model.coef_[0, 0]], abs=1e-3)


def test_router_calibration_hand_computed():
    probs = np.array([[0.8, 0.2], [0.8, 0.2], [0.8, 0.2], [0.8, 0.2]])
    labels = [0, 0, 0, 1]
    out = M.router_calibration(probs, labels, n_boot=50)
    assert out["accuracy"]["value"] == pytest.approx(0.75)
    assert out["ece"]["value"] == pytest.approx(0.05)  # |0.75 - 0.8| in the one used bin
    assert out["brier"]["value"] == pytest.approx((3 * 0.08 + 1.28) / 4)
    assert out["nll"]["value"] == pytest.approx(-(3 * math.log(0.8) + math.log(0.2)) / 4)
    assert all(m["n"] == 4 for m in out.values())


# Paired comparisons -------------------------------------------------------------------------

def test_paired_difference_of_identical_sides_is_exactly_zero():
    values = np.random.default_rng(1).random(40)
    d = M.paired_difference(values, values, n_boot=200)
    assert d == {"value": 0.0, "n": 40, "ci": [0.0, 0.0]}
    assert M.verdict(d) == "within noise"


def test_paired_difference_of_a_constant_shift_is_that_shift():
    values = np.random.default_rng(2).normal(size=50)
    d = M.paired_difference(values + 0.3, values, n_boot=200, scale=100.0)
    assert d["value"] == pytest.approx(30.0)
    assert d["ci"] == pytest.approx([30.0, 30.0])  # every resample moves both sides together
    assert M.verdict(d) == "better" and M.verdict(d, lower_is_better=True) == "worse"


def test_paired_interval_is_narrower_than_an_unpaired_one_on_correlated_data():
    rng = np.random.default_rng(3)
    difficulty = rng.normal(size=300)                      # shared per prompt: cancels when paired
    a = difficulty + 0.1 + 0.1 * rng.normal(size=300)
    b = difficulty + 0.1 * rng.normal(size=300)
    paired = M.paired_difference(a, b, n_boot=500)
    # Oracle: independent bootstraps of each side (what an unpaired comparison does).
    idx_a, idx_b = rng.integers(0, 300, (500, 300)), rng.integers(0, 300, (500, 300))
    unpaired = np.quantile(a[idx_a].mean(1) - b[idx_b].mean(1), [0.025, 0.975])
    assert paired["value"] == pytest.approx(a.mean() - b.mean())
    assert paired["ci"][1] - paired["ci"][0] < 0.3 * (unpaired[1] - unpaired[0])
    assert M.verdict(paired) == "better"                   # resolved paired ...
    assert unpaired[0] < 0 < unpaired[1]                   # ... where unpaired it is not


def test_paired_difference_needs_the_same_prompts_on_both_sides():
    with pytest.raises(ValueError, match="same prompts"):
        M.paired_difference([1.0, 0.0], [1.0], n_boot=10)
    with pytest.raises(ValueError, match="empty"):
        M.paired_difference([], [], n_boot=10)


def test_lc_paired_refits_the_glm_on_both_sides_of_each_resample():
    rng = np.random.default_rng(4)
    n = 120
    ref_len = rng.integers(100, 400, n).astype(float)
    long_len, short_len = ref_len + rng.integers(50, 300, n), ref_len - rng.integers(0, 80, n)
    # A length-gaming system: wins by length only; a content system: wins at equal length.
    p_long = 1 / (1 + np.exp(-np.tanh((long_len - ref_len) / 150) * 3))
    p_short = np.clip(0.6 + 0.1 * rng.normal(size=n), 0, 1)
    rows_long, rows_short = M.lc_rows(p_long, long_len, ref_len), M.lc_rows(p_short, short_len, ref_len)
    d = M.paired_difference(rows_short, rows_long, stat=M.lc_stat, n_boot=200, scale=100.0)
    # Oracle: the one-system LC win rates computed on their own.
    lc_short = M.length_controlled_win_rate(p_short, short_len, ref_len, n_boot=10)["value"]
    lc_long = M.length_controlled_win_rate(p_long, long_len, ref_len, n_boot=10)["value"]
    assert d["value"] == pytest.approx(lc_short - lc_long)
    assert p_long.mean() > p_short.mean() and d["value"] > 0  # raw says long, LC says short
    assert d["ci"][0] <= d["value"] <= d["ci"][1]
    same = M.paired_difference(rows_long, rows_long, stat=M.lc_stat, n_boot=50)
    assert same["ci"] == [0.0, 0.0]


def test_resolvable_difference_matches_the_binomial_formula():
    # 1.96 * sqrt(2 * 0.25 / n): at n=16 about 34.6 points, at n=300 about 8.0
    assert M.resolvable_difference(16) == pytest.approx(34.65, abs=0.01)
    assert M.resolvable_difference(300) == pytest.approx(8.00, abs=0.01)
    with pytest.raises(ValueError):
        M.resolvable_difference(0)
