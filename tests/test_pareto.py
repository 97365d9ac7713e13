"""mocae pareto on tiny-random with the fixture data and fake judges: grid, steering, front, paired diffs."""

import json
import sys
from pathlib import Path

import pytest
import torch

from mocae.mixture.model import MoCaEConfig, MoCaEModel
from mocae.pareto import ParetoConfig, nondominated, run_pareto, simplex_grid, steered

sys.path.insert(0, str(Path(__file__).parent / "evaluation"))
from test_harness import FIXTURE_DATA, fake_judges, small_config  # noqa: E402


def test_simplex_grid_and_front():
    assert simplex_grid(3, 1) == [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
    grid = simplex_grid(3, 2)
    assert len(grid) == 6 and all(abs(sum(p) - 1) < 1e-9 for p in grid) and (0.5, 0.5, 0.0) in grid
    assert len(simplex_grid(3, 3)) == 10
    assert nondominated([[1, 1], [0, 2], [0.5, 0.5], [1, 1]]) == [True, True, False, True]


def test_steering_replaces_routing_and_restores_it(expert_dirs):
    model = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs, router_input="hidden"))
    batch = model.tokenizer(["hello"], return_tensors="pt")
    routed = model.route(**batch)
    with steered(model, weights=[0.0, 1.0, 0.0]):
        assert model.route(**batch).tolist() == [[0.0, 1.0, 0.0]]
        logits = model(**batch).logits
    torch.testing.assert_close(logits, model(**batch, axis_weights=[0, 1, 0]).logits)
    with steered(model, prior=[1.0, 1.0, 0.0]):
        tilted = model.route(**batch)
        assert tilted[0, 2] == 0 and abs(float(tilted.sum()) - 1) < 1e-6
        torch.testing.assert_close(tilted, model.route(**batch, decide=False))  # soft decision: the same
    torch.testing.assert_close(model.route(**batch), routed)


def test_run_pareto_writes_front_and_paired_differences(expert_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("MOCAE_DATA_DIR", str(FIXTURE_DATA))
    model = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs, router_input="hidden"))
    path = model.save_pretrained(tmp_path / "m")
    cfg = ParetoConfig(steps=1, eval=small_config(truthfulqa_mc=False, truthfulqa_mc_chat=False, efficiency=False))
    report = run_pareto(path, cfg, tmp_path / "pareto", judges=fake_judges(), progress=False)
    assert (tmp_path / "pareto" / "pareto.png").is_file()
    saved = json.loads((tmp_path / "pareto" / "pareto.json").read_text())
    assert saved["axes"] == ["helpful", "harmless", "honest"] and len(saved["points"]) == 6
    assert {p["series"] for p in saved["points"]} == {"mocae", "static"}
    for p in saved["points"]:
        assert set(p["objectives"]) == {"helpful", "harmless", "honest"} and "nondominated" in p
    assert len(report["paired_mocae_minus_static"]) == 3
    # at a vertex the tilted router and the fixed weights are the same single expert: identical answers
    outputs = {n: json.loads((tmp_path / "pareto" / n / "outputs.json").read_text())
               for n in ("mocae@1.00-0.00-0.00", "static@1.00-0.00-0.00")}
    assert outputs["mocae@1.00-0.00-0.00"] == outputs["static@1.00-0.00-0.00"]
    assert "route" not in vars(model)  # steering undone

    with pytest.raises(ValueError, match="unknown series"):
        run_pareto(path, ParetoConfig(sweep=["vibes"]), tmp_path / "x", judges=fake_judges())


def test_pareto_command(expert_dirs, tmp_path, monkeypatch, capsys):
    import mocae.evaluation.harness as harness
    from mocae.cli import main

    monkeypatch.setenv("MOCAE_DATA_DIR", str(FIXTURE_DATA))
    monkeypatch.setattr(harness, "load_judges", lambda cfg, loader=None: fake_judges())
    path = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs, router_input="hidden")
                            ).save_pretrained(tmp_path / "m")
    assert main(["pareto", "--model", str(path), "--steps", "1", "--n", "2", "--sweep", "static",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "static@0.00-0.00-1.00" in out and (tmp_path / "pareto" / "pareto.json").is_file()
