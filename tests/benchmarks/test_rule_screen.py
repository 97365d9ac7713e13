"""benchmarks/rule_screen.py: hard rules composed from the experts' per-prompt results, checked against generation."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from benchmark_scripts import load_script

AXES = ["helpful", "harmless", "honest"]


@pytest.fixture(scope="module")
def screen():
    load_script("mocae_ablation")  # what rule_screen imports beside it
    return load_script("rule_screen")


def test_the_rules_send_each_prompt_where_their_thresholds_say(screen):
    grid = screen.rule_grid(AXES, fitted_gate=0.8)
    p = np.array([[0.6, 0.3, 0.1],     # helpful, but sounds a little risky
                  [0.1, 0.85, 0.05],   # confidently harmful
                  [0.2, 0.55, 0.25],   # the middle band
                  [0.4, 0.2, 0.4 + 1e-6]])
    assert grid["argmax"](p).tolist() == [0, 1, 1, 2]
    assert grid["argmax_no_harmless"](p).tolist() == [0, 0, 2, 2]
    assert grid["top1>=0.6"](p).tolist() == [0, 1, screen.BASE, screen.BASE]
    assert grid["gate>0.8"](p).tolist() == [0, 1, 2, 2]  # the fitted threshold is in the grid
    assert grid["gate>0.9"](p).tolist() == [0, 0, 2, 2]
    # the caution band gives the honest expert (no refusal) to what only sounds risky
    assert grid["gate>0.7,caution>0.3"](p).tolist() == [0, 1, 2, 2]
    assert grid["gate>0.9,caution>0.5"](p).tolist() == [0, 2, 2, 2]


@pytest.mark.parametrize("screened, generated", [("gate>0.9,caution>0.3", "gate0.9_caution0.3"),
                                                   ("top1>=0.7", "top1>=0.7_base")])
def test_the_ablation_generates_the_screened_rules_exactly(screen, screened, generated):
    # the same rule in two forms: composed in the screen, a DecisionConfig in the ablation's MODES
    import torch

    from mocae.mixture.decide import DecisionConfig, decide

    rng = np.random.default_rng(0)
    p = np.concatenate([rng.dirichlet([0.7] * 3, 500), [[0.05, 0.9, 0.05], [0.4, 0.3, 0.3], [0.15, 0.7, 0.15]]])
    weights = decide(torch.tensor(p), DecisionConfig(**sys.modules["mocae_ablation"].MODES[generated]), AXES)
    one_hot = (weights.sum(-1) == 1) & (weights.max(-1).values == 1)
    base = weights.sum(-1) == 0
    assert bool((one_hot | base).all())  # every prompt gets one expert or none: a hard rule
    chosen = np.where(base.numpy(), screen.BASE, weights.argmax(-1).numpy())
    assert chosen.tolist() == screen.rule_grid(AXES, None)[screened](p).tolist()


def _measured(n, pref, chars, refused, safe, mc2, base_chars=None):
    out = {"per_prompt": {
        "helpful/output_length_chars": {"set": "helpful", "scale": 1.0, "values": chars},
        "harmless/safety_score": {"set": "harmful", "scale": 100.0, "values": safe},
        "harmless/over_refusal": {"set": "risky_benign", "scale": 100.0, "values": refused},
        "honest/mc2": {"set": "truthfulqa_mc", "scale": 100.0, "values": mc2}},
        "prompt_sets": {"helpful": "h", "harmful": "x", "risky_benign": "r", "truthfulqa_mc": "m"}, "chars": chars}
    if pref is not None:
        out["per_prompt"]["helpful/lc_win_rate_vs_base"] = {"set": "helpful", "lc": True, "pref": pref, "chars": chars,
                                                           "other_chars": base_chars}
    return out


def test_a_composed_rule_takes_each_prompt_from_the_system_it_chose(screen):
    base = _measured(2, None, [100, 110], [0, 0], [0, 0], [0.2, 0.3])
    helpful = _measured(2, [0.9, 0.8], [300, 310], [0, 0], [0, 0], [0.2, 0.3], [100, 110])
    harmless = _measured(2, [0.1, 0.2], [50, 60], [1, 1], [1, 1], [0.25, 0.3], [100, 110])
    choice = {"helpful": np.array([0, screen.BASE]), "harmful": np.array([1, 0]),
              "risky_benign": np.array([0, 1]), "truthfulqa_mc": np.array([1, screen.BASE])}
    r = screen.compose("r", choice, [helpful, harmless], base)
    lc = r["per_prompt"]["helpful/lc_win_rate_vs_base"]
    assert lc["pref"] == [0.9, 0.5] and lc["chars"] == [300, 110]  # base vs itself: a tie at its own length
    assert r["per_prompt"]["helpful/output_length_chars"]["values"] == [300, 110]
    assert r["per_prompt"]["harmless/safety_score"]["values"] == [1, 0]
    assert r["per_prompt"]["harmless/over_refusal"]["values"] == [0, 1]
    assert r["per_prompt"]["honest/mc2"]["values"] == [0.25, 0.3]
    assert r["shares"]["helpful"] == {"base": 0.5, "0": 0.5}


def test_the_screen_favours_the_rule_that_keeps_every_axis(screen):
    rng = np.random.default_rng(0)
    n = 60
    base = _measured(n, None, [200] * n, [0] * n, [0] * n, [0.3] * n)
    good = lambda: rng.random(n) < 0.9  # noqa: E731
    helpful = _measured(n, [0.8] * n, [200] * n, [0] * n, [0] * n, [0.3] * n, [200] * n)
    harmless = _measured(n, [0.2] * n, [80] * n, good().astype(float).tolist(), good().astype(float).tolist(),
                         [0.3] * n, [200] * n)
    honest = _measured(n, [0.5] * n, [200] * n, [0] * n, [0] * n, [0.6] * n, [200] * n)
    onehot = lambda i: np.eye(3)[[i] * n] * 0.9 + 0.1 / 3  # noqa: E731
    probs = {"helpful": onehot(0), "harmful": onehot(1), "truthfulqa_mc": onehot(2),
             "risky_benign": np.tile([0.2, 0.75, 0.05], (n, 1))}  # risky benign prompts look harmful to the router
    report = screen.score(screen.rule_grid(AXES, None), probs, [helpful, harmless, honest], base)
    # argmax and a confident top1 refuse the risky benign prompts; only a gate above their P(harmful)
    # (0.75) and below the harmful ones' (0.93) keeps every axis
    for rule in ("argmax", "top1>=0.7", "gate>0.7"):
        assert report["vs_base"][rule]["harmless/over_refusal"]["verdict"] == "worse"
    assert report["scores"][report["favoured"]]["axes_worse"] == 0 and report["favoured"].startswith("gate>0.9")


def test_agreement_counts_only_prompts_routed_one_hot(screen):
    check = screen.agreement(np.array([0, 1, 1]), np.array([True, True, False]), ["a", "x", "c"],
                             [["a", "b", "c"], ["a", "b", "c"]])
    assert check == {"one_hot": 2, "n": 3, "identical": 1, "share": 0.5}


def test_end_to_end_composition_equals_generation_where_the_router_is_one_hot(screen, tmp_path, monkeypatch):
    import json
    import sys

    import mocae.evaluation.judges
    from run_data import TINY_MOCAE_PRESET, StandInJudge, pipeline_data

    ablation = sys.modules["mocae_ablation"]

    monkeypatch.setenv("MOCAE_DATA_DIR", str(pipeline_data(tmp_path / "data")))
    monkeypatch.setattr(mocae.evaluation.judges, "load_judge", lambda kind: StandInJudge())

    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY_MOCAE_PRESET)
    common = ["--preset", str(preset), "--run-dir", str(tmp_path / "run"), "--n-over-refusal", "2",
              "--max-new-tokens", "3", "--results-dir", str(tmp_path / "out"),
              "--set", "decision.top1_threshold=0.0"]  # top1 routes every prompt one-hot: all comparable
    landing = sys.modules.get("landing") or load_script("landing")
    monkeypatch.setattr(landing, "RESULTS", tmp_path / "landed")  # never the repository's landing
    # the ablation's top1 first: its answers are what composition is checked against
    monkeypatch.setattr(sys, "argv", ["mocae_ablation.py", *common, "--variants", "top1"])
    assert ablation.main() == 0
    monkeypatch.setattr(sys, "argv", ["rule_screen.py", *common])
    assert screen.main() == 0
    report = json.loads((tmp_path / "out" / "rule_screen.json").read_text())
    assert report["axes"] == AXES and set(report["vs_base"]) == set(report["rules"]) and report["favoured"]
    check = report["composition_check"]["sets"]
    assert set(check) == {"helpful", "harmful", "risky_benign"}
    # a one-hot mixture is the expert's adapter: fp32 on tiny-random, the same greedy answers exactly
    assert all(c["identical"] == c["one_hot"] for c in check.values()) and sum(c["one_hot"] for c in check.values())
    assert "Composition checked against generation" in (tmp_path / "out" / "rule_screen.md").read_text()


def test_it_takes_the_ablations_calib_options_and_their_checks(screen, monkeypatch):
    import sys

    # beyond the reserve the risky benign prompts may be router_hard_negatives' training prompts
    monkeypatch.setattr(sys, "argv", ["rule_screen.py", "--run-dir", "x", "--n-over-refusal", "100000"])
    with pytest.raises(SystemExit) as stop:
        screen.main()
    assert stop.value.code == 2
