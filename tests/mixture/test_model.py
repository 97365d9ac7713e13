"""MoCaEModel on tiny-random: routing invariances, steering, generation, save/load, errors."""

import json
from pathlib import Path

import pytest
import torch

from mocae.mixture.model import MoCaEConfig, MoCaEModel


def build(expert_dirs, **kw):
    return MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=expert_dirs, **kw))


def randomise_router(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


def encode(tok, texts, side):
    tok.padding_side = side
    return tok(texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("side", ["left", "right"])
def test_routing_with_padding_equals_unpadded(expert_dirs, side):
    model = build(expert_dirs, feature_layer=1)
    randomise_router(model)
    texts = ["a short one", "a considerably longer prompt with many more tokens in it"]
    batch = encode(model.tokenizer, texts, side)
    assert (batch["attention_mask"] == 0).any()
    padded = model.route(batch["input_ids"], batch["attention_mask"])
    for i, text in enumerate(texts):
        single = encode(model.tokenizer, [text], side)
        torch.testing.assert_close(padded[i:i + 1], model.route(single["input_ids"], single["attention_mask"]),
                                   atol=1e-5, rtol=1e-4)


def test_generation_returns_routing_and_steering_works(expert_dirs):
    model = build(expert_dirs)
    randomise_router(model)
    out = model.chat(["hello", "what is water"], max_new_tokens=4)
    for row in out:
        assert set(row["routing"]) == {"helpful", "harmless", "honest"}
        assert abs(sum(row["routing"].values()) - 1) < 1e-5
    steered = model.chat("hello", max_new_tokens=4, axis_weights={"honest": 1.0})
    assert steered[0]["routing"] == {"helpful": 0.0, "harmless": 0.0, "honest": 1.0}
    tilted = model.chat("hello", max_new_tokens=4, prior={"helpful": 1, "harmless": 1, "honest": 10})
    assert tilted[0]["routing"]["honest"] > out[0]["routing"]["honest"]
    with pytest.raises(ValueError, match="unknown axes"):
        model.chat("hello", axis_weights={"funny": 1.0})


def test_chat_restores_the_tokenizers_padding_side(expert_dirs):
    model = build(expert_dirs, router_input="hidden")
    model.tokenizer.padding_side = "right"  # chat pads on the left for generation, then puts it back
    assert model.chat(["hello", "what is water"], max_new_tokens=2)
    assert model.tokenizer.padding_side == "right"


def test_from_experts_wraps_a_loaded_backbone_like_build(expert_dirs, tiny):
    from mocae.backbones import load_backbone

    base, tok = tiny
    model = MoCaEModel.from_experts(base, tok, {a: Path(p) for a, p in expert_dirs.items()},
                                    router_input="hidden", pooling="last")
    assert model.mocae_config.backbone == "tiny-random"  # read from the experts' records
    assert model.peft_model.get_base_model() is base and model.tokenizer is tok
    assert model.mocae_config.pooling == "last" and list(model.axes) == list(expert_dirs)
    built = build(expert_dirs, router_input="hidden", pooling="last")
    for m in (model, built):
        randomise_router(m)
    assert model.chat("hello there", max_new_tokens=4) == built.chat("hello there", max_new_tokens=4)
    token = MoCaEModel.from_experts(*load_backbone("tiny-random"), expert_dirs, routing="token", top_k=2)
    assert token.router.top_k == 2 and not token.routes_per_request


def test_batch1_merged_generation_equals_unmerged(expert_dirs):
    model = build(expert_dirs)
    randomise_router(model)
    batch = encode(model.tokenizer, ["tell me something"], "left")
    model.mixer.merge_min_tokens = 1  # merge even for 8 tokens
    merges = []
    original = model.mixer.merge
    model.mixer.merge = lambda w: (merges.append(w), original(w))
    merged = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert len(merges) == 1
    model.mocae_config.merge_single_request = False
    unmerged = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert torch.equal(merged, unmerged) and len(merges) == 1


def test_generate_merges_only_when_the_answer_is_long_enough(expert_dirs):
    """A merge and its exact unmerge cost many decode steps' worth of the unmerged path: a short
    budget (a 1-token prefill above all) decodes unmerged, a long one merges, with equal tokens."""
    model = build(expert_dirs)
    randomise_router(model)
    batch = encode(model.tokenizer, ["tell me something"], "left")
    merges = []
    original = model.mixer.merge
    model.mixer.merge = lambda w: (merges.append(w), original(w))
    assert not model.mixer.merge_pays(model.mixer.merge_min_tokens - 1) and model.mixer.merge_pays(None)
    model.mixer.merge_min_tokens = 6
    short = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert merges == []
    long = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert len(merges) == 1 and torch.equal(long[:, :short.shape[1]], short)


def test_save_load_round_trip_generates_the_same(expert_dirs, tmp_path):
    model = build(expert_dirs)
    randomise_router(model)
    before = model.chat(["hello there", "why"], max_new_tokens=6)
    path = model.save_pretrained(tmp_path / "mocae")
    loaded = MoCaEModel.from_pretrained(path)
    assert loaded.chat(["hello there", "why"], max_new_tokens=6) == before
    for (k, v), (k2, v2) in zip(model.router.state_dict().items(), loaded.router.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_token_routing_builds_and_generates(expert_dirs):
    model = build(expert_dirs, routing="token", top_k=2)
    randomise_router(model)
    out = model.chat("hello", max_new_tokens=4)
    assert out[0]["routing"] is None and isinstance(out[0]["text"], str)
    batch = encode(model.tokenizer, ["hello"], "left")
    routed = model(**batch).logits
    uniform = model(**batch, axis_weights=[1, 1, 1]).logits
    assert not torch.allclose(routed, uniform)


def test_static_routing(expert_dirs):
    model = build(expert_dirs, routing="static", static_weights=[1, 0, 3])
    out = model.chat("hello", max_new_tokens=2)
    assert out[0]["routing"] == pytest.approx({"helpful": 0.25, "harmless": 0.0, "honest": 0.75})


def test_expert_from_another_backbone_is_rejected(expert_dirs, expert_factory, tmp_path):
    expert_factory(tmp_path / "other", 7, backbone="smollm2-135m")
    bad = {**expert_dirs, "honest": str(tmp_path / "other")}
    with pytest.raises(ValueError, match="'honest' was trained on backbone 'smollm2-135m'"):
        build(bad)


def test_experts_with_different_targets_are_rejected(expert_dirs, expert_factory, tmp_path):
    expert_factory(tmp_path / "odd", 7, targets=["q_proj"])
    with pytest.raises(ValueError, match="target different modules"):
        build({**expert_dirs, "harmless": str(tmp_path / "odd")})


def test_router_with_wrong_expert_count_is_rejected(expert_dirs, tmp_path):
    path = build(expert_dirs).save_pretrained(tmp_path / "m")
    meta = json.loads((path / "mocae_config.json").read_text())
    meta["config"]["experts"].pop("honest")
    (path / "mocae_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not fit 2 experts"):
        MoCaEModel.from_pretrained(path)


def test_missing_expert_folder_is_named(expert_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="expert 'honest'"):
        build({**expert_dirs, "honest": str(tmp_path / "nope")})


def test_content_pooling_keeps_only_the_user_message(tiny):
    from mocae.generation import chat_prompt
    from mocae.mixture.router import content_margins, pooling_mask, template_margins

    _, tok = tiny
    template = template_margins(tok)
    batch = tok([chat_prompt(tok, "why is water wet"), "plain text, no template"], return_tensors="pt",
                padding=True, add_special_tokens=False)
    margins = content_margins(batch["input_ids"], batch["attention_mask"], template)
    pool = pooling_mask(batch["attention_mask"], "content", margins)
    assert tok.decode(batch["input_ids"][0][pool[0].bool()]) == "why is water wet"
    assert torch.equal(pool[1], batch["attention_mask"][1])  # not chat-formatted: nothing trimmed
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    assert pooling_mask(mask, "content", (1, 1)).tolist() == [[0, 0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0, 0]]
    assert pooling_mask(mask, "content", (4, 4)).tolist() == mask.tolist()  # nothing left: keep all
    assert pooling_mask(mask, "last").tolist() == [[0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 0, 0]]
    with pytest.raises(ValueError, match="pooling must be"):
        pooling_mask(mask, "max")


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_other_poolings_are_padding_invariant(expert_dirs, pooling):
    model = build(expert_dirs, feature_layer=1, pooling=pooling)
    randomise_router(model)
    texts = ["a short one", "a considerably longer prompt with many more tokens in it"]
    padded = model.route(**encode(model.tokenizer, texts, "left"))
    single = model.route(**encode(model.tokenizer, texts[:1], "right"))
    torch.testing.assert_close(padded[:1], single, atol=1e-5, rtol=1e-4)


def test_embedding_router_reads_the_user_message(expert_dirs, monkeypatch):
    import mocae.mixture.model as model_module

    seen = []

    def fake_embeddings(texts):
        seen.extend(texts)
        return torch.stack([torch.full((model_module.EMBEDDING_SIZE,), float(len(t))) for t in texts])

    monkeypatch.setattr(model_module, "sentence_embeddings", fake_embeddings)
    model = build(expert_dirs, router_input="embedding")
    assert model.router.linear.in_features == model_module.EMBEDDING_SIZE
    randomise_router(model)
    from mocae.generation import chat_prompt

    texts = ["short", "a much longer message here"]
    chats = [chat_prompt(model.tokenizer, t) for t in texts]
    padded = model.route(**encode(model.tokenizer, chats, "left"))
    assert seen == texts
    single = model.route(**encode(model.tokenizer, chats[1:], "right"))
    torch.testing.assert_close(padded[1:], single)


# routing that decides (mocae.mixture.decide) -------------------------------------------------------

IDS = torch.tensor([[5, 9, 13, 2, 7, 30], [8, 3, 3, 11, 40, 6]])
MASK = torch.ones_like(IDS)


def fixed_router(model, probs):
    """Every prompt gets these calibrated probabilities (uncalibrated softmax of a constant bias)."""
    with torch.no_grad():
        model.router.linear.weight.zero_()
        model.router.linear.bias.copy_(torch.tensor(probs).log())


def single_adapter_logits(expert_dirs, axis):
    """Logits of plain peft with only that expert loaded: what one-hot weights must reproduce."""
    from peft import PeftModel

    from mocae.backbones import load_backbone

    base, _ = load_backbone("tiny-random")
    with torch.no_grad():
        if axis is None:
            return base(IDS).logits
        return PeftModel.from_pretrained(base, expert_dirs[axis]).eval()(IDS).logits


def decided(expert_dirs, probs, **decision):
    from mocae.mixture.decide import DecisionConfig

    model = build(expert_dirs, router_input="hidden", feature_layer=1, decision=DecisionConfig(**decision))
    fixed_router(model, probs)
    return model


def test_harm_gate_applies_the_harmless_expert_at_full_weight_above_its_threshold(expert_dirs):
    harmful = [0.15, 0.7, 0.15]
    model = decided(expert_dirs, harmful, mode="harm_gate", gate_threshold=0.6)
    weights = model.route(IDS, MASK)
    assert weights.tolist() == [[0.0, 1.0, 0.0]] * 2
    torch.testing.assert_close(model.routing_probs(IDS, MASK), torch.tensor([harmful] * 2))
    with torch.no_grad():
        got = model(IDS, attention_mask=MASK).logits
    torch.testing.assert_close(got, single_adapter_logits(expert_dirs, "harmless"), atol=1e-5, rtol=1e-5)
    # batch-1 generation (mixture merged into W0) decodes as the harmless adapter alone
    from peft import PeftModel

    from mocae.backbones import load_backbone

    alone = PeftModel.from_pretrained(load_backbone("tiny-random")[0], expert_dirs["harmless"]).eval()
    expected = alone.generate(input_ids=IDS[:1], attention_mask=MASK[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(IDS[:1], MASK[:1], max_new_tokens=6, do_sample=False), expected)

    # below the threshold: not gated, the soft blend, not the harmless expert
    below = decided(expert_dirs, harmful, mode="harm_gate", gate_threshold=0.75)
    torch.testing.assert_close(below.route(IDS, MASK), torch.tensor([harmful] * 2))
    with torch.no_grad():
        blend = below(IDS, attention_mask=MASK).logits
        soft = below(IDS, attention_mask=MASK, axis_weights=harmful).logits
    torch.testing.assert_close(blend, soft, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(blend, single_adapter_logits(expert_dirs, "harmless"), atol=1e-3)
    # gate_rest=others: below the threshold the harmless expert gets nothing
    others = decided(expert_dirs, harmful, mode="harm_gate", gate_threshold=0.75, gate_rest="others")
    torch.testing.assert_close(others.route(IDS, MASK), torch.tensor([[0.5, 0.0, 0.5]] * 2))


def test_top1_equals_the_single_expert_when_confident(expert_dirs):
    confident = [0.1, 0.1, 0.8]
    model = decided(expert_dirs, confident, mode="top1", top1_threshold=0.7)
    assert model.route(IDS, MASK).tolist() == [[0.0, 0.0, 1.0]] * 2
    with torch.no_grad():
        got = model(IDS, attention_mask=MASK).logits
    torch.testing.assert_close(got, single_adapter_logits(expert_dirs, "honest"), atol=1e-5, rtol=1e-5)
    chat = model.chat("hello", max_new_tokens=2)
    assert chat[0]["routing"] == {"helpful": 0.0, "harmless": 0.0, "honest": 1.0}


@pytest.mark.parametrize("fallback", ["base", "soft"])
def test_top1_falls_back_when_not_confident(expert_dirs, fallback):
    unsure = [0.4, 0.25, 0.35]
    model = decided(expert_dirs, unsure, mode="top1", top1_threshold=0.7, top1_fallback=fallback)
    weights = model.route(IDS, MASK)
    with torch.no_grad():
        got = model(IDS, attention_mask=MASK).logits
    if fallback == "base":  # all-zero weights: the backbone without any expert
        assert weights.tolist() == [[0.0, 0.0, 0.0]] * 2
        torch.testing.assert_close(got, single_adapter_logits(expert_dirs, None), atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(weights, torch.tensor([unsure] * 2))
        with torch.no_grad():
            soft = model(IDS, attention_mask=MASK, axis_weights=unsure).logits
        torch.testing.assert_close(got, soft, atol=1e-5, rtol=1e-5)


def test_caller_prior_tilts_the_blend_but_not_the_gate(expert_dirs):
    model = decided(expert_dirs, [0.2, 0.6, 0.2], mode="harm_gate", gate_threshold=0.5)
    assert model.route(IDS, MASK, prior={"helpful": 10, "harmless": 1, "honest": 1}).tolist() == [[0.0, 1.0, 0.0]] * 2
    model.mocae_config.decision.gate_threshold = 0.65
    tilted = model.route(IDS, MASK, prior={"helpful": 1, "harmless": 1, "honest": 4})
    torch.testing.assert_close(tilted, torch.tensor([[0.125, 0.375, 0.5]] * 2))


def test_save_load_keeps_the_routing_mode_and_thresholds(expert_dirs, tmp_path):
    model = decided(expert_dirs, [0.15, 0.7, 0.15], mode="harm_gate+top1", gate_threshold=0.3125,
                    gate_budget=0.1, gate_rest="others", top1_threshold=0.8, top1_fallback="base")
    path = model.save_pretrained(tmp_path / "m")
    saved = json.loads((path / "mocae_config.json").read_text())["config"]["decision"]
    assert saved["mode"] == "harm_gate+top1" and saved["gate_threshold"] == 0.3125
    loaded = MoCaEModel.from_pretrained(path)
    assert loaded.mocae_config.decision == model.mocae_config.decision
    assert torch.equal(loaded.route(IDS, MASK), model.route(IDS, MASK))
    # a folder saved before routing modes existed loads as the soft blend
    meta = json.loads((path / "mocae_config.json").read_text())
    meta["config"].pop("decision")
    (path / "mocae_config.json").write_text(json.dumps(meta))
    assert MoCaEModel.from_pretrained(path).mocae_config.decision.mode == "soft"


def test_using_decision_switches_modes_for_an_ablation_and_restores(expert_dirs):
    from mocae.mixture.decide import DecisionConfig, using_decision

    model = decided(expert_dirs, [0.1, 0.1, 0.8])
    with using_decision(model, mode="top1", top1_threshold=0.7):
        assert model.route(IDS, MASK).tolist() == [[0.0, 0.0, 1.0]] * 2
    assert model.mocae_config.decision == DecisionConfig()
    with pytest.raises(ValueError, match="mode"), using_decision(model, mode="sometimes"):
        pass
    with pytest.raises(ValueError, match="token routing"):
        MoCaEConfig(backbone="tiny-random", experts=expert_dirs, routing="token", decision={"mode": "top1"})


def test_base_fallback_rows_mix_nothing_next_to_decided_rows(expert_dirs):
    model = decided(expert_dirs, [0.4, 0.25, 0.35], mode="top1", top1_threshold=0.7, top1_fallback="base")
    with torch.no_grad():
        got = model(IDS, attention_mask=MASK, routing_weights=torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])).logits
    torch.testing.assert_close(got[:1], single_adapter_logits(expert_dirs, "honest")[:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1:], single_adapter_logits(expert_dirs, None)[1:], atol=1e-5, rtol=1e-5)
    # batch-1 generation on the base fallback decodes as the backbone alone (nothing merged)
    from mocae.backbones import load_backbone

    base, _ = load_backbone("tiny-random")
    expected = base.generate(input_ids=IDS[:1], attention_mask=MASK[:1], max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(IDS[:1], MASK[:1], max_new_tokens=5, do_sample=False), expected)
    # without the base fallback, all-zero weights stay an error (a damaged router or a bad caller)
    soft = decided(expert_dirs, [0.4, 0.25, 0.35])
    with pytest.raises(ValueError, match="positive sum"):
        soft(IDS, attention_mask=MASK, routing_weights=torch.zeros(2, 3))
