import json

import numpy as np
import pytest

from mocae.evaluation.report import format_results_table, router_calibration_curves, write_results


def _m(value, n=10, judge=None):
    out = {"value": value, "n": n, "ci": [value - 5, value + 5]}
    if judge:
        out["judge"] = judge
    return out


def results_fixture(with_routing=True):
    helpful_judge = {"helpful": {"agreement": 0.8, "agreement_length_matched": 0.72}}
    base = {"metrics": {"helpful": {"win_rate_vs_text_davinci_003": _m(40.0, 20, helpful_judge)},
                        "harmless": {"safety_score": _m(30.0, 8, {"harmless": {"auc_heldout_model": 0.96}}),
                                     "safety_score_strmatch": _m(25.0, 8)},
                        "honest": {"mc2": _m(45.0, 6)},
                        "efficiency": {"peak_rss_mb": {"value": 812.4, "n": 1, "ci": [812.4, 812.4]}}},
            "tables": {"harmful_per_category": {"harmbench/illegal": {"n": 3, "judge": 33.3, "strmatch": 0.0}}},
            "routing": None}
    mocae = json.loads(json.dumps(base))
    mocae["metrics"]["helpful"]["win_rate_vs_base"] = _m(55.0, 20, helpful_judge)
    if with_routing:
        mocae["routing"] = {"axes": ["helpful", "harmless", "honest"],
                            "sets": {"alpaca_eval": {"label": 0, "probs": [[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]]},
                                     "harmful": {"label": 1, "probs": [[0.1, 0.8, 0.1]]},
                                     "xstest_safe": {"label": None, "probs": [[0.3, 0.4, 0.3]]}}}
    return {"config": {}, "systems": {"base": base, "mocae": mocae},
            "judges": {"helpful": {"agreement": 0.8, "n_pairs": 1500}}}


def test_table_has_every_system_ci_n_and_judge_validation():
    table = format_results_table(results_fixture())
    lines = table.splitlines()
    assert lines[0].startswith("| system |") and "win % vs base" in lines[0]
    assert "(judge helpful: agreement_length_matched 0.720)" in lines[0]
    assert "(judge harmless: auc_heldout_model 0.960)" in lines[0]
    assert lines[2].startswith("| base | 40.0 [35.0, 45.0] |")
    assert "| - |" in lines[2]  # base has no win rate vs itself
    assert lines[-1].startswith("| n | 20 |")


def test_write_results_writes_json_markdown_and_plots(tmp_path):
    paths = write_results(results_fixture(), tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["systems"]["mocae"]["metrics"]["helpful"]["win_rate_vs_base"]["n"] == 20
    md = (tmp_path / "results.md").read_text()
    assert "harmbench/illegal" in md and "Judges' held-out validation" in md and "n_pairs 1500" in md
    names = {p.split("/")[-1] for p in paths["plots"]}
    assert names == {"hhh_bars.png", "routing_mocae.png", "router_reliability.png"}
    for p in paths["plots"]:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_no_routing_no_routing_plots(tmp_path):
    paths = write_results(results_fixture(with_routing=False), tmp_path)
    assert [p.split("/")[-1] for p in paths["plots"]] == ["hhh_bars.png"]


def test_calibration_curves_use_labelled_sets_only():
    probs, labels = router_calibration_curves(results_fixture())["mocae"]
    assert probs.shape == (3, 3) and labels.tolist() == [0, 0, 1]
    assert np.allclose(probs.sum(1), 1)


def test_explicit_calibration_data_is_plotted(tmp_path):
    curves = {"before": (np.array([[0.6, 0.4], [0.3, 0.7]]), np.array([0, 0]))}
    paths = write_results(results_fixture(with_routing=False), tmp_path, calibration=curves)
    assert any(p.endswith("router_reliability.png") for p in paths["plots"])


def test_run_summary_says_within_noise_and_what_n_can_resolve(tmp_path):
    from mocae.evaluation.report import format_run_summary
    from mocae.pipeline import relative_change

    results = results_fixture(with_routing=False)
    for name, safe in (("base", [0.0] * 8 + [1.0] * 8), ("mocae", [0.0] * 7 + [1.0] * 9)):
        results["systems"][name]["name"] = name
        results["systems"][name]["prompt_sets"] = {"harmful": "h"}
        results["systems"][name]["per_prompt"] = {
            "harmless/safety_score": {"set": "harmful", "scale": 100.0, "values": safe}}
        results["systems"][name]["metrics"]["harmless"]["safety_score"] = _m(100 * sum(safe) / 16, 16)
    write_results(results, tmp_path)
    results["relative_change_mocae_vs_base_pct"] = relative_change(results)
    summary = format_run_summary(results, "quick", tmp_path, [("Router calibration", "a table")])
    row = next(line for line in summary.splitlines() if line.startswith("| harmless/safety_score |"))
    assert row.endswith("| within noise |") and "[" in row  # +6.2 points on 16 prompts: not resolved
    assert "better: yes" not in summary and "| yes |" not in summary
    assert "What this n can resolve" in summary and "harmful 16" in summary and "±34.6 points (n=16)" in summary
    assert summary.rstrip().endswith("a table")
    md = (tmp_path / "results.md").read_text()
    assert "### mocae-base" in md and "within noise" in md
