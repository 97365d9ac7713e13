"""benchmarks/router_screen.py: the AUROC it pairs, its variant specs and its report."""

import argparse

import numpy as np
import pytest

from tests.helpers.benchmark_scripts import load_script

screen = load_script("router_screen")


def test_auroc_matches_the_pairwise_definition():
    rows = np.array([[0.9, 1], [0.4, 1], [0.4, 0], [0.1, 0], [0.5, 0]])
    # positives over negatives: 0.9 beats all 3; 0.4 beats 0.1, ties 0.4, loses to 0.5 -> (3 + 1 + 0.5) / 6
    assert screen.auroc(rows) == pytest.approx(4.5 / 6)
    assert screen.auroc(rows[rows[:, 1] == 1]) == 0.5  # one class: nothing ranked


def test_paired_auroc_difference_is_zero_against_itself_and_signed():
    rng = np.random.default_rng(0)
    labels = np.repeat([1.0, 0.0], 40)
    good = {"values": np.c_[labels + rng.normal(0, 0.5, 80), labels].tolist(), "auroc": True}
    noise = {"values": np.c_[rng.normal(0, 1, 80), labels].tolist(), "auroc": True}
    same = screen.compare(good, good)
    assert same["value"] == 0 and same["ci"] == [0, 0]
    d = screen.compare(good, noise)
    assert d["value"] == pytest.approx(screen.value(good) - screen.value(noise)) and d["ci"][0] > 0


def test_variant_specs():
    parser = argparse.ArgumentParser()
    specs = ["preset=", "gate_others", "mine=router.router_hard_negatives=50; decision.mode=top1"]
    assert screen.parse_variants(specs, parser) == {
        "preset": [], "gate_others": screen.VARIANTS["gate_others"],
        "mine": ["router.router_hard_negatives=50", "decision.mode=top1"]}
    with pytest.raises(SystemExit):
        screen.parse_variants(["no_such_variant"], parser)


def test_markdown_pairs_every_variant_with_the_first():
    fit = {"train_counts": {"n": 3}, "calibrator": "temperature", "decision": "top1", "test_accuracy": 0.5,
           "test_ece": 0.1}
    report = {"command": "c", "date": "d", "machine": "m", "note": "n", "variants": {"a": [], "b": ["x=1"]},
              "fits": {"a": fit, "b": fit}, "side": {"risky/w": "calib"},
              "values": {"a": {"risky/w": 20.0}, "b": {"risky/w": 10.0}},
              "vs_reference": {"b": {"risky/w": {"value": -10.0, "ci": [-15.0, -5.0]}}}}
    md = screen.markdown(report)
    assert "| risky/w | calib | 20.0 | 10.0 (-10.0 [-15.0, -5.0]) |" in md and "| b | x=1 |" in md
