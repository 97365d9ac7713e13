import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from mocae.evaluation.harness import (EvalConfig, _router_metrics, eval_prompts, evaluate, evaluate_system,
                                     routing_probabilities)

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
    # names the answers' model_id while the system runs: what the bench lands of a cut-off sitting
    assert json.loads((tmp_path / "in_progress.json").read_text()) == {"name": "sys", "model_id": result["model_id"]}
    m = result["metrics"]
    for axis in ("helpful", "harmless", "honest", "efficiency"):
        for metric in m[axis].values():
            _check_metric(metric)
    assert all(e.split == "eval" for e in prompts["alpaca_eval"])  # never a judge's training instruction
    assert m["helpful"]["lc_win_rate_vs_text_davinci_003"]["headline"] is True
    assert {"output_length_chars", "output_length_tokens", "truncated_share", "reference_nll",
            "reference_nll_gpt4"} <= set(m["helpful"])
    assert "gpt4_1106_preview" in m["helpful"]["reference_nll_gpt4"]["method"]
    assert m["helpful"]["reference_nll_gpt4"]["value"] != m["helpful"]["reference_nll"]["value"]
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
    assert m["honest"]["mc1"]["n"] == m["honest"]["mc2"]["n"] == m["honest"]["mc2_chat"]["n"] == 2
    assert "6-shot" in m["honest"]["mc2"]["mode"] and "chat" in m["honest"]["mc2_chat"]["mode"]
    jb = m["harmless"]["safety_jailbreak"]
    assert jb["n"] == len(prompts["harmful_jailbreak"]) == 4 and jb["judge"] == {"harmless": VALIDATION["harmless"]}
    assert m["harmless"]["safety_jailbreak_minus_plain"]["paired"] and "verdict" in m["harmless"][
        "safety_jailbreak_minus_plain"]
    assert set(result["tables"]["jailbreak_per_template"]) == {e.meta["template"] for e in prompts["harmful_jailbreak"]}
    # Every metric of the three axes keeps its per-prompt values, as many as its n.
    per_prompt = result["per_prompt"]
    for axis in ("helpful", "harmless", "honest"):
        for name, metric in m[axis].items():
            if "_harmbench" in name or "_strongreject" in name or metric.get("paired"):
                continue  # per-source breakdowns and within-system differences are derived
            entry = per_prompt[f"{axis}/{name}"]
            assert len(entry.get("values", entry.get("pref", []))) == metric["n"], name
            assert entry["set"] in result["prompt_sets"]
    lc = per_prompt["helpful/lc_win_rate_vs_base"]
    assert lc["other_chars"] == [len(o) for o in base_outputs] and lc["pref"] == [0.75] * len(base_outputs)
    assert result["torch_threads"] >= 1
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
    # With fingerprints (what the pipeline passes) a cached row is found without loading its model.
    prints = {"base": "fp-base", "other": "fp-other"}
    first = evaluate({"other": loader("other"), "base": loader("base")}, cfg, tmp_path, judges=judges,
                     progress=False, fingerprints=prints)
    loads.clear()
    again = evaluate({"other": loader("other"), "base": loader("base")}, cfg, tmp_path, judges=judges,
                     progress=False, fingerprints=prints)
    assert loads == []  # nothing reloaded
    assert all(e["reused"] for e in again["evaluated"].values())
    assert not any(e["reused"] for e in first["evaluated"].values())
    assert again["systems"]["other"]["metrics"] == results["systems"]["other"]["metrics"]
    # Paired comparisons: the fake judge prefers "other" with 0.75 everywhere, base ties itself at 0.5.
    diff = results["comparisons"]["other-base"]["helpful/win_rate_vs_base"]
    assert diff["value"] == pytest.approx(25.0) and diff["ci"] == pytest.approx([25.0, 25.0])
    assert diff["verdict"] == "better"
    same = results["comparisons"]["other-base"]["harmless/over_refusal_xstest"]
    assert same["value"] == 0 and same["verdict"] == "within noise"  # one tiny model under two names
    assert "## Paired differences" in md and "within noise" in md and "resolved only beyond" in md
    assert results["torch_threads"] >= 1


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
    routing = routing_probabilities(FakeRouted(), tokenizer, sets, cfg)
    assert routing["sets"]["alpaca_eval"]["label"] == 0 and routing["sets"]["xstest_safe"]["label"] is None
    assert len(routing["sets"]["harmful"]["probs"]) == 4
    router = _router_metrics(routing, cfg)
    labelled = len(prompts["alpaca_eval"]) + 4 + len(prompts["truthfulqa"])
    assert router["accuracy"]["value"] == pytest.approx(len(prompts["alpaca_eval"]) / labelled)
    assert router["accuracy"]["n"] == labelled
    assert router["ece"]["value"] == pytest.approx(abs(0.8 - router["accuracy"]["value"]), abs=1e-6)
    assert routing_probabilities(object(), tokenizer, sets, cfg) is None  # plain models have no routing


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
    routing = routing_probabilities(model, model.tokenizer, {"alpaca_eval": prompts["alpaca_eval"],
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
    from mocae.cli import build_parser, eval_loaders
    from mocae.pipeline import load_eval_config

    args = build_parser().parse_args(["eval", "--model", "base", "--preset", "full", "--out", str(tmp_path)])
    assert args.model == "base" and args.preset == "full" and callable(args.func)
    quick, full = load_eval_config("quick"), load_eval_config("full")
    assert quick.n_helpful and quick.max_new_tokens <= 64 and full.n_helpful is None
    assert list(eval_loaders("base")) == ["base"]
    with pytest.raises(FileNotFoundError, match="not a saved system.*adapter_config.json.*mocae_config.json"):
        eval_loaders(str(tmp_path))
    expert_factory(tmp_path / "adapter", 0)  # a real adapter: its files are checked here, before any load
    assert list(eval_loaders(str(tmp_path / "adapter"))) == ["base", "adapter"]


def test_jailbreak_set_spreads_templates_evenly_and_pairs_with_the_plain_prompts(data):
    from mocae.data.loaders import load_jailbreak_templates

    cfg = small_config(n_harmful=4, n_jailbreak=4)
    prompts = eval_prompts(cfg)
    harmful, templates = prompts["harmful"], load_jailbreak_templates(data)
    from mocae.evaluation.harness import jailbreak_set

    many = [harmful[i % len(harmful)] for i in range(20)]  # 20 underlying prompts over 9 templates
    wrapped = jailbreak_set(many, templates, n=20)
    counts = {t.meta["name"]: sum(e.meta["template"] == t.meta["name"] for e in wrapped) for t in templates}
    assert set(counts.values()) == {2, 3} and sum(counts.values()) == 20  # every template, within one
    for e in wrapped:
        plain = many[e.meta["plain_index"]].prompt
        assert e.meta["request"] == plain and e.source == "jailbreak"
        template = next(t for t in templates if t.meta["name"] == e.meta["template"])
        if template.meta["slot"]:  # RANTI: the request sits in its slot, nothing after the template
            assert "INSERT PROMPT HERE" not in e.prompt and plain in e.prompt and not e.prompt.endswith("\n\n" + plain)
        else:
            assert e.prompt == template.prompt + "\n\n" + plain
    # In eval_prompts: drawn from the plain harmful set itself, capped at its size.
    assert [e.meta["request"] for e in prompts["harmful_jailbreak"]] == [e.prompt for e in harmful]
    assert len(eval_prompts(small_config(n_harmful=4, n_jailbreak=100))["harmful_jailbreak"]) == 4


def test_truthfulqa_mc_and_judged_sets_can_differ_in_size(data):
    prompts = eval_prompts(small_config(n_truthfulqa=3, n_truthfulqa_judged=1))
    assert len(prompts["truthfulqa_mc"]) == 3 and len(prompts["truthfulqa"]) == 1
    assert len(eval_prompts(small_config(n_truthfulqa=2))["truthfulqa"]) == 2  # default: the same n


def test_full_preset_meets_the_protocol_sizes(real_data_dir, monkeypatch):
    """Issue 12's sizes: >= 300 helpful eval-side, >= 300 harmful, 250 XSTest safe, ~409 MC, >= 200 judged."""
    from collections import Counter

    from mocae.pipeline import load_run_config

    monkeypatch.setenv("MOCAE_DATA_DIR", str(real_data_dir))
    cfg = load_run_config("full").eval
    sets = eval_prompts(cfg)
    assert len(sets["alpaca_eval"]) >= 300 and {e.split for e in sets["alpaca_eval"]} == {"eval"}
    assert len(sets["harmful"]) >= 300 and {e.meta.get("functional_category") for e in sets["harmful"]
                                            if e.source == "harmbench"} == {"standard"}
    assert len(sets["xstest_safe"]) == 250 and len(sets["truthfulqa_mc"]) >= 400 and len(sets["truthfulqa"]) >= 200
    assert cfg.max_new_tokens == 256 and cfg.truthfulqa_mc_chat
    per_template = Counter(e.meta["template"] for e in sets["harmful_jailbreak"])
    assert len(sets["harmful_jailbreak"]) >= 150 and len(per_template) == 9 and set(per_template.values()) == {18}
    quick = load_run_config("quick").eval
    assert quick.n_helpful <= 32 and quick.n_jailbreak == 9


def test_a_retrained_judge_rejudges_without_generating_or_scoring_again(tiny, data, tmp_path, monkeypatch):
    """A changed judge re-evaluates a system from its cached answers, NLLs and MC scores: no forward pass."""
    import mocae.evaluation.sanity as sanity
    import mocae.evaluation.truthfulqa_mc as tmc

    cfg = small_config(efficiency=False, truthfulqa_mc_chat=False)
    cache = tmp_path / "gen-cache"
    first = evaluate({"base": lambda: tiny}, cfg, tmp_path / "a", judges=fake_judges(), progress=False,
                     cache_dir=cache)
    kinds = sorted(json.loads(p.read_text()).get("kind", "answers") for p in cache.glob("*.json"))
    assert "truthfulqa_mc" in kinds and "nll_text_davinci_003" in kinds and "nll_gpt4_1106_preview" in kinds

    def forbidden(*a, **k):
        raise AssertionError("recomputed a cached judge-free score")
    monkeypatch.setattr(sanity, "reference_nll", forbidden)
    monkeypatch.setattr(tmc, "truthfulqa_mc", forbidden)
    import mocae.generation as generation
    monkeypatch.setattr(generation, "generate_batch", forbidden)
    judges = fake_judges()
    judges["harmless"] = FakeScoreJudge("harmless", 0.1)  # "retrained": another validation would change the key
    judges["harmless"].validation = {"auc_heldout_model": 0.5}
    again = evaluate({"base": lambda: tiny}, cfg, tmp_path / "a", judges=judges, progress=False, cache_dir=cache)
    assert not again["evaluated"]["base"]["reused"]  # the key changed with the judge ...
    old, new = first["systems"]["base"]["metrics"], again["systems"]["base"]["metrics"]
    assert new["honest"]["mc2"] == old["honest"]["mc2"]  # ... the forward-pass scores came from the cache
    assert new["helpful"]["reference_nll_gpt4"] == old["helpful"]["reference_nll_gpt4"]
    assert new["harmless"]["safety_score"]["value"] != old["harmless"]["safety_score"]["value"]  # re-judged


# ---- a system added from outside: one module (here, the functions below) and one registry line ----
TOY_FILE = "toy.json"


def _toy(backbone: str):
    """The backbone with its (tied) embeddings halved: a system that differs from base, made in no time."""
    from mocae.backbones import load_backbone
    from mocae.spec import Capabilities, declare

    model, tokenizer = load_backbone(backbone)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(0.5)
    model.toy_backbone = backbone
    return declare(model, Capabilities(kv_cache=False)), tokenizer


def _toy_save(model, tokenizer, path):
    from mocae.spec import write_marker

    path.mkdir(parents=True)
    (path / TOY_FILE).write_text(json.dumps({"backbone": model.toy_backbone}))
    write_marker(path, "toy")
    return path


def _toy_spec():
    from mocae.spec import SystemSpec

    return SystemSpec(name="toy", build=lambda ctx: _toy(ctx.backbone), fingerprint=lambda ctx: {"scale": 0.5},
                      save_pretrained=_toy_save, files=(TOY_FILE,),
                      from_pretrained=lambda path, backbone=None: _toy(json.loads((path / TOY_FILE).read_text())
                                                                       ["backbone"]))


def test_a_registered_system_is_built_saved_loaded_and_evaluated(data, tmp_path, monkeypatch):
    import mocae.systems as systems
    from mocae.spec import capabilities_of

    monkeypatch.setattr(systems, "SPECS", list(systems.SPECS))  # the registry line, undone after the test
    systems.register(_toy_spec())
    with pytest.raises(ValueError, match="already registered"):
        systems.register(_toy_spec())
    run = systems.RunSystems(backbone="tiny-random", experts={}, run_dir=str(tmp_path / "run"))
    model, tokenizer = systems.load_system("toy", run)
    folder = systems.save_system("toy", model, tokenizer, tmp_path / "toy")
    assert systems.detect(folder).name == "toy" and systems.system_fingerprint("toy", run)
    loaded, _ = systems.load_system(folder)  # by its marker, as any saved system
    assert not capabilities_of(loaded).kv_cache  # declared by its builder, not probed
    results = evaluate({"base": lambda: systems.load_system("base", backbone="tiny-random"),
                        "toy": lambda: systems.load_system(folder)}, small_config(efficiency=False),
                       tmp_path / "eval", judges=fake_judges(), progress=False)
    toy, base = results["systems"]["toy"], results["systems"]["base"]
    assert toy["metrics"]["honest"]["mc1"]["n"] == base["metrics"]["honest"]["mc1"]["n"] > 0
    assert toy["model_id"] != base["model_id"] and toy["routing"] is None
