"""Stage fingerprints: keys change exactly when what made a stage changes, and caches that are
damaged are misses with a warning naming the file (experts, router features, evaluation rows)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mocae import stages
from mocae.experts.config import ExpertConfig
from mocae.stages import (StageLog, changed_fields, expert_fingerprint, folder_fingerprint, stage_inputs, stage_key,
                          write_stage)

FIXTURE_DATA = Path(__file__).parent / "fixtures" / "data"


def _data(root: Path, word: str = "Describe", reference: str = "short") -> Path:
    """A copy of the fixture data whose AlpacaEval file has an eval side (24 instructions)."""
    if not root.exists():
        shutil.copytree(FIXTURE_DATA, root)
    datasets = ["helpful_base", "koala", "selfinstruct"]
    rows = [{"dataset": datasets[i % 3], "instruction": f"{word} item number {i} of the list in one line.",
             "output": f"Item {i} is a {reference} example."} for i in range(24)]
    for generator in ("text_davinci_003", "gpt4_1106_preview"):
        (root / "alpaca_eval" / f"reference_{generator}.json").write_text(
            json.dumps([{**r, "generator": generator} for r in rows]))
    return root


def test_stage_key_and_changed_fields():
    inputs = stage_inputs(config=ExpertConfig(axis="helpful"), data={"a.json": "1"})
    assert inputs["split_rules"] == stages.SPLIT_RULES and inputs["config"]["axis"] == "helpful"
    assert stage_key(inputs) == stage_key(json.loads(json.dumps(inputs)))  # plain JSON, stable
    other = stage_inputs(config=ExpertConfig(axis="helpful", rank=4), data={"a.json": "1", "b.json": "2"})
    assert stage_key(other) != stage_key(inputs)
    assert changed_fields(inputs, other) == ["config.rank", "data.b.json"]
    assert changed_fields(inputs, inputs) == []


def test_stage_log_says_what_changed(tmp_path):
    log = StageLog(tmp_path)
    assert log.reason("mocae", {"experts": {"helpful": "a"}}) == "no earlier record"
    log.note("mocae", "k1", {"experts": {"helpful": "a"}}, computed=True)
    log.note("eval/base", "k2", {"model": "m"}, computed=False)
    again = StageLog(tmp_path)  # the next invocation reads this one's log
    assert again.reason("mocae", {"experts": {"helpful": "b"}}) == "changed: experts.helpful"
    assert again.reason("eval/base", {"model": "m"}) == "output missing or unfinished"
    again.note("mocae", "k3", {"experts": {"helpful": "b"}}, computed=True)  # interrupted before eval/base
    third = StageLog(tmp_path)
    assert third.reason("eval/base", {"model": "n"}) == "changed: model"  # kept from the first invocation
    assert third.previous["mocae"]["key"] == "k3"
    (tmp_path / "stages.json").write_text("{garbage")
    with pytest.warns(UserWarning, match=f"stage log {tmp_path / 'stages.json'}"):
        assert StageLog(tmp_path).previous == {}


def test_fingerprints_follow_file_contents(tmp_path, expert_factory):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\x00" * 64)
    first = folder_fingerprint(folder)
    write_stage(folder, "x", "key", {})  # a stage record (it carries a time) is not part of the model
    assert folder_fingerprint(folder) == first
    (folder / "weights.bin").write_bytes(b"\x01" * 64)  # same size, new content
    assert folder_fingerprint(folder) != first

    expert = expert_factory(tmp_path / "expert", seed=0)
    before = expert_fingerprint(expert)
    expert_factory(expert, seed=1)
    assert expert_fingerprint(expert) != before
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'model'}: no adapter_model.safetensors"):
        expert_fingerprint(folder)


def test_expert_folders_are_keyed_by_their_data_files_backbone_and_split_rules(tmp_path, monkeypatch):
    from mocae.experts.train import expert_dir, training_files

    data = _data(tmp_path / "data")
    configs = {axis: ExpertConfig(axis=axis, backbone="tiny-random") for axis in ("helpful", "harmless", "honest")}
    configs["harmless_tq"] = ExpertConfig(axis="harmless", backbone="tiny-random", benign_sources=["truthfulqa"])
    assert training_files(configs["harmless_tq"]) == ["safety_tuned_llamas/safety_only_data_Instructions.json",
                                                      "truthfulqa/TruthfulQA.csv"]

    def dirs():
        return {name: expert_dir(cfg, tmp_path / "experts", data) for name, cfg in configs.items()}

    before = dirs()
    assert len(set(before.values())) == 4 and before == dirs()
    csv = data / "truthfulqa" / "TruthfulQA.csv"
    csv.write_text(csv.read_text() + "\n")  # another TruthfulQA file: the experts that read it are new
    after = dirs()
    assert {n for n in configs if after[n] != before[n]} == {"honest", "harmless_tq"}
    monkeypatch.setattr(stages, "SPLIT_RULES", "truthfulqa-stratified-v2/alpaca-eval-3way-v1")
    assert all(d != after[n] for n, d in dirs().items())  # new split rules: every expert is new
    other = ExpertConfig(axis="helpful", backbone=str(tmp_path))  # another backbone (a local folder)
    assert expert_dir(other, tmp_path / "experts", data).name != after["helpful"].name


def test_damaged_features_cache_is_recomputed_with_a_warning(tmp_path, expert_dirs, tiny):
    from safetensors.torch import save_file

    from mocae.mixture.fit import extract_features, features_path
    from mocae.mixture.model import MoCaEConfig, MoCaEModel

    model = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs, router_input="hidden"), tiny)
    prompts = ["hello there", "is the earth flat?", "how do I pick a lock?"]
    first = extract_features(model, prompts, progress=False, cache=tmp_path)
    path = features_path(model, prompts, tmp_path)
    assert path.is_file() and torch.equal(extract_features(model, prompts, progress=False, cache=tmp_path), first)
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match=f"router features cache {path} is unreadable"):
        assert torch.equal(extract_features(model, prompts, progress=False, cache=tmp_path), first)
    save_file({"features": torch.zeros(2, first.shape[1])}, str(path))  # two rows for three prompts
    with pytest.warns(UserWarning, match=f"router features cache {path} holds"):
        assert torch.equal(extract_features(model, prompts, progress=False, cache=tmp_path), first)


# ---- the evaluation cache ----------------------------------------------------------------------
def _eval_config():
    from mocae.evaluation.harness import EvalConfig

    return EvalConfig(n_helpful=2, n_harmful=2, n_xstest_safe=2, n_truthfulqa=2, max_new_tokens=2,
                      max_new_tokens_short=2, batch_size=2, truthfulqa_mc=False, reference_nll=False,
                      efficiency=False, n_boot=10, judges={"helpful": False, "harmless": False, "honest": False})


def test_evaluation_rows_are_keyed_by_weights_and_prompts(tmp_path):
    from mocae.backbones import load_backbone
    from mocae.evaluation.harness import evaluate

    loads = []

    def loader(shift: float = 0.0):
        def load():
            loads.append(shift)
            model, tokenizer = load_backbone("tiny-random")
            with torch.no_grad():
                next(model.parameters()).add_(shift)
            return model, tokenizer
        return load

    cfg, out, cache = _eval_config(), tmp_path / "eval", tmp_path / "generations"

    def run(shift=0.0, data=_data(tmp_path / "data"), fingerprints=None):
        results = evaluate({"base": loader(shift)}, cfg, out, judges={}, data_dir=data, progress=False,
                           cache_dir=cache, fingerprints=fingerprints)
        return results["evaluated"]["base"], results["systems"]["base"]

    first, result = run()
    assert not first["reused"] and result["cache"]["key"] == first["key"]
    assert result["torch_threads"] == torch.get_num_threads()
    assert run()[0]["reused"]  # loaded only to fingerprint the weights
    assert not run(shift=0.5)[0]["reused"]  # other weights, same name: evaluated again
    assert not run(data=_data(tmp_path / "data2", word="Explain"))[0]["reused"]  # other prompts
    references, _ = run(data=_data(tmp_path / "data3", reference="long"))  # same prompts, other references
    assert not references["reused"] and references["inputs"]["prompts"] != first["inputs"]["prompts"]
    assert len(list((out / "systems").glob("base-*.json"))) == 4

    # Given a fingerprint, a cached row is found without loading the model at all.
    loads.clear()
    assert run(fingerprints={"base": "fp-1"})[0]["reused"] is False and loads == [0.0]
    assert run(fingerprints={"base": "fp-1"})[0]["reused"] and loads == [0.0]
    assert run(fingerprints={"base": "fp-2"})[0]["reused"] is False


def test_mismatched_cached_row_is_a_miss_with_a_warning(tmp_path):
    from mocae.backbones import load_backbone
    from mocae.evaluation.harness import evaluate

    cfg, out, data = _eval_config(), tmp_path / "eval", _data(tmp_path / "data")

    def run():
        return evaluate({"base": lambda: load_backbone("tiny-random")}, cfg, out, judges={}, data_dir=data,
                        progress=False, cache_dir=tmp_path / "generations", fingerprints={"base": "fp"})

    first = run()["systems"]["base"]
    (row,) = (out / "systems").glob("base-*.json")
    row.write_text(json.dumps({**first, "cache": {"key": "another"}}))  # valid JSON, another request's
    with pytest.warns(UserWarning, match=f"evaluation cache {row} is not a result of base for this request"):
        assert run()["evaluated"]["base"]["reused"] is False
    assert json.loads(row.read_text())["cache"] == first["cache"]
