"""benchmarks/summarize.py: every result file that exists gets its section, from what the file holds."""

from __future__ import annotations

import json

import pytest

from benchmark_scripts import load_script


@pytest.fixture
def summarize(tmp_path, monkeypatch):
    script = load_script("summarize")
    monkeypatch.setattr(script, "RESULTS", tmp_path)
    return script


def test_a_bench_not_landed_in_full_is_summarised_from_its_interim_report(summarize, tmp_path):
    (tmp_path / "bench_smollm2-135m").mkdir()
    (tmp_path / "bench_smollm2-135m" / "interim.md").write_text("> **Interim: 2 systems landed**\n\n# Benchmark: x\n\n"
                                                                "## Targets\n| a |\n")
    summarize.main()
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "## Every system, SmolLM2-135M (benchmarks/bench.py): interim" in text
    assert "> **Interim: 2 systems landed**" in text and "### Targets" in text  # its headings one level down
    assert "Qwen2.5" not in text  # nothing landed for it: no section


def test_reports_with_their_own_markdown_are_embedded_and_provenance_is_never_invented(summarize, tmp_path):
    (tmp_path / "judges.json").write_text(json.dumps({"command": "python benchmarks/train_judges.py", "date": "d",
                                                      "machine": {"torch": "2.13", "threads": 1}}))
    (tmp_path / "judges.md").write_text("# Offline judges\n\n## helpful\n\n| agreement | 0.83 |\n")
    (tmp_path / "contamination.json").write_text(json.dumps({
        "overlaps": 1, "exact_only": True, "training_sources": [{"name": "alpaca", "stages": ["expert helpful"]}],
        "pairs": [{"source": "alpaca", "eval_set": "alpaca_eval", "field": "prompt", "exact": 1, "near": 0}]}))
    summarize.main()
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "`python benchmarks/train_judges.py`, on d (torch 2.13, threads 1)" in text
    assert "### helpful" in text and "| agreement | 0.83 |" in text
    assert "no command recorded, no date recorded" in text  # the contamination report records neither
    assert "**1 overlaps** in 1" in text and "- overlap: alpaca x alpaca_eval (prompt): 1 exact, 0 near" in text


def test_paired_harmless_rows_are_shown_with_their_verdicts(summarize):
    row = {"benign_fraction": 0.5, "benign_sources": ["alpaca"], "trainer": "dpo", "overrides": [],
           "refusal_harmful": 0.5, "over_refusal_risky_benign": 0.3, "n_harmful": 80, "n_risky_benign": 120,
           "risky_benign_sha256": "8a3bc2143aecb480", "date": "2026-12-07"}
    diff = {"value": -6.7, "ci": [-11.7, -1.7], "verdict": "better"}
    lines = summarize.harmless_mix_calib({"examples": 2000, "metric": "m", "sets": "s", "rows": [row], "paired": [
        {"a": "harmless-x (dpo)", "b": "harmless-y (sft)", "refusal_harmful": diff | {"value": 0.0, "ci": [-2.0, 2.0],
                                                                                     "verdict": "within noise"},
         "over_refusal_risky_benign": diff}]})
    assert "| harmless-x (dpo) | harmless-y (sft) | +0.0 [-2.0, +2.0] within noise | -6.7 [-11.7, -1.7] better |" in lines
