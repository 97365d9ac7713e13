import math

import pytest
import torch

from mocae.evaluation.sanity import format_sanity_table, reference_nll


def test_reference_nll_matches_a_direct_computation(tiny):
    model, tokenizer = tiny
    prompts, refs = ["hello", "what is water"], ["Paris is nice.", "It boils."]
    got = reference_nll(model, tokenizer, prompts, refs, batch_size=2)
    total, count = 0.0, 0
    for p, r in zip(prompts, refs):  # one sequence at a time, no padding at all
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(r + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + r_ids])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].log_softmax(-1)
        for pos in range(len(p_ids) - 1, ids.shape[1] - 1):
            total -= logp[pos, ids[0, pos + 1]].item()
            count += 1
    assert math.isclose(got, total / count, rel_tol=1e-4)
    assert tokenizer.padding_side == "left"  # restored


def test_reference_nll_rejects_mismatched_lists(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="equal, non-empty"):
        reference_nll(model, tokenizer, ["a"], [])


def test_sanity_table_lists_every_system():
    metric = {"value": 0.5, "n": 4}
    row = {k: metric for k in ("alpaca_eval_ref_nll", "refusal_harmful", "refusal_xstest_safe", "mc1", "mc2")}
    table = format_sanity_table({"systems": {"base": row, "expert_honest": row}})
    assert "| base |" in table and "| expert_honest |" in table and "0.500 (n=4)" in table


def test_reference_nll_per_example_matches_each_reference_alone(tiny):
    model, tokenizer = tiny
    prompts, refs = ["hello", "what is water", "a"], ["Paris is nice.", "It boils at a hundred degrees.", "Yes."]
    each = reference_nll(model, tokenizer, prompts, refs, batch_size=3, per_example=True)
    alone = [reference_nll(model, tokenizer, [p], [r], batch_size=1) for p, r in zip(prompts, refs)]
    assert each == pytest.approx(alone, rel=1e-4)
    assert len(set(each)) == 3  # rows are not mixed up by batching


def test_arrow_reference_nll_runs_in_fp32_when_bf16_is_asked(tiny, expert_dirs):
    """peft Arrow's router fails under bf16 autocast (scatter_ dtype mismatch): its NLL is taken in fp32,
    so it equals the fp32 value exactly instead of crashing."""
    from mocae.baselines.peft_routing import build_arrow

    model, tok = build_arrow("tiny-random", expert_dirs, model_and_tokenizer=tiny)
    prompts, refs = ["Say hi.", "Name a colour, please."], ["Hi there.", "Blue."]
    asked = reference_nll(model, tok, prompts, refs, per_example=True, bf16=True)
    assert asked == reference_nll(model, tok, prompts, refs, per_example=True, bf16=False)
