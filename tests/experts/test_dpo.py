"""DPO experts on tiny-random and the fixture data: training, resume, the saved adapter, config checks."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import TrainerCallback

from mocae.backbones import load_backbone
from mocae.config import ConfigError, config_hash, validate_config
from mocae.experts.config import DPO_FIELDS, ExpertConfig, MultitaskConfig
from mocae.experts.dpo import dpo_config, to_dpo_rows, train_dpo_expert
from mocae.experts.preference import preference_rows
from mocae.experts.train import expert_dir, is_trained, latest_checkpoint, train_expert

FIXTURE_DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def tiny_dpo(**overrides) -> ExpertConfig:
    base = dict(axis="honest", backbone="tiny-random", trainer="dpo", rank=4, alpha=8, max_length=64,
                batch_size=1, epochs=1, save_steps=2, bf16=False, learning_rate=1e-2, max_pairs=6,
                pairs_per_question=2, warmup_ratio=0.0)
    return ExpertConfig(**{**base, **overrides})


class StopAfter(TrainerCallback):
    """Simulates a crash right after a checkpoint was written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise KeyboardInterrupt("simulated interruption")


def preference_data(tmp_path: Path) -> Path:
    """The fixtures plus AlpacaEval annotations covering every side of the split (as in test_preference)."""
    import shutil

    from tiny_judges import write_fixture_data

    root = tmp_path / "data"
    shutil.copytree(FIXTURE_DATA, root)
    judges = write_fixture_data(tmp_path / "judges", n_instructions=20)
    (root / "alpaca_eval" / "reference_gpt4_1106_preview.json").unlink()
    for name in ("reference_text_davinci_003.json", "annotations_alpaca_eval_gpt4_vs_davinci003.jsonl.gz"):
        shutil.copy(judges / "alpaca_eval" / name, root / "alpaca_eval" / name)
    return root


def adapter_weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


def test_dpo_expert_trains_saves_a_peft_adapter_and_its_record(tmp_path):
    cfg = tiny_dpo(rpo_alpha=0.5)
    out = train_expert(cfg, root=tmp_path, data_dir=FIXTURE_DATA, progress=False)  # dispatches on trainer
    assert out == expert_dir(cfg, tmp_path, FIXTURE_DATA) and is_trained(out)
    assert not (out / "checkpoints").exists()
    record = json.loads((out / "training.json").read_text())
    rows = preference_rows(cfg, FIXTURE_DATA)
    assert record["trainer"] == "dpo" and record["axis"] == "honest"
    assert record["data"]["pairs"] == len(rows) == 6 and record["data"]["by_source"] == {"truthfulqa": 6}
    assert record["data"]["preference_sources"] == ["truthfulqa"]
    assert record["beta"] == 0.1 and record["rpo_alpha"] == 0.5
    assert record["steps"] == 6 and len(record["loss_curve"]) == 6
    assert all(0 <= p["accuracy"] <= 1 for p in record["reward_accuracy_curve"])
    assert record["wall_time_s"] >= 0 and record["config"]["trainer"] == "dpo"
    # the keys the pipeline copies into experts.json from every expert's record
    assert {"data", "steps", "tokens_per_s", "wall_time_s", "peak_rss_mb"} <= set(record)
    assert record["tokens_trained"] > 0 and record["tokens_per_s"] > 0 and record["peak_rss_mb"] > 0
    # A plain peft adapter, loadable under the expert's own name, that moved away from init
    # (LoRA B starts at zero) and from the base model.
    weights = adapter_weights(out)
    assert weights and not any(".ref." in k or ".default." in k for k in weights)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())
    base, _ = load_backbone("tiny-random")
    ids = torch.tensor([[5, 6, 7, 8]])
    before = base(ids).logits
    model = PeftModel.from_pretrained(base, str(out), adapter_name="honest")
    assert list(model.peft_config) == ["honest"]
    assert not torch.allclose(model(ids).logits, before)
    # reused, not retrained
    stamp = (out / "training.json").stat().st_mtime_ns
    assert train_expert(cfg, root=tmp_path, data_dir=FIXTURE_DATA, progress=False) == out
    assert (out / "training.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("init", ["zero", "sft_twin"])
def test_dpo_resume_after_interruption_matches_uninterrupted(tmp_path, init):
    cfg = tiny_dpo(dpo_init=init)
    with pytest.raises(KeyboardInterrupt):
        train_dpo_expert(cfg, root=tmp_path / "a", data_dir=FIXTURE_DATA, progress=False, callbacks=[StopAfter(4)])
    partial = expert_dir(cfg, tmp_path / "a", FIXTURE_DATA)
    assert not is_trained(partial)
    assert latest_checkpoint(partial / "checkpoints").name == "checkpoint-4"
    resumed = train_dpo_expert(cfg, root=tmp_path / "a", data_dir=FIXTURE_DATA, progress=False)
    record = json.loads((resumed / "training.json").read_text())
    assert record["resumed_from"] == "checkpoint-4"

    straight = train_dpo_expert(cfg, root=tmp_path / "b", data_dir=FIXTURE_DATA, progress=False)
    assert record["steps"] == json.loads((straight / "training.json").read_text())["steps"] == 6
    a, b = adapter_weights(resumed), adapter_weights(straight)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_dpo_config_follows_the_expert_config(tmp_path):
    plain = dpo_config(tiny_dpo(), tmp_path)
    assert plain.loss_type == ["sigmoid"] and plain.beta == 0.1 and plain.learning_rate == 1e-2
    assert not plain.gradient_checkpointing and plain.use_cpu and plain.save_steps == 2
    rpo = dpo_config(tiny_dpo(rpo_alpha=1.0, beta=0.3, bf16=True), tmp_path)
    assert rpo.loss_type == ["sigmoid", "sft"] and rpo.loss_weights == [1.0, 1.0]
    assert rpo.beta == 0.3 and rpo.bf16


def test_dpo_rows_are_conversational_with_optional_injection():
    rows = [{"prompt": "q?", "chosen": "yes", "rejected": "no", "source": "truthfulqa", "axis": "honest"}]
    out = to_dpo_rows(rows, inject_prompt=True)[0]
    assert out["prompt"][0]["role"] == "user" and out["prompt"][0]["content"].endswith("q?")
    assert out["prompt"][0]["content"] != "q?"
    assert out["chosen"] == [{"role": "assistant", "content": "yes"}]
    assert to_dpo_rows(rows, inject_prompt=False)[0]["prompt"][0]["content"] == "q?"


@pytest.mark.parametrize("field, value", [
    ("beta", 0), ("beta", -0.1), ("rpo_alpha", -1.0), ("rpo_alpha", 0), ("pairs_per_question", 0),
    ("max_pairs", 0), ("base_answer_tokens", 0), ("trainer", "ppo")])
def test_dpo_knobs_reject_nonsense(field, value):
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        validate_config(ExpertConfig, {"axis": "honest", "trainer": "dpo", field: value}, source="cfg.yaml")


def test_dpo_only_knobs_and_sources_are_checked():
    with pytest.raises(ConfigError, match="beta only apply when trainer is 'dpo'"):
        validate_config(ExpertConfig, {"axis": "honest", "beta": 0.2}, source="cfg.yaml")
    with pytest.raises(ConfigError, match="preference_sources for axis 'honest'"):
        validate_config(ExpertConfig, {"axis": "honest", "trainer": "dpo",
                                       "preference_sources": ["alpaca_eval_gpt4"]}, source="cfg.yaml")
    with pytest.raises(ConfigError, match="preference_sources"):
        validate_config(ExpertConfig, {"axis": "harmless", "trainer": "dpo", "preference_sources": []}, source="c")
    with pytest.raises(ConfigError, match="packing is SFT only"):
        validate_config(ExpertConfig, {"axis": "helpful", "trainer": "dpo", "packing": True}, source="c")
    with pytest.raises(ConfigError, match="multi-task baseline is SFT only"):
        validate_config(MultitaskConfig, {"trainer": "dpo"}, source="c")
    ok = ExpertConfig(axis="harmless", trainer="dpo", preference_sources=["answer_over_refusal"])
    assert ok.pair_sources() == ["answer_over_refusal"]
    assert ExpertConfig(axis="harmless", trainer="dpo").pair_sources() == [
        "refusal_over_compliance", "answer_over_refusal"]


def test_sft_configs_keep_their_cache_key():
    sft = ExpertConfig(axis="helpful")
    assert not set(DPO_FIELDS) & set(sft.model_dump())  # dumped (and hashed) as before DPO existed
    assert config_hash(sft) == config_hash(ExpertConfig(axis="helpful", trainer="sft"))
    dpo = ExpertConfig(axis="helpful", trainer="dpo")
    assert config_hash(dpo) != config_hash(sft)
    assert config_hash(ExpertConfig(axis="helpful", trainer="dpo", beta=0.2)) != config_hash(dpo)
    assert ExpertConfig.model_validate_json(dpo.model_dump_json()) == dpo


def test_the_sft_twin_knobs_are_checked_and_keep_dpo_cache_keys():
    with pytest.raises(ConfigError, match="harmless axis only"):
        validate_config(ExpertConfig, {"axis": "honest", "trainer": "dpo", "harmless_chosen": "sft_twin"}, source="c")
    with pytest.raises(ConfigError, match="twin_learning_rate only applies when harmless_chosen or dpo_init"):
        validate_config(ExpertConfig, {"axis": "harmless", "trainer": "dpo", "twin_learning_rate": 1e-4}, source="c")
    with pytest.raises(ConfigError, match="harmless_chosen only apply when trainer is 'dpo'"):
        validate_config(ExpertConfig, {"axis": "harmless", "harmless_chosen": "sft_twin"}, source="c")
    dpo = ExpertConfig(axis="harmless", trainer="dpo", learning_rate=5e-5, benign_fraction=0.5)
    assert not {"harmless_chosen", "dpo_init", "twin_learning_rate"} & set(dpo.model_dump())  # cached keys stay
    assert config_hash(dpo.model_copy(update={"dpo_init": "sft_twin"})) != config_hash(dpo)
    twin_dpo = dpo.model_copy(update={"harmless_chosen": "sft_twin"})
    assert config_hash(twin_dpo) != config_hash(dpo)
    # the twin is exactly the SFT expert on the same fields at the twin's learning rate (shares its cache)
    assert config_hash(twin_dpo.sft_twin()) == config_hash(ExpertConfig(axis="harmless", benign_fraction=0.5))
    assert twin_dpo.sft_twin().trainer == "sft"


def test_a_harmless_dpo_expert_on_its_sft_twins_refusals(tmp_path, monkeypatch):
    root = preference_data(tmp_path)
    calls = []

    def answer(model, tok, prompts, max_new_tokens, **kw):  # the twin (a PeftModel) refuses, the base complies
        twin = isinstance(model, PeftModel)
        calls.append(twin)
        return [f"I'm sorry, I cannot help with {p[:12]}" if twin else f"Sure: {p[:16]}" for p in prompts]

    monkeypatch.setattr("mocae.generation.generate_batch", answer)
    cfg = tiny_dpo(axis="harmless", max_pairs=4, rpo_alpha=1.0, benign_fraction=0.5, benign_sources=["truthfulqa"],
                   harmless_chosen="sft_twin", twin_learning_rate=1e-2)
    experts = tmp_path / "experts"
    out = train_dpo_expert(cfg, root=experts, data_dir=root, progress=False)
    twin_dir = expert_dir(cfg.sft_twin(), experts, root)
    assert is_trained(twin_dir) and calls == [False, True]
    record = json.loads((out / "training.json").read_text())
    assert record["harmless_chosen"] == "sft_twin" and record["sft_twin"] == twin_dir.name
    rows = preference_rows(cfg, root, root=experts)  # cached: nothing generated or trained again
    assert calls == [False, True]
    assert all(r["chosen"].startswith("I'm sorry") for r in rows if r["source"] == "safety_refusals")
    assert all(r["rejected"].startswith("I'm sorry") for r in rows if r["source"] == "truthfulqa")
    cached = [json.loads(p.read_text()) for p in (experts / "tiny-random" / "base_answers").glob("*.json")]
    assert sorted(str(c["adapter"]) for c in cached) == sorted(["None", twin_dir.name])


def test_dpo_from_the_sft_twin_starts_at_its_adapter_with_it_as_reference(tmp_path):
    cfg = tiny_dpo(dpo_init="sft_twin", max_pairs=4, learning_rate=1e-1, twin_learning_rate=1e-2)
    experts = tmp_path / "experts"
    seen = {}

    class AtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["adapters"] = set(model.peft_config)
            seen["default"] = {k: v.detach().clone() for k, v in model.named_parameters() if ".default." in k}

    out = train_dpo_expert(cfg, root=experts, data_dir=FIXTURE_DATA, progress=False, callbacks=[AtStart()])
    twin = expert_dir(cfg.sft_twin(), experts, FIXTURE_DATA)
    assert is_trained(twin) and json.loads((out / "training.json").read_text())["sft_twin"] == twin.name
    assert seen["adapters"] == {"default", "ref"}  # trl's frozen copy of the starting adapter is the reference
    start, twin_w, trained = seen["default"], adapter_weights(twin), adapter_weights(out)
    assert len(start) == len(twin_w) == len(trained)
    for name, value in twin_w.items():  # DPO began at the twin's weights and moved away from them
        assert torch.equal(start[name.replace(".weight", ".default.weight")], value)
    assert any(not torch.allclose(trained[n], twin_w[n]) for n in twin_w)
    # saved as a plain root-level adapter (no "ref" left in it)
    assert not any(".ref." in n for n in trained)


def test_helpful_and_harmless_dpo_experts_train_end_to_end(tmp_path, monkeypatch):
    root = preference_data(tmp_path)
    # tiny-random answers with nothing (no pair could be made): stand in compliant base answers
    monkeypatch.setattr("mocae.generation.generate_batch",
                        lambda model, tok, prompts, max_new_tokens, **kw: [f"Sure: {p[:16]}" for p in prompts])
    for axis, extra in (("helpful", {}), ("harmless", {"rpo_alpha": 1.0, "benign_fraction": 0.5,
                                                       "benign_sources": ["truthfulqa"]})):
        cfg = tiny_dpo(axis=axis, max_pairs=4, **extra)
        out = train_dpo_expert(cfg, root=tmp_path / "experts", data_dir=root, progress=False)
        record = json.loads((out / "training.json").read_text())
        assert record["trainer"] == "dpo" and record["data"]["pairs"] == 4
        # trl drops a pair whose prompt alone fills max_length (one fixture refusal prompt does)
        assert 0 < record["data"]["pairs_trained"] <= 4 and record["steps"] == record["data"]["pairs_trained"]
        assert sum(record["data"]["by_source"].values()) == 4
    assert set(record["data"]["by_source"]) == {"safety_refusals", "truthfulqa"}
    assert list((tmp_path / "experts" / "tiny-random" / "base_answers").glob("*.json"))


def test_dpo_preset_trains_every_expert_with_dpo_honest_on_the_measured_recipe():
    from mocae.pipeline import load_run_config

    experts = load_run_config("dpo").expert_configs()
    assert {c.trainer for c in experts.values()} == {"dpo"}
    honest = experts["honest"]
    assert (honest.learning_rate, honest.batch_size, honest.epochs, honest.beta, honest.pairs_per_question,
            honest.rpo_alpha) == (2e-4, 8, 1, 0.1, 3, None)
    assert experts["harmless"].rpo_alpha == 1.0 and experts["harmless"].pair_sources() == [
        "refusal_over_compliance", "answer_over_refusal"]


def test_a_dpo_expert_goes_through_the_pipeline_into_mocae(tmp_path, monkeypatch):
    """experts.json and the MoCaE build read a DPO expert's folder and record as they read SFT ones."""
    from mocae.pipeline import run_pipeline

    monkeypatch.setenv("MOCAE_DATA_DIR", str(FIXTURE_DATA))
    preset = tmp_path / "tiny_dpo.yaml"
    preset.write_text("""\
name: tiny-dpo
backbone: tiny-random
experts:
  all: {rank: 2, alpha: 4, max_examples: 3, max_length: 64, batch_size: 2, bf16: false}
  honest: {trainer: dpo, max_pairs: 4, learning_rate: 1.0e-2}
router: {n_per_axis: 4, n_test_per_axis: 2, epochs: 5, calibrators: [temperature]}
systems: [base, expert_honest, mocae]
eval:
  n_helpful: 2
  n_harmful: 2
  n_xstest_safe: 2
  n_truthfulqa: 2
  max_new_tokens: 2
  max_new_tokens_short: 2
  batch_size: 2
  judges: {helpful: false, harmless: false, honest: false}
  efficiency: false
  n_boot: 10
efficiency: {enabled: false}
""")
    run_dir = run_pipeline(preset, run_dir=tmp_path / "run", progress=False)
    experts = json.loads((run_dir / "experts.json").read_text())
    assert experts["honest"]["data"]["pairs"] == 4 and "examples" in experts["helpful"]["data"]
    honest = json.loads((Path(experts["honest"]["path"]) / "training.json").read_text())
    assert honest["trainer"] == "dpo"
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(results["systems"]) == {"base", "expert_honest", "mocae"}
