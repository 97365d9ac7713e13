"""Fault injection (issue 13): bad weights, damaged files, unknown names and out-of-range inputs.

Each case must give one clear error naming the culprit (a CLI case: exit code 2, one
``mocae: error:`` line, no traceback) and must leave nothing half-done: a bad weight or a crash
mid-decode never leaves the base weights changed.
"""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mocae.cli import main
from mocae.errors import LoadError
from mocae.mixture.model import MoCaEConfig, MoCaEModel

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("MOCAE_DEBUG", raising=False)


def build(expert_dirs, **kw):
    model = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs, **kw))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.peft_model.named_parameters() if "lora_" not in n}


def assert_unchanged(model, saved):
    now = dict(model.peft_model.named_parameters())
    assert all(torch.equal(now[n], w) for n, w in saved.items())


def cli_error(capsys, argv) -> str:
    """Run the CLI in process; it must return 2 with one error line and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("mocae: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def moe(expert_dirs):
    return build(expert_dirs, router_input="hidden")


@pytest.fixture
def saved_moe(moe, tmp_path):
    return moe.save_pretrained(tmp_path / "mocae")


# ---- routing weights and priors --------------------------------------------------------------

BAD_WEIGHTS = [
    ({"helpful": float("nan"), "harmless": 1.0, "honest": 1.0}, "finite"),
    ({"helpful": float("inf"), "harmless": 1.0, "honest": 1.0}, "finite"),
    ({"helpful": -1.0, "harmless": 1.0, "honest": 1.0}, ">= 0"),
    ({"helpful": 0.0, "harmless": 0.0, "honest": 0.0}, "positive sum"),
    ({"funny": 1.0}, "unknown axes"),
    ([1.0, 1.0], "3 values"),
    (["a", 1.0, 1.0], "numbers"),
]


@pytest.mark.parametrize("field", ["axis_weights", "prior"])
@pytest.mark.parametrize("weights, problem", BAD_WEIGHTS)
def test_bad_weights_and_priors_are_rejected_before_any_merge(moe, field, weights, problem):
    saved = base_weights(moe)
    with pytest.raises(ValueError, match=problem) as info:
        moe.chat("hello", max_new_tokens=2, **{field: weights})
    assert str(info.value).startswith(field)
    batch = moe.tokenizer(["hello"], return_tensors="pt")
    with pytest.raises(ValueError, match=field):
        moe.generate(**batch, max_new_tokens=2, **{field: weights})
    assert_unchanged(moe, saved)
    assert moe.mixer._merged is None


def test_a_router_that_outputs_nan_is_stopped_before_the_merge(moe):
    saved = base_weights(moe)
    with torch.no_grad():
        moe.router.linear.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"router logits are not finite .*router.safetensors"):
        moe.chat("hello", max_new_tokens=2)
    assert_unchanged(moe, saved)


def test_static_weights_must_be_finite(expert_dirs):
    with pytest.raises(ValueError, match="static_weights must be finite"):
        build(expert_dirs, routing="static", static_weights=[1.0, float("nan"), 1.0])


# ---- the merge path --------------------------------------------------------------------------

def test_exception_mid_merged_decode_restores_w0_bit_for_bit(moe):
    moe.mixer.merge_min_tokens = 1  # merge even for 8 tokens: the merged path is what this test breaks
    moe.tokenizer.padding_side = "right"  # chat must put it back
    saved = base_weights(moe)
    q_proj = next(n for n in saved if n.endswith("q_proj.base_layer.weight"))
    calls, merged_seen = [], []

    def explode(module, args, kwargs):
        calls.append(1)
        merged_seen.append(not torch.equal(dict(moe.peft_model.named_parameters())[q_proj], saved[q_proj]))
        if len(calls) == 4:  # router features (unmerged), prefill, a decode step, then fail in the next
            raise RuntimeError("injected fault mid-decode")

    layer = moe.peft_model.get_base_model().model.layers[1]
    handle = layer.register_forward_pre_hook(explode, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="injected fault"):
            moe.chat("tell me something", max_new_tokens=8)
    finally:
        handle.remove()
    assert merged_seen == [False, True, True, True]  # the merged path was what crashed
    assert_unchanged(moe, saved)
    assert moe.mixer._merged is None and moe.mixer.sequence_weights is None
    assert moe.tokenizer.padding_side == "right"
    assert moe.chat("tell me something", max_new_tokens=4)  # still usable
    assert_unchanged(moe, saved)


def test_merge_then_unmerge_is_exact_not_approximate(moe):
    moe.mixer.merge_min_tokens = 1  # short answers merge too, so every chat below merges and unmerges
    saved = base_weights(moe)
    for _ in range(5):
        moe.chat("hello there", max_new_tokens=3)
    assert_unchanged(moe, saved)


# ---- damaged or mismatched files -------------------------------------------------------------

def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_router_file_is_named_before_the_backbone_loads(saved_moe, monkeypatch, capsys):
    truncate(saved_moe / "router.safetensors")
    import mocae.backbones

    monkeypatch.setattr(mocae.backbones, "load_backbone", lambda *a, **k: pytest.fail("backbone loaded"))
    with pytest.raises(LoadError, match="router.safetensors: not a complete safetensors file") as info:
        MoCaEModel.from_pretrained(saved_moe)
    assert f"rebuild with: mocae fit-router --out {saved_moe}" in str(info.value)
    assert "router.safetensors" in cli_error(capsys, ["chat", "--model", str(saved_moe)])


def test_corrupt_adapter_is_named(expert_dirs, saved_moe):
    truncate(Path(expert_dirs["harmless"]) / "adapter_model.safetensors")
    with pytest.raises(LoadError, match=r"harmless/adapter_model.safetensors: not a complete safetensors") as info:
        build(expert_dirs)
    assert "mocae train-expert --axis harmless" in str(info.value)
    (saved_moe / "experts" / "honest" / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 4)
    with pytest.raises(LoadError, match="honest/adapter_model.safetensors") as info:
        MoCaEModel.from_pretrained(saved_moe)
    assert "mocae fit-router" in str(info.value)


def test_adapter_naming_another_base_model_is_an_error(expert_dirs):
    cfg_file = Path(expert_dirs["honest"]) / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="names base model 'meta-llama/Llama-2-7b-hf', but the backbone is "
                                        "'tiny-random'") as info:
        build(expert_dirs)
    assert str(info.value).startswith(str(cfg_file))


def test_adapter_with_shapes_of_another_backbone_fails_before_peft(expert_dirs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    peft_model = get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    peft_model.save_pretrained(tmp_path / "narrow")
    (tmp_path / "narrow" / "training.json").write_text(json.dumps({"backbone": "tiny-random"}))
    with pytest.raises(LoadError, match=r"narrow/adapter_model.safetensors: \d+ LoRA tensors do not fit backbone "
                                        r"'tiny-random' \(first: .* its layer is \d+ -> \d+; an adapter for "
                                        r"another backbone\?\)"):
        build({**expert_dirs, "helpful": str(tmp_path / "narrow")})


def test_cut_off_mocae_config_is_named(saved_moe, capsys):
    config = saved_moe / "mocae_config.json"
    text = config.read_text()
    config.write_text(text[: len(text) // 2])
    with pytest.raises(LoadError, match=r"mocae_config.json: cut off \(its JSON does not end\) \(line"):
        MoCaEModel.from_pretrained(saved_moe)
    assert "mocae_config.json: cut off" in cli_error(capsys, ["eval", "--model", str(saved_moe)])


def test_mocae_config_with_wrong_schema_is_named(saved_moe):
    config = saved_moe / "mocae_config.json"
    meta = json.loads(config.read_text())
    meta["config"]["routing"] = "psychic"
    config.write_text(json.dumps(meta))
    with pytest.raises(LoadError, match=r"mocae_config.json: wrong schema .*routing"):
        MoCaEModel.from_pretrained(saved_moe)
    config.write_text("[1, 2]")
    with pytest.raises(LoadError, match="mocae_config.json: expected a JSON dict, found list"):
        MoCaEModel.from_pretrained(saved_moe)


def test_mocae_config_with_a_changed_backbone_fails_before_loading(saved_moe, monkeypatch):
    import mocae.backbones

    monkeypatch.setattr(mocae.backbones, "load_backbone", lambda *a, **k: pytest.fail("backbone loaded"))
    config = saved_moe / "mocae_config.json"
    meta = json.loads(config.read_text())
    meta["config"]["backbone"] = "smollm2-135m"
    config.write_text(json.dumps(meta))
    with pytest.raises(LoadError, match=r"mocae_config.json: backbone 'smollm2-135m' is not the one expert "
                                        r"'helpful' was trained on \('tiny-random'\)"):
        MoCaEModel.from_pretrained(saved_moe)


def test_garbage_json_given_to_a_cli_command_is_named(saved_moe, expert_dirs, capsys):
    (saved_moe / "mocae_config.json").write_text("{'not': json}")
    line = cli_error(capsys, ["eval", "--model", str(saved_moe)])
    assert f"{saved_moe / 'mocae_config.json'}: not valid JSON" in line
    record = Path(expert_dirs["honest"]) / "training.json"
    record.write_text("\x00\x01 garbage")
    assert f"{record}: not valid JSON" in cli_error(capsys, ["eval", "--model", expert_dirs["honest"]])


# ---- names -----------------------------------------------------------------------------------

def test_unknown_backbone_fails_at_once_with_the_known_names(capsys):
    start = time.perf_counter()
    line = cli_error(capsys, ["generate", "--backbone", "nosuch", "--prompt", "hi"])
    assert time.perf_counter() - start < 5
    assert "unknown backbone 'nosuch'" in line and "smollm2-135m" in line and "tiny-random" in line
    assert "Hugging Face id" in line
    line = cli_error(capsys, ["generate", "--backbone", "nosuch-org/nosuch-model", "--prompt", "hi"])
    assert "not in the local Hugging Face cache and offline mode is set" in line


def test_unknown_backbone_in_run_overrides_fails_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = cli_error(capsys, ["run", "--preset", "quick", "--set", "backbone=nosuch", "--no-progress"])
    assert "unknown backbone 'nosuch'" in line
    assert not (tmp_path / "runs").exists()


def test_unknown_backbone_for_train_expert_fit_router_and_eval(capsys):
    assert "unknown backbone" in cli_error(capsys, ["train-expert", "--axis", "honest", "--backbone", "nosuch"])
    assert "unknown backbone" in cli_error(capsys, ["fit-router", "--backbone", "nosuch", "--out", "x",
                                                    "--expert", "helpful=a", "--expert", "harmless=b",
                                                    "--expert", "honest=c"])
    assert "unknown backbone" in cli_error(capsys, ["eval", "--model", "base", "--backbone", "nosuch"])


def test_fit_router_names_a_damaged_expert_before_training(expert_dirs, tmp_path, capsys):
    truncate(Path(expert_dirs["honest"]) / "adapter_model.safetensors")
    argv = ["fit-router", "--backbone", "tiny-random", "--out", str(tmp_path / "m")]
    argv += [a for axis, path in expert_dirs.items() for a in ("--expert", f"{axis}={path}")]
    line = cli_error(capsys, argv)
    assert "honest/adapter_model.safetensors: not a complete safetensors file" in line
    assert "mocae train-expert --axis honest" in line


def test_cli_prints_one_line_and_no_traceback_in_a_real_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "MOCAE_CACHE": str(tmp_path)}
    env.pop("MOCAE_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "mocae.cli", "generate", "--backbone", "nosuch", "--prompt", "hi"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("mocae: error: unknown backbone 'nosuch'")


@pytest.mark.parametrize("expert, message", [
    (["funny=/x"], "unknown axis 'funny'"),
    (["helpful=/x"], "no expert for axis harmless, honest"),
    (["helpful=/x", "helpful=/y"], "axis 'helpful' given twice"),
    (["helpful"], "expected AXIS=DIR"),
])
def test_fit_router_with_a_bad_axis_fails_before_features(expert, message, monkeypatch, capsys):
    import mocae.mixture.fit as fit

    monkeypatch.setattr(fit, "extract_features", lambda *a, **k: pytest.fail("features computed"))
    argv = ["fit-router", "--backbone", "tiny-random", "--out", "x"] + [a for e in expert for a in ("--expert", e)]
    assert message in cli_error(capsys, argv)


# ---- input limits ----------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_empty_prompts_are_rejected(moe, tiny, prompt, capsys):
    from mocae.generation import generate_batch

    with pytest.raises(ValueError, match="prompt 1 is empty"):
        moe.chat(["fine", prompt], max_new_tokens=2)
    model, tok = tiny
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate_batch(model, tok, [prompt], max_new_tokens=2, progress=False)
    assert "--prompt is empty" in cli_error(capsys, ["generate", "--backbone", "tiny-random", "--prompt", prompt])


def long_prompt(n_words=400):
    return " ".join(f"word{i}" for i in range(n_words)) + " THE QUESTION AT THE END"


def test_over_long_prompt_is_refused_by_default(moe, tiny, capsys):
    from mocae.generation import generate_batch

    with pytest.raises(ValueError, match=r"prompt 0 .* tokens in chat format, but the model's 512-token context"):
        moe.chat(long_prompt(), max_new_tokens=8)
    model, tok = tiny
    with pytest.raises(ValueError, match="truncate_prompt=True"):
        generate_batch(model, tok, ["short", long_prompt()], max_new_tokens=8, progress=False)
    line = cli_error(capsys, ["generate", "--backbone", "tiny-random", "--prompt", long_prompt(),
                              "--max-new-tokens", "8"])
    assert "--truncate-prompt" in line


def test_over_long_prompt_is_truncated_keeping_its_end_with_the_option(moe, caplog, capsys):
    from mocae.generation import chat_inputs

    with caplog.at_level(logging.WARNING, logger="mocae"):
        out = moe.chat(long_prompt(), max_new_tokens=8, truncate_prompt=True)
    assert isinstance(out[0]["text"], str) and set(out[0]["routing"]) == set(moe.axes)
    assert "kept its last part" in caplog.text
    [text] = chat_inputs(moe.tokenizer, [long_prompt()], None, 8, 512, truncate_prompt=True)
    assert "THE QUESTION AT THE END<|im_end|>" in text and "word0 " not in text
    assert 504 - 5 <= len(moe.tokenizer(text, add_special_tokens=False)["input_ids"]) <= 504
    assert main(["generate", "--backbone", "tiny-random", "--prompt", long_prompt(), "--max-new-tokens", "4",
                 "--truncate-prompt"]) == 0


def test_max_new_tokens_beyond_the_context_is_refused(moe):
    with pytest.raises(ValueError, match="max_new_tokens=600 leaves no room for a prompt in the model's 512-token"):
        moe.chat("hello", max_new_tokens=600)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_absurd_max_new_tokens_is_refused_before_the_model_loads(command, monkeypatch, capsys):
    import mocae.backbones

    monkeypatch.setattr(mocae.backbones, "load_backbone", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(MoCaEModel, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    argv = ([command, "--backbone", "tiny-random", "--prompt", "hi"] if command == "generate"
            else [command, "--model", "nowhere"]) + ["--max-new-tokens", "1000000000000"]
    line = cli_error(capsys, argv)
    assert "--max-new-tokens must be an integer in 1..32768, got 1000000000000" in line


def test_absurd_max_new_tokens_is_refused_by_the_api(moe):
    saved = base_weights(moe)
    for value in (10**12, 0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer in 1..32768"):
            moe.chat("hello", max_new_tokens=value)
    batch = moe.tokenizer(["hello"], return_tensors="pt")
    with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        moe.generate(**batch, max_new_tokens=10**12)
    assert_unchanged(moe, saved)


def test_cli_cap_equals_the_library_cap():
    import mocae.cli
    from mocae.generation import MAX_NEW_TOKENS

    assert mocae.cli.MAX_NEW_TOKENS == MAX_NEW_TOKENS


# ---- the CLI keeps real bugs visible ---------------------------------------------------------

def test_debug_flag_and_env_reraise_user_errors(monkeypatch):
    from mocae.backbones import UnknownBackbone

    with pytest.raises(UnknownBackbone):
        main(["--debug", "generate", "--backbone", "nosuch", "--prompt", "hi"])
    monkeypatch.setenv("MOCAE_DEBUG", "1")
    with pytest.raises(UnknownBackbone):
        main(["generate", "--backbone", "nosuch", "--prompt", "hi"])


def test_a_bug_is_not_turned_into_an_error_line(monkeypatch):
    import mocae.cli

    def buggy(args):
        raise KeyError("a real bug")

    monkeypatch.setattr(mocae.cli, "_cmd_backbones", buggy)
    with pytest.raises(KeyError):
        main(["backbones"])
