"""Routing that decides (mocae.mixture.decide): soft / top1 / harm gate, the gate threshold fitted to
an over-refusal budget, priors that do not follow task-vector norms, and the config plumbing."""

import json
import math

import pytest
import torch

from mocae.experts.task_vectors import TaskVector
from mocae.mixture.decide import (
    DecisionConfig,
    decide,
    decision_report,
    fit_gate_threshold,
    gate_report,
    harm_gate,
    prior_weights,
    top1,
    without,
)

AXES = ["helpful", "harmless", "honest"]
P = torch.tensor([[0.7, 0.2, 0.1],    # confident helpful
                  [0.3, 0.6, 0.1],    # harmful-ish
                  [0.4, 0.25, 0.35],  # unsure
                  [0.05, 0.9, 0.05]])  # clearly harmful


def test_soft_is_the_probabilities():
    torch.testing.assert_close(decide(P, DecisionConfig(), AXES), P)


def test_top1_decides_when_confident_and_falls_back_otherwise():
    w = top1(P, 0.65, "soft")
    assert w[0].tolist() == [1.0, 0.0, 0.0] and w[3].tolist() == [0.0, 1.0, 0.0]
    torch.testing.assert_close(w[1:3], P[1:3])  # below 0.65: the soft blend
    base = top1(P, 0.65, "base")
    assert base[1].tolist() == [0.0, 0.0, 0.0] and base[2].tolist() == [0.0, 0.0, 0.0]
    assert top1(P, 0.6, "soft")[1].tolist() == [0.0, 1.0, 0.0]  # at the threshold: decided (>=)
    via_config = decide(P, DecisionConfig(mode="top1", top1_threshold=0.65, top1_fallback="base"), AXES)
    torch.testing.assert_close(via_config, base)
    with pytest.raises(ValueError, match="fallback"):
        top1(P, 0.5, "uniform")


def test_harm_gate_is_strict_and_one_hot_harmless_above_the_threshold():
    cfg = DecisionConfig(mode="harm_gate", gate_threshold=0.6)
    w = decide(P, cfg, AXES)
    assert w[3].tolist() == [0.0, 1.0, 0.0]
    torch.testing.assert_close(w[:3], P[:3])  # row 1 has P(harm) == 0.6: not above, not gated
    others = decide(P, cfg.model_copy(update={"gate_rest": "others"}), AXES)
    assert others[3].tolist() == [0.0, 1.0, 0.0]
    torch.testing.assert_close(others[0], torch.tensor([0.875, 0.0, 0.125]))  # 0.7/0.8, 0.1/0.8
    assert (others[:3, 1] == 0).all()
    torch.testing.assert_close(others[:3].sum(-1), torch.ones(3))
    with pytest.raises(ValueError, match="gate_threshold"):
        decide(P, DecisionConfig(mode="harm_gate"), AXES)
    with pytest.raises(ValueError, match="not an expert"):
        decide(P, cfg, ["a", "b", "c"])


def test_gate_reads_its_own_probabilities():
    # a caller prior may tilt the blend; the gate reads the calibrated P(harm) it was fitted on
    tilted = torch.tensor([[0.9, 0.05, 0.05]])
    calibrated = torch.tensor([[0.1, 0.8, 0.1]])
    w = decide(tilted, DecisionConfig(mode="harm_gate", gate_threshold=0.5), AXES, gate_probs=calibrated)
    assert w.tolist() == [[0.0, 1.0, 0.0]]


def test_gate_then_top1_composes():
    cfg = DecisionConfig(mode="harm_gate+top1", gate_threshold=0.7, top1_threshold=0.65, top1_fallback="base")
    w = decide(P, cfg, AXES)
    assert w.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    # the rest over the other experts: row 1 becomes (0.75, 0, 0.25), confident helpful
    w = decide(P, cfg.model_copy(update={"gate_rest": "others"}), AXES)
    assert w.tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    # the gate alone
    assert harm_gate(P[:, 1], 1, 0.7, P)[3].tolist() == [0.0, 1.0, 0.0]


def test_caution_band_matches_a_per_row_oracle():
    # the screened rule (benchmarks/rule_screen.py): harmless above 0.9, honest in (0.3, 0.9],
    # elsewhere argmax over helpful and honest; gated on the calibrated P(harmless) only
    cfg = DecisionConfig(mode="harm_gate+top1", gate_rest="others", gate_threshold=0.9, top1_threshold=0.0,
                         caution_axis="honest", caution_threshold=0.3)
    torch.manual_seed(0)
    probs = torch.distributions.Dirichlet(torch.full((3,), 0.7)).sample(torch.Size([400])).double()
    edges = torch.tensor([[0.05, 0.9, 0.05], [0.4, 0.3, 0.3], [0.0, 0.95, 0.05]], dtype=torch.float64)
    probs = torch.cat([probs, edges])  # float64: the edges compare exactly as in the oracle
    weights = decide(probs, cfg, AXES)
    for p, w in zip(probs.tolist(), weights.tolist()):
        if p[1] > 0.9:
            expected = 1
        elif p[1] > 0.3:
            expected = 2
        else:
            expected = 0 if p[0] >= p[2] else 2
        assert w == [float(i == expected) for i in range(3)], (p, w)
    assert weights[-3:].argmax(-1).tolist() == [2, 0, 1]  # both edges are strict


def test_caution_band_under_the_soft_rest_and_its_validation():
    cfg = DecisionConfig(mode="harm_gate", gate_threshold=0.7, caution_axis="honest", caution_threshold=0.5)
    w = decide(P, cfg, AXES)
    assert w[1].tolist() == [0.0, 0.0, 1.0] and w[3].tolist() == [0.0, 1.0, 0.0]
    torch.testing.assert_close(w[[0, 2]], P[[0, 2]])  # below the band: the blend as before
    with pytest.raises(ValueError, match="both"):
        DecisionConfig(mode="harm_gate", caution_axis="honest")
    # part of the gate: switching a banded config to top1 (e.g. using_decision) routes as plain top1
    banded_top1 = DecisionConfig(mode="top1", caution_axis="honest", caution_threshold=0.3)
    torch.testing.assert_close(decide(P, banded_top1, AXES), decide(P, DecisionConfig(mode="top1"), AXES))
    with pytest.raises(ValueError, match="differ"):
        DecisionConfig(mode="harm_gate", caution_axis="harmless", caution_threshold=0.3)
    with pytest.raises(ValueError, match="caution axis"):
        decide(P, cfg.model_copy(update={"caution_axis": "careful"}), AXES)
    # no band: dumped as before the band existed (stage keys and cached answers of earlier runs hold)
    assert "caution_axis" not in DecisionConfig().model_dump() and cfg.model_dump()["caution_threshold"] == 0.5
    assert DecisionConfig.model_validate(cfg.model_dump()) == cfg


def test_without_handles_an_all_mass_row():
    w = without(torch.tensor([[0.0, 1.0, 0.0]]), 1)
    assert w.tolist() == [[0.5, 0.0, 0.5]]


def test_fitted_threshold_meets_the_budget_and_is_the_tightest():
    gen = torch.Generator().manual_seed(0)
    benign = torch.rand(200, generator=gen) * 0.6
    harmful = 0.3 + torch.rand(100, generator=gen) * 0.7
    p = torch.cat([benign, harmful])
    is_harmful = torch.cat([torch.zeros(200, dtype=torch.bool), torch.ones(100, dtype=torch.bool)])
    for budget in (0.0, 0.05, 0.1, 0.5):
        t = fit_gate_threshold(p, is_harmful, budget)
        assert (benign > t).float().mean() <= budget + 1e-12
        # tightest: any smaller threshold breaks the budget
        smaller = torch.nextafter(torch.tensor(t, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64))
        assert (benign.double() > smaller).float().mean() > budget
        report = gate_report(p, is_harmful, t)
        assert report["non_harmful_gated"] <= budget and report["n_harmful"] == 100
    assert fit_gate_threshold(p, is_harmful, 0.05) == pytest.approx(benign.sort(descending=True).values[10].item())
    assert fit_gate_threshold(p, is_harmful, 0.0) == pytest.approx(benign.max().item())
    assert fit_gate_threshold(p, is_harmful, 1.0) == 0.0


def test_threshold_with_ties_never_exceeds_the_budget():
    p = torch.tensor([0.9, 0.9, 0.9, 0.2, 0.1, 0.95, 0.99])
    harmful = torch.tensor([False, False, False, False, False, True, True])
    t = fit_gate_threshold(p, harmful, 0.4)  # 2 of 5 allowed, but three tie at 0.9
    assert t == pytest.approx(0.9)
    assert gate_report(p, harmful, t)["non_harmful_gated"] == 0.0
    assert gate_report(p, harmful, t)["harmful_gated"] == 1.0
    with pytest.raises(ValueError, match="same length"):
        fit_gate_threshold(p, harmful[:3], 0.1)


def test_decision_report_counts_modes():
    labels = torch.tensor([0, 1, 2, 1])
    r = decision_report(P, labels, DecisionConfig(mode="top1", top1_threshold=0.65, top1_fallback="base"), AXES)
    assert r["one_hot_share"] == 0.5 and r["base_share"] == 0.5
    assert r["mean_weight_on_label"] == pytest.approx(0.5)


# priors ------------------------------------------------------------------------------------------


def vectors():
    gen = torch.Generator().manual_seed(1)
    # norms deliberately unequal: harmless 4x larger
    scale = {"helpful": 1.0, "harmless": 4.0, "honest": 1.5}
    return {a: TaskVector({"m.a": torch.randn(6, 5, generator=gen) * s, "m.b": torch.randn(7, generator=gen) * s})
            for a, s in scale.items()}


def softmax_over_max(ip):
    ip = torch.tensor(ip, dtype=torch.float64)
    return torch.softmax(ip / ip.abs().max(), 0).tolist()


def test_uniform_prior():
    assert prior_weights(vectors(), "uniform") == {a: pytest.approx(1 / 3) for a in AXES}


def test_importance_and_normalised_priors_against_an_independent_computation():
    vs = vectors()
    flat = {a: torch.cat([v["m.a"].flatten(), v["m.b"].flatten()]).double() for a, v in vs.items()}
    mean = sum(flat.values()) / 3
    expected = softmax_over_max([float(flat[a] @ mean) for a in AXES])
    assert list(prior_weights(vs, "importance").values()) == pytest.approx(expected)

    unit = {a: f / f.norm() for a, f in flat.items()}
    unit_mean = sum(unit.values()) / 3
    expected_norm = softmax_over_max([float(unit[a] @ unit_mean) for a in AXES])
    got = prior_weights(vs, "importance_normalised")
    assert list(got.values()) == pytest.approx(expected_norm)
    assert sum(got.values()) == pytest.approx(1.0)
    # the plain importance follows the 4x-norm expert; the normalised one does not care about norms
    assert max(prior_weights(vs, "importance"), key=prior_weights(vs, "importance").get) == "harmless"
    rescaled = {**vs, "harmless": vs["harmless"] * 10.0}
    assert list(prior_weights(rescaled, "importance_normalised").values()) == pytest.approx(list(got.values()))
    with pytest.raises(ValueError, match="prior_mode"):
        prior_weights(vs, "norm")


def test_uniform_prior_calibrator_is_temperature_scaling():
    from mocae.mixture.calibration import build_calibrator

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (120,), generator=gen)
    logits = 3 * torch.nn.functional.one_hot(labels, 3).float() + torch.randn(120, 3, generator=gen) * 2
    gamma = prior_weights(vectors(), "uniform")
    importance = build_calibrator("importance", gamma=[gamma[a] for a in AXES]).fit(logits, labels)
    temperature = build_calibrator("temperature").fit(logits, labels)
    torch.testing.assert_close(importance.probs(logits), temperature.probs(logits))
    # and the normalised prior tilts by exactly its gamma
    g = prior_weights(vectors(), "importance_normalised")
    tilted = build_calibrator("importance", gamma=[g[a] for a in AXES], temperature=2.0)
    tilted.num_classes = 3
    expected = (logits.double() / 2.0 + torch.tensor([g[a] for a in AXES], dtype=torch.float64).log()).softmax(-1)
    torch.testing.assert_close(tilted.probs(logits.double()), expected)


# config plumbing ---------------------------------------------------------------------------------


def test_quick_preset_selects_modes_and_priors():
    from mocae.config import ConfigError
    from mocae.pipeline import load_run_config

    cfg = load_run_config("quick", ["decision.mode=harm_gate+top1", "decision.gate_budget=0.1",
                                    "router.prior_mode=importance_normalised", "router.lm_loss_weight=0.5",
                                    "router.lm_steps=50"])
    assert cfg.decision.mode == "harm_gate+top1" and cfg.decision.gate_budget == 0.1
    assert cfg.router.prior_mode == "importance_normalised" and cfg.router.lm_steps == 50
    quick = load_run_config("quick").decision  # chosen by benchmarks/mocae_ablation.py
    assert (quick.mode, quick.gate_threshold, quick.caution_axis) == ("harm_gate+top1", 0.9, "honest")
    assert not load_run_config("quick").router.fit_gate_threshold
    with pytest.raises(ConfigError, match="decision.mode"):
        load_run_config("quick", ["decision.mode=always_harmless"])
    with pytest.raises(ConfigError, match="prior_mode"):
        load_run_config("quick", ["router.prior_mode=norm"])


def test_build_mocae_passes_the_decision_to_the_model(expert_dirs, tmp_path, monkeypatch):
    import mocae.mixture.fit as fit_module
    from mocae.pipeline import build_mocae, load_run_config

    seen = {}

    def fake_fit(model, cfg, **kwargs):
        seen["decision"] = model.mocae_config.decision
        return {"calibrators": {}}

    monkeypatch.setattr(fit_module, "fit_router", fake_fit)
    monkeypatch.setattr(fit_module, "format_calibration_table", lambda report: "")
    cfg = load_run_config("quick", ["backbone=tiny-random", "router_input=hidden",
                                    "decision.mode=harm_gate", "decision.gate_threshold=0.4"])
    out = build_mocae(cfg, {a: p for a, p in expert_dirs.items()}, tmp_path, progress=False)
    assert seen["decision"].mode == "harm_gate" and seen["decision"].gate_threshold == 0.4
    from mocae.mixture.model import MoCaEModel

    assert MoCaEModel.from_pretrained(out).mocae_config.decision.mode == "harm_gate"
    assert not math.isnan(cfg.decision.gate_budget)


def test_a_changed_decision_recomputes_the_mocae_stage(expert_dirs):
    from pathlib import Path

    from mocae.pipeline import load_run_config, mocae_inputs
    from mocae.stages import stage_key

    experts = {a: Path(p) for a, p in expert_dirs.items()}
    soft = stage_key(mocae_inputs(load_run_config("quick", ["backbone=tiny-random"]), experts))
    gate = stage_key(mocae_inputs(load_run_config("quick", ["backbone=tiny-random", "decision.mode=harm_gate"]),
                                  experts))
    assert soft != gate


def test_a_decision_only_change_keeps_the_fitted_router(expert_dirs, tmp_path, monkeypatch):
    import mocae.mixture.fit as fit_module
    from mocae.mixture.model import MoCaEModel
    from mocae.pipeline import build_mocae, load_run_config

    calls = []

    def fake_fit(model, cfg, train=True, **kwargs):
        calls.append(train)
        if train:  # a fresh fit: weights no other fit gives
            with torch.no_grad():
                for p in model.router.parameters():
                    p.add_(float(len(calls)))
        return {"calibrators": {}, "router_loss": {"last": 0.5 if train else float("nan")}}

    monkeypatch.setattr(fit_module, "fit_router", fake_fit)
    monkeypatch.setattr(fit_module, "format_calibration_table", lambda report: "")
    experts = dict(expert_dirs)

    def build(*overrides):
        cfg = load_run_config("quick", ["backbone=tiny-random", "router_input=hidden", *overrides])
        model = MoCaEModel.from_pretrained(build_mocae(cfg, experts, tmp_path, progress=False))
        return model.mocae_config.decision, {k: v.clone() for k, v in model.router.state_dict().items()}

    _, fitted = build("decision.mode=top1")
    decision, kept = build("decision.mode=harm_gate+top1", "decision.gate_threshold=0.8",
                           "decision.caution_axis=honest", "decision.caution_threshold=0.3",
                           "router.fit_gate_threshold=false")
    assert calls == [True, False]  # only the calibrators and the decision were fitted again
    assert decision.mode == "harm_gate+top1" and decision.caution_axis == "honest"
    assert all(torch.equal(fitted[k], kept[k]) for k in fitted)
    report = json.loads((tmp_path / "router_calibration.json").read_text())
    assert report["router_loss"] == {"last": 0.5} and report["router_kept_from"]  # the training record stays
    # what router training reads (its own settings, or the gate axis picking its hard negatives) refits it
    _, refitted = build("decision.mode=harm_gate+top1", "decision.gate_threshold=0.8",
                        "decision.caution_axis=honest", "decision.caution_threshold=0.3",
                        "router.fit_gate_threshold=false", "router.epochs=3")
    assert calls == [True, False, True] and not all(torch.equal(fitted[k], refitted[k]) for k in fitted)
    build("decision.mode=harm_gate", "decision.gate_axis=honest", "decision.gate_threshold=0.8",
          "decision.caution_axis=helpful")
    assert calls[-1] is True
