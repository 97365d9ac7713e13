"""Stage 1 training on tiny-random and the fixture data: end to end, resume, reuse, errors."""

import json
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import TrainerCallback

from mocae.backbones import load_backbone
from mocae.config import ConfigError, load_config, validate_config
from mocae.experts.config import ExpertConfig
from mocae.data import Example
from mocae.errors import LoadError
from mocae.experts.dataset import benign_examples, nearest_examples, select_examples, to_sft_rows
from mocae.experts.train import expert_dir, is_trained, latest_checkpoint, train_expert, training_files

FIXTURE_DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def tiny_config(**overrides) -> ExpertConfig:
    base = dict(axis="helpful", backbone="tiny-random", rank=4, alpha=8, max_examples=5,
                max_length=64, batch_size=1, epochs=2, save_steps=2, bf16=False,
                learning_rate=1e-2)
    return ExpertConfig(**{**base, **overrides})


class StopAfter(TrainerCallback):
    """Simulates a crash right after a checkpoint was written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise KeyboardInterrupt("simulated interruption")


def adapter_weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


@pytest.mark.parametrize("axis", ["helpful", "harmless", "honest"])
def test_train_expert_end_to_end(axis, tmp_path):
    cfg = tiny_config(axis=axis, epochs=1)
    out = train_expert(cfg, root=tmp_path, data_dir=FIXTURE_DATA, progress=False)
    assert out == expert_dir(cfg, tmp_path, FIXTURE_DATA) and is_trained(out)
    record = json.loads((out / "training.json").read_text())
    assert record["axis"] == axis and record["steps"] > 0
    assert record["data"]["examples"] == len(select_examples(cfg, FIXTURE_DATA))
    assert record["tokens_per_s"] > 0 and record["peak_rss_mb"] > 0
    assert all(set(p) == {"step", "loss"} for p in record["loss_curve"])
    assert not (out / "checkpoints").exists()
    assert record["key"] == json.loads((out / "stage.json").read_text())["key"]  # data and backbone included
    assert set(record["inputs"]["data"]) == set(training_files(cfg)) and record["inputs"]["backbone"] == "tiny-random"
    # A plain peft adapter folder that moved the model away from the base.
    base, _ = load_backbone("tiny-random")
    ids = torch.tensor([[5, 6, 7, 8]])
    before = base(ids).logits
    model = PeftModel.from_pretrained(base, str(out))
    assert not torch.allclose(model(ids).logits, before)


def test_training_lowers_the_loss(tmp_path):
    cfg = tiny_config(epochs=6, save_steps=100)
    record = json.loads((train_expert(cfg, root=tmp_path, data_dir=FIXTURE_DATA, progress=False)
                         / "training.json").read_text())
    losses = [p["loss"] for p in record["loss_curve"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    cfg = tiny_config()
    with pytest.raises(KeyboardInterrupt):
        train_expert(cfg, root=tmp_path / "a", data_dir=FIXTURE_DATA, progress=False,
                     callbacks=[StopAfter(4)])
    partial = expert_dir(cfg, tmp_path / "a", FIXTURE_DATA)
    assert not is_trained(partial)
    assert latest_checkpoint(partial / "checkpoints").name == "checkpoint-4"
    resumed = train_expert(cfg, root=tmp_path / "a", data_dir=FIXTURE_DATA, progress=False)
    record = json.loads((resumed / "training.json").read_text())
    assert record["resumed_from"] == "checkpoint-4"

    straight = train_expert(cfg, root=tmp_path / "b", data_dir=FIXTURE_DATA, progress=False)
    assert record["steps"] == json.loads((straight / "training.json").read_text())["steps"]
    a, b = adapter_weights(resumed), adapter_weights(straight)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_half_written_checkpoint_is_ignored(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / "checkpoint-2").mkdir(parents=True)
    (ckpts / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (ckpts / "checkpoint-4").mkdir()  # killed before trainer_state.json was written
    assert latest_checkpoint(ckpts).name == "checkpoint-2"
    assert not (ckpts / "checkpoint-4").exists()


def test_finished_expert_is_reused_not_retrained(tmp_path, monkeypatch):
    cfg = tiny_config(epochs=1)
    out = train_expert(cfg, root=tmp_path, data_dir=FIXTURE_DATA, progress=False)
    stamp = (out / "training.json").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("retrained a finished expert")

    monkeypatch.setattr("mocae.experts.train.select_examples", fail)
    assert train_expert(cfg, root=tmp_path, data_dir=FIXTURE_DATA, progress=False) == out
    assert (out / "training.json").stat().st_mtime_ns == stamp
    # A different config is a different expert.
    assert expert_dir(tiny_config(epochs=1, rank=2), tmp_path, FIXTURE_DATA) != out
    # A damaged finished expert is reported, with the command that retrains it, not reused.
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(LoadError, match=r"adapter_model.safetensors: not a complete safetensors file .*; rebuild "
                                        rf"with: rm -r {re.escape(str(out))} && mocae train-expert --axis {cfg.axis}"):
        train_expert(cfg, root=tmp_path, data_dir=FIXTURE_DATA, progress=False)


def test_harmless_mix_has_benign_share_and_injection():
    cfg = tiny_config(axis="harmless", max_examples=4, benign_fraction=0.5, inject_prompt=True)
    examples = select_examples(cfg, FIXTURE_DATA)
    sources = {ex.source for ex in examples}
    assert sources == {"safety_refusals", "alpaca"}
    assert sum(ex.source == "alpaca" for ex in examples) == 2
    rows = to_sft_rows(examples, "harmless", inject_prompt=True)
    assert all(r["prompt"][0]["content"].startswith("You are a harmless assistant") for r in rows)
    assert rows[0]["completion"][0]["role"] == "assistant"


def test_benign_sources_split_the_share_and_never_repeat_a_prompt():
    cfg = tiny_config(axis="harmless", max_examples=6, benign_fraction=0.5,
                      benign_sources=["truthfulqa", "alpaca"])
    examples = select_examples(cfg, FIXTURE_DATA)  # the fixture has 3 refusals: 3 benign rows
    benign = [e for e in examples if e.source != "safety_refusals"]
    assert len(benign) == 3 and {e.source for e in benign} == {"truthfulqa", "alpaca"}
    assert sum(e.source == "truthfulqa" for e in benign) == 1  # 3 // 2 for the first source
    assert all(e.completion for e in benign) and len({e.prompt for e in benign}) == 3
    assert all(e.split == "train" for e in benign if e.source == "truthfulqa")  # never an eval question


def test_alpaca_nearest_takes_the_rows_closest_to_the_refusal_prompts():
    def fake_embed(texts):  # 1-d "topic": how many letters k a prompt has, so "kill" prompts cluster
        v = torch.tensor([[float(t.lower().count("k")), 1.0] for t in texts])
        return torch.nn.functional.normalize(v, dim=-1)

    refusals = [Example("kill kill the king", "I can't.", "harmless", "safety_refusals", "train")]
    rows = [Example(p, "ok", "helpful", "alpaca", "train") for p in ["bake bread", "name a fruit", "kick a ball"]]
    ranked = nearest_examples(rows, [r.prompt for r in refusals], embed=fake_embed)
    assert [e.prompt for e in ranked] == ["kick a ball", "bake bread", "name a fruit"]

    def by_length(texts):  # longer prompts sit closer to the (long) anchor
        return torch.nn.functional.normalize(torch.tensor([[float(len(t)), 10.0] for t in texts]), dim=-1)

    far_half = benign_examples(tiny_config(axis="harmless", benign_sources=["alpaca"]), 2, refusals, FIXTURE_DATA)
    assert len({len(e.prompt) for e in far_half}) == 2  # the fixture rows differ, so the pick is decided
    anchor = [Example("x" * 1000, "no", "harmless", "safety_refusals", "train")]
    cfg = tiny_config(axis="harmless", benign_sources=["alpaca_nearest"])
    picked = benign_examples(cfg, 1, anchor, FIXTURE_DATA, embed=by_length)
    assert [e.prompt for e in picked] == [max(far_half, key=lambda e: len(e.prompt)).prompt]


def test_unknown_axis_is_a_clear_error():
    with pytest.raises(ConfigError, match="field 'axis'"):
        validate_config(ExpertConfig, {"axis": "funny"}, source="cfg.yaml")


def test_wrong_type_names_file_and_field(tmp_path):
    path = tmp_path / "expert.yaml"
    path.write_text("axis: helpful\nrank: eight\n")
    with pytest.raises(ConfigError, match=r"expert.yaml: field 'rank'.*'eight'"):
        load_config(ExpertConfig, path)
    path.write_text("axis: helpful\nrnak: 8\n")
    with pytest.raises(ConfigError, match="field 'rnak'"):
        load_config(ExpertConfig, path)


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "alpaca").mkdir()
    (tmp_path / "alpaca" / "alpaca_5000.json").write_text("[]")
    with pytest.raises(ValueError, match="no training examples for axis 'helpful'"):
        train_expert(tiny_config(), root=tmp_path / "experts", data_dir=tmp_path, progress=False)
