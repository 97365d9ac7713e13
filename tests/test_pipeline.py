"""`mocae run` end to end on tiny-random and the fixture data, then again from its caches."""

import json
from pathlib import Path

import pytest

from mocae.config import ConfigError
from mocae.pipeline import load_run_config, run_pipeline

FIXTURE_DATA = Path(__file__).parent / "fixtures" / "data"

PRESET = """\
# Run with: mocae run --preset {path}
name: tiny
backbone: tiny-random
experts:
  all: {{rank: 2, alpha: 4, max_examples: 3, max_length: 64, batch_size: 2, bf16: false}}
router: {{n_per_axis: 4, n_test_per_axis: 2, epochs: 20, calibrators: [none, temperature]}}
sanity: {{n_harmful: 2, n_xstest_safe: 2, n_truthfulqa: 2, max_new_tokens: 4, batch_size: 2}}
"""


@pytest.fixture
def tiny_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("MOCAE_DATA_DIR", str(FIXTURE_DATA))
    path = tmp_path / "tiny.yaml"
    path.write_text(PRESET.format(path=path))
    return path


def test_run_then_rerun_reuses_every_stage(tiny_preset, tmp_path, monkeypatch, capsys):
    run_dir = run_pipeline(tiny_preset, run_dir=tmp_path / "run", progress=False)
    sanity = json.loads((run_dir / "sanity.json").read_text())
    assert set(sanity["systems"]) == {"base", "expert_helpful", "expert_harmless", "expert_honest", "mocae"}
    calibration = json.loads((run_dir / "router_calibration.json").read_text())
    assert set(calibration["calibrators"]) == {"none", "temperature"}
    assert (run_dir / "mocae" / "router.safetensors").is_file()
    assert (run_dir / "reliability_test.png").is_file()
    for metrics in sanity["systems"].values():
        assert 0 <= metrics["refusal_harmful"]["value"] <= 1 and metrics["mc1"]["n"] == 2
    assert "| expert_honest |" in (run_dir / "summary.md").read_text()
    assert "expert_harmless" in capsys.readouterr().out

    def fail(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr("mocae.experts.train.select_examples", fail)
    monkeypatch.setattr("mocae.evaluation.sanity.evaluate_system", fail)
    assert run_pipeline(tiny_preset, run_dir=tmp_path / "run", progress=False) == run_dir


def test_interrupted_run_continues(tiny_preset, tmp_path, monkeypatch):
    import mocae.evaluation.sanity as sanity

    real = sanity.evaluate_system
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sanity, "evaluate_system", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(tiny_preset, run_dir=tmp_path / "run", progress=False)
    calls.clear()
    monkeypatch.setattr(sanity, "evaluate_system", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    run_pipeline(tiny_preset, run_dir=tmp_path / "run", progress=False)
    assert len(calls) == 4  # the base model's finished evaluation was kept


def test_presets_load_and_bad_preset_is_named(tmp_path):
    for name in ("quick", "full"):
        cfg = load_run_config(name)
        assert set(cfg.expert_configs()) == {"helpful", "harmless", "honest"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nexperts:\n  all: {rank: -1}\n")
    with pytest.raises(ConfigError, match="experts.helpful.*field 'rank'"):
        load_run_config(bad).expert_configs()
    with pytest.raises(FileNotFoundError, match="presets:"):
        load_run_config("no-such-preset")
