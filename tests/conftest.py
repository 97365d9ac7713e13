"""Shared fixtures: a tiny random backbone (never a download), an isolated cache and three tiny
random LoRA experts on it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

FIXTURES = Path(__file__).parent / "fixtures"
# Test-only helper modules (e.g. tiny_judges): importable by name, and kept out of the package.
sys.path.insert(0, str(Path(__file__).parent / "helpers"))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own MOCAE_CACHE so no test sees another's converted models."""
    monkeypatch.setenv("MOCAE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny():
    """(model, tokenizer) of the tiny-random backbone, fresh per test (they get mutated)."""
    from mocae.backbones import load_backbone

    return load_backbone("tiny-random")


@pytest.fixture
def real_data_dir() -> Path:
    """The real data directory, or skip when this machine has none."""
    value = os.environ.get("MOCAE_DATA_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("MOCAE_DATA_DIR is not set to an existing directory")
    return Path(value)


# LoRA targets of the tiny experts: attention and MLP, as real experts have.
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def make_expert(path, seed, targets=TARGETS, rank=2, backbone="tiny-random"):
    """A peft adapter folder with random (non-zero) LoRA weights and a training.json."""
    from mocae.backbones import load_backbone

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
def named_expert_dirs(tmp_path):
    """Four experts beyond the HHH axes; ``concise`` is a user's own peft adapter (no training.json)."""
    dirs = {name: make_expert(tmp_path / "named" / name, seed)
            for seed, name in enumerate(["helpful", "harmless", "honest", "concise"], start=10)}
    (dirs["concise"] / "training.json").unlink()
    return {name: str(path) for name, path in dirs.items()}


@pytest.fixture
def expert_factory():
    """make_expert(path, seed, targets=..., rank=..., backbone=...) for tests that need odd experts."""
    return make_expert
