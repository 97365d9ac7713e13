"""The System contract: what a system declares (``SystemSpec``) and what a loaded one offers.

A system is anything the evaluation harness scores: ``loader() -> (model, tokenizer)`` with an
HF-style ``generate`` and forward. Each system module declares one ``SystemSpec`` (its name, its
settings model, how it is built, fitted, saved and loaded, and its capabilities) and
``mocae.systems`` lists the specs in one table. Callers never probe a model's attributes to learn
what it can do: they ask ``capabilities_of(model)``, which every builder declares on the models it
returns (``declare``); a plain transformers or peft model has the ``PLAIN`` capabilities.

A system saved with ``save_pretrained`` carries ``mocae_system.json`` (``write_marker``) naming its
spec, so ``mocae.systems.load_system(path)`` opens it without being told what it is; folders saved
before the marker existed are recognised by their files (``SystemSpec.files``).

This module imports only ``mocae.errors``: every layer may use it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mocae.errors import LoadError, read_json

SYSTEM_FILE = "mocae_system.json"
ATTRIBUTE = "mocae_capabilities"


@dataclass(frozen=True)
class Capabilities:
    """What the harness, the MC scorer and the server may ask of a loaded system.

    Args:
        router: exposes ``axes`` and ``route`` / ``routing_probs`` (:class:`Router`): scoring routes
            on the prompt alone.
        per_request_routing: ``route`` gives one weight vector per request and ``routing_override``
            is honoured (scoring routes each MC context on its question alone).
        step_decoding: writes a reasoning chain before the answer (:class:`StepDecoder`): the
            chain gets ``reasoning_tokens`` of extra budget and only ``final_answer`` is scored.
        kv_cache: a forward with ``past_key_values`` gives the logits of a full forward (the MC
            scorer's shared-prefix cache may be used).
        bf16_autocast: its forward runs under bf16 autocast (else scoring stays in fp32).
        routing_report: a router's per-prompt probabilities and their calibration are reported
            (False for fixed or steered weights, whose calibration means nothing).
    """

    router: bool = False
    per_request_routing: bool = False
    step_decoding: bool = False
    kv_cache: bool = True
    bf16_autocast: bool = True
    routing_report: bool = True

    def autocast_bf16(self, asked: bool) -> bool:
        """Whether scoring runs under bf16 autocast when ``asked`` (never for a model that fails under it,
        e.g. peft Arrow): the scorers and the score cache's keys both read it."""
        return asked and self.bf16_autocast


PLAIN = Capabilities()


@runtime_checkable
class Router(Protocol):
    """A system with ``Capabilities.router``."""

    axes: list[str]
    routing_override: Callable | None

    def route(self, input_ids, attention_mask): ...

    def routing_probs(self, input_ids, attention_mask): ...


@runtime_checkable
class StepDecoder(Protocol):
    """A system with ``Capabilities.step_decoding``."""

    reasoning_tokens: int

    def final_answer(self, text: str) -> str: ...


def declare(model, capabilities: Capabilities | None):
    """Record ``capabilities`` on a built model (one attribute) and return the model; None goes back
    to what the model's class or interface says."""
    setattr(model, ATTRIBUTE, capabilities)
    return model


def capabilities_of(model) -> Capabilities:
    """The capabilities a builder declared on ``model``.

    A model no mocae builder made (a plain transformers or peft model, a caller's own wrapper)
    has those its interface shows: a router when it has ``route`` and ``axes``, per-request
    routing when it also honours ``routing_override`` with ``routes_per_request``, step decoding
    when it has ``reasoning_tokens`` and ``final_answer``; else ``PLAIN``.
    """
    declared = getattr(model, ATTRIBUTE, None)
    if declared is not None:
        return declared
    return Capabilities(
        router=hasattr(model, "route") and hasattr(model, "axes"),
        per_request_routing=hasattr(model, "routing_override") and bool(getattr(model, "routes_per_request", False)),
        step_decoding=hasattr(model, "reasoning_tokens") and hasattr(model, "final_answer"))


@dataclass(frozen=True)
class BuildContext:
    """What a spec's hooks get from the run: one system name of it and what it is made of.

    Args:
        name: the system name (``"ties"``, ``"expert_honest"``).
        backbone: the run's backbone.
        experts: axis -> expert adapter folder.
        multitask: the multi-task expert's folder, if the run trained one.
        run_dir: the run directory; a saved system lives in ``run_dir/<name>``.
        settings: the spec's section of the run's ``BaselinesConfig`` (None without one).
        baselines: the whole ``BaselinesConfig``.
    """

    name: str
    backbone: str
    experts: dict[str, str]
    multitask: str | None
    run_dir: Path
    settings: Any = None
    baselines: Any = None

    @property
    def folder(self) -> Path:
        return self.run_dir / self.name


@dataclass(frozen=True)
class SystemSpec:
    """One system, as its module declares it (registered in ``mocae.systems.SPECS``).

    Args:
        name: registry name; also the system name unless ``names`` lists several.
        names: the system names this spec provides (merges: ``task_arithmetic``, ``ties``, ``dare``).
        config: its settings' type, a field ``name`` of ``BaselinesConfig`` (None: no settings).
        config_default: factory of the default settings (default: ``config()``).
        build: ``build(ctx) -> (model, tokenizer)``: a training-free system, made when evaluated.
        fit: ``fit(ctx, examples, progress) -> (model, record)``: trains the system in its run
            stage from (prompt, completion, axis index) examples; it is then saved in ``ctx.folder``.
        save_pretrained: ``save_pretrained(model, path) -> path``, writing the marker.
        from_pretrained: ``from_pretrained(path, backbone=None) -> (model, tokenizer)``.
        inspect: ``inspect(path, backbone=None) -> backbone``: checks a saved folder's files
            without loading a model and returns the backbone it belongs to.
        files: the files that identify a saved folder of this system written without the marker.
        saved: the system lives in ``run_dir/<name>`` (its stage saves it): it is loaded with
            ``from_pretrained`` and fingerprinted by that folder.
        fingerprint: ``fingerprint(ctx) -> dict``: what a training-free system is made of.
        capabilities: declared on the models it returns (see ``declare``).
        compose: ``compose(results) -> result``: composed from other systems' results, no model.
        requires: systems a run must list with this one.
        examples_per_axis: ``examples_per_axis(baselines) -> int``: training pairs per axis for ``fit``.
        reads_experts: its fitted stage reads the run's experts (its key covers them).
    """

    name: str
    names: tuple[str, ...] = ()
    config: Any = None
    config_default: Callable | None = None
    build: Callable | None = None
    fit: Callable | None = None
    save_pretrained: Callable | None = None
    from_pretrained: Callable | None = None
    inspect: Callable | None = None
    files: tuple[str, ...] = ()
    saved: bool = False
    fingerprint: Callable | None = None
    capabilities: Capabilities = PLAIN
    compose: Callable | None = None
    requires: tuple[str, ...] = ()
    examples_per_axis: Callable | None = None
    reads_experts: bool = True
    description: str = field(default="", compare=False)

    @property
    def system_names(self) -> tuple[str, ...]:
        return self.names or (self.name,)


def write_marker(folder: str | Path, system: str) -> Path:
    """Write ``mocae_system.json`` naming the spec that saved ``folder``."""
    path = Path(folder) / SYSTEM_FILE
    path.write_text(json.dumps({"system": system}) + "\n")
    return path


def read_marker(folder: str | Path) -> str | None:
    """The spec name recorded in ``folder``'s marker, or None when it has none.

    Raises:
        LoadError: the marker is damaged or names no system.
    """
    path = Path(folder) / SYSTEM_FILE
    if not path.is_file():
        return None
    name = read_json(path, f"rm {path} (the system is then recognised by its files)").get("system")
    if not isinstance(name, str):
        raise LoadError(path, f"'system' must be a system name, got {name!r}")
    return name
