"""check_adapter: an adapter is checked against the backbone before peft loads it."""

import json
from pathlib import Path

import pytest

from mocae.errors import LoadError
from mocae.experts.checks import check_adapter, names_backbone


def test_recorded_base_names_are_matched_by_name_path_or_hub_cache(tmp_path):
    assert names_backbone(None, "tiny-random") and names_backbone("", "smollm2-135m")
    assert names_backbone("/root/.cache/mocae/backbones/smollm2-135m", "smollm2-135m")
    snapshot = tmp_path / "hub" / "models--org--model" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    assert names_backbone(str(snapshot), "org/model")
    assert not names_backbone("meta-llama/Llama-2-7b-hf", "tiny-random")
    assert not names_backbone("other/model", "org/model")


def test_a_good_adapter_passes_with_shapes(expert_dirs, tiny):
    model, _ = tiny
    cfg = check_adapter(expert_dirs["helpful"], "tiny-random", "helpful", model)
    assert set(cfg["target_modules"]) == {"q_proj", "v_proj", "up_proj", "down_proj"}


def test_missing_folder_and_damaged_config_are_named(expert_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="expert 'honest': .*adapter_config.json not found"):
        check_adapter(tmp_path / "nope", "tiny-random", "honest")
    cfg = Path(expert_dirs["honest"]) / "adapter_config.json"
    cfg.write_text(cfg.read_text()[:20])
    with pytest.raises(LoadError, match=r"adapter_config.json: cut off .*rm -r .* && mocae train-expert --axis honest"):
        check_adapter(expert_dirs["honest"], "tiny-random", "honest")


def test_training_record_of_another_backbone_names_the_record(expert_dirs):
    record = Path(expert_dirs["helpful"]) / "training.json"
    record.write_text(json.dumps({"backbone": "gemma3-270m"}))
    with pytest.raises(LoadError, match=r"training.json: expert 'helpful' was trained on backbone 'gemma3-270m', "
                                        r"not 'tiny-random'"):
        check_adapter(expert_dirs["helpful"], "tiny-random", "helpful")


def test_module_the_backbone_lacks_is_named(expert_dirs, tiny):
    from safetensors.torch import load_file, save_file

    model, _ = tiny
    weights = Path(expert_dirs["helpful"]) / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = next(iter(state))
    state[key.replace("layers.0", "layers.7")] = state.pop(key)
    save_file(state, str(weights))
    with pytest.raises(LoadError, match=r"has LoRA weights for 'model.layers.7.*', a module backbone 'tiny-random' "
                                        "does not have"):
        check_adapter(expert_dirs["helpful"], "tiny-random", "helpful", model)


def test_non_lora_adapter_is_rejected(expert_dirs):
    cfg_file = Path(expert_dirs["helpful"]) / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["peft_type"] = "IA3"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="is not a LoRA adapter"):
        check_adapter(expert_dirs["helpful"], "tiny-random", "helpful")
