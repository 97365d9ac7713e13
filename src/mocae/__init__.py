"""mocae: helpful, harmless and honest alignment with a Mixture of Calibrated Experts.

    from mocae import MoCaEModel, MoCaEConfig, fit_router, train_expert, evaluate, load_system, AXES

The exports load on first use, so ``import mocae`` stays cheap (no torch, no transformers).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

AXES = ("helpful", "harmless", "honest")

# name -> the module it lives in (tests/test_import_layers.py reads this too).
_EXPORTS = {
    "MoCaEModel": "mocae.mixture.model",
    "MoCaEConfig": "mocae.mixture.model",
    "fit_router": "mocae.mixture.fit",
    "train_expert": "mocae.experts.train",
    "evaluate": "mocae.evaluation.harness",
    "load_system": "mocae.systems",
}

__all__ = ["AXES", "__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mocae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
