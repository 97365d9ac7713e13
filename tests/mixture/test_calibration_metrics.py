"""Calibration metrics against values computed by hand, and the reliability-diagram PNG."""

from __future__ import annotations

import math

import pytest
import torch

from mocae.mixture.calibration_metrics import (
    calibration_report,
    expected_calibration_error,
    reliability_diagram,
    reliability_diagrams,
)

# Four samples, three classes. Confidences (max prob) 0.9, 0.9, 0.5, 0.5; correctness
# yes, no, yes, yes. With 15 bins, 0.9 falls in [13/15, 14/15) and 0.5 in [7/15, 8/15):
#   ECE = 2/4 * |1/2 - 0.9| + 2/4 * |1 - 0.5| = 0.2 + 0.25 = 0.45
# Brier per sample: 0.1^2 + 2 * 0.05^2 = 0.015; 0.9^2 + 0.95^2 + 0.05^2 = 1.715;
#   0.5^2 + 0.3^2 + 0.2^2 = 0.38; 0.2^2 + 0.5^2 + 0.3^2 = 0.38  -> mean 2.49 / 4 = 0.6225
# NLL: -(log 0.9 + log 0.05 + log 0.5 + log 0.5) / 4
PROBS = torch.tensor([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.2, 0.5, 0.3]])
LABELS = torch.tensor([0, 1, 0, 1])


def test_report_matches_hand_computed_values():
    report = calibration_report(PROBS, LABELS)
    assert report["n"] == 4
    assert report["accuracy"] == pytest.approx(0.75)
    assert report["ece"] == pytest.approx(0.45, abs=1e-6)
    assert report["brier"] == pytest.approx(0.6225, abs=1e-6)
    nll = -(math.log(0.9) + math.log(0.05) + math.log(0.5) + math.log(0.5)) / 4
    assert report["nll"] == pytest.approx(nll, rel=1e-6)


def test_ece_is_zero_when_confidence_equals_accuracy():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    assert expected_calibration_error(probs, torch.tensor([0, 1])) == pytest.approx(0.0, abs=1e-7)
    # ... and it depends on the binning: with 1 bin the two groups above are merged
    assert expected_calibration_error(PROBS, LABELS, n_bins=1) == pytest.approx(abs(0.75 - 0.7), abs=1e-6)


def test_nll_is_clamped_for_zero_probability():
    report = calibration_report(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 1]))
    assert report["nll"] == pytest.approx(-math.log(1e-12) / 2)
    assert report["brier"] == pytest.approx(1.0)  # (1 + 1 + 0 + 0) / 2


def test_report_validates_inputs():
    with pytest.raises(ValueError, match="rows summing to 1"):
        calibration_report(torch.tensor([[2.0, -1.0], [0.3, 0.1]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="0..2"):
        calibration_report(PROBS, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="N=4"):
        calibration_report(PROBS, LABELS[:3])
    with pytest.raises(ValueError, match="non-empty"):
        calibration_report(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1024


def test_reliability_diagram_writes_a_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    probs = (3 * torch.randn(200, 3, generator=g)).softmax(1)
    labels = torch.randint(0, 3, (200,), generator=g)
    out = reliability_diagram(probs, labels, tmp_path / "plots" / "router.png", title="router")
    assert out == tmp_path / "plots" / "router.png"
    assert _is_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["router.png"]  # no temp file left behind


def test_reliability_diagrams_before_and_after(tmp_path):
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(200, 3, generator=g)
    labels = torch.randint(0, 3, (200,), generator=g)
    curves = {"before": (logits.softmax(1), labels), "after": ((logits / 3).softmax(1), labels)}
    single = reliability_diagram(curves["before"][0], labels, tmp_path / "one.png")
    both = reliability_diagrams(curves, tmp_path / "both.png", title="temperature")
    via_dict = reliability_diagram(curves, path=tmp_path / "dict.png")
    assert _is_png(single) and _is_png(both) and _is_png(via_dict)
    from PIL import Image  # matplotlib depends on pillow

    assert Image.open(both).size[0] > 1.5 * Image.open(single).size[0]  # two panels side by side
    with pytest.raises(ValueError, match="at least one"):
        reliability_diagrams({}, tmp_path / "none.png")
    with pytest.raises(ValueError, match="inside the dict"):
        reliability_diagram(curves, labels, tmp_path / "bad.png")
