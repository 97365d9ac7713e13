"""MoTE on tiny-random: the chain format, per-token step mixing, step-aware cached decoding,
training that resumes, save/load."""

import pytest
import torch

import mocae.baselines.mote as mote
from mocae.baselines.mote import (
    ADAPTERS,
    MoteConfig,
    build_chains,
    build_mote,
    chain_text,
    encode_chain,
    final_answer,
    fit_mote,
    load_mote,
    step_at,
)
from mocae.generation import chat_prompt, generate_batch

SMALL = MoteConfig(rank=2, alpha=4, target_modules=["q_proj", "v_proj", "up_proj"], batch_size=2, epochs=2,
                   max_length=64, analysis_tokens=6, guidance_tokens=6, reasoning_tokens=5, save_steps=2,
                   learning_rate=1e-2)
CHAINS = [{"prompt": f"question {i}", "completion": chain_text(f"it asks {i}.", f"answer {i}.",
                                                               "be careful." if i % 2 else None),
           "axis": i % 3, "guidance": bool(i % 2)} for i in range(6)]


def randomise(model, seed=0):
    """Non-zero B factors, so every expert changes the output (fresh LoRAs start at B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def test_step_follows_the_last_complete_header():
    assert step_at("") == 0 and step_at("Analysis: it asks") == 0
    assert step_at("Analysis: x\nGuidance") == 0  # header not complete yet
    assert step_at("Analysis: x\nGuidance:") == 1
    assert step_at("Analysis: x\nGuidance: y\nAnswer: z") == 2
    assert step_at("Analysis: the word Answer: inside a line") == 0  # headers start a line
    assert final_answer("Analysis: x\nAnswer: Paris.\nAnswer: again") == "Paris.\nAnswer: again"
    assert final_answer("Analysis: x\nGuidance: be kind") == "x\nbe kind"  # no answer: the chain, no headers


def test_encoded_chain_steps_switch_at_each_header(tiny):
    _, tokenizer = tiny
    completion = chain_text("it asks for harm.", "I can't help with that.", "refuse politely.")
    row = encode_chain(tokenizer, "do harm", completion, max_length=512)
    n_prompt = len(tokenizer(chat_prompt(tokenizer, "do harm"), add_special_tokens=False)["input_ids"])
    assert all(lab == -100 for lab in row["labels"][:n_prompt]) and row["labels"][n_prompt] != -100
    steps = row["steps"]
    assert steps[:n_prompt] == [0] * n_prompt
    assert sorted(set(steps)) == [0, 1, 2] and steps == sorted(steps)  # analysis, guidance, answer in order
    completion_ids = row["input_ids"][n_prompt:]
    first_guidance = steps.index(1) - n_prompt
    assert tokenizer.decode(completion_ids[:first_guidance + 1], skip_special_tokens=True).endswith("Guidance:")


def test_step_weights_mix_the_step_expert_with_the_shared_one(tiny):
    model, _ = build_mote("tiny-random", SMALL, tiny)
    w = model.step_weights(torch.tensor([[0, 1, 2]]))
    shared = ADAPTERS.index("shared")
    assert torch.allclose(w.sum(-1), torch.ones(1, 3))
    assert torch.allclose(w[0, :, shared], torch.full((3,), 0.5))
    assert [int(w[0, t, :shared].argmax()) for t in range(3)] == [0, 1, 2]


def test_tokens_before_a_step_change_are_unaffected_and_after_it_change(tiny):
    model = randomise(build_mote("tiny-random", SMALL, tiny)[0])
    ids = torch.tensor([[5, 9, 13, 2, 7, 30, 8, 11]])
    with torch.no_grad():
        constant = model(ids, steps=torch.zeros_like(ids)).logits
        switched = model(ids, steps=torch.tensor([[0, 0, 0, 0, 2, 2, 2, 2]])).logits
        answer = model(ids).logits  # no steps: the answer step everywhere (likelihood scoring)
        all_answer = model(ids, steps=torch.full_like(ids, 2)).logits
    torch.testing.assert_close(switched[:, :4], constant[:, :4])  # causal: earlier tokens never see the switch
    assert not torch.allclose(switched[:, 4:], constant[:, 4:], atol=1e-4)
    torch.testing.assert_close(answer, all_answer, atol=1e-5, rtol=1e-5)


def test_cached_step_aware_decoding_equals_recomputing_every_step(tiny, monkeypatch):
    # Tiny-random writes no headers, so let the step rule switch on text length instead: the
    # decoder must then change experts mid-answer, exactly as a full recomputation would.
    monkeypatch.setattr(mote, "step_at", lambda text: min(len(text) // 3, 2))
    model, tokenizer = build_mote("tiny-random", SMALL, tiny)
    model = randomise(model, seed=3).eval()
    tokenizer.padding_side = "left"
    batch = tokenizer(["hello there friend", "hi"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=10, min_new_tokens=10, pad_token_id=tokenizer.pad_token_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    prompt_len = ids.shape[1]
    for _ in range(10):  # reference: no cache, every token's step recomputed from the text before it
        generated = ids[:, prompt_len:]
        steps = torch.zeros_like(ids)
        for t in range(generated.shape[1]):
            steps[:, prompt_len + t] = torch.tensor([mote.step_at(tokenizer.decode(row[:t + 1], skip_special_tokens=True))
                                                     for row in generated])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, steps=steps, position_ids=positions).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(out, ids)
    assert max(mote.step_at(tokenizer.decode(r, skip_special_tokens=True)) for r in out[:, prompt_len:]) > 0
    with pytest.raises(ValueError, match="greedy"):
        model.generate(**batch, max_new_tokens=2, do_sample=True)


def test_generate_batch_scores_only_the_answer_and_adds_the_reasoning_budget(tiny, monkeypatch):
    model, tokenizer = build_mote("tiny-random", SMALL, tiny)
    seen = {}

    def fake_generate(input_ids, attention_mask=None, max_new_tokens=0, **kwargs):
        seen["budget"] = max_new_tokens
        chain = tokenizer("Analysis: fine\nAnswer: Paris", add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.cat([input_ids, chain.expand(len(input_ids), -1)], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    assert generate_batch(model, tokenizer, ["capital of France?"], max_new_tokens=7, progress=False) == ["Paris"]
    assert seen["budget"] == 7 + SMALL.reasoning_tokens


def test_chains_have_guidance_only_for_harmful_prompts(tiny, tmp_path):
    model, tokenizer = tiny
    examples = [("bake bread", "Mix flour.", 0), ("pick a lock to break in", "I can't help.", 1),
                ("is the earth flat", "No.", 2)]
    chains = build_chains(model, tokenizer, examples, harmful_label=1, cfg=SMALL, cache_dir=tmp_path, progress=False)
    assert [c["guidance"] for c in chains] == [False, True, False]
    for chain, (_, completion, _) in zip(chains, examples):
        assert final_answer(chain["completion"]) == completion
        headers = [line.split(":")[0] for line in chain["completion"].split("\n")]
        assert headers == (["Analysis", "Guidance", "Answer"] if chain["guidance"] else ["Analysis", "Answer"])
    files = sorted(p.name.split("-")[0] for p in tmp_path.glob("*.json"))
    assert files == ["mote_analysis", "mote_guidance"]  # cached: a rerun generates nothing
    again = build_chains(model, tokenizer, examples, harmful_label=1, cfg=SMALL, cache_dir=tmp_path, progress=False)
    assert again == chains
    with pytest.raises(ValueError, match="at least one"):
        build_chains(model, tokenizer, [], harmful_label=1, cfg=SMALL, cache_dir=tmp_path)


def test_training_lowers_the_loss_on_the_chains(tiny):
    model, tokenizer = build_mote("tiny-random", SMALL.model_copy(update={"epochs": 8}), tiny)
    record = fit_mote(model, tokenizer, CHAINS, progress=False)
    losses = record["losses"]
    assert record["steps"] == len(losses) == 8 * 3
    assert sum(losses[-3:]) < sum(losses[:3])
    assert record["chains"]["with_guidance"] == 3


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from mocae.backbones import load_backbone

    def fresh():
        return build_mote("tiny-random", SMALL, load_backbone("tiny-random"))

    straight, tokenizer = fresh()
    fit_mote(straight, tokenizer, CHAINS, checkpoint_dir=tmp_path / "a", progress=False)

    real, calls = mote._train_step, []

    def interrupted(*args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args)

    model, tokenizer = fresh()
    monkeypatch.setattr(mote, "_train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit_mote(model, tokenizer, CHAINS, checkpoint_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(mote, "_train_step", real)
    resumed, tokenizer = fresh()  # a new process: only the checkpoint survives
    record = fit_mote(resumed, tokenizer, CHAINS, checkpoint_dir=tmp_path / "b", progress=False)
    assert record["resumed_from_step"] == 2  # the checkpoint before the interruption (save_steps=2)
    assert len(record["losses"]) == record["steps"] == 6
    for (name, a), (_, b) in zip(straight.peft_model.named_parameters(), resumed.peft_model.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_saved_model_loads_with_the_same_outputs(tiny, tmp_path):
    model, tokenizer = build_mote("tiny-random", SMALL, tiny)
    model = randomise(model).eval()
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    steps = torch.tensor([[0, 0, 1, 2, 2]])
    with torch.no_grad():
        expected = model(ids, steps=steps).logits
    model.save_pretrained(tmp_path / "mote")
    loaded, _ = load_mote(tmp_path / "mote")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, steps=steps).logits, expected, atol=1e-5, rtol=1e-5)
    assert loaded.mote_config == SMALL
    with pytest.raises(FileNotFoundError, match="not a MoTE folder"):
        load_mote(tmp_path)
