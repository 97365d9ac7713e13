"""Shared fixtures: a tiny random backbone (never a download) and an isolated cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

FIXTURES = Path(__file__).parent / "fixtures"


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
