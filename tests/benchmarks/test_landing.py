"""benchmarks/landing.py: what one sitting lands is what a fresh machine restores, and nothing more."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark_scripts import load_script


@pytest.fixture(scope="module")
def landing():
    return load_script("landing")


def _write(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload) if not isinstance(payload, str) else payload)


def _run(tmp_path: Path, cache: Path) -> Path:
    """A run folder as the pipeline leaves it after evaluating base and expert_honest."""
    run = tmp_path / "run"
    expert = cache / "experts" / "tiny" / "honest-abc123"
    _write(expert / "adapter_model.safetensors", "weights")
    _write(expert / "adapter_config.json", {"r": 8})
    _write(expert / "training.json", {"steps": 3})
    _write(expert / "checkpoints" / "checkpoint-2" / "optimizer.pt", "big")
    _write(run / "systems.json", {"experts": {"honest": str(expert)}})
    _write(run / "eval" / "results.json", {
        "systems": {"base": {"torch_threads": 2}, "expert_honest": {"torch_threads": 2}, "oracle": {}},
        "evaluated": {"base": {"key": "k0", "inputs": {"model": "w0"}},
                      "expert_honest": {"key": "k1", "inputs": {"model": "w1"}}}})
    _write(run / "eval" / "systems" / "base-k0.json", {"name": "base", "model_id": "base-w0"})
    _write(run / "eval" / "systems" / "expert_honest-k1.json", {"name": "expert_honest", "model_id": "expert_honest-w1"})
    _write(run / "eval" / "base" / "model_outputs.json", [{"instruction": "q", "output": "a"}])
    _write(cache / "generations" / "truthfulqa-1.json", {"model_id": "expert_honest-w1", "outputs": ["x"]})
    _write(cache / "generations" / "truthfulqa-2.json", {"model_id": "expert_honesty_other-w9", "outputs": ["y"]})
    _write(cache / "generations" / "alpaca_eval-3.json", {"model_id": "base-w0", "outputs": ["z"]})
    # another backbone's base, restored into the shared cache from its own landing folder
    _write(cache / "generations" / "alpaca_eval-4.json", {"model_id": "base-other", "outputs": ["q"]})
    _write(cache / "contamination" / "check-abc.json", {"overlaps": 0, "fingerprint": "abc"})
    return run


def test_land_then_restore_on_a_fresh_machine(landing, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOCAE_CACHE", str(cache))
    run = _run(tmp_path, cache)
    land_to = tmp_path / "landed"
    landed = landing.land(land_to, run, "expert_honest", "test sitting")

    names = {p.relative_to(land_to).as_posix() for p in landed}
    assert "systems/expert_honest-k1.json" in names
    assert "generations/truthfulqa-1.json" in names  # its own answers only: not another system's
    assert "generations/truthfulqa-2.json" not in names and "generations/alpaca_eval-3.json" not in names
    assert "contamination/check-abc.json" in names  # the data's passing verdict travels with the first system
    assert not (land_to / "base").exists()  # base's answers land with base
    assert not (land_to / "experts").exists()  # weights never land in the repository
    manifest = json.loads((land_to / "landed.json").read_text())
    assert manifest["expert_honest"]["key"] == "k1" and manifest["expert_honest"]["weights"] == "w1"

    landing.land(land_to, run, "base", "test sitting")
    assert json.loads((land_to / "base" / "model_outputs.json").read_text())[0]["output"] == "a"
    assert (land_to / "generations" / "alpaca_eval-3.json").is_file()
    assert not (land_to / "generations" / "alpaca_eval-4.json").exists()  # same name, another backbone's base

    fresh_cache = tmp_path / "fresh-cache"
    monkeypatch.setenv("MOCAE_CACHE", str(fresh_cache))
    fresh_run = tmp_path / "fresh-run"
    copied = landing.restore(land_to, fresh_run)
    assert (fresh_run / "eval" / "systems" / "expert_honest-k1.json").is_file()
    assert (fresh_run / "eval" / "systems" / "base-k0.json").is_file()
    assert (fresh_run / "eval" / "base" / "model_outputs.json").is_file()
    assert json.loads((fresh_cache / "generations" / "truthfulqa-1.json").read_text())["outputs"] == ["x"]
    assert json.loads((fresh_cache / "contamination" / "check-abc.json").read_text())["overlaps"] == 0
    assert len(copied) == 6
    assert landing.restore(land_to, fresh_run) == []  # nothing present is overwritten


def test_a_system_lands_one_current_result(landing, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOCAE_CACHE", str(cache))
    run = _run(tmp_path, cache)
    land_to = tmp_path / "landed"
    _write(land_to / "systems" / "expert_honest-old.json", {"name": "expert_honest"})  # an earlier key
    landed = landing.land(land_to, run, "expert_honest", "s")
    assert sorted(p.name for p in (land_to / "systems").glob("expert_honest-*")) == ["expert_honest-k1.json"]
    assert land_to / "systems" / "expert_honest-old.json" in landed  # its removal is committed with the rest


def test_landing_a_system_that_was_not_evaluated_names_it(landing, tmp_path, monkeypatch):
    monkeypatch.setenv("MOCAE_CACHE", str(tmp_path / "cache"))
    run = _run(tmp_path, tmp_path / "cache")
    with pytest.raises(KeyError, match="mocae"):
        landing.land(tmp_path / "landed", run, "mocae", "s")



def test_landed_json_waits_for_a_side_by_side_sitting(landing, tmp_path, monkeypatch):
    """Two sittings landing at once must not drop each other's entry in landed.json."""
    import threading

    monkeypatch.setenv("MOCAE_CACHE", str(tmp_path / "cache"))
    run = _run(tmp_path, tmp_path / "cache")
    land_to = tmp_path / "landed"
    landing.land(land_to, run, "base", "sitting a")
    with landing._landing_lock():  # the other sitting is mid-update
        worker = threading.Thread(target=landing.land, args=(land_to, run, "expert_honest", "sitting b"))
        worker.start()
        worker.join(timeout=0.5)
        assert worker.is_alive()  # it queues instead of reading a manifest about to change
        assert "expert_honest" not in json.loads((land_to / "landed.json").read_text())
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert sorted(json.loads((land_to / "landed.json").read_text())) == ["base", "expert_honest"]


def test_answers_of_the_system_in_progress_land_once(landing, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOCAE_CACHE", str(cache))
    run = _run(tmp_path, cache)
    land_to = tmp_path / "landed"
    (run / "eval" / "results.json").unlink()  # expert_honest not finished: only the harness' marker names it
    _write(run / "eval" / "in_progress.json", {"name": "expert_honest", "model_id": "expert_honest-w1"})
    assert landing.model_ids(run, ["base", "expert_honest"]) == ["expert_honest-w1"]

    first = landing.land_answers(land_to, landing.model_ids(run, ["expert_honest"]))
    assert [p.name for p in first] == ["check-abc.json", "truthfulqa-1.json"]  # not another system's, not its result
    assert not (land_to / "systems").exists() and not (land_to / "landed.json").exists()
    assert landing.land_answers(land_to, ["expert_honest-w1"]) == []  # same bytes: nothing new to commit

    _run(tmp_path, cache)  # base finished (its result names its answers), expert_honest still in progress
    _write(cache / "generations" / "truthfulqa-1.json", {"model_id": "expert_honest-w1", "outputs": ["x2"]})
    _write(cache / "generations" / "xstest-4.json", {"model_id": "expert_honest-w1", "outputs": ["r"]})
    assert landing.model_ids(run, ["base", "expert_honest"]) == ["base-w0", "expert_honest-w1"]
    again = sorted(p.name for p in landing.land_answers(land_to, landing.model_ids(run, ["expert_honest", "base"])))
    assert again == ["alpaca_eval-3.json", "truthfulqa-1.json", "xstest-4.json"]  # never base-other's file
    assert json.loads((land_to / "generations" / "truthfulqa-1.json").read_text())["outputs"] == ["x2"]


def _git(repo: Path, *args: str) -> None:
    import subprocess

    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_experts_come_back_from_history_only_where_their_key_matches(landing, tmp_path):
    repo = tmp_path / "repo"
    folder = repo / "benchmarks" / "results" / "bench_tiny" / "experts"
    _write(folder / "honest-abc123abc123" / "adapter_model.safetensors", "weights")
    _write(folder / "honest-abc123abc123" / "stage.json", {"key": "abc123abc123" + "0" * 52})
    _write(folder / "honest-abc123abc123" / "training.json", {"steps": 3})
    _write(folder / "helpful-def456def456" / "stage.json", {"key": "ffffff" + "0" * 58})  # renamed by hand
    _write(folder / "helpful-def456def456" / "training.json", {"steps": 3})
    repo.mkdir(exist_ok=True)
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "experts")
    _git(repo, "rm", "-q", "-r", "benchmarks")
    _git(repo, "commit", "-q", "-m", "weights leave the tree")

    cache = tmp_path / "cache"
    expected = {"honest": cache / "honest-abc123abc123", "helpful": cache / "helpful-def456def456",
                "harmless": cache / "harmless-000000000000"}
    restored = landing.restore_experts("HEAD~1", "tiny", expected, repo=repo)
    assert restored == [str(expected["honest"])]  # helpful's stage key disagrees with its name; harmless absent
    assert (expected["honest"] / "adapter_model.safetensors").read_text() == "weights"
    assert json.loads((expected["honest"] / "training.json").read_text()) == {"steps": 3}
    assert not expected["helpful"].exists()
    assert landing.restore_experts("HEAD~1", "tiny", expected, repo=repo) == []  # a finished expert stays
    with pytest.raises(ValueError, match="holds no experts"):
        landing.restore_experts("HEAD", "tiny", expected, repo=repo)


def test_run_experts_include_the_multitask_expert_only_when_the_run_has_it(landing, monkeypatch):
    from mocae.experts.train import expert_dir
    from mocae.pipeline import load_run_config

    asked = {}
    monkeypatch.setattr(landing, "restore_experts", lambda commit, backbone, expected: asked.update(expected) or [])
    cfg = load_run_config("quick", ["systems=[base, mocae, multitask]"])
    landing.restore_run_experts(cfg, "abc1234")
    assert set(asked) == {"helpful", "harmless", "honest", "multitask"}
    assert asked["multitask"] == expert_dir(cfg.multitask_config())  # where the pipeline looks for it
    asked.clear()
    landing.restore_run_experts(load_run_config("quick", ["systems=[base, mocae]"]), "abc1234")
    assert set(asked) == {"helpful", "harmless", "honest"}
    assert landing.restore_run_experts(cfg, None) == [] and not asked.get("multitask")


def test_a_restored_result_landed_again_keeps_the_sitting_that_measured_it(landing, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOCAE_CACHE", str(cache))
    run = _run(tmp_path, cache)
    land_to = tmp_path / "landed"
    landing.land(land_to, run, "expert_honest", "first sitting")
    landing.land(land_to, run, "expert_honest", "later sitting")  # same key and weights: restored, not measured
    assert json.loads((land_to / "landed.json").read_text())["expert_honest"]["sitting"] == "first sitting"
    results = json.loads((run / "eval" / "results.json").read_text())
    results["evaluated"]["expert_honest"]["inputs"]["model"] = "w2"  # retrained: a new measurement
    _write(run / "eval" / "results.json", results)
    landing.land(land_to, run, "expert_honest", "later sitting")
    assert json.loads((land_to / "landed.json").read_text())["expert_honest"]["sitting"] == "later sitting"
    # the composed oracle has no key: the same figures are the same result
    landing.land(land_to, run, "oracle", "first sitting")
    landing.land(land_to, run, "oracle", "later sitting")
    assert json.loads((land_to / "landed.json").read_text())["oracle"]["sitting"] == "first sitting"
    results["systems"]["oracle"] = {"metrics": {"honest": {"mc2": {"value": 60.0}}}}
    _write(run / "eval" / "results.json", results)
    landing.land(land_to, run, "oracle", "later sitting")
    assert json.loads((land_to / "landed.json").read_text())["oracle"]["sitting"] == "later sitting"
