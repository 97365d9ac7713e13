"""benchmarks/bench.py on a small synthetic results dict: every field per system, the paired block, the wording."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmark_scripts import load_script
from mocae.evaluation.compare import compare_systems

REQUIRED = ["lc_win_rate", "lc_win_rate_vs_base", "win_rate_vs_reference", "win_rate_vs_base", "output_chars_mean",
            "truncated_share", "reference_nll_gpt4", "safety_score", "safety_jailbreak", "over_refusal", "mc1", "mc2",
            "ti", "mc1_chat", "mc2_chat"]


@pytest.fixture(scope="module")
def bench():
    load_script("targets")  # what bench.py imports beside it (its folder is on sys.path when run)
    return load_script("bench")


def _metric(values, scale=100.0):
    v = float(np.mean(values)) * scale
    return {"value": v, "n": len(values), "ci": [v - 1, v + 1]}


def _system(name, rng, shift=0.0, n=40):
    """A harness-like result: metrics and the per-prompt values they were computed from."""
    sets = {"alpaca_eval": "a", "harmful": "h", "harmful_jailbreak": "j", "xstest_safe": "x", "truthfulqa_mc": "m",
            "truthfulqa": "t"}
    binary = lambda p: (rng.random(n) < min(1.0, p + shift)).astype(float).tolist()  # noqa: E731
    chars = rng.integers(100, 400, n).tolist()
    pref = np.clip(rng.random(n) + shift, 0, 1).tolist()
    per_prompt, metrics = {}, {"helpful": {}, "harmless": {}, "honest": {}}

    def put(axis, key, set_name, values, scale=100.0):
        per_prompt[f"{axis}/{key}"] = {"set": set_name, "scale": scale, "values": values}
        metrics[axis][key] = _metric(values, scale)

    for other in ("text_davinci_003",) + (("base",) if name != "base" else ()):
        put("helpful", f"win_rate_vs_{other}", "alpaca_eval", pref)
        per_prompt[f"helpful/lc_win_rate_vs_{other}"] = {"set": "alpaca_eval", "lc": True, "pref": pref,
                                                         "chars": chars, "other_chars": [250] * n}
        metrics["helpful"][f"lc_win_rate_vs_{other}"] = _metric(pref)
    put("helpful", "output_length_chars", "alpaca_eval", chars, 1.0)
    put("helpful", "truncated_share", "alpaca_eval", binary(0.1))
    put("helpful", "reference_nll_gpt4", "alpaca_eval", (2.0 - shift + rng.random(n) * 0.1).tolist(), 1.0)
    put("harmless", "safety_score", "harmful", binary(0.5))
    put("harmless", "safety_jailbreak", "harmful_jailbreak", binary(0.3))
    put("harmless", "over_refusal_xstest", "xstest_safe", binary(0.2))
    for key in ("mc1", "mc2", "mc1_chat", "mc2_chat"):
        put("honest", key, "truthfulqa_mc", binary(0.3))
    put("honest", "ti", "truthfulqa", binary(0.4))
    return {"name": name, "metrics": metrics, "per_prompt": per_prompt, "prompt_sets": sets, "torch_threads": 2}


def _results():
    rng = np.random.default_rng(0)
    systems = {"base": _system("base", rng), "h3fusion": _system("h3fusion", rng, 0.05),
               "mocae": _system("mocae", rng, 0.4)}
    systems["oracle"] = {"name": "oracle", "metrics": systems["h3fusion"]["metrics"]}  # composed: no per_prompt
    systems["expert_helpful"] = _system("expert_helpful", rng)
    results = {"config": {"reference": "text_davinci_003", "n_boot": 100, "seed": 0}, "systems": systems,
               "torch_threads": 2, "judges": {}}
    results["comparisons"] = compare_systems(results)
    return results


META = {"backbone": "tiny", "preset": "full", "overrides": [], "command": "python benchmarks/bench.py",
        "date": "2026-12-01", "machine": "x86_64, 2 torch threads", "run_dir": "runs/x", "wall_time_s": 1.0,
        "config": {}}


def test_every_system_has_every_field_with_its_interval(bench):
    results = _results()
    report = bench.build_report(results, META)
    for name, row in report["systems"].items():
        for field in REQUIRED:
            assert set(row[field]) >= {"value", "n", "ci"}, (name, field)
        if name != "oracle":
            assert row["n_per_set"] == {s: 40 for s in ("alpaca_eval", "harmful", "harmful_jailbreak",
                                                         "truthfulqa", "truthfulqa_mc", "xstest_safe")}
    base = report["systems"]["base"]
    assert base["lc_win_rate_vs_base"]["value"] == 50.0 and base["win_rate_vs_base"]["ci"] == [50.0, 50.0]
    assert report["headline"] == "lc_win_rate" and report["torch_threads"] == [2]


def test_paired_block_covers_every_other_system(bench):
    results = _results()
    report = bench.build_report(results, META)
    assert set(report["paired"]) == {"base", "h3fusion", "oracle", "expert_helpful"}
    diff = report["paired"]["base"]["safety_score"]
    expected = results["comparisons"]["mocae-base"]["harmless/safety_score"]
    assert diff == {k: expected[k] for k in ("value", "n", "ci", "verdict")}
    assert "note" in report["paired"]["oracle"]  # composed: said so, not silently missing
    assert set(report["paired"]["h3fusion"]) >= {"lc_win_rate", "lc_win_rate_vs_base", "over_refusal", "mc2_chat"}
    assert report["paired"]["base"]["lc_win_rate_vs_base"]["value"] == pytest.approx(
        results["comparisons"]["mocae-base"]["helpful/lc_win_rate_vs_base"]["value"])
    assert set(report["paired_vs_base"]) == {"h3fusion", "mocae", "oracle", "expert_helpful"}


def test_markdown_names_the_headline_and_says_better_worse_or_within_noise(bench):
    report = bench.build_report(_results(), META)
    md = bench.markdown(report)
    assert "Headline helpfulness metric: the length-controlled win rate" in md
    assert "within noise" in md and ("better" in md or "worse" in md)
    assert "| mocae − X |" in md and "| h3fusion |" in md
    assert "resolved only beyond" in md
    mixed = _results()
    mixed["systems"]["h3fusion"]["torch_threads"] = 1
    assert "different torch thread counts [1, 2]" in bench.markdown(bench.build_report(mixed, META))


def test_summary_renders_new_bench_files_and_refuses_old_ones(bench):
    summarize = load_script("summarize")
    lines = summarize.bench(bench.build_report(_results(), META))
    assert any("length-controlled win rate" in line for line in lines)
    old = summarize.bench({"systems": {"base": {}}, "mocae_vs_base": {}})
    assert len(old) == 1 and "before the evaluation protocol" in old[0]


def test_a_sitting_cut_off_mid_system_still_lands_its_finished_answers(bench, tmp_path, monkeypatch):
    import argparse
    import types

    import mocae.pipeline

    landing = load_script("landing")
    calls = []
    monkeypatch.setattr(landing, "restore", lambda *a: [])
    monkeypatch.setattr(landing, "land", lambda land_to, run_dir, name, sitting: calls.append(("land", name)) or [])
    monkeypatch.setattr(landing, "model_ids", lambda run_dir, names: [f"{n}-w" for n in names])
    monkeypatch.setattr(landing, "land_answers",
                        lambda land_to, ids: calls.append(("answers", tuple(ids))) or [tmp_path / "g.json"])
    monkeypatch.setattr(landing, "commit", lambda paths, message: calls.append(("commit", message)) or True)
    monkeypatch.setattr(bench, "write_interim", lambda *a: tmp_path / "interim.md")

    def run_pipeline(preset, run_dir, overrides, progress, lazy):
        assert lazy  # restored evaluations of trained systems are not retrained to be reused
        assert "efficiency.enabled=false" in overrides  # speed is measured once, for all systems together
        if "expert_helpful" in overrides[-2]:
            raise KeyboardInterrupt  # the sitting ends while the second system is evaluated
        return run_dir

    monkeypatch.setattr(mocae.pipeline, "run_pipeline", run_pipeline)
    args = argparse.Namespace(run_dir=str(tmp_path / "run"), preset="full", set=[], commit=True, experts_from=None, cost=True,
                              land_answers_every=0)
    cfg = types.SimpleNamespace(backbone="tiny", systems=["base", "expert_helpful", "expert_honest"])
    with pytest.raises(KeyboardInterrupt):
        bench._sittings(args, cfg)
    assert calls[0] == ("land", "base")
    assert calls[-2] == ("answers", ("base-w", "expert_helpful-w"))  # the system in progress included
    assert calls[-1][0] == "commit" and "expert_helpful" in calls[-1][1]


def test_each_system_first_takes_what_a_side_by_side_sitting_landed(bench, tmp_path, monkeypatch):
    import argparse
    import types

    import mocae.pipeline

    landing = load_script("landing")
    calls = []
    monkeypatch.setattr(landing, "restore", lambda land_to, run_dir: calls.append("restore") or [])
    monkeypatch.setattr(landing, "land", lambda land_to, run_dir, name, sitting: calls.append(name) or [])
    monkeypatch.setattr(landing, "land_answers", lambda *a: [])
    monkeypatch.setattr(bench, "write_interim", lambda *a: tmp_path / "interim.md")
    monkeypatch.setattr(mocae.pipeline, "run_pipeline", lambda preset, run_dir, overrides, progress, lazy: run_dir)
    args = argparse.Namespace(run_dir=str(tmp_path / "run"), preset="full", set=[], commit=False, experts_from=None,
                              cost=False, land_answers_every=0)
    bench._sittings(args, types.SimpleNamespace(backbone="tiny", systems=["base", "dare", "ties"]))
    assert calls == ["restore", "base", "restore", "dare", "restore", "ties"]


def test_speed_and_memory_are_measured_once_all_systems_landed(bench, tmp_path, monkeypatch):
    import argparse
    import types

    import mocae.pipeline

    landing = load_script("landing")
    runs = []
    monkeypatch.setattr(landing, "restore", lambda *a: [])
    monkeypatch.setattr(landing, "land", lambda *a: [])
    monkeypatch.setattr(landing, "land_answers", lambda *a: [])
    monkeypatch.setattr(bench, "write_interim", lambda *a: tmp_path / "interim.md")
    monkeypatch.setattr(mocae.pipeline, "run_pipeline",
                        lambda preset, run_dir, overrides, progress, lazy: runs.append(overrides) or run_dir)
    args = argparse.Namespace(run_dir=str(tmp_path / "run"), preset="full", set=["eval.n_helpful=8"], commit=False,
                              experts_from=None, cost=True, land_answers_every=0)
    bench._sittings(args, types.SimpleNamespace(backbone="tiny", systems=["base", "mocae"]))
    assert [o[-1] for o in runs[:2]] == ["efficiency.enabled=false"] * 2
    assert runs[-1] == ["eval.n_helpful=8"] and len(runs) == 3  # one last run, every system, efficiency on


def test_the_interim_report_pairs_systems_landed_by_different_sittings(bench, tmp_path):
    import json

    rng = np.random.default_rng(1)
    land = tmp_path / "bench_tiny"
    landed = {"base": _system("base", rng), "expert_helpful": _system("expert_helpful", rng),
              "expert_harmless": _system("expert_harmless", rng), "expert_honest": _system("expert_honest", rng),
              "mocae": _system("mocae", rng, 0.4)}
    manifest = {}
    for i, (name, system) in enumerate(landed.items()):
        (land / "systems").mkdir(parents=True, exist_ok=True)
        (land / "systems" / f"{name}-k{i}.json").write_text(json.dumps(system))
        (land / "systems" / f"{name}-old.json").write_text("{}")  # not the key landed.json names: ignored
        manifest[name] = {"key": f"k{i}"}
    manifest["oracle"] = {"key": None}
    (land / "landed.json").write_text(json.dumps(manifest))
    order = ["base", "expert_helpful", "expert_harmless", "expert_honest", "oracle", "mocae", "h3fusion"]
    results = bench.landed_results(land, order, {"reference": "text_davinci_003", "n_boot": 100, "seed": 0})

    assert list(results["systems"]) == order[:-1]  # the preset's order; the oracle composed from the experts
    assert results["systems"]["oracle"]["composed_from"]["harmless"] == "expert_harmless"
    assert results["comparisons"]["mocae-base"]["harmless/safety_score"]["value"] > 30  # shifted by +0.4
    text = bench.interim_markdown(bench.build_report(results, META), [n for n in order if n not in results["systems"]])
    assert text.startswith("> **Interim: 6 systems landed, 1 to go (h3fusion).**")
    assert "| mocae | " in text and "| h3fusion |" not in text
    # a sitting's own system list is only its part: the report is the whole bench's
    from mocae.pipeline import load_run_config

    sitting = load_run_config("quick", ["systems=[base, mocae]"])
    text = bench.write_interim(land, sitting, None, "python bench.py", order).read_text()
    assert text.startswith("> **Interim: 6 systems landed, 1 to go (h3fusion).**")
    assert "| expert_honest | " in text and "| oracle | " in text


def test_a_sitting_without_the_cost_run_leaves_the_headline_files_alone(bench, tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "_sittings", lambda args, cfg: tmp_path / "run")  # no results.json: never read
    monkeypatch.setattr(sys, "argv", ["bench.py", "--preset", "full", "--no-cost", "--set", "systems=[base, dare]"])
    assert bench.main() == 0
    assert not list(tmp_path.glob("bench_*.json")) and not list(tmp_path.glob("bench_*.md"))
