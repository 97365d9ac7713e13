"""Router fitting and calibration on tiny-random experts and the fixture data."""

from pathlib import Path

import pytest
import torch

from mocae.cli import main
from mocae.mixture.fit import RouterFitConfig, fit_router, format_calibration_table, train_router
from mocae.mixture.model import MoCaEConfig, MoCaEModel
from mocae.mixture.router import SequenceRouter

FIXTURE_DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data"
SMALL = dict(n_per_axis=4, n_test_per_axis=2, epochs=30, calibrators=["none", "temperature", "importance"])


def test_gating_loss_separates_clusters():
    torch.manual_seed(0)
    centres = torch.randn(3, 16) * 3
    labels = torch.arange(3).repeat_interleave(50)
    features = centres[labels] + torch.randn(150, 16)
    router = SequenceRouter(16, 3, feature_layer=0)
    curve = train_router(router, features, labels, RouterFitConfig(epochs=100))
    assert curve[-1] < curve[0]
    assert (router(features).argmax(-1) == labels).float().mean() > 0.95


def test_fit_router_reports_and_installs_default(expert_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("MOCAE_DATA_DIR", str(FIXTURE_DATA))
    model = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs, feature_layer=1))
    report = fit_router(model, RouterFitConfig(**SMALL), cache=tmp_path / "f", progress=False, plot_dir=tmp_path)
    assert set(report["calibrators"]) == {"none", "temperature", "importance"}
    for result in report["calibrators"].values():
        assert {"accuracy", "ece", "brier", "nll", "n"} <= set(result["test"]) and result["shifted"]["n"] > 0
    assert abs(sum(report["gamma"].values()) - 1) < 1e-6
    selection = report["calibrator_selection"]  # default "auto": lowest cross-validated NLL on calib
    assert set(selection) == {"temperature", "importance"}
    assert model.calibrator.name == report["default_calibrator"] == min(selection, key=selection.get)
    assert Path(report["reliability_diagram"]).is_file()
    assert "| temperature | test" in format_calibration_table(report)
    assert list(tmp_path.joinpath("f").glob("features-*.safetensors"))  # cached for the next fit

    before = {k: v.clone() for k, v in model.router.state_dict().items()}
    fit_router(model, RouterFitConfig(**{**SMALL, "default_calibrator": "importance"}),
               cache=tmp_path / "f", progress=False, train=False)
    assert all(torch.equal(v, model.router.state_dict()[k]) for k, v in before.items())
    assert model.calibrator.name == "importance"


def test_default_calibrator_must_be_fitted(expert_dirs):
    model = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs))
    with pytest.raises(ValueError, match="not among calibrators"):
        fit_router(model, RouterFitConfig(calibrators=["none"], default_calibrator="temperature"))


def test_chat_cli_prints_routing_bars(expert_dirs, tmp_path, monkeypatch, capsys):
    path = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs)).save_pretrained(tmp_path / "m")
    answers = iter(["hello there", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert main(["chat", "--model", str(path), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "mocae>" in out and "helpful" in out and "%" in out


def test_lm_loss_through_the_mixture_trains_only_the_router(expert_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("MOCAE_DATA_DIR", str(FIXTURE_DATA))
    model = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs, feature_layer=1))
    frozen = {k: v.clone() for k, v in model.peft_model.state_dict().items()}
    cfg = RouterFitConfig(**{**SMALL, "calibrators": ["none"], "default_calibrator": "none",
                             "lm_loss_weight": 1.0, "lm_steps": 3, "lm_batch_size": 2, "lm_examples_per_axis": 2})
    start = model.router.linear.weight.clone()
    report = fit_router(model, cfg, cache=tmp_path / "f", progress=False)
    assert report["lm_loss_through_mixture"]["steps"] == 3
    assert not torch.equal(start, model.router.linear.weight)
    for k, v in model.peft_model.state_dict().items():
        assert torch.equal(v, frozen[k]), k


def test_auto_selection_uses_only_the_calib_split():
    from mocae.mixture.calibration import build_calibrator
    from mocae.mixture.fit import select_calibrator

    torch.manual_seed(0)
    labels = torch.randint(0, 3, (400,))
    logits = 4.0 * torch.nn.functional.one_hot(labels, 3).float() + torch.randn(400, 3) * 3  # overconfident
    scores = select_calibrator({"none": lambda: build_calibrator("none"),
                                "temperature": lambda: build_calibrator("temperature")},
                               logits, labels, torch.zeros(400, 1))
    assert scores["temperature"] < scores["none"]
