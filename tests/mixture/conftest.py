"""Three tiny experts on tiny-random with random (non-zero) LoRA weights."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from mocae.backbones import load_backbone

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def make_expert(path, seed, targets=TARGETS, rank=2, backbone="tiny-random"):
    base, _ = load_backbone("tiny-random")
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(path)
    (path / "training.json").write_text(json.dumps({"backbone": backbone}))
    return path


@pytest.fixture
def expert_dirs(tmp_path):
    return {axis: str(make_expert(tmp_path / axis, seed))
            for seed, axis in enumerate(["helpful", "harmless", "honest"])}


@pytest.fixture
def expert_factory():
    """make_expert(path, seed, targets=..., rank=..., backbone=...) for tests that need odd experts."""
    return make_expert
