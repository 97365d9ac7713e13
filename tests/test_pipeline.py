"""`mocae run` end to end on tiny-random and the fixture data, then again from its caches, and
re-run after config changes: exactly the stages whose inputs changed are recomputed."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mocae.config import ConfigError
from mocae.pipeline import StaleRunError, load_run_config, relative_change, run_pipeline
from run_data import pipeline_data  # tests/helpers


PRESET = """\
# Run with: mocae run --preset {path}
name: tiny
backbone: tiny-random
experts:
  all: {{rank: 2, alpha: 4, max_examples: 3, max_length: 64, batch_size: 2, bf16: false, warmup_ratio: 0,
        learning_rate: 0.01}}  # no warmup: the 1-2 steps move the weights
router: {{n_per_axis: 4, n_test_per_axis: 2, epochs: 20, calibrators: [none, temperature]}}
systems: [base, expert_helpful, expert_harmless, expert_honest, oracle, task_arithmetic, mocae]
eval:
  n_helpful: 2
  n_harmful: 2
  n_xstest_safe: 2
  n_truthfulqa: 2
  max_new_tokens: 3
  max_new_tokens_short: 3
  batch_size: 2
  judges: {{helpful: false, harmless: false, honest: false}}
  efficiency: false
  n_boot: 20
efficiency: {{enabled: {efficiency}, new_tokens: 2, repeats: 1, n_prompts: 1, threads: 1}}
"""


@pytest.fixture
def tiny_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("MOCAE_DATA_DIR", str(pipeline_data(tmp_path / "data")))

    def write(efficiency=False):
        path = tmp_path / "tiny.yaml"
        path.write_text(PRESET.format(path=path, efficiency=str(efficiency).lower()))
        return path
    return write


def test_run_then_rerun_reuses_every_stage(tiny_preset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOCAE_CACHE", str(tmp_path / "cache"))  # the efficiency children see it too
    run_dir = run_pipeline(tiny_preset(efficiency=True), run_dir=tmp_path / "run", progress=False)
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert list(results["systems"]) == ["base", "expert_helpful", "expert_harmless", "expert_honest", "oracle",
                                        "task_arithmetic", "mocae"]
    for name, system in results["systems"].items():
        m = system["metrics"]
        assert m["honest"]["mc1"]["n"] == 2 and 0 <= m["harmless"]["safety_score_strmatch"]["value"] <= 100
        assert m["helpful"]["reference_nll"]["value"] > 0
        if name != "oracle":  # measured in a child process of its own
            assert m["efficiency"]["decode_tokens_per_s_b1"]["value"] > 0
            assert m["efficiency"]["weights_mb"]["value"] > 0
            assert system["efficiency"]["torch_threads"] == 1  # the preset's efficiency.threads
            assert system["torch_threads"] == torch.get_num_threads()
    assert results["torch_threads"] == torch.get_num_threads()
    oracle, experts = results["systems"]["oracle"], results["systems"]
    assert oracle["metrics"]["honest"] == experts["expert_honest"]["metrics"]["honest"]
    assert (oracle["metrics"]["harmless"]["over_refusal_xstest"]
            == experts["expert_helpful"]["metrics"]["harmless"]["over_refusal_xstest"])
    change = results["relative_change_mocae_vs_base_pct"]["helpful/reference_nll"]
    assert change["absolute"] == pytest.approx(change["system"] - change["reference"], abs=1e-3)
    calibration = json.loads((run_dir / "router_calibration.json").read_text())
    assert set(calibration["calibrators"]) == {"none", "temperature"}
    summary = (run_dir / "summary.md").read_text()
    assert "| task_arithmetic |" in summary and "| mocae |" in summary
    assert "| expert_harmless |" in capsys.readouterr().out

    def fail(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr("mocae.experts.train.select_examples", fail)
    monkeypatch.setattr("mocae.evaluation.harness.evaluate_system", fail)
    monkeypatch.setattr("mocae.systems.measure_isolated", fail)
    monkeypatch.setattr("mocae.mixture.fit.fit_router", fail)
    assert run_pipeline(tiny_preset(efficiency=True), run_dir=tmp_path / "run", progress=False) == run_dir
    stages = json.loads((run_dir / "stages.json").read_text())["stages"]
    assert {e["status"] for e in stages.values()} == {"reused"} and "efficiency/mocae" in stages
    assert "[stages] reused" in capsys.readouterr().out


def test_interrupted_run_continues(tiny_preset, tmp_path, monkeypatch):
    import mocae.evaluation.harness as harness

    real = harness.evaluate_system
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "evaluate_system", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(tiny_preset(), run_dir=tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "mocae" / "router.safetensors").is_file()  # stages before eval are done

    def fail(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    calls.clear()
    monkeypatch.setattr(harness, "evaluate_system", lambda *a, **k: (calls.append(a[0]), real(*a, **k))[1])
    monkeypatch.setattr("mocae.experts.train.select_examples", fail)
    monkeypatch.setattr("mocae.mixture.fit.fit_router", fail)
    run_pipeline(tiny_preset(), run_dir=tmp_path / "run", progress=False)
    assert calls == ["expert_helpful", "expert_harmless", "expert_honest", "task_arithmetic", "mocae"]  # base kept


def test_presets_load_and_bad_preset_is_named(tmp_path):
    for name in ("quick", "full", "trinityx", "alignx", "h3fusion", "mote"):
        cfg = load_run_config(name)
        assert set(cfg.expert_configs()) == {"helpful", "harmless", "honest"}
        assert "base" in cfg.systems and not cfg.eval.efficiency
    full = load_run_config("full")  # every system of the bench, MoTE included, MoCaE before the baselines
    assert len(full.systems) == 14 and full.systems.index("mocae") < full.systems.index("task_arithmetic")
    assert {e.trainer for e in full.expert_configs().values()} == {"sft", "dpo"}  # DPO where it measured better
    assert load_run_config("h3fusion").expert_configs()["helpful"].target_modules == ["gate_proj", "up_proj",
                                                                                       "down_proj"]
    mote = load_run_config("mote").baselines.mote
    assert (mote.rank, mote.target_modules, mote.learning_rate, mote.batch_size, mote.epochs) == (
        16, "all-linear", 2e-5, 16, 3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nexperts:\n  all: {rank: -1}\n")
    with pytest.raises(ConfigError, match="experts.helpful.*field 'rank'"):
        load_run_config(bad).expert_configs()
    with pytest.raises(FileNotFoundError, match="presets:"):
        load_run_config("no-such-preset")


def test_overrides_and_system_checks():
    cfg = load_run_config("quick", ["eval.n_helpful=7", "systems=[base, mocae]"])
    assert cfg.eval.n_helpful == 7 and cfg.systems == ["base", "mocae"]
    with pytest.raises(ConfigError, match="oracle"):
        load_run_config("quick", ["systems=[base, oracle]"])
    with pytest.raises(ConfigError, match="systems"):
        load_run_config("quick", ["systems=[base, gpt5]"])
    with pytest.raises(ConfigError, match="field 'systems'.*systems is empty: list at least one system"):
        load_run_config("quick", ["systems=[]"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_run_config("quick", ["eval.n_helpful"])


def test_the_mocae_section_selects_routing_pooling_and_top_k_without_moving_default_keys(expert_dirs):
    from mocae.config import config_hash
    from mocae.pipeline import mocae_inputs
    from mocae.stages import stage_key

    experts = {a: Path(p) for a, p in expert_dirs.items()}
    plain = load_run_config("quick", ["backbone=tiny-random"])
    assert "mocae" not in plain.model_dump() and "mocae" not in mocae_inputs(plain, experts)["config"]
    # the quick preset decides per request (top1): token routing has no per-request probabilities
    token = load_run_config("quick", ["backbone=tiny-random", "mocae={routing: token, top_k: 2}", "decision.mode=soft"])
    built = token.mocae_config(expert_dirs)
    assert (built.routing, built.top_k, built.router_input) == ("token", 2, plain.router_input)
    assert config_hash(token) != config_hash(plain)
    assert stage_key(mocae_inputs(token, experts)) != stage_key(mocae_inputs(plain, experts))
    assert load_run_config("quick", ["mocae.pooling=last"]).mocae_config(expert_dirs).pooling == "last"
    for overrides, message in ((["mocae.pooling=median"], "pooling"), (["mocae.feature_layer=3"], "outside the mocae"),
                               (["mocae.routing=token"], "token routing")):  # the preset's top1
        with pytest.raises(ConfigError, match=message):
            load_run_config("quick", overrides)


def test_a_token_routed_mocae_is_built_and_saved_without_router_fitting(expert_dirs, tmp_path, monkeypatch):
    import mocae.mixture.fit as fit_module
    from mocae.mixture.model import MoCaEModel
    from mocae.pipeline import build_mocae

    monkeypatch.setattr(fit_module, "fit_router", lambda *a, **k: pytest.fail("fit_router trains sequence routers"))
    cfg = load_run_config("quick", ["backbone=tiny-random", "mocae={routing: token, top_k: 2}", "decision.mode=soft"])
    out = build_mocae(cfg, {a: Path(p) for a, p in expert_dirs.items()}, tmp_path, progress=False)
    loaded = MoCaEModel.from_pretrained(out)
    assert loaded.mocae_config.routing == "token" and loaded.router.top_k == 2
    assert json.loads((tmp_path / "router_calibration.json").read_text())["fitted"] is False


def test_multitask_config_is_the_union_of_the_experts_data():
    cfg = load_run_config("quick")
    multitask = cfg.multitask_config()
    experts = cfg.expert_configs()
    assert multitask.axis == "multitask" and multitask.rank == experts["helpful"].rank
    assert multitask.union_caps == {a: c.max_examples for a, c in experts.items()}
    assert multitask.axis_config("harmless") == experts["harmless"]  # same data, same cache key


def _system(name, nll, mc1):
    """A result with per-prompt values: NLL on 4 AlpacaEval prompts, MC1 on 10 questions."""
    return {"name": name, "prompt_sets": {"alpaca_eval": "a", "truthfulqa_mc": "t"},
            "metrics": {"helpful": {"reference_nll": {"value": sum(nll) / len(nll)}},
                        "honest": {"mc1": {"value": 100 * sum(mc1) / len(mc1)}}},
            "per_prompt": {"helpful/reference_nll": {"set": "alpaca_eval", "scale": 1.0, "values": nll},
                           "honest/mc1": {"set": "truthfulqa_mc", "scale": 100.0, "values": mc1}}}


def test_relative_change_says_better_only_where_the_paired_interval_excludes_zero():
    results = {"config": {"n_boot": 200, "seed": 0}, "systems": {
        "base": _system("base", [2.0, 2.2, 1.8, 2.0], [1, 0, 0, 1, 0, 1, 0, 0, 1, 0]),
        "mocae": _system("mocae", [1.5, 1.7, 1.3, 1.5], [1, 0, 1, 1, 0, 1, 0, 0, 1, 0])}}
    change = relative_change(results)
    nll, mc1 = change["helpful/reference_nll"], change["honest/mc1"]
    # NLL falls by 0.5 on every prompt: a paired interval of exactly [-0.5, -0.5], lower is better.
    assert nll["relative_pct"] == -25.0 and nll["ci"] == pytest.approx([-0.5, -0.5]) and nll["verdict"] == "better"
    # MC1 +10 points from one question of ten: the interval spans zero.
    assert mc1["absolute"] == pytest.approx(10.0) and mc1["ci"][0] <= 0 <= mc1["ci"][1]
    assert mc1["verdict"] == "within noise"
    del results["systems"]["mocae"]["per_prompt"]["honest/mc1"]
    assert relative_change(results)["honest/mc1"]["verdict"] == "no paired interval"


def test_run_interrupted_in_the_baselines_stage_continues(tiny_preset, tmp_path, monkeypatch):
    import mocae.baselines.h3fusion as h3fusion

    preset = tiny_preset()
    overrides = ["systems=[base, expert_helpful, expert_harmless, expert_honest, h3fusion, mocae]",
                 "baselines.h3fusion.steps=1", "baselines.fusion_examples_per_axis=2"]
    real = h3fusion.fit_h3fusion

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(h3fusion, "fit_h3fusion", crash)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(preset, run_dir=tmp_path / "run", progress=False, overrides=overrides)
    assert (tmp_path / "run" / "mocae" / "router.safetensors").is_file()
    assert not (tmp_path / "run" / "h3fusion").exists()

    def fail(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(h3fusion, "fit_h3fusion", real)
    monkeypatch.setattr("mocae.experts.train.select_examples", fail)
    monkeypatch.setattr("mocae.mixture.fit.fit_router", fail)
    run_dir = run_pipeline(preset, run_dir=tmp_path / "run", progress=False, overrides=overrides)
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert "h3fusion" in results["systems"] and (run_dir / "h3fusion_training.json").is_file()


# ---- re-running one run folder after a config change -------------------------------------------
@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """One tiny run (no efficiency), made once for the tests below; each re-runs a copy of it."""
    root = tmp_path_factory.mktemp("shared")
    preset = root / "tiny.yaml"
    preset.write_text(PRESET.format(path=preset, efficiency="false"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOCAE_DATA_DIR", str(pipeline_data(root / "data")))
        mp.setenv("MOCAE_CACHE", str(root / "cache"))
        run_pipeline(preset, run_dir=root / "run", progress=False)
    return root


class Rerun:
    """A copy of the shared run folder, re-run with overrides; records what was computed again."""

    def __init__(self, root: Path, run_dir: Path, monkeypatch):
        import mocae.evaluation.harness as harness
        import mocae.experts.train as train
        import mocae.mixture.fit as fit

        self.preset, self.run_dir = root / "tiny.yaml", run_dir
        self.trained, self.fitted, self.evaluated = [], [], []
        shutil.copytree(root / "run", run_dir)  # copy2: file times are kept
        self.before = json.loads((run_dir / "eval" / "results.json").read_text())
        monkeypatch.setenv("MOCAE_DATA_DIR", str(root / "data"))
        monkeypatch.setenv("MOCAE_CACHE", str(root / "cache"))  # the experts trained by the shared run
        for module, name, calls, arg in ((train, "select_examples", self.trained, lambda a: a[0].axis),
                                         (fit, "fit_router", self.fitted, lambda a: "router"),
                                         (harness, "evaluate_system", self.evaluated, lambda a: a[0])):
            real = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _real=real, _calls=calls, _arg=arg, **k:
                                (_calls.append(_arg(a)), _real(*a, **k))[1])

    def __call__(self, *overrides: str, force: bool = False, lazy: bool = False) -> dict:
        run_pipeline(self.preset, run_dir=self.run_dir, progress=False, overrides=list(overrides), force=force,
                     lazy=lazy)
        return json.loads((self.run_dir / "stages.json").read_text())["stages"]

    def row(self, name: str) -> Path:
        (path,) = (self.run_dir / "eval" / "systems").glob(f"{name}-*.json")
        return path

    def results(self) -> dict:
        return json.loads((self.run_dir / "eval" / "results.json").read_text())


@pytest.fixture
def rerun(shared_run, tmp_path, monkeypatch):
    return Rerun(shared_run, tmp_path / "run", monkeypatch)


def _recomputed(stages: dict) -> dict:
    return {name: e["reason"] for name, e in stages.items() if e["status"] == "computed"}


def test_changed_expert_recomputes_it_the_router_and_every_system_built_from_it_only(rerun, capsys):
    row_mtimes = {p.name: p.stat().st_mtime_ns for p in (rerun.run_dir / "eval" / "systems").iterdir()}
    stages = rerun("experts.helpful.max_examples=2")
    assert rerun.trained == ["helpful"] and rerun.fitted == ["router"]
    assert rerun.evaluated == ["expert_helpful", "task_arithmetic", "mocae"]
    recomputed = _recomputed(stages)
    assert set(recomputed) == {"experts/helpful", "mocae", "eval/expert_helpful", "eval/task_arithmetic",
                               "eval/mocae"}
    assert recomputed["experts/helpful"] == "changed: config.max_examples"
    assert recomputed["mocae"] == "changed: experts.helpful"
    assert recomputed["eval/expert_helpful"] == "changed: model"
    for name in ("experts/harmless", "experts/honest", "eval/base", "eval/expert_harmless", "eval/expert_honest"):
        assert stages[name]["status"] == "reused", name
    for name in ("base", "expert_harmless", "expert_honest"):  # reused rows were not rewritten
        assert rerun.row(name).stat().st_mtime_ns == row_mtimes[rerun.row(name).name]
    after = rerun.results()
    for name in ("expert_helpful", "mocae"):  # new weights, new rows: never the old result under a new name
        assert after["systems"][name]["model_id"] != rerun.before["systems"][name]["model_id"]
    assert after["systems"]["base"] == rerun.before["systems"]["base"]
    assert after["recomputed_stages"] == recomputed
    new_expert = Path(json.loads((rerun.run_dir / "experts.json").read_text())["helpful"]["path"])
    record = json.loads((new_expert / "stage.json").read_text())
    assert record["inputs"]["config"]["max_examples"] == 2 and "alpaca/alpaca_5000.json" in record["inputs"]["data"]
    out = capsys.readouterr().out
    assert "experts.helpful.max_examples: 'unset' -> 2" in out
    assert "[stages] recomputed mocae: changed: experts.helpful" in out


def test_changed_router_setting_recomputes_the_router_and_the_mocae_row_only(rerun):
    stages = rerun("router.epochs=5")
    assert rerun.trained == [] and rerun.fitted == ["router"] and rerun.evaluated == ["mocae"]
    assert _recomputed(stages) == {"mocae": "changed: config.router.epochs", "eval/mocae": "changed: model"}
    calibration = json.loads((rerun.run_dir / "router_calibration.json").read_text())
    assert calibration["router_loss"]["epochs"] == 5


def test_a_lazy_rerun_without_the_router_folder_reuses_its_evaluation_and_trains_nothing(rerun):
    shutil.rmtree(rerun.run_dir / "mocae")  # a fresh machine: the evaluation was restored, the weights were not
    rerun(lazy=True)
    assert rerun.fitted == [] and rerun.evaluated == [] and not (rerun.run_dir / "mocae").exists()
    assert rerun.results()["systems"]["mocae"] == rerun.before["systems"]["mocae"]
    rerun("router.epochs=5", lazy=True)  # a changed router is built, then evaluated
    assert rerun.fitted == ["router"] and rerun.evaluated == ["mocae"] and (rerun.run_dir / "mocae").is_dir()


def test_corrupt_cached_result_is_evaluated_again_with_a_warning(rerun):
    row = rerun.row("expert_honest")
    row.write_text('{"name": "expert_honest", "metrics": ')
    with pytest.warns(UserWarning, match=f"evaluation cache {row}"):
        stages = rerun()
    assert rerun.evaluated == ["expert_honest"] and set(_recomputed(stages)) == {"eval/expert_honest"}
    assert json.loads(row.read_text())["metrics"] == rerun.before["systems"]["expert_honest"]["metrics"]


def test_cached_rows_of_another_thread_count_are_named(rerun):
    row = rerun.row("base")
    result = json.loads(row.read_text())
    row.write_text(json.dumps({**result, "torch_threads": 99}))
    with pytest.warns(UserWarning, match=r"cached results of base \(99 threads\)"):
        rerun()
    assert rerun.evaluated == [] and rerun.results()["other_thread_counts"] == {"base": 99}


def test_backbone_change_is_refused_without_force(rerun, monkeypatch, capsys):
    from mocae import pipeline
    from mocae.cli import main

    config = (rerun.run_dir / "config.json").read_text()
    with pytest.raises(StaleRunError, match=r"another backbone.*backbone: 'tiny-random' -> 'smollm2-135m'.*--force"):
        rerun("backbone=smollm2-135m")
    assert (rerun.run_dir / "config.json").read_text() == config
    assert main(["run", "--preset", str(rerun.preset), "--run-dir", str(rerun.run_dir), "--no-progress",
                 "--set", "backbone=smollm2-135m"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mocae: error: ") and "--force" in err and "Traceback" not in err

    class Proceeded(Exception):
        pass

    def stop(*args, **kwargs):
        raise Proceeded

    monkeypatch.setattr(pipeline, "train_experts", stop)  # past the check: nothing real is trained
    with pytest.raises(Proceeded):
        rerun("backbone=smollm2-135m", force=True)
    assert json.loads((rerun.run_dir / "config.json").read_text())["backbone"] == "smollm2-135m"


def test_invalid_config_writes_nothing(tiny_preset, tmp_path):
    with pytest.raises(ConfigError, match=r"experts.honest.*field 'rank'"):
        run_pipeline(tiny_preset(), run_dir=tmp_path / "bad", progress=False, overrides=["experts.honest.rank=0"])
    with pytest.raises(ConfigError, match="systems is empty"):
        run_pipeline(tiny_preset(), run_dir=tmp_path / "bad", progress=False, overrides=["systems=[]"])
    assert not (tmp_path / "bad").exists()


def test_efficiency_rows_are_keyed_by_the_system_and_checked_on_read(tmp_path, monkeypatch):
    from mocae.pipeline import measure_systems

    cfg = load_run_config("quick", ["systems=[base, mocae]"])
    measured = []

    def measure(name, *args, **kwargs):
        measured.append(name)
        return {"weights_mb": 1.0, "torch_threads": {"base": 1, "mocae": 2}[name]}

    monkeypatch.setattr("mocae.systems.measure_isolated", measure)
    with pytest.warns(UserWarning, match=r"different torch thread counts: \{'base': 1, 'mocae': 2\}"):
        first = measure_systems(cfg, tmp_path, ["hi"], {"base": "b1", "mocae": "m1"})
    assert measured == ["base", "mocae"] and first["mocae"]["torch_threads"] == 2
    with pytest.warns(UserWarning):
        measure_systems(cfg, tmp_path, ["hi"], {"base": "b1", "mocae": "m1"})
    assert measured == ["base", "mocae"]  # cached
    (row,) = (tmp_path / "efficiency").glob("base-*.json")
    row.write_text("[1, 2")
    with pytest.warns(UserWarning, match=f"efficiency cache {row}: cut off"):
        measure_systems(cfg, tmp_path, ["hi"], {"base": "b1", "mocae": "m2"})  # and a changed mocae
    assert measured == ["base", "mocae", "base", "mocae"]
