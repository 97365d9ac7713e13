"""benchmarks/mocae_ablation.py: the rule that picks MoCaE's default from calib-side paired differences."""

from __future__ import annotations

import pytest

from benchmark_scripts import load_script
from run_data import TINY_MOCAE_PRESET, StandInJudge


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


def test_the_script_runs_end_to_end_and_reports_each_variant(ablation, tmp_path, monkeypatch):
    import json
    import sys

    import mocae.evaluation.judges
    from run_data import pipeline_data

    monkeypatch.setenv("MOCAE_DATA_DIR", str(pipeline_data(tmp_path / "data")))
    monkeypatch.setattr(mocae.evaluation.judges, "load_judge", lambda kind: StandInJudge())
    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY_MOCAE_PRESET)
    monkeypatch.setattr(sys, "argv", ["mocae_ablation.py", "--preset", str(preset), "--run-dir", str(tmp_path / "run"),
                                      "--variants", "soft", "harm_gate", "prior_uniform", "--n-over-refusal", "2",
                                      "--max-new-tokens", "3", "--results-dir", str(tmp_path / "out"),
                                      "--set", "decision.mode=harm_gate"])
    monkeypatch.setattr(ablation, "RESULTS", tmp_path / "out")
    landing = sys.modules.get("landing") or load_script("landing")
    monkeypatch.setattr(landing, "RESULTS", tmp_path / "landed")  # never the repository's landing
    assert ablation.main() == 0
    report = json.loads((tmp_path / "out" / "mocae_ablation.json").read_text())
    assert report["complete"] and report["not_measured"] == []
    # the refit is measured under each --refit-modes rule (top1 was not measured on its own to compare with)
    assert set(report["variants"]) == {"base", "soft", "harm_gate", "prior_uniform", "prior_uniform+top1"}
    assert set(report["vs_base"]) == {"soft", "harm_gate", "prior_uniform", "prior_uniform+top1"}
    assert report["chosen"] in report["vs_base"] and report["identical_to"] == {}
    # every other variant minus the preset's own rule, the one a candidate has to beat
    assert report["default_mode"] == "harm_gate"
    assert set(report["vs_default"]) == {"soft", "prior_uniform", "prior_uniform+top1"}
    assert "Variant minus harm_gate, the preset's rule" in (tmp_path / "out" / "mocae_ablation.md").read_text()
    assert (tmp_path / "run" / "ablation" / "prior_uniform" / "mocae" / "stage.json").is_file()  # its own refit
    assert "**Chosen:" in (tmp_path / "out" / "mocae_ablation.md").read_text()
    assert report["routers"]["prior_uniform"]["prior_mode"] == "uniform" and report["routers"]["soft"]["calibrator"]
    # over-refusal is measured on risky benign prompts no expert trained on (the harmless expert's
    # benign rows are Alpaca prompts nearest its refusals: the same kind)
    from mocae.data import normalise_text
    from mocae.experts.dataset import training_prompts
    from mocae.pipeline import load_run_config

    cfg = load_run_config(str(preset))
    risky = ablation.calib_sets(cfg, 2)["risky_benign"]
    trained = set().union(*(training_prompts(c) for c in cfg.expert_configs().values()))
    assert report["n"]["risky_benign"] == len(risky) == 2 and not {normalise_text(p) for p in risky} & trained


def test_the_presets_rule_is_named_by_every_field_but_a_fitted_threshold(ablation):
    from mocae.mixture.decide import DecisionConfig

    assert ablation.mode_name(DecisionConfig(mode="top1")) == "top1"
    assert ablation.mode_name(DecisionConfig(mode="harm_gate+top1", gate_rest="others", gate_threshold=0.56,
                                             gate_budget=0.1)) == "gate_others+top1"  # threshold fitted
    caution = DecisionConfig(**ablation.MODES["gate0.9_caution0.3"])
    assert ablation.mode_name(caution) == "gate0.9_caution0.3"
    assert ablation.mode_name(caution.model_copy(update={"caution_threshold": 0.4})) is None
    assert ablation.mode_name(DecisionConfig(mode="top1", top1_threshold=0.6)) is None


def test_same_as_reads_answers_and_mc_scores(ablation):
    def variant(answer, mc2):
        return {"outputs": {"helpful": [answer]},
                "per_prompt": {"honest/mc1": {"values": [1.0]}, "honest/mc2": {"values": [mc2]}}}

    assert ablation.same_as(variant("a", 0.5), variant("a", 0.5))
    assert not ablation.same_as(variant("a", 0.5), variant("b", 0.5))
    assert not ablation.same_as(variant("a", 0.5), variant("a", 0.6))
    assert not ablation.same_as(variant("a", 0.5), None)
