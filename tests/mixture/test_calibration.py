"""Calibrators: known-temperature recovery, held-out improvement, priors, fractal geometry,
composition, (de)serialisation and input validation."""

from __future__ import annotations

import json

import pytest
import torch

from mocae.mixture.calibration_metrics import calibration_report
from mocae.mixture.calibration import (
    CALIBRATORS,
    Calibrator,
    ComposedCalibrator,
    FractalCalibrator,
    ImportanceCalibrator,
    TemperatureCalibrator,
    build_calibrator,
)

E = 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def synthetic(n: int, seed: int = 0, scale: float = 2.0):
    """True logits and labels drawn from softmax(true logits): softmax(z_true) is calibrated."""
    g = _gen(seed)
    z_true = scale * torch.randn(n, E, generator=g)
    labels = torch.multinomial(z_true.softmax(dim=1), 1, generator=g).squeeze(1)
    return z_true, labels


def fractal_data(n: int, seed: int = 0):
    """Features where axis 0 lies on a 1-D curve, axis 1 fills a square, axis 2 another square;
    logits are pure noise, so only the feature geometry tells the axes apart."""
    g = _gen(seed)
    y = torch.arange(n) % E
    t, u = torch.rand(n, generator=g), torch.rand(n, 2, generator=g)
    x = torch.zeros(n, 6)
    x[y == 0, 0] = t[y == 0]
    x[y == 0, 1] = 0.5 + 0.4 * torch.sin(6 * t[y == 0])
    x[y == 1, :2] = u[y == 1]
    x[y == 2, 2:4] = u[y == 2] + 1.0
    x += 1e-3 * torch.randn(n, 6, generator=g)
    return torch.randn(n, E, generator=g), y, x


@pytest.mark.parametrize("t0", [2.5, 0.5])
def test_temperature_recovers_known_temperature(t0):
    z_true, y = synthetic(20000, seed=1)
    cal = TemperatureCalibrator().fit(z_true * t0, y)
    assert cal.temperature == pytest.approx(t0, rel=0.05)
    # ... and the calibrated probabilities are then those of the true model
    assert torch.allclose(cal.probs(z_true * t0), z_true.softmax(1), atol=0.05)


def test_temperature_improves_held_out_calibration_of_overconfident_logits():
    z_true, y = synthetic(6000, seed=2)
    logits = 4.0 * z_true  # over-confident router
    cal = build_calibrator("temperature").fit(logits[:3000], y[:3000])
    before = calibration_report(logits[3000:].softmax(1), y[3000:])
    after = calibration_report(cal.probs(logits[3000:]), y[3000:])
    assert cal.temperature > 2.0
    assert after["nll"] < before["nll"] - 0.1
    assert after["ece"] < before["ece"] / 2
    assert after["accuracy"] == before["accuracy"]  # scaling never changes the argmax


def test_identity_is_softmax_and_needs_no_fit():
    z = torch.randn(5, E, generator=_gen(3))
    assert torch.allclose(build_calibrator("none").probs(z), z.softmax(1))


def test_importance_with_uniform_gamma_is_temperature_scaling():
    z, y = synthetic(3000, seed=4)
    temp = TemperatureCalibrator().fit(3 * z, y)
    imp = ImportanceCalibrator(gamma=[1.0, 1.0, 1.0]).fit(3 * z, y)
    assert imp.gamma == pytest.approx([1 / 3] * 3)
    assert imp.temperature == pytest.approx(temp.temperature, rel=1e-6)
    assert torch.allclose(imp.probs(3 * z), temp.probs(3 * z), atol=1e-6)


def test_importance_gamma_tilts_towards_favoured_expert():
    z, y = synthetic(3000, seed=5)
    temp = TemperatureCalibrator().fit(z, y)
    imp = ImportanceCalibrator(gamma={"harmless": 0.2, "helpful": 0.6, "honest": 0.2}).fit(z, y)
    assert imp.gamma == pytest.approx([0.6, 0.2, 0.2])  # dict keyed by axes -> mocae.AXES order
    assert imp.probs(z)[:, 0].mean() > temp.probs(z)[:, 0].mean() + 0.05
    assert torch.allclose(imp.probs(z).sum(1), torch.ones(len(z)), atol=1e-5)


@pytest.mark.parametrize("gamma", [[0.5, -0.1, 0.6], [0.5, 0.0, 0.5], [1.0], [float("nan"), 1, 1]])
def test_importance_rejects_bad_weights(gamma):
    with pytest.raises(ValueError, match="gamma"):
        ImportanceCalibrator(gamma=gamma)


def test_importance_rejects_gamma_of_wrong_width():
    z, y = synthetic(100, seed=6)
    with pytest.raises(ValueError, match="gamma has 2 weights"):
        ImportanceCalibrator(gamma=[0.5, 0.5]).fit(z, y)


def test_fractal_fit_and_probs():
    z, y, x = fractal_data(600, seed=7)
    cal = build_calibrator("fractal").fit(z, y, x)
    p = cal.probs(z[:50], x[:50])
    assert p.shape == (50, E) and p.dtype == z.dtype
    assert torch.allclose(p.sum(1), torch.ones(50), atol=1e-5)
    assert (p > 0).all()
    assert cal.beta in cal.beta_grid == [0.0, 0.1, 0.25, 0.5, 1.0, 2.0]
    assert [b for b, _ in cal.nll_by_beta] == cal.beta_grid
    assert min(n for _, n in cal.nll_by_beta) == dict(map(tuple, cal.nll_by_beta))[cal.beta]
    assert len(cal.dims) == E and len(cal.features) == E


def test_fractal_dimension_of_curve_is_below_that_of_region():
    z, y, x = fractal_data(3000, seed=8)
    cal = FractalCalibrator().fit(z, y, x)
    assert cal.dims[0] < cal.dims[1] - 0.25


def test_fractal_penalty_helps_when_geometry_is_informative():
    z, y, x = fractal_data(1200, seed=9)
    fit, test = slice(0, 900), slice(900, None)
    frac = FractalCalibrator().fit(z[fit], y[fit], x[fit])
    temp = TemperatureCalibrator().fit(z[fit], y[fit])
    assert frac.beta > 0  # noise logits: the geometry is the only signal
    nll_frac = calibration_report(frac.probs(z[test], x[test]), y[test])["nll"]
    nll_temp = calibration_report(temp.probs(z[test]), y[test])["nll"]
    assert nll_frac < nll_temp - 0.2


def test_fractal_with_useless_features_keeps_beta_zero_or_harmless():
    z_true, y = synthetic(900, seed=10)
    x = torch.randn(900, 16, generator=_gen(11))  # features independent of the label
    cal = FractalCalibrator().fit(2 * z_true, y, x)
    nll = dict(map(tuple, cal.nll_by_beta))
    assert nll[cal.beta] <= nll[0.0]


def test_fractal_requires_features():
    z, y, x = fractal_data(60, seed=12)
    with pytest.raises(ValueError, match="features"):
        FractalCalibrator().fit(z, y)
    cal = FractalCalibrator().fit(z, y, x)
    with pytest.raises(ValueError, match="features"):
        cal.probs(z)
    with pytest.raises(ValueError, match="columns"):
        cal.probs(z, x[:, :4])


def test_fractal_needs_three_prompts_per_axis():
    z, y, x = fractal_data(60, seed=13)
    y = torch.zeros(60, dtype=torch.long)
    y[:30], y[30:32] = 1, 2  # axis 2 has only 2 prompts
    with pytest.raises(ValueError, match=">= 3 fit prompts"):
        FractalCalibrator().fit(z, y, x)


def test_composition_builds_and_chains_log_probs():
    cal = build_calibrator("importance+temperature", gamma=[0.5, 0.3, 0.2])
    assert isinstance(cal, ComposedCalibrator) and cal.name == "importance+temperature"
    assert [type(s) for s in cal.stages] == [ImportanceCalibrator, TemperatureCalibrator]
    z, y = synthetic(3000, seed=14)
    cal.fit(3 * z, y)
    imp, temp = cal.stages
    expected = ((3 * z / imp.temperature + torch.tensor(imp.gamma).log()).log_softmax(1) / temp.temperature).softmax(1)
    assert torch.allclose(cal.probs(3 * z), expected, atol=1e-5)


def test_second_temperature_stage_has_nothing_left_to_fix():
    z, y = synthetic(5000, seed=15)
    cal = build_calibrator("temperature+temperature").fit(4 * z, y)
    assert cal.stages[0].temperature == pytest.approx(4.0, rel=0.1)
    assert cal.stages[1].temperature == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("none", {}),
        ("temperature", {}),
        ("importance", {"gamma": [0.5, 0.3, 0.2]}),
        ("fractal", {}),
        ("importance+temperature", {"gamma": [0.2, 0.3, 0.5]}),
        ("fractal+temperature", {"lambdas": (0.5, 0.5)}),
    ],
)
def test_state_dict_round_trip_through_json(name, kwargs):
    z, y, x = fractal_data(300, seed=16)
    z = 3 * z + 2 * torch.nn.functional.one_hot(y, E)
    cal = build_calibrator(name, **kwargs).fit(z, y, x)
    state = json.loads(json.dumps(cal.state_dict()))
    rebuilt = Calibrator.from_state_dict(state)
    assert type(rebuilt) is type(cal) and rebuilt.name == name
    assert torch.equal(rebuilt.probs(z, x), cal.probs(z, x))
    assert torch.allclose(cal.probs(z, x).sum(1), torch.ones(len(z)), atol=1e-5)
    assert rebuilt.state_dict() == state


def test_from_state_dict_on_wrong_subclass_fails():
    state = TemperatureCalibrator().fit(*synthetic(50, seed=17)).state_dict()
    assert TemperatureCalibrator.from_state_dict(state).temperature == state["temperature"]
    with pytest.raises(ValueError, match="cannot be loaded"):
        FractalCalibrator.from_state_dict(state)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        build_calibrator("platt")
    for known in CALIBRATORS:
        assert known in str(err.value)
    with pytest.raises(ValueError, match="unknown calibrator"):
        build_calibrator("temperature+platt")
    with pytest.raises(ValueError, match="takes no argument"):
        build_calibrator("temperature", gamma=[1, 1, 1])


@pytest.mark.parametrize("name", ["none", "temperature", "importance", "fractal", "importance+temperature"])
def test_empty_fit_split_raises(name):
    cal = build_calibrator(name, gamma=[1, 1, 1]) if "importance" in name else build_calibrator(name)
    with pytest.raises(ValueError, match="empty split"):
        cal.fit(torch.zeros(0, E), torch.zeros(0, dtype=torch.long), torch.zeros(0, 4))


def test_inputs_are_validated():
    z, y = synthetic(20, seed=18)
    cal = TemperatureCalibrator()
    with pytest.raises(RuntimeError, match="not fitted"):
        cal.probs(z)
    with pytest.raises(ValueError, match="2-D"):
        cal.fit(z[:, 0], y)
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        cal.fit(z, torch.full((20,), 3))
    with pytest.raises(ValueError, match="N=20"):
        cal.fit(z, y[:10])
    with pytest.raises(ValueError, match="integers"):
        cal.fit(z, y.float())
    with pytest.raises(ValueError, match="NaN"):
        cal.fit(torch.full((20, E), float("nan")), y)
    cal.fit(z, y)
    with pytest.raises(ValueError, match="fitted on 3 experts"):
        cal.probs(torch.randn(4, 4))
