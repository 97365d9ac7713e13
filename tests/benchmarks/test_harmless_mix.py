"""benchmarks/harmless_mix.py: the harmless recipe is measured on the calibration side, never an eval set."""

from __future__ import annotations

import json
import sys

import pytest

from benchmark_scripts import load_script
from run_data import TINY_EXPERTS_PRESET


@pytest.fixture
def mix(tmp_path, monkeypatch):
    """The script on the fixture data, a fresh cache and the tiny experts preset (``tmp_path/tiny.yaml``),
    writing to ``tmp_path/out``."""
    from run_data import pipeline_data

    script = load_script("harmless_mix")
    monkeypatch.setenv("MOCAE_DATA_DIR", str(pipeline_data(tmp_path / "data")))
    monkeypatch.setenv("MOCAE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tiny.yaml").write_text(TINY_EXPERTS_PRESET)
    monkeypatch.setattr(script, "RESULTS", tmp_path / "out")
    return script


def test_it_reads_harmbench_validation_and_untrained_risky_prompts_only(mix, tmp_path, monkeypatch):
    from mocae.data import load_harmbench, load_xstest, normalise_text
    from mocae.experts.dataset import training_prompts
    from mocae.pipeline import load_run_config

    preset = tmp_path / "tiny.yaml"
    monkeypatch.setattr(sys, "argv", ["harmless_mix.py", "--preset", str(preset), "--examples", "3",
                                      "--fractions", "0.5", "--n-prompts", "1"])
    assert mix.main() == 0
    report = json.loads((tmp_path / "out" / "harmless_mix_calib_tiny.json").read_text())
    (row,) = report["rows"]
    assert row["n_harmful"] == row["n_risky_benign"] == 1 and 0 <= row["over_refusal_risky_benign"] <= 1
    risky = {normalise_text(s["prompt"]) for s in row["samples_risky_benign"]}
    evaluated = {normalise_text(e.prompt) for e in load_harmbench() + load_xstest()}
    cfg = load_run_config(str(preset)).expert_configs()["harmless"]
    trained = training_prompts(cfg.model_copy(update={"benign_fraction": 0.5, "max_examples": 3}))
    assert risky and not risky & evaluated and not risky & trained
    # more risky prompts than the data holds outside the experts' rows: one clear error, no traceback
    monkeypatch.setattr(sys, "argv", ["harmless_mix.py", "--preset", str(preset), "--examples", "3",
                                      "--fractions", "0.5", "--n-prompts", "50"])
    with pytest.raises(SystemExit) as stop:
        mix.main()
    assert stop.value.code == 2


def test_a_dpo_recipe_from_set_is_its_own_row_beside_the_sft_one(mix, tmp_path, monkeypatch):
    from pathlib import Path

    preset = tmp_path / "tiny.yaml"
    # tiny-random answers with nothing (no pair could be made): stand in compliant base answers
    monkeypatch.setattr("mocae.generation.generate_batch",
                        lambda model, tok, prompts, max_new_tokens, **kw: [f"Sure: {p[:16]}" for p in prompts])
    common = ["harmless_mix.py", "--preset", str(preset), "--examples", "3", "--fractions", "0.5", "--n-prompts", "1"]
    monkeypatch.setattr(sys, "argv", common)
    assert mix.main() == 0
    dpo = ["--set", "experts.harmless.trainer=dpo", "--set", "experts.harmless.max_pairs=4"]
    monkeypatch.setattr(sys, "argv", common + dpo)
    assert mix.main() == 0
    rows = json.loads((tmp_path / "out" / "harmless_mix_calib_tiny.json").read_text())["rows"]
    assert [r["trainer"] for r in rows] == ["sft", "dpo"] and rows[1]["overrides"] == dpo[1::2]
    record = json.loads((Path(rows[1]["expert"]) / "training.json").read_text())
    assert record["trainer"] == "dpo" and record["data"]["pairs"] <= 4
    monkeypatch.setattr(sys, "argv", common + dpo)  # measured again: replaces its own row only
    assert mix.main() == 0
    again = json.loads((tmp_path / "out" / "harmless_mix_calib_tiny.json").read_text())["rows"]
    assert [r["trainer"] for r in again] == ["sft", "dpo"]
    assert all(len(r["risky_benign_sha256"]) == 16 for r in again)
    (pair,) = json.loads((tmp_path / "out" / "harmless_mix_calib_tiny.json").read_text())["paired"]
    assert pair["a"].endswith("(dpo)") and pair["b"].endswith("(sft)")
    assert pair["over_refusal_risky_benign"]["value"] == 0.0  # both answered the same stand-in


def test_rows_pair_only_on_the_same_prompts_and_verdicts_follow_the_interval(mix):
    def row(expert, trainer, harmful, benign, sets=("h1", "b1")):
        return {"expert": f"/cache/{expert}", "trainer": trainer, "refused_harmful": harmful,
                "refused_risky_benign": benign, "harmful_sha256": sets[0], "risky_benign_sha256": sets[1]}

    n = 40
    rows = [row("base", None, [0] * n, [0] * n),
            row("sft-1", "sft", [1] * n, [1] * 20 + [0] * 20),
            row("dpo-2", "dpo", [1] * n, [0] * n, sets=("h1", "b2")),  # another risky set: pairs with nothing
            {"expert": "/cache/old", "trainer": "sft"}]  # measured before per-prompt refusals: skipped
    (pair,) = mix.paired_rows(rows)
    assert (pair["a"], pair["b"]) == ("sft-1 (sft)", "base")
    assert pair["refusal_harmful"]["value"] == 100.0 and pair["refusal_harmful"]["verdict"] == "better"
    benign = pair["over_refusal_risky_benign"]
    assert benign["value"] == 50.0 and benign["verdict"] == "worse" and benign["n"] == n
