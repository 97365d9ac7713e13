"""Where models train and run, and in which precision: one setting, resolved here only.

``MOCAE_DEVICE`` (or ``mocae --device``): ``auto`` (default: CUDA when available, else the CPU;
``accelerate launch --cpu`` forces the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
``MOCAE_DTYPE`` (or ``mocae --dtype``): ``auto`` (default), ``bf16`` or ``fp32``.

Training loops always keep fp32 weights and run their forward under bf16 autocast (``auto`` and
``bf16``; ``fp32`` turns autocast off). Generation runs in fp32 on the CPU under ``auto`` (the
numbers this project reports were measured so) and under bf16 autocast on CUDA or with ``bf16``.

Neither setting is part of any stage key or config hash: where a stage ran does not say what it
is (a stage trained on another device is reused, like one trained with another thread count).
"""

from __future__ import annotations

import contextlib
import os

import torch

DEVICE_ENV = "MOCAE_DEVICE"
DTYPE_ENV = "MOCAE_DTYPE"
DTYPES = ("auto", "bf16", "fp32")


def resolve(device: str | torch.device | None = None) -> torch.device:
    """The torch device for ``device`` (None: ``$MOCAE_DEVICE``, default ``auto``).

    Raises:
        ValueError: an unknown device name, or CUDA asked for where there is none.
    """
    value = device if device is not None else os.environ.get(DEVICE_ENV) or "auto"
    if isinstance(value, torch.device):
        return value
    if value == "auto":
        forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        return torch.device("cuda" if torch.cuda.is_available() and not forced_cpu else "cpu")
    try:
        resolved = torch.device(value)
    except RuntimeError:
        raise ValueError(f"unknown device {value!r} (--device / {DEVICE_ENV}): use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {value!r} (--device / {DEVICE_ENV}) asked for, but torch sees no CUDA GPU "
                         f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    return resolved


def precision(dtype: str | None = None) -> str:
    """``auto``, ``bf16`` or ``fp32`` (None: ``$MOCAE_DTYPE``, default ``auto``).

    Raises:
        ValueError: any other value.
    """
    value = dtype if dtype is not None else os.environ.get(DTYPE_ENV) or "auto"
    if value not in DTYPES:
        raise ValueError(f"unknown dtype {value!r} ({DTYPE_ENV}): use one of {', '.join(DTYPES)}")
    return value


def train_autocast(device: torch.device, dtype: str | None = None):
    """The autocast context of a training forward on ``device``: bf16 unless ``fp32``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision(dtype) != "fp32")


def inference_autocast(device: torch.device, dtype: str | None = None):
    """The autocast context of generation on ``device``: bf16 on CUDA or when asked, else none."""
    mode = precision(dtype)
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_of(model) -> torch.device:
    """Where ``model`` runs: its ``device``, else its first parameter's, else the CPU (a duck-typed stand-in)."""
    if getattr(model, "device", None) is not None:
        return torch.device(model.device)
    first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return first.device if first is not None else torch.device("cpu")


def place(model, device: str | torch.device | None = None):
    """Move ``model`` to the resolved device (a no-op where it already is) and return it."""
    target = resolve(device)
    current = getattr(model, "device", None)
    if current is None or torch.device(current) != target:
        model.to(target)
    return model
