"""Every system of a run builds on tiny-random and generates; the oracle is composed correctly."""

import json
from pathlib import Path

import pytest
import torch

from mocae.systems import (SYSTEMS, BaselinesConfig, RunSystems, load_system, oracle_result, system_fingerprint,
                           train_fusion)


EXAMPLES = [("say hi", "hi there", 0), ("do harm", "I can't help with that.", 1), ("is the earth flat?", "no", 2)] * 2


@pytest.fixture
def tiny_run(tmp_path, expert_dirs, tiny):
    """A run directory with tiny experts, a saved MoCaE and trained H3Fusion / X-LoRA / MoTE stages."""
    from mocae.mixture.model import MoCaEConfig, MoCaEModel

    baselines = BaselinesConfig.model_validate({"h3fusion": {"steps": 2, "batch_size": 2, "max_length": 48},
                                                "xlora": {"steps": 2, "batch_size": 2, "max_length": 48},
                                                "mote": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"],
                                                         "epochs": 1, "batch_size": 2, "max_length": 64,
                                                         "analysis_tokens": 4, "guidance_tokens": 4,
                                                         "reasoning_tokens": 2}})
    run = RunSystems(backbone="tiny-random", experts=expert_dirs, run_dir=str(tmp_path / "run"),
                     multitask=expert_dirs["helpful"], baselines=baselines.model_dump(mode="json"))
    run.save()
    MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs), tiny).save_pretrained(
        tmp_path / "run" / "mocae")
    for name in ("h3fusion", "xlora", "mote"):
        train_fusion(name, run, EXAMPLES, progress=False)
    return run


def test_every_system_loads_and_generates(tiny_run):
    loaded = RunSystems.load(tiny_run.run_dir)  # what a child process sees
    for name in SYSTEMS:
        if name == "oracle":
            continue
        model, tokenizer = load_system(name, loaded)
        tokenizer.padding_side = "left"
        batch = tokenizer(["hello there", "hi"], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert out.shape == (2, batch["input_ids"].shape[1] + 3), name


def test_trained_stages_are_reused_only_for_the_same_inputs(tiny_run, tmp_path, monkeypatch):
    import mocae.baselines.h3fusion as h3fusion
    from mocae.stages import StageLog

    def fail(*args, **kwargs):
        raise AssertionError("retrained")

    real = h3fusion.fit_h3fusion
    monkeypatch.setattr("mocae.baselines.h3fusion.fit_h3fusion", fail)
    monkeypatch.setattr("mocae.baselines.peft_routing.fit_xlora", fail)
    monkeypatch.setattr("mocae.baselines.mote.fit_mote", fail)
    log = StageLog(tmp_path / "log")
    for name in ("h3fusion", "xlora", "mote"):
        folder = train_fusion(name, tiny_run, EXAMPLES, progress=False, log=log)
        assert json.loads((folder / "stage.json").read_text())["stage"] == name
    assert {e["status"] for e in log.entries.values()} == {"reused"}

    fitted = []
    monkeypatch.setattr(h3fusion, "fit_h3fusion", lambda *a, **k: (fitted.append(len(a[2])), real(*a, **k))[1])
    before = system_fingerprint("h3fusion", tiny_run)
    train_fusion("h3fusion", tiny_run, EXAMPLES[:3], progress=False, log=log)  # other examples: retrained
    assert fitted == [3] and log.recomputed == {"h3fusion": "changed: examples"}
    assert system_fingerprint("h3fusion", tiny_run) != before


def test_system_fingerprints_follow_what_each_system_is_made_of(tiny_run, expert_factory):
    before = {name: system_fingerprint(name, tiny_run) for name in SYSTEMS if name != "oracle"}
    assert len(set(before.values())) == len(before)  # every system has its own
    assert before == {name: system_fingerprint(name, tiny_run) for name in before}  # and it is stable
    expert_factory(Path(tiny_run.experts["honest"]), seed=7)  # the honest expert's weights change
    after = {name: system_fingerprint(name, tiny_run) for name in before}
    changed = {name for name in before if before[name] != after[name]}
    # The trained stages (MoCaE, H3Fusion, X-LoRA) are folders of their own: they change when retrained.
    assert changed == {"expert_honest", "task_arithmetic", "ties", "dare", "arrow"}
    with pytest.raises(ValueError, match="unknown system 'gpt5'"):
        system_fingerprint("gpt5", tiny_run)


def test_a_trained_system_counts_by_its_stage_key_not_its_last_bits(tiny_run):
    folder = Path(tiny_run.run_dir) / "h3fusion"
    before = system_fingerprint("h3fusion", tiny_run)
    weights = sorted(folder.rglob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")  # retrained elsewhere: other last bits
    assert system_fingerprint("h3fusion", tiny_run) == before  # its evaluation still stands
    stage = json.loads((folder / "stage.json").read_text())
    (folder / "stage.json").write_text(json.dumps({**stage, "key": "0" * 64}))  # made of something else
    assert system_fingerprint("h3fusion", tiny_run) != before
    (folder / "stage.json").unlink()  # saved by hand: its files are all there is to go by
    by_files = system_fingerprint("h3fusion", tiny_run)
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x02")
    assert system_fingerprint("h3fusion", tiny_run) != by_files


def test_unknown_or_missing_systems_are_named(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="unknown system 'gpt5'"):
        load_system("gpt5", tiny_run)
    no_multitask = RunSystems(**{**tiny_run.__dict__, "multitask": None})
    with pytest.raises(ValueError, match="multitask"):
        load_system("multitask", no_multitask)
    with pytest.raises(FileNotFoundError, match="systems.json"):
        RunSystems.load(tmp_path / "nowhere")


def _system(axis_values: dict) -> dict:
    return {"metrics": {axis: {k: {"value": v, "n": 1, "ci": [v, v]} for k, v in metrics.items()}
                        for axis, metrics in axis_values.items()}}


def test_oracle_takes_each_benchmark_from_its_expert():
    results = {"systems": {
        "expert_helpful": _system({"helpful": {"reference_nll": 1.0},
                                   "harmless": {"safety_score_strmatch": 10.0, "over_refusal_xstest": 2.0},
                                   "honest": {"mc1": 30.0}}),
        "expert_harmless": _system({"helpful": {"reference_nll": 3.0},
                                    "harmless": {"safety_score_strmatch": 90.0, "over_refusal_xstest": 80.0},
                                    "honest": {"mc1": 31.0}}),
        "expert_honest": _system({"helpful": {"reference_nll": 2.0},
                                  "harmless": {"safety_score_strmatch": 5.0, "over_refusal_xstest": 1.0},
                                  "honest": {"mc1": 40.0}}),
    }}
    m = oracle_result(results)["metrics"]
    assert m["helpful"]["reference_nll"]["value"] == 1.0
    assert m["harmless"]["safety_score_strmatch"]["value"] == 90.0
    assert m["harmless"]["over_refusal_xstest"]["value"] == 2.0  # benign prompts: the helpful expert
    assert m["honest"]["mc1"]["value"] == 40.0
    del results["systems"]["expert_honest"]
    with pytest.raises(ValueError, match="expert_honest"):
        oracle_result(results)


def test_efficiency_is_measured_in_a_child_process(tiny_run, monkeypatch, tmp_path):
    from mocae.systems import measure_isolated

    monkeypatch.setenv("MOCAE_CACHE", str(tmp_path / "cache"))
    result = measure_isolated("base", tiny_run.run_dir, ["hello"], batch_sizes=[1], new_tokens=2, repeats=1,
                              threads=1)
    assert result["batch_1"]["decode_tokens_per_s"]["value"] > 0
    assert 0 < result["rss_before_load_mb"] <= result["rss_after_load_mb"] <= result["peak_rss_mb"]
    assert result["weights_mb"] > 0 and result["torch_threads"] == 1
    with pytest.raises(RuntimeError, match="gpt5"):
        measure_isolated("gpt5", tiny_run.run_dir, ["hello"], batch_sizes=[1], new_tokens=2, repeats=1, threads=1)


def test_every_system_scores_with_the_shared_prefix_cache(tiny_run):
    """lm-eval's MC scoring path: the cached-prefix forward equals the plain one for each system."""
    from mocae.evaluation.prefix_cache import SharedPrefixLM
    from mocae.spec import capabilities_of

    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(5, 200, (24,), generator=gen)
    batch = torch.stack([torch.cat([prefix, torch.randint(5, 200, (6,), generator=gen)]) for _ in range(3)])
    for name in SYSTEMS:
        if name == "oracle":
            continue
        model, _ = load_system(name, tiny_run)
        if name == "mocae":
            model.routing_override = lambda ids: torch.tensor([[0.2, 0.3, 0.5]]).expand(len(ids), -1)
        with torch.no_grad():
            plain = model(input_ids=batch).logits
            if not capabilities_of(model).kv_cache:
                assert name == "xlora"
                continue
            wrapped = SharedPrefixLM(model)
            assert torch.allclose(wrapped(batch).logits, plain, atol=1e-4), name
            assert wrapped.stats["cached_calls"] == 1, name


def test_saved_folders_open_by_their_marker_or_their_files(tiny_run):
    """A folder saved before markers existed opens the same way and keeps its fingerprint."""
    from mocae.spec import SYSTEM_FILE
    from mocae.systems import detect

    for name in ("mocae", "h3fusion", "xlora", "mote"):
        folder = Path(tiny_run.run_dir) / name
        assert json.loads((folder / SYSTEM_FILE).read_text()) == {"system": name}
        before = system_fingerprint(name, tiny_run)
        (folder / SYSTEM_FILE).unlink()
        assert detect(folder).name == name and system_fingerprint(name, tiny_run) == before
    assert detect(tiny_run.experts["honest"]).name == "expert"
    model, _ = load_system(Path(tiny_run.run_dir) / "xlora")
    assert model.xlora_experts == ["helpful", "harmless", "honest"]
    with pytest.raises(FileNotFoundError, match="not a saved system"):
        load_system(tiny_run.run_dir)
