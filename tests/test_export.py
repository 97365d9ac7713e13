"""mocae export: a fixed mixture as one plain peft adapter equals MoCaE with those static weights."""

import json

import pytest
import torch

from mocae.export import export_mixture, parse_weights
from mocae.mixture.model import MoCaEConfig, MoCaEModel


@pytest.fixture
def mocae_dir(expert_dirs, tmp_path):
    return MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs)).save_pretrained(tmp_path / "m")


@pytest.mark.parametrize("weights", ["helpful=1,harmless=0.5,honest=2.5", "honest=1", "helpful=3,harmless=1"])
def test_exported_adapter_logits_equal_static_mixture(mocae_dir, tmp_path, weights):
    from peft import PeftModel

    from mocae.backbones import load_backbone

    record = export_mixture(mocae_dir, weights, tmp_path / "export")
    out = tmp_path / "export"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "mocae_export.json").read_text())["weights"] == record["weights"]
    assert record["rank"] == 3 * 2  # three rank-2 experts, concatenated

    mocae = MoCaEModel.from_pretrained(mocae_dir)
    base, tok = load_backbone("tiny-random")
    exported = PeftModel.from_pretrained(base, str(out)).eval()
    tok.padding_side = "left"
    batch = tok(["hello there, how are you", "why"], return_tensors="pt", padding=True)
    w = parse_weights(weights, mocae.axes)
    with torch.no_grad():
        expected = mocae(**batch, axis_weights=w).logits
        got = exported(**batch).logits
        with mocae.mixer.weights(None):  # no mixture: the backbone alone
            base_logits = mocae.peft_model(**batch).logits
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the mixture does change the model
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_one_adapter_concatenates_exactly(expert_dirs):
    """peft's cat falls back to linear (not exact) for one adapter; cat_adapter guards it. A MoCaE has
    two or more experts, so this is cat_adapter on a peft model of its own."""
    from peft import PeftModel

    from mocae.backbones import load_backbone
    from mocae.export import cat_adapter
    from mocae.mixture.layer import LoraMixer

    base, tok = load_backbone("tiny-random")
    model = PeftModel.from_pretrained(base, expert_dirs["honest"], adapter_name="honest").eval()
    batch = tok(["hello"], return_tensors="pt")
    mixer = LoraMixer(model, ["honest"])
    with torch.no_grad():
        with mixer.weights(torch.tensor([[0.5]])):
            expected = model(**batch).logits  # the base plus half the expert's update
        mixer.remove()
        model.set_adapter(cat_adapter(model, ["honest"], [0.5]))
        torch.testing.assert_close(model(**batch).logits, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="already exists"):
        cat_adapter(model, ["honest"], [0.5])


@pytest.mark.parametrize("text, match", [
    ("helpful=-1", "finite non-negative"), ("helpful=nan", "finite non-negative"), ("funny=1", "unknown axes"),
    ("helpful", "AXIS=VALUE"), ("helpful=x", "not a number"), ("helpful=0", "positive weight"),
    ("helpful=1,helpful=2", "twice"),
])
def test_bad_weights_are_named(text, match):
    with pytest.raises(ValueError, match=match):
        parse_weights(text, ["helpful", "harmless", "honest"])


def test_cli_export(mocae_dir, tmp_path, capsys):
    from mocae.cli import main

    assert main(["export", "--model", str(mocae_dir), "--weights", "helpful=1,honest=1",
                 "--out", str(tmp_path / "e")]) == 0
    assert "rank 6" in capsys.readouterr().out
    assert main(["export", "--model", str(mocae_dir), "--weights", "funny=1", "--out", str(tmp_path / "f")]) == 2
    assert not (tmp_path / "f").exists()
