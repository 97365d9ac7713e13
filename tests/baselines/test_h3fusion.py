"""H3Fusion MoE baseline on tiny-random: exact expert weights, routing, training, save/load."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mocae.backbones import load_backbone
from mocae.baselines.h3fusion import (
    H3FusionConfig,
    build_h3fusion,
    drift_norm,
    fit_h3fusion,
    h3fusion_layers,
    load_h3fusion,
    materialize_h3fusion,
    save_h3fusion,
)

AXES = ["helpful", "harmless", "honest"]


def hand_delta(expert_dir, module):
    """scale * B @ A for ``module`` read straight from the adapter files (None if not adapted)."""
    cfg = json.loads((Path(expert_dir) / "adapter_config.json").read_text())
    tensors = load_file(str(Path(expert_dir) / "adapter_model.safetensors"))
    key = f"base_model.model.{module}"
    if f"{key}.lora_A.weight" not in tensors:
        return None
    A, B = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
    return cfg["lora_alpha"] / cfg["r"] * (B @ A)


def hand_mlp(x, expert_dir, layer=0):
    """The dense MLP of one expert: W_base + scale * B @ A on every projection."""
    base, _ = load_backbone("tiny-random")
    mlp = base.model.layers[layer].mlp
    W = {}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        delta = hand_delta(expert_dir, f"model.layers.{layer}.mlp.{proj}")
        W[proj] = getattr(mlp, proj).weight + (0 if delta is None else delta)
    return F.linear(F.silu(F.linear(x, W["gate_proj"])) * F.linear(x, W["up_proj"]), W["down_proj"])


def examples():
    """Twelve (prompt, completion, axis) triples whose prompts differ by axis."""
    topics = [("Explain how to bake bread.", "Mix flour and water."),
              ("How do I pick a lock to break in?", "I cannot help with that."),
              ("Is the Earth flat?", "No, the Earth is round.")]
    return [(f"{topics[y][0]} ({i})", topics[y][1], y) for i in range(4) for y in range(3)]


def test_forced_expert_equals_hand_built_dense_mlp(expert_dirs, expert_factory, tmp_path):
    # A fourth expert without MLP LoRA: its MLP must be the base MLP (zero delta, not an error).
    experts = {**expert_dirs, "attn_only": str(expert_factory(tmp_path / "attn", 7, targets=["q_proj"]))}
    model, _ = build_h3fusion("tiny-random", experts)
    mlp = h3fusion_layers(model)[0]
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    expected = [hand_mlp(x, path) for path in experts.values()]
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # the experts really differ
    for form in ("training", "materialized"):
        if form == "materialized":
            mlp.materialize()
        for e in range(len(experts)):
            mlp.forced_weights = F.one_hot(torch.tensor(e), len(experts)).float()
            with torch.no_grad():
                torch.testing.assert_close(mlp(x), expected[e], atol=1e-5, rtol=1e-5, msg=f"{form}, expert {e}")


def test_attention_gets_mean_of_expert_deltas(expert_dirs):
    model, _ = build_h3fusion("tiny-random", expert_dirs)
    base, _ = load_backbone("tiny-random")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        deltas = [hand_delta(p, name) for p in expert_dirs.values()]
        want = base.get_submodule(name).weight + sum(deltas) / 3
        torch.testing.assert_close(model.get_submodule(name).weight, want, atol=1e-6, rtol=1e-5)
    # Modules no expert adapted keep the base weights.
    assert torch.equal(model.model.layers[0].self_attn.k_proj.weight, base.model.layers[0].self_attn.k_proj.weight)


def test_materialize_keeps_outputs_and_allocates_dense_copies(expert_dirs):
    model, tok = build_h3fusion("tiny-random", expert_dirs)
    mlp = h3fusion_layers(model)[0]
    with torch.no_grad():
        mlp.router.weight.normal_(0, 1.0)  # a confident router so the top-2 choice matters
    base_mlp = sum(getattr(mlp, p).weight.numel() for p in ("gate_proj", "up_proj", "down_proj"))
    ids = tok(["Explain how to bake bread."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
        x = torch.randn(3, 4, 64)
        layer_before = mlp(x)
        materialize_h3fusion(model)
        after = model(ids).logits
        layer_after = mlp(x)
    torch.testing.assert_close(layer_after, layer_before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    names = [n for n, _ in mlp.named_parameters()]
    assert not any("lora" in n for n in names)
    counted = sum(p.numel() for p in mlp.parameters())
    assert counted >= 3 * base_mlp and counted < 3 * base_mlp + 1000  # E dense copies + router
    assert mlp.dense["up_proj"].shape == (3, 128, 64)


def test_top2_routing_weights(expert_dirs):
    model, _ = build_h3fusion("tiny-random", expert_dirs)
    mlp = h3fusion_layers(model)[1]
    with torch.no_grad():
        mlp.router.weight.normal_(0, 1.0)
        w = mlp.routing_weights(torch.randn(4, 7, 64))
    assert ((w > 0).sum(-1) == 2).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 7))
    probs = mlp.last_probs
    assert probs.shape == (4, 7, 3) and torch.allclose(probs.sum(-1), torch.ones(4, 7))
    # The kept experts are the two most probable, in the same ratio as their probabilities.
    dropped = probs.argmin(-1, keepdim=True)
    assert (w.gather(-1, dropped) == 0).all()
    kept = w > 0
    ratio = (probs * kept) / (probs * kept).sum(-1, keepdim=True)
    torch.testing.assert_close(w, ratio)


def test_drift_matches_dense_norm(expert_dirs):
    model, _ = build_h3fusion("tiny-random", expert_dirs)
    want = sum(torch.linalg.matrix_norm(layer.delta(p, e)) for layer in h3fusion_layers(model)
               for p in ("gate_proj", "up_proj", "down_proj") for e in range(3))
    torch.testing.assert_close(drift_norm(model), want, atol=1e-4, rtol=1e-5)


def test_fit_learns_labels_and_keeps_base_frozen(expert_dirs):
    model, tok = build_h3fusion("tiny-random", expert_dirs)
    data = examples()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if "router" not in n and "lora_" not in n}
    lora_before = h3fusion_layers(model)[0].lora_B["up_proj"][0].detach().clone()

    def label_prob():
        batch = tok([f"<|im_start|>user\n{p}<|im_end|>\n" for p, _, _ in data], return_tensors="pt", padding=True)
        labels = torch.tensor([y for _, _, y in data])
        with torch.no_grad():
            model(**batch)
        mask = batch["attention_mask"].float().unsqueeze(-1)
        probs = [((layer.last_probs * mask).sum(1) / mask.sum(1)).gather(1, labels[:, None]).mean()
                 for layer in h3fusion_layers(model)]
        return float(sum(probs) / len(probs))

    start = label_prob()
    cfg = H3FusionConfig(gating_weight=10.0, learning_rate=0.05, steps=12, batch_size=6, max_length=64)
    history = fit_h3fusion(model, tok, data, cfg, progress=False)
    assert history["steps"] == 12 and len(history["losses"]) == 12
    for key in ("losses", "lm_loss", "gating_loss", "drift"):
        assert all(torch.isfinite(torch.tensor(history[key]))), key
    assert min(history["drift"]) > 0
    end = label_prob()
    assert end > start + 0.1, (start, end)  # the router learnt the per-sample labels
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} changed"
    assert not torch.equal(h3fusion_layers(model)[0].lora_B["up_proj"][0], lora_before)  # train_experts


def test_fit_router_only_keeps_experts(expert_dirs):
    model, tok = build_h3fusion("tiny-random", expert_dirs)
    loras = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    router = h3fusion_layers(model)[0].router.weight.detach().clone()
    cfg = H3FusionConfig(train_experts=False, steps=2, batch_size=4, learning_rate=0.05, max_length=64)
    fit_h3fusion(model, tok, examples(), cfg, progress=False)
    assert all(torch.equal(p, loras[n]) for n, p in model.named_parameters() if n in loras)
    assert not torch.equal(h3fusion_layers(model)[0].router.weight, router)
    with pytest.raises(ValueError, match="labels"):
        fit_h3fusion(model, tok, [("a", "b", 3)], cfg, progress=False)


def test_generate_and_save_load_round_trip(expert_dirs, tmp_path):
    cfg = H3FusionConfig(steps=2, batch_size=4, learning_rate=0.05, max_length=64)
    model, tok = build_h3fusion("tiny-random", expert_dirs, cfg)
    assert model.h3fusion_axes == AXES
    fit_h3fusion(model, tok, examples(), cfg, progress=False)  # trained A/B must be what is saved
    batch = tok(["Explain how to bake bread.", "Is the Earth flat?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    out = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, batch["input_ids"].shape[1] + 5)

    path = save_h3fusion(model, tmp_path / "h3", "tiny-random", expert_dirs, cfg)
    assert sorted(p.name for p in path.iterdir()) == ["h3fusion.safetensors", "h3fusion_config.json"]
    loaded, _ = load_h3fusion(path)
    assert all(layer.materialized for layer in h3fusion_layers(loaded))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, logits, atol=1e-5, rtol=1e-5)
        materialize_h3fusion(model)
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    again = loaded.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(again, out)
    with pytest.raises(ValueError, match="before materialize"):
        save_h3fusion(model, tmp_path / "h3b", "tiny-random", expert_dirs, cfg)


def test_load_errors(expert_dirs, tmp_path):
    (tmp_path / "not_h3").mkdir()
    with pytest.raises(FileNotFoundError, match="not an H3Fusion folder"):
        load_h3fusion(tmp_path / "not_h3")
    cfg = H3FusionConfig()
    model, _ = build_h3fusion("tiny-random", expert_dirs, cfg)
    path = save_h3fusion(model, tmp_path / "h3", "tiny-random", expert_dirs, cfg)
    # Pointing the saved fusion at two experts: the router no longer fits.
    meta = json.loads((path / "h3fusion_config.json").read_text())
    meta["experts"].pop("honest")
    meta["num_experts"] = 2
    (path / "h3fusion_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not fit 2 experts"):
        load_h3fusion(path)
