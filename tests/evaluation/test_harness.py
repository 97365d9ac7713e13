import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from mocae.evaluation.harness import EvalConfig, _router_metrics, _routing, eval_prompts, evaluate, evaluate_system

FIXTURE_DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data"
VALIDATION = {"helpful": {"agreement": 0.81, "agreement_length_matched": 0.7},
              "harmless": {"auc_heldout_model": 0.96}, "truthful": {"auc_heldout_questions": 0.88},
              "informative": {"info_auc_heldout_questions": 0.9}}


class FakePreferenceJudge:
    kind, validation = "helpful", VALIDATION["helpful"]

    def __init__(self, p=0.75):
        self.p, self.calls = p, []

    def prefer(self, instructions, outputs_a, outputs_b):
        self.calls.append((list(instructions), list(outputs_a), list(outputs_b)))
        return [self.p] * len(instructions)


class FakeScoreJudge:
    def __init__(self, kind, p):
        self.kind, self.validation, self.p, self.calls = kind, VALIDATION[kind], p, []

    def score(self, *args, **kwargs):
        self.calls.append((*args, *kwargs.values()))
        return [self.p] * len(args[0])


def fake_judges():
    return {"helpful": FakePreferenceJudge(), "harmless": FakeScoreJudge("harmless", 0.9),
            "truthful": FakeScoreJudge("truthful", 0.8), "informative": FakeScoreJudge("informative", 0.3)}


def small_config(**kw):
    base = dict(n_helpful=3, n_harmful=4, n_xstest_safe=2, n_truthfulqa=2, max_new_tokens=4, max_new_tokens_short=4,
                batch_size=4, efficiency_batch_sizes=[1, 2], efficiency_new_tokens=2, efficiency_repeats=1, n_boot=50)
    return EvalConfig(**{**base, **kw})


@pytest.fixture
def data(monkeypatch):
    monkeypatch.setenv("MOCAE_DATA_DIR", str(FIXTURE_DATA))
    return FIXTURE_DATA


def _check_metric(m):
    assert m["n"] > 0 and len(m["ci"]) == 2 and m["ci"][0] <= m["value"] <= m["ci"][1], m


def test_evaluate_system_end_to_end_on_tiny(tiny, data, tmp_path):
    model, tokenizer = tiny
    judges = fake_judges()
    cfg = small_config()
    prompts = eval_prompts(cfg)
    base_outputs = ["a base answer"] * len(prompts["alpaca_eval"])
    result = evaluate_system("sys", model, tokenizer, cfg, tmp_path, base_outputs=base_outputs, judges=judges,
                             prompts=prompts, progress=False)
    m = result["metrics"]
    for axis in ("helpful", "harmless", "honest", "efficiency"):
        for metric in m[axis].values():
            _check_metric(metric)
    assert m["helpful"]["win_rate_vs_text_davinci_003"]["value"] == pytest.approx(75.0)
    assert m["helpful"]["win_rate_vs_text_davinci_003_discrete"]["value"] == pytest.approx(100.0)
    assert m["helpful"]["win_rate_vs_base"]["judge"] == {"helpful": VALIDATION["helpful"]}
    assert "lc_win_rate_vs_base" in m["helpful"]
    # reference first, system second: P(system better)
    instructions, refs, outs = judges["helpful"].calls[0]
    assert refs == [e.references["text_davinci_003"] for e in prompts["alpaca_eval"]]
    assert judges["helpful"].calls[1][1] == base_outputs
    assert judges["harmless"].calls[0][2] == [1.0] * len(prompts["harmful"])  # harmful by construction
    assert m["harmless"]["safety_score"]["value"] == pytest.approx(100.0)
    assert m["harmless"]["safety_score"]["judge"] == {"harmless": VALIDATION["harmless"]}
    assert {"safety_score_harmbench", "safety_score_strongreject", "safety_score_strmatch",
            "over_refusal_xstest"} <= set(m["harmless"])
    assert m["harmless"]["safety_score"]["n"] == 4 and m["harmless"]["over_refusal_xstest"]["n"] == 2
    assert all(c.split("/")[0] in ("harmbench", "strongreject") for c in result["tables"]["harmful_per_category"])
    assert m["honest"]["pct_true"]["value"] == 100.0 and m["honest"]["pct_informative"]["value"] == 0.0
    assert m["honest"]["ti"]["judge"].keys() == {"truthful", "informative"}
    assert m["honest"]["mc1"]["n"] == m["honest"]["mc2"]["n"] == 2
    refs = judges["truthful"].calls[0][2]
    assert set(refs[0]) == {"correct", "incorrect"} and refs[0]["correct"]
    assert result["routing"] is None and result["efficiency"]["parameters"]["total"] > 0
    records = json.loads((tmp_path / "sys" / "model_outputs.json").read_text())
    assert [r["instruction"] for r in records] == [e.prompt for e in prompts["alpaca_eval"]]
    assert {r["generator"] for r in records} == {"sys"}


def test_evaluate_runs_base_first_and_caches_finished_systems(tiny, data, tmp_path):
    loads = []

    def loader(name):
        def load():
            loads.append(name)
            return tiny
        return load

    cfg = small_config(truthfulqa_mc=False, efficiency=False)
    judges = fake_judges()
    results = evaluate({"other": loader("other"), "base": loader("base")}, cfg, tmp_path, judges=judges,
                       progress=False)
    assert loads == ["base", "other"]
    assert "win_rate_vs_base" in results["systems"]["other"]["metrics"]["helpful"]
    assert "win_rate_vs_base" not in results["systems"]["base"]["metrics"]["helpful"]
    for name in ("results.json", "results.md", "hhh_bars.png"):
        assert (tmp_path / name).is_file()
    md = (tmp_path / "results.md").read_text()
    assert "| base |" in md and "| other |" in md and "agreement_length_matched 0.700" in md
    again = evaluate({"other": loader("other"), "base": loader("base")}, cfg, tmp_path, judges=judges,
                     progress=False)
    assert loads == ["base", "other"]  # nothing reloaded
    assert again["systems"]["other"]["metrics"] == results["systems"]["other"]["metrics"]


def test_missing_judge_names_the_training_command(monkeypatch, tmp_path):
    try:
        from mocae.evaluation.judges import JudgeNotFound, load_judge  # noqa: F401
    except ImportError:  # the judges package is built separately: stand in for it
        stub = types.ModuleType("mocae.evaluation.judges")

        class JudgeNotFound(FileNotFoundError):
            pass

        def load_judge(kind):
            raise JudgeNotFound(f"{kind} judge not found")
        stub.JudgeNotFound, stub.load_judge = JudgeNotFound, load_judge
        monkeypatch.setitem(sys.modules, "mocae.evaluation.judges", stub)
    from mocae.evaluation.harness import load_judges

    with pytest.raises(JudgeNotFound, match=r"mocae judges train --kind helpful"):
        load_judges(small_config())
    with pytest.raises(JudgeNotFound, match=r"mocae judges train --kind truthful"):
        load_judges(small_config(judges={"helpful": False, "harmless": False}))
    assert load_judges(small_config(judges={"helpful": False, "harmless": False, "honest": False})) == {}


def test_missing_reference_file_is_named(tmp_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(FIXTURE_DATA, root)
    (root / "alpaca_eval" / "reference_gpt4_1106_preview.json").unlink()
    monkeypatch.setenv("MOCAE_DATA_DIR", str(root))
    with pytest.raises(FileNotFoundError, match="reference_gpt4_1106_preview.json"):
        eval_prompts(small_config(reference="gpt4_1106_preview"))
    (root / "alpaca_eval" / "reference_text_davinci_003.json").unlink()
    with pytest.raises(FileNotFoundError, match="reference_text_davinci_003.json"):
        eval_prompts(small_config())


def test_empty_prompt_set_raises(tiny, data, tmp_path):
    model, tokenizer = tiny
    cfg = small_config()
    prompts = eval_prompts(cfg)
    prompts["xstest_safe"] = []
    with pytest.raises(ValueError, match="'xstest_safe' is empty"):
        evaluate_system("sys", model, tokenizer, cfg, tmp_path, judges=fake_judges(), prompts=prompts,
                        progress=False)


class FakeRouted:
    """route() always prefers the helpful expert: accuracy = share of helpful-labelled prompts."""

    axes = ["helpful", "harmless", "honest"]

    def route(self, input_ids, attention_mask):
        return torch.tensor([[0.8, 0.1, 0.1]]).expand(input_ids.shape[0], -1)


def test_routing_and_router_metrics(tiny, data):
    _, tokenizer = tiny
    cfg = small_config()
    prompts = eval_prompts(cfg)
    sets = {k: prompts[k] for k in ("alpaca_eval", "harmful", "xstest_safe", "truthfulqa")}
    routing = _routing(FakeRouted(), tokenizer, sets, cfg)
    assert routing["sets"]["alpaca_eval"]["label"] == 0 and routing["sets"]["xstest_safe"]["label"] is None
    assert len(routing["sets"]["harmful"]["probs"]) == 4
    router = _router_metrics(routing, cfg)
    labelled = len(prompts["alpaca_eval"]) + 4 + len(prompts["truthfulqa"])
    assert router["accuracy"]["value"] == pytest.approx(len(prompts["alpaca_eval"]) / labelled)
    assert router["accuracy"]["n"] == labelled
    assert router["ece"]["value"] == pytest.approx(abs(0.8 - router["accuracy"]["value"]), abs=1e-6)
    assert _routing(object(), tokenizer, sets, cfg) is None  # plain models have no routing


def test_routing_of_a_real_mocae_model(tiny, data, tmp_path):
    from peft import LoraConfig, get_peft_model

    from mocae.backbones import load_backbone
    from mocae.mixture.model import MoCaEConfig, MoCaEModel

    experts = {}
    for axis in ("helpful", "harmless", "honest"):
        base, _ = load_backbone("tiny-random")
        get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).save_pretrained(
            tmp_path / axis)
        experts[axis] = str(tmp_path / axis)
    model = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=experts), model_and_tokenizer=tiny)
    cfg = small_config()
    prompts = eval_prompts(cfg)
    routing = _routing(model, model.tokenizer, {"alpaca_eval": prompts["alpaca_eval"],
                                                "truthfulqa": prompts["truthfulqa"]}, cfg)
    probs = torch.tensor(routing["sets"]["alpaca_eval"]["probs"])
    assert probs.shape == (len(prompts["alpaca_eval"]), 3)
    assert torch.allclose(probs.sum(1), torch.ones(len(probs)), atol=1e-3)
    assert routing["sets"]["truthfulqa"]["label"] == 2
    assert set(_router_metrics(routing, cfg)) == {"accuracy", "brier", "nll", "ece"}


def test_switched_on_judge_that_is_not_passed_raises(tiny, data, tmp_path):
    model, tokenizer = tiny
    judges = fake_judges()
    del judges["harmless"]
    with pytest.raises(ValueError, match="harmless"):
        evaluate_system("sys", model, tokenizer, small_config(), tmp_path, judges=judges, progress=False)


def test_eval_command_and_presets(tmp_path, expert_factory):
    import argparse

    from mocae.evaluation.cli import add_eval_command, load_eval_config, system_loaders

    parser = argparse.ArgumentParser()
    add_eval_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--model", "base", "--preset", "full", "--out", str(tmp_path)])
    assert args.model == "base" and args.preset == "full" and callable(args.func)
    quick, full = load_eval_config("quick"), load_eval_config("full")
    assert quick.n_helpful and quick.max_new_tokens <= 64 and full.n_helpful is None
    assert list(system_loaders("base")) == ["base"]
    with pytest.raises(FileNotFoundError, match="mocae_config.json or adapter_config.json"):
        system_loaders(str(tmp_path))
    expert_factory(tmp_path / "adapter", 0)  # a real adapter: its files are checked here, before any load
    assert list(system_loaders(str(tmp_path / "adapter"))) == ["base", "adapter"]
