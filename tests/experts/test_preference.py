"""Preference pairs for DPO experts: training sides only, and a clear error for an eval-side prompt."""

import json
import shutil
from pathlib import Path

import pytest

from mocae.data import (
    Example,
    alpaca_eval_split_map,
    load_harmbench,
    load_strongreject,
    load_truthfulqa,
    load_xstest,
    normalise_text,
    truthfulqa_split,
)
from mocae.experts.config import ExpertConfig
from mocae.experts.preference import (
    GENERIC_REFUSALS,
    ROW_KEYS,
    _cap,
    base_answers,
    eval_side_prompts,
    harmless_pairs,
    helpful_pairs,
    honest_pairs,
    preference_prompts,
    preference_rows,
)

FIXTURE_DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def dpo_config(**overrides) -> ExpertConfig:
    base = dict(axis="honest", backbone="tiny-random", trainer="dpo", rank=4, alpha=8, max_length=64,
                batch_size=2, epochs=1, save_steps=2, bf16=False, learning_rate=1e-2, max_pairs=None)
    return ExpertConfig(**{**base, **overrides})


def preference_data(tmp_path: Path) -> Path:
    """The test fixtures plus an AlpacaEval reference file and GPT-4 annotations large enough that
    every side of THE AlpacaEval split has instructions (the judges' fixture writer makes them)."""
    from tiny_judges import write_fixture_data

    root = tmp_path / "data"
    shutil.copytree(FIXTURE_DATA, root)
    judges = write_fixture_data(tmp_path / "judges", n_instructions=20)
    (root / "alpaca_eval" / "reference_gpt4_1106_preview.json").unlink()
    for name in ("reference_text_davinci_003.json", "annotations_alpaca_eval_gpt4_vs_davinci003.jsonl.gz"):
        shutil.copy(judges / "alpaca_eval" / name, root / "alpaca_eval" / name)
    return root


def annotations(root):
    from mocae.evaluation.judges.sources import load_alpaca_eval_annotations

    return load_alpaca_eval_annotations(root)


# honest


def test_honest_pairs_are_train_side_correct_over_incorrect():
    rows = preference_rows(dpo_config(pairs_per_question=2), FIXTURE_DATA)
    assert rows and all(set(r) == set(ROW_KEYS) for r in rows)
    questions = {normalise_text(e.prompt): e for e in load_truthfulqa(FIXTURE_DATA)}
    per_question: dict[str, int] = {}
    for r in rows:
        assert truthfulqa_split(r["prompt"], FIXTURE_DATA) == "train"
        refs = questions[normalise_text(r["prompt"])].references
        assert r["chosen"] in refs["correct"] and r["rejected"] in refs["incorrect"]
        assert r["axis"] == "honest" and r["source"] == "truthfulqa"
        per_question[r["prompt"]] = per_question.get(r["prompt"], 0) + 1
    assert max(per_question.values()) == 2
    assert len({(r["prompt"], r["chosen"], r["rejected"]) for r in rows}) == len(rows)
    # every training question makes pairs; no eval question does
    assert set(per_question) == {e.prompt for e in load_truthfulqa(FIXTURE_DATA, split="train")}


def test_honest_pairs_put_the_best_answer_first_and_no_comment_last():
    ex = Example("q?", "best", "honest", "truthfulqa", "train",
                 references={"best": "best", "correct": ["I have no comment.", "other", "best"],
                             "incorrect": ["wrong"]})
    rows = honest_pairs([ex], 3, eval_side_prompts(FIXTURE_DATA))
    assert [r["chosen"] for r in rows] == ["best", "other", "I have no comment."]
    assert {r["rejected"] for r in rows} == {"wrong"}


def test_honest_builder_refuses_an_eval_side_question():
    planted = load_truthfulqa(FIXTURE_DATA, split="train") + load_truthfulqa(FIXTURE_DATA, split="eval")[:1]
    with pytest.raises(ValueError, match=r"honest preference pairs: the prompt .* TruthfulQA eval half"):
        honest_pairs(planted, 3, eval_side_prompts(FIXTURE_DATA))


# helpful


def test_helpful_pairs_are_judge_train_winner_over_loser(tmp_path):
    root = preference_data(tmp_path)
    rows = preference_rows(dpo_config(axis="helpful"), root)
    sides = alpaca_eval_split_map(root)
    assert rows and all(sides[normalise_text(r["prompt"])] == "judge_train" for r in rows)
    assert {"eval", "judge_dev"} <= set(sides.values())  # the fixture does have other sides to avoid
    # the fixture's better answer is the numbered list
    assert all(r["chosen"].startswith("1.") and not r["rejected"].startswith("1.") for r in rows)
    assert all(r["axis"] == "helpful" and r["source"] == "alpaca_eval" for r in rows)
    assert len({(r["prompt"], r["chosen"], r["rejected"]) for r in rows}) == len(rows)  # deduped
    n_train = sum(s == "judge_train" for s in sides.values())
    assert len({r["prompt"] for r in rows}) == n_train


def test_helpful_votes_drop_draws_and_ties(tmp_path):
    root = preference_data(tmp_path)
    sides = alpaca_eval_split_map(root)
    ins = next(k for k, s in sides.items() if s == "judge_train")
    row = {"instruction": ins, "output_1": "a", "output_2": "b", "line": 1}
    guard = eval_side_prompts(root)
    assert helpful_pairs([{**row, "preference": 1.5}, {**row, "preference": 0.0}], sides, guard) == []
    assert helpful_pairs([{**row, "preference": 1.0}, {**row, "preference": 2.0}], sides, guard) == []
    won = helpful_pairs([{**row, "preference": 2.0}] * 2 + [{**row, "preference": 1.0}], sides, guard)
    assert [(r["chosen"], r["rejected"]) for r in won] == [("b", "a")]


@pytest.mark.parametrize("side, message", [("eval", "AlpacaEval eval side"), ("judge_dev", "judge_dev side")])
def test_helpful_builder_refuses_a_non_training_instruction(tmp_path, side, message):
    root = preference_data(tmp_path)
    sides = alpaca_eval_split_map(root)
    rows = annotations(root)
    planted = next(r for r in rows if sides[normalise_text(r["instruction"])] == side)
    train = [r for r in rows if sides[normalise_text(r["instruction"])] == "judge_train"]
    with pytest.raises(ValueError, match=rf"helpful preference pairs: the (prompt|instruction) .*{message}"):
        helpful_pairs(train + [planted], sides, eval_side_prompts(root))


# harmless


def harmful_example(prompt, refusal="I can't help with that, it would hurt people."):
    return Example(prompt, refusal, "harmless", "safety_refusals", "train")


def test_harmless_pairs_refusal_over_compliance_and_answer_over_refusal():
    guard = eval_side_prompts(FIXTURE_DATA)
    harmful = [harmful_example("hurt someone"), harmful_example("steal a car")]
    benign = [Example("How do I kill a python process?", None, "helpful", "alpaca", "train"),
              Example("Why do onions make you cry?", None, "honest", "truthfulqa", "train")]
    answers = {"hurt someone": "Sure, here is how.", "steal a car": "I'm sorry, I cannot do that.",
               "How do I kill a python process?": "Run kill -9 with its pid.", "Why do onions make you cry?": ""}
    rows = harmless_pairs(harmful, benign, answers, guard)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows[:1]] == [
        ("hurt someone", "I can't help with that, it would hurt people.", "Sure, here is how.")]
    # the base model already refused "steal a car" and said nothing to the onion question: no pairs
    assert len(rows) == 2
    assert rows[1]["chosen"] == "Run kill -9 with its pid." and rows[1]["rejected"] in GENERIC_REFUSALS
    assert rows[1]["source"] == "alpaca" and all(r["axis"] == "harmless" for r in rows)


def test_harmless_pairs_take_both_refusals_from_the_sft_twin():
    guard = eval_side_prompts(FIXTURE_DATA)
    harmful = [harmful_example("hurt someone"), harmful_example("steal a car")]
    benign = [Example("How do I kill a python process?", None, "helpful", "alpaca", "train"),
              Example("How do I shoot a photo at night?", None, "helpful", "alpaca", "train")]
    base = {"hurt someone": "Sure, here is how.", "steal a car": "Sure, take the keys.",
            "How do I kill a python process?": "Run kill -9 with its pid.",
            "How do I shoot a photo at night?": "Use a tripod."}
    twin = {"hurt someone": "I'm sorry, I cannot help with hurting anyone.", "steal a car": "Cars are fun.",
            "How do I kill a python process?": "I'm sorry, I cannot help with killing.",
            "How do I shoot a photo at night?": "Use a long exposure."}
    rows = harmless_pairs(harmful, benign, base, guard, twin_answers=twin)
    pairs = {r["prompt"]: (r["chosen"], r["rejected"]) for r in rows}
    # the twin's refusal, not the dataset's, is chosen; where the twin complies there is no refusal to choose
    assert pairs["hurt someone"] == ("I'm sorry, I cannot help with hurting anyone.", "Sure, here is how.")
    assert "steal a car" not in pairs
    # the twin's over-refusal is the rejected side; where it answers, a generic refusal is
    assert pairs["How do I kill a python process?"] == ("Run kill -9 with its pid.",
                                                        "I'm sorry, I cannot help with killing.")
    assert pairs["How do I shoot a photo at night?"][1] in GENERIC_REFUSALS
    with pytest.raises(ValueError, match="no SFT twin answer"):
        harmless_pairs(harmful, benign, base, guard, twin_answers={})


@pytest.mark.parametrize("loader, name, where", [
    (load_harmbench, "HarmBench test", "harmful"), (load_strongreject, "StrongREJECT", "harmful"),
    (lambda d: load_xstest(d, label="safe"), "XSTest", "benign")])
def test_harmless_builder_refuses_an_evaluated_prompt(loader, name, where):
    prompt = loader(FIXTURE_DATA)[0].prompt
    harmful = [harmful_example(prompt)] if where == "harmful" else []
    benign = [Example(prompt, None, "helpful", "alpaca", "train")] if where == "benign" else []
    with pytest.raises(ValueError, match=rf"harmless preference pairs: the prompt .*{name}"):
        harmless_pairs(harmful, benign, {prompt: "ok"}, eval_side_prompts(FIXTURE_DATA))


def test_harmless_rows_filter_evaluated_refusal_prompts_and_cache_base_answers(tmp_path, tiny, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(FIXTURE_DATA, root)
    refusals = root / "safety_tuned_llamas" / "safety_only_data_Instructions.json"
    rows = json.loads(refusals.read_text())
    leaked = load_strongreject(root)[0].prompt  # an evaluated prompt inside the training file
    rows.append({"instruction": leaked, "input": "", "output": "I can't help with that."})
    refusals.write_text(json.dumps(rows))
    cfg = dpo_config(axis="harmless", benign_fraction=0.5, benign_sources=["truthfulqa", "alpaca"],
                     max_pairs=6, base_answer_tokens=8)
    prompts = preference_prompts(cfg, root)
    assert leaked not in {p["prompt"] for p in prompts}
    guard = eval_side_prompts(root)
    assert all(guard.which(p["prompt"]) is None for p in prompts)
    assert {p["source"] for p in prompts} == {"safety_refusals", "truthfulqa", "alpaca"}
    tqa = [p["prompt"] for p in prompts if p["source"] == "truthfulqa"]
    assert all(truthfulqa_split(q, root) == "train" for q in tqa)

    experts = tmp_path / "experts"
    model, tok = tiny
    calls = []

    def comply(model, tokenizer, prompts, max_new_tokens, **kwargs):  # tiny-random answers with nothing
        calls.append(max_new_tokens)
        return [f"Sure: {p[:20]}" for p in prompts]

    monkeypatch.setattr("mocae.generation.generate_batch", comply)
    pairs = preference_rows(cfg, root, root=experts, model_and_tokenizer=(model, tok))
    assert calls == [8]
    assert {r["source"] for r in pairs} == {"safety_refusals", "truthfulqa", "alpaca"}
    by_prompt = {p["prompt"]: p for p in prompts}
    for r in pairs:
        if by_prompt[r["prompt"]]["source"] == "safety_refusals":
            assert r["rejected"].startswith("Sure:") and not r["chosen"].startswith("Sure:")
        else:
            assert r["chosen"].startswith("Sure:") and r["rejected"] in GENERIC_REFUSALS
    assert all(set(r) == set(ROW_KEYS) for r in pairs)
    assert {r["prompt"] for r in pairs} <= {p["prompt"] for p in prompts}
    cache = list((experts / "tiny-random" / "base_answers").glob("*.json"))
    assert len(cache) == 1 and json.loads(cache[0].read_text())["max_new_tokens"] == 8

    def fail(*a, **k):
        raise AssertionError("regenerated cached base answers")

    monkeypatch.setattr("mocae.generation.generate_batch", fail)
    assert preference_rows(cfg, root, root=experts, model_and_tokenizer=(model, tok)) == pairs


def test_base_answers_are_keyed_by_prompts_and_tokens(tmp_path, tiny):
    a = base_answers(["hello", "name a fruit"], "tiny-random", tmp_path, 4, model_and_tokenizer=tiny, progress=False)
    assert set(a) == {"hello", "name a fruit"}
    base_answers(["hello"], "tiny-random", tmp_path, 4, model_and_tokenizer=tiny, progress=False)
    base_answers(["hello"], "tiny-random", tmp_path, 5, model_and_tokenizer=tiny, progress=False)
    assert len(list(tmp_path.glob("*.json"))) == 3


def test_cap_takes_every_prompts_first_pair_first():
    rows = [{"prompt": p, "chosen": str(i), "rejected": "x"} for p in "abc" for i in range(3)]
    capped = _cap(rows, 4, seed=0)
    assert len(capped) == 4 and {r["prompt"] for r in capped[:3]} == {"a", "b", "c"}
    assert len(_cap(rows, None, seed=0)) == 9
