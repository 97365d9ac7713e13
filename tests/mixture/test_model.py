"""MoCaEModel on tiny-random: routing invariances, steering, generation, save/load, errors."""

import json

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


def test_batch1_merged_generation_equals_unmerged(expert_dirs):
    model = build(expert_dirs)
    randomise_router(model)
    batch = encode(model.tokenizer, ["tell me something"], "left")
    merged = model.generate(**batch, max_new_tokens=8, do_sample=False)
    model.mocae_config.merge_single_request = False
    unmerged = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert torch.equal(merged, unmerged)


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
