"""benchmarks/train_judges.py runs end to end on fixture files and writes the issue's judges.json fields."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tiny_judges import build_tiny_encoder, fixture_texts, write_fixture_data

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "train_judges.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_judges", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_judges_on_fixtures(tmp_path, isolated_cache, capsys):
    data = write_fixture_data(tmp_path / "data")
    enc = build_tiny_encoder(tmp_path / "enc", fixture_texts(data))
    out = tmp_path / "results"
    out.mkdir()
    assert _script().main(["--data-dir", str(data), "--encoder", str(enc), "--results-dir", str(out)]) == 0
    res = json.loads((out / "judges.json").read_text())
    helpful = res["helpful"]
    assert helpful["side"] == "eval" and helpful["n_pairs"] == 24 and helpful["n_length_matched"] == 24
    lo, hi = helpful["length_matched_gain_ci95"]
    assert lo <= helpful["length_matched_gain"] <= hi and isinstance(helpful["target_met"], bool)
    assert res["n"]["helpful"] == {"n_pairs": 24, "n_length_matched": 24}
    assert res["n"]["harmless"]["n_heldout"] == 3
    assert res["n"]["truthful"] == {"n_eval_questions": 4, "n_eval_rows": 24}
    assert all(res["honest"][k] is not None for k in ("auc_heldout_questions", "info_auc_heldout_questions"))
    assert set(res["train_seconds"]) == {"truthful", "informative", "harmless", "helpful"}
    md = (out / "judges.md").read_text()
    assert "length_matched_gain_ci95" in md and "n per judge" in md
    # --report-only rebuilds the same figures from the saved judges.
    assert _script().main(["--report-only", "--results-dir", str(out)]) == 0
    assert json.loads((out / "judges.json").read_text())["helpful"] == helpful
