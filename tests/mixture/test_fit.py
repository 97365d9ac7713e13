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
    model.tokenizer.padding_side = "right"  # features are read left-padded; the caller's side comes back
    report = fit_router(model, RouterFitConfig(**SMALL), cache=tmp_path / "f", progress=False, plot_dir=tmp_path)
    assert model.tokenizer.padding_side == "right"
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


def lm_loss_on(model, pairs):
    """Mean LM loss of every pair's completion through the mixture, router softmax weights."""
    from mocae.generation import completion_batch
    from mocae.mixture.fit import extract_features

    rows = completion_batch(model.tokenizer, [p for p, _, _ in pairs], [c for _, c, _ in pairs], max_length=64)
    with torch.no_grad():
        weights = model.router(extract_features(model, [p for p, _, _ in pairs], progress=False)).softmax(-1)
        losses = []
        for i in range(len(pairs)):  # one row at a time: the per-pair mean, not a token-weighted one
            with model.mixer.weights(weights[i:i + 1]):
                losses.append(model.peft_model(input_ids=rows["input_ids"][i:i + 1],
                                               attention_mask=rows["attention_mask"][i:i + 1],
                                               labels=rows["labels"][i:i + 1]).loss.item())
    return sum(losses) / len(losses)


def test_lm_loss_fitting_decreases_the_loss_and_moves_the_router(expert_dirs):
    from mocae.mixture.fit import extract_features, train_router_lm

    model = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs, router_input="hidden",
                                         feature_layer=1))
    pairs = [("say hello", "hello hello hello", 0), ("how do I hurt someone", "I can't help with that.", 1),
             ("is the earth flat", "No, the earth is round.", 2), ("write a poem", "roses are red", 0),
             ("steal a car", "I won't help with that.", 1), ("do we use 10% of the brain", "No, all of it.", 2)]
    model.router.set_normalisation(extract_features(model, [p for p, _, _ in pairs], progress=False))
    cfg = RouterFitConfig(lm_loss_weight=10.0, lm_steps=40, lm_batch_size=3, lm_learning_rate=0.05, lm_max_length=64)
    before_loss, before = lm_loss_on(model, pairs), model.router.linear.weight.clone()
    frozen = {k: v.clone() for k, v in model.peft_model.state_dict().items()}
    calls = []

    def features_fn(prompts):
        calls.append(len(prompts))
        return extract_features(model, prompts, progress=False)

    curve = train_router_lm(model, pairs, cfg, features_fn, progress=False)
    after_loss = lm_loss_on(model, pairs)
    assert len(curve) == 40 and calls == [len(pairs)]  # features once for every pair, not per step
    assert after_loss < before_loss - 1e-3, (before_loss, after_loss)
    assert sum(curve[-10:]) / 10 < sum(curve[:10]) / 10
    assert (model.router.linear.weight - before).abs().max() > 1e-2
    for k, v in model.peft_model.state_dict().items():
        assert torch.equal(v, frozen[k]), k


def test_lm_examples_never_use_eval_side_prompts(monkeypatch):
    from mocae.data import normalise_text
    from mocae.experts.preference import eval_side_prompts
    from mocae.mixture.fit import lm_examples

    monkeypatch.setenv("MOCAE_DATA_DIR", str(FIXTURE_DATA))
    pairs = lm_examples(RouterFitConfig(lm_examples_per_axis=1000))
    guard = eval_side_prompts(FIXTURE_DATA)
    assert pairs and {lab for _, _, lab in pairs} == {0, 1, 2}
    assert all(guard.which(p) is None for p, _, _ in pairs)
    assert len({normalise_text(p) for p, _, _ in pairs}) > 0


def test_fit_router_fits_the_gate_to_its_budget_and_the_prior_mode(expert_dirs, tmp_path, monkeypatch):
    from mocae.mixture.decide import DecisionConfig, prior_weights
    from mocae.experts.task_vectors import task_vector_from_peft

    monkeypatch.setenv("MOCAE_DATA_DIR", str(FIXTURE_DATA))
    model = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs, router_input="hidden",
                                         feature_layer=1, decision=DecisionConfig(mode="harm_gate", gate_budget=0.2)))
    cfg = RouterFitConfig(**{**SMALL, "prior_mode": "importance_normalised"})
    report = fit_router(model, cfg, cache=tmp_path / "f", progress=False)
    gate = report["decision"]["gate"]
    assert model.mocae_config.decision.gate_threshold == gate["threshold"]
    assert gate["non_harmful_gated"] <= 0.2 and gate["fitted_on"] == "calib"
    assert set(report["decision"]["modes"]) == {"soft", "top1", "harm_gate", "harm_gate+top1"}
    vectors = {a: task_vector_from_peft(model.peft_model, adapter_name=a) for a in model.axes}
    assert report["gamma"] == pytest.approx(prior_weights(vectors, "importance_normalised"))
    assert report["prior_mode"] == "importance_normalised"

    model.mocae_config.decision.gate_threshold = 0.99  # kept when not refitted
    fit_router(model, RouterFitConfig(**{**SMALL, "prior_mode": "uniform", "fit_gate_threshold": False}),
               cache=tmp_path / "f", progress=False, train=False)
    assert model.mocae_config.decision.gate_threshold == 0.99
    uniform = fit_router(model, RouterFitConfig(**{**SMALL, "prior_mode": "uniform"}), cache=tmp_path / "f",
                         progress=False, train=False)
    assert uniform["gamma"] == pytest.approx({a: 1 / 3 for a in model.axes})


def test_hard_negatives_count_in_the_gate_budget(expert_dirs, tmp_path, monkeypatch):
    from mocae.experts.preference import eval_side_prompts
    from mocae.mixture.decide import DecisionConfig
    from mocae.mixture.fit import gate_hard_negative_prompts

    monkeypatch.setenv("MOCAE_DATA_DIR", str(FIXTURE_DATA))
    anchors = ["how do I build a weapon", "how do I poison someone"]

    def embed(texts):  # a fake sentence embedding: the anchors and two Alpaca rows share a direction
        v = torch.tensor([[float(any(w in t for w in ("weapon", "poison", "healthy", "colour"))), 0.1]
                          for t in texts])
        return v / v.norm(dim=1, keepdim=True)

    picked = gate_hard_negative_prompts(3, anchors, embed=embed)
    guard = eval_side_prompts(FIXTURE_DATA)
    assert len(picked) == 3 and all(guard.which(p) is None for p in picked)
    assert set(picked[:2]) == {"Give three tips for staying healthy.", "Name a primary colour."}

    model = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs, router_input="hidden",
                                         feature_layer=1, decision=DecisionConfig(gate_budget=0.25)))
    monkeypatch.setattr("mocae.mixture.fit.gate_hard_negative_prompts",
                        lambda n, anchors, data_dir=None: picked[:n])
    report = fit_router(model, RouterFitConfig(**{**SMALL, "gate_hard_negatives": 3}), cache=tmp_path / "f",
                        progress=False)
    gate = report["decision"]["gate"]
    calib = report["splits"]["calib"]
    assert gate["n_non_harmful"] == calib["helpful"] + calib["honest"] + 3 and gate["hard_negatives"]["n"] == 3
    assert gate["non_harmful_gated"] <= 0.25
    sweep = report["decision"]["gate_budget_sweep"]
    assert all(r["non_harmful_gated"] <= float(b) for b, r in sweep.items())
    assert set(report["decision"]["top1_sweep"]) == {"0.4", "0.5", "0.6", "0.7", "0.8", "0.9"}


def _risky_embed(texts):
    """A fake sentence embedding: "poison"/"healthy" share one direction, "weapon"/"colour" another."""
    v = torch.tensor([[float(any(w in t for w in ("poison", "healthy"))),
                       float(any(w in t for w in ("weapon", "colour"))), 0.1] for t in texts])
    return v / v.norm(dim=1, keepdim=True)


def test_router_hard_negatives_skip_the_calib_sides_risky_prompts(monkeypatch):
    from mocae.experts.preference import eval_side_prompts
    from mocae.mixture.fit import add_router_hard_negatives, router_hard_negative_prompts
    from mocae.mixture.routing_data import RoutingSplit

    monkeypatch.setenv("MOCAE_DATA_DIR", str(FIXTURE_DATA))
    train_harmful, calib_harmful = ["how do I build a weapon"], ["how do I poison someone"]
    picked = router_hard_negative_prompts(2, train_harmful, calib_harmful, embed=_risky_embed, reserve=1)
    guard = eval_side_prompts(FIXTURE_DATA)
    # the row nearest the calib harmful prompt is the calib side's (it measures over-refusal): never trained on
    assert "Give three tips for staying healthy." not in picked
    assert picked[0] == "Name a primary colour." and all(guard.which(p) is None for p in picked)

    train = RoutingSplit(["hi", *train_harmful, "q?"], [0, 1, 2], ["a", "b", "c"])
    calib = RoutingSplit(["yo", *calib_harmful, "r?"], [0, 1, 2], ["a", "b", "c"])
    grown = add_router_hard_negatives(train, calib, 2, ("helpful", "harmless", "honest"), "harmless",
                                      embed=_risky_embed, reserve=1)
    assert grown.prompts == train.prompts + picked and grown.labels == [0, 1, 2, 0, 0]
    assert grown.sources[-2:] == ["alpaca_risky_benign"] * 2 and len(train) == 3  # the input split is kept
    with pytest.raises(ValueError, match="only 3 prompts"):  # 5 Alpaca rows, two reserved
        add_router_hard_negatives(train, calib, 4, ("helpful", "harmless", "honest"), "harmless",
                                  embed=_risky_embed, reserve=2)


def test_router_hard_negatives_keep_earlier_stage_keys_when_off():
    from mocae.pipeline import load_run_config, mocae_inputs
    from mocae.stages import stage_key

    cfg = load_run_config("quick", [])
    off = mocae_inputs(cfg, {})
    assert "router_hard_negatives" not in off["config"]["router"]  # the key of every router fitted before it
    on = mocae_inputs(load_run_config("quick", ["router.router_hard_negatives=50"]), {})
    assert on["config"]["router"]["router_hard_negatives"] == 50 and stage_key(on) != stage_key(off)
    assert "alpaca/alpaca_5000.json" in on["data"] or any("alpaca_5000" in f for f in on["data"])


def test_fit_router_adds_its_hard_negatives_before_training(expert_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("MOCAE_DATA_DIR", str(FIXTURE_DATA))
    model = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs, feature_layer=1))
    # the fixture's 5 Alpaca rows all sit in the calib side's reserve: one clear error, nothing trained
    with pytest.raises(ValueError, match="router_hard_negatives: 2 asked, but Alpaca holds only 0"):
        fit_router(model, RouterFitConfig(**{**SMALL, "router_hard_negatives": 2}), cache=tmp_path / "f",
                   progress=False)
    with pytest.raises(ValueError, match="put such prompts under the expert"):
        fit_router(model, RouterFitConfig(**{**SMALL, "router_hard_negatives": 2}), progress=False,
                   prompts={"helpful": ["a", "b"], "harmless": ["c", "d"], "honest": ["e", "f"]})


def test_calib_risky_prompts_skip_what_an_expert_trained_on(monkeypatch):
    from mocae.data import normalise_text
    from mocae.mixture.fit import calib_risky_prompts, gate_hard_negative_prompts

    monkeypatch.setenv("MOCAE_DATA_DIR", str(FIXTURE_DATA))
    anchors = ["how do I poison someone"]
    ranked = gate_hard_negative_prompts(5, anchors, embed=_risky_embed)
    assert ranked[0] == "Give three tips for staying healthy."
    # the nearest one is a training row of one of the experts (and only of that one)
    monkeypatch.setattr("mocae.experts.dataset.training_prompts",
                        lambda cfg, data_dir=None: {normalise_text(ranked[0])} if cfg == "harmless" else set())
    assert calib_risky_prompts(3, anchors, ["helpful", "harmless"], embed=_risky_embed) == ranked[1:4]
    with pytest.raises(ValueError, match="only 4 of the 500 nearest"):
        calib_risky_prompts(5, anchors, ["helpful", "harmless"], embed=_risky_embed)
