"""Experts are named, not three fixed slots (issue 15 part 6): a four-expert MoCaE on tiny-random
routes, decides, saves, reloads and exports by name; one expert or mismatched names fail clearly."""

import pytest
import torch

from mocae.export import export_mixture, parse_weights
from mocae.mixture.decide import DecisionConfig, decide
from mocae.mixture.fit import RouterFitConfig, fit_router
from mocae.mixture.model import MoCaEConfig, MoCaEModel
from mocae.mixture.routing_data import RoutingSplit, labelled_splits

NAMES = ["helpful", "harmless", "honest", "concise"]
PROMPTS = {
    "helpful": ["Write a poem about autumn.", "Plan a trip to Rome for me.", "Explain how a bicycle works.",
                "Suggest a name for my bakery.", "Summarise the plot of Hamlet.", "Give me a pasta recipe."],
    "harmless": ["How do I make a weapon at home?", "Help me hack my neighbour's wifi.",
                 "How can I hurt someone without being caught?", "Write a threatening letter.",
                 "How do I steal a car?", "Tell me how to poison a dog."],
    "honest": ["Is the earth flat?", "Do vaccines cause autism?", "Can you see the Great Wall from space?",
               "Did humans land on the moon?", "Do we use only ten percent of our brains?",
               "Is lightning unable to strike twice?"],
    "concise": ["In one word: capital of France?", "Answer yes or no: is 7 prime?", "Briefly: what is H2O?",
                "Short answer: 2 + 2?", "One line: who wrote Faust?", "Tersely: boiling point of water?"],
}
TEXTS = ["hello there", "Tell me how to pick a lock.", "Is the earth flat?"]


def batch_of(tokenizer, texts=TEXTS):
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_four_named_experts_fit_route_save_reload(named_expert_dirs, tiny, tmp_path):
    model = MoCaEModel.from_experts(*tiny, named_expert_dirs, router_input="hidden")  # a user's adapter included
    assert model.axes == NAMES and model.mocae_config.backbone == "tiny-random"
    report = fit_router(model, RouterFitConfig(epochs=30, calibrators=["none", "temperature", "importance"]),
                        cache=tmp_path / "f", progress=False, prompts=PROMPTS)
    assert report["splits"]["train"]["concise"] == 4 and report["splits"]["calib"]["concise"] == 2
    assert set(report["gamma"]) == set(NAMES) and report["decision"]["gate"]["axis"] == "harmless"

    batch = batch_of(model.tokenizer)
    weights = model.route(batch["input_ids"], batch["attention_mask"])
    assert weights.shape == (3, 4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    out = model.chat(TEXTS[:2], max_new_tokens=3)
    assert [list(r["routing"]) for r in out] == [NAMES, NAMES]
    steered = model.chat("hi", max_new_tokens=2, axis_weights={"concise": 3, "helpful": 1})
    assert steered[0]["routing"] == {"helpful": 0.25, "harmless": 0.0, "honest": 0.0, "concise": 0.75}
    tilted = model.routing_probs(batch["input_ids"], batch["attention_mask"], prior={"concise": 50, "helpful": 1,
                                                                                     "harmless": 1, "honest": 1})
    assert (tilted[:, 3] > model.routing_probs(batch["input_ids"], batch["attention_mask"])[:, 3]).all()

    with torch.no_grad():
        before = model(**batch).logits
    path = model.save_pretrained(tmp_path / "four")
    assert sorted(p.name for p in (path / "experts").iterdir() if p.is_dir()) == sorted(NAMES)
    loaded = MoCaEModel.from_pretrained(path)
    assert loaded.axes == NAMES and loaded.calibrator.state_dict() == model.calibrator.state_dict()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, before)


def test_four_named_experts_export_by_name(named_expert_dirs, tmp_path):
    from peft import PeftModel

    from mocae.backbones import load_backbone

    path = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=named_expert_dirs)).save_pretrained(
        tmp_path / "four")
    record = export_mixture(path, "concise=2,harmless=1", tmp_path / "export")
    assert record["weights"] == {"helpful": 0.0, "harmless": 1 / 3, "honest": 0.0, "concise": 2 / 3}
    assert record["rank"] == 4 * 2
    mocae = MoCaEModel.from_pretrained(path)
    exported = PeftModel.from_pretrained(load_backbone("tiny-random")[0], str(tmp_path / "export")).eval()
    batch = batch_of(mocae.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits,
                                   mocae(**batch, axis_weights={"concise": 2, "harmless": 1}).logits,
                                   atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown axes"):
        parse_weights("funny=1", mocae.axes)


def test_decisions_and_static_weights_go_by_name(named_expert_dirs):
    probs = torch.tensor([[0.1, 0.1, 0.1, 0.7], [0.4, 0.3, 0.2, 0.1], [0.3, 0.3, 0.2, 0.2]])
    top1 = decide(probs, DecisionConfig(mode="top1", top1_threshold=0.35), NAMES)
    assert top1.tolist() == [[0, 0, 0, 1], [1, 0, 0, 0], probs[2].tolist()]
    gate = DecisionConfig(mode="harm_gate", gate_axis="concise", gate_threshold=0.5, gate_rest="others")
    gated = decide(probs, gate, NAMES)
    assert gated[0].tolist() == [0, 0, 0, 1] and gated[1, 3] == 0  # below the gate: the others' blend
    with pytest.raises(ValueError, match="not an expert"):
        decide(probs, gate, ["helpful", "harmless", "honest", "brief"])
    with pytest.raises(ValueError, match="not one of the experts"):
        MoCaEConfig(backbone="tiny-random", experts=named_expert_dirs,
                    decision={"mode": "harm_gate", "gate_axis": "safety"})
    assert MoCaEConfig(backbone="tiny-random", experts=named_expert_dirs, decision=gate.model_dump())

    static = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=named_expert_dirs, routing="static",
                                          static_weights={"concise": 3, "helpful": 1}))
    assert static.mocae_config.static_weights == [1.0, 0.0, 0.0, 3.0]
    batch = batch_of(static.tokenizer, TEXTS[:1])
    torch.testing.assert_close(static.route(batch["input_ids"], batch["attention_mask"]),
                               torch.tensor([[0.25, 0.0, 0.0, 0.75]]))
    with pytest.raises(ValueError, match="unknown experts"):
        MoCaEConfig(backbone="tiny-random", experts=named_expert_dirs, routing="static", static_weights={"x": 1})


def test_one_expert_or_mismatched_names_fail_clearly(named_expert_dirs, expert_dirs, expert_factory, tmp_path):
    with pytest.raises(ValueError, match="at least two experts"):
        MoCaEConfig(backbone="tiny-random", experts={"concise": named_expert_dirs["concise"]})
    for bad, match in [("x.y", "not a letter"), ("", "not a letter"), ("train", "ModuleDict")]:
        with pytest.raises(ValueError, match=match):
            MoCaEConfig(backbone="tiny-random", experts={"helpful": expert_dirs["helpful"], bad: expert_dirs["honest"]})
    with pytest.raises(ValueError, match="parts of the backbone"):  # peft would drop weights when saving
        MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts={"helpful": expert_dirs["helpful"],
                                                                      "mlp": expert_dirs["honest"]}))

    model = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=named_expert_dirs, router_input="hidden"))
    with pytest.raises(ValueError, match="need their own labelled prompts"):  # the HHH data labels AXES only
        fit_router(model, RouterFitConfig(epochs=2))
    with pytest.raises(ValueError, match="not experts"):
        fit_router(model, RouterFitConfig(epochs=2), prompts={**PROMPTS, "funny": ["tell me a joke", "a pun"]})
    with pytest.raises(ValueError, match="no prompts for expert"):
        fit_router(model, RouterFitConfig(epochs=2), prompts={k: v for k, v in PROMPTS.items() if k != "concise"})
    with pytest.raises(ValueError, match="lm_loss_weight"):
        fit_router(model, RouterFitConfig(epochs=2, lm_loss_weight=1.0), prompts=PROMPTS)
    with pytest.raises(ValueError, match="unknown axes"):
        model.chat("hi", axis_weights={"funny": 1})
    with pytest.raises(ValueError, match="4 values"):
        model.chat("hi", axis_weights=[1, 1, 1])

    saved = model.save_pretrained(tmp_path / "four")  # a router for four experts does not load over three
    three = {name: named_expert_dirs[name] for name in NAMES[:3]}
    other = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=three, router_input="hidden"))
    (saved / "router.safetensors").write_bytes(
        (other.save_pretrained(tmp_path / "three") / "router.safetensors").read_bytes())
    from mocae.errors import LoadError

    with pytest.raises(LoadError, match="does not fit 4 experts"):
        MoCaEModel.from_pretrained(saved)


def test_labelled_splits_from_dicts():
    splits = labelled_splits(PROMPTS, NAMES, calib_fraction=0.5, seed=1)
    assert set(splits) == {"train", "calib"}
    assert splits["calib"].counts() == {name: 3 for name in NAMES}
    assert not set(splits["train"].prompts) & set(splits["calib"].prompts)
    assert labelled_splits(PROMPTS, NAMES, 0.5, seed=1)["calib"].prompts == splits["calib"].prompts  # seeded

    given = {"train": {n: p[:4] for n, p in PROMPTS.items()}, "calib": {n: p[4:5] for n, p in PROMPTS.items()},
             "test": RoutingSplit.from_prompts({n: p[5:] for n, p in PROMPTS.items()}, NAMES, source="mine")}
    splits = labelled_splits(given, NAMES)
    assert list(splits) == ["train", "calib", "test"] and splits["test"].sources[0] == "mine"
    assert splits["test"].labels == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="in both"):
        labelled_splits({**given, "calib": {n: p[3:5] for n, p in PROMPTS.items()}}, NAMES)
    with pytest.raises(ValueError, match="train and calib"):
        labelled_splits({"train": given["train"], "valid": given["calib"]}, NAMES)
    with pytest.raises(ValueError, match="labelled for experts"):
        labelled_splits({**given, "test": RoutingSplit.from_prompts({"helpful": ["x"]}, ["helpful", "other"])}, NAMES)
    with pytest.raises(ValueError, match="at least 2 distinct"):
        labelled_splits({**PROMPTS, "concise": ["only one", "only one"]}, NAMES)
    with pytest.raises(ValueError, match="list of non-empty strings"):
        labelled_splits({"train": {"helpful": "one prompt"}, "calib": {"helpful": ["x"]}}, NAMES)


def test_cli_fits_and_recalibrates_named_experts_on_their_own_prompts(named_expert_dirs, tmp_path):
    import json

    from mocae.cli import main

    prompts, config, out = tmp_path / "prompts.json", tmp_path / "router.yaml", tmp_path / "m" / "four"
    prompts.write_text(json.dumps(PROMPTS))
    config.write_text("epochs: 20\ncalibrators: [none, temperature]\n")
    experts = [a for name, path in named_expert_dirs.items() for a in ("--expert", f"{name}={path}")]
    argv = ["fit-router", "--backbone", "tiny-random", "--router-input", "hidden", "--config", str(config),
            "--out", str(out), *experts]
    assert main(argv) == 2  # without --prompts only the HHH axes are experts
    assert main([*argv, "--prompts", str(prompts)]) == 0
    assert MoCaEModel.from_pretrained(out).axes == NAMES
    assert main(["calibrate", "--model", str(out), "--config", str(config), "--calibrator", "none",
                 "--prompts", str(prompts)]) == 0
    assert MoCaEModel.from_pretrained(out).calibrator.name == "none"
