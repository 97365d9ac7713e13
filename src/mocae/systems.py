"""The systems a run compares: one table of specs, and how each is built, loaded and measured.

Every system module declares one ``SystemSpec`` (``mocae.spec``) and ``SPECS`` below lists them;
nothing else names a system. The harness scores each as a ``loader() -> (model, tokenizer)``:

- ``base``, ``expert_<axis>`` (one peft adapter), ``multitask`` (one LoRA on the union of the
  experts' training sets), ``mocae`` (the run's Mixture of Calibrated Experts);
- merges of the experts' dense deltas: ``task_arithmetic``, ``ties``, ``dare`` (peft merge_utils);
- routed baselines: ``h3fusion`` (MoE of expert MLPs, token router trained here), ``xlora``
  (peft X-LoRA, classifier trained here), ``arrow`` (peft Arrow, training-free), ``mote``
  (step experts + shared expert on self-generated reasoning chains, trained here);
- ``oracle``: the right expert per benchmark, composed from the single experts' results (an
  upper bound for any router; it generates nothing of its own).

``load_system(path)`` opens any saved system folder (its ``mocae_system.json`` marker names the
spec; older folders are recognised by their files), ``load_system(name, run)`` one system of a
``mocae run`` directory.

Memory and latency are measured per system in a fresh child process (``measure_isolated``),
so a system's peak RSS is its own and not the high-water mark of everything evaluated before.

Every system has a fingerprint of what it is made of (``system_fingerprint``: backbone identity,
adapter digests, the stage key of a trained system's folder, merge settings), computed without
loading it: evaluation results are keyed by it, so a row is redone exactly when the system changed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, create_model

from mocae import AXES
from mocae.baselines import adapter, base, h3fusion, merges, mote, oracle, peft_routing
from mocae.baselines.oracle import ORACLE_EXPERT, oracle_result  # noqa: F401 (public here too)
from mocae.mixture import system as mocae_system
from mocae.paths import atomic_write_json
from mocae.spec import SYSTEM_FILE, BuildContext, SystemSpec, read_marker
from mocae.stages import (StageLog, backbone_fingerprint, experts_fingerprint, folder_fingerprint, is_current,
                          read_stage, stage_inputs, stage_key, write_stage)

# The registry: one line per system module. Order: how systems are listed (and detected).
SPECS: list[SystemSpec] = [
    base.SYSTEM,
    adapter.EXPERT,
    oracle.SYSTEM,
    adapter.MULTITASK,
    merges.SYSTEM,
    h3fusion.SYSTEM,
    peft_routing.XLORA_SYSTEM,
    peft_routing.ARROW_SYSTEM,
    mote.SYSTEM,
    mocae_system.SYSTEM,
]


def register(spec: SystemSpec) -> SystemSpec:
    """Add a system to the registry at run time (a plugin's, or a test's); returns it.

    A spec registered here is loaded, saved, fingerprinted and evaluated like the built-in ones;
    only ``RunConfig.systems`` and ``BaselinesConfig`` (fixed when this module is imported) do not
    know it: list it in ``SPECS`` for a preset to name it.

    Raises:
        ValueError: a spec or system name already taken.
    """
    taken = {s.name for s in SPECS} | set(system_names())
    clash = sorted(({spec.name} | set(spec.system_names)) & taken)
    if clash:
        raise ValueError(f"system names already registered: {clash}")
    SPECS.append(spec)
    return spec


def system_names() -> tuple[str, ...]:
    """Every registered system name, in registry order."""
    return tuple(n for spec in SPECS for n in spec.system_names)


SYSTEMS: tuple[str, ...] = system_names()
SystemName = Literal[SYSTEMS]
MERGES = merges.SYSTEM.system_names
TRAINED = tuple(n for spec in SPECS if spec.fit is not None for n in spec.system_names)  # stages trained in the run


def spec_for(name: str) -> SystemSpec:
    """The spec of system ``name``.

    Raises:
        ValueError: an unknown system.
    """
    for spec in SPECS:
        if name in spec.system_names:
            return spec
    raise ValueError(f"unknown system {name!r}; systems are {', '.join(system_names())}")


def is_composed(name: str) -> bool:
    """True for a system composed from other systems' results (no model: the oracle)."""
    return spec_for(name).compose is not None


BaselinesConfig = create_model(
    "BaselinesConfig", __config__=ConfigDict(extra="forbid"),
    __doc__="Settings of the baselines a run builds (only those listed in ``systems`` are built).",
    **{spec.name: (spec.config, Field(default_factory=spec.config_default or spec.config,
                                      description=spec.description))
       for spec in SPECS if spec.config is not None},
    fusion_examples_per_axis=(int, Field(64, gt=0, description="labelled training pairs per axis for the "
                                         "H3Fusion router and the X-LoRA classifier (from the experts' own data)")),
)


@dataclass
class RunSystems:
    """What a run's systems are made of; saved as ``systems.json`` so a child process can load any."""

    backbone: str
    experts: dict[str, str]
    run_dir: str
    multitask: str | None = None
    baselines: dict = field(default_factory=dict)

    def save(self) -> Path:
        return atomic_write_json(Path(self.run_dir) / "systems.json", asdict(self))

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunSystems":
        path = Path(run_dir) / "systems.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a `mocae run` directory (or its experts stage "
                                    "has not finished)")
        return cls(**json.loads(path.read_text()))

    @property
    def config(self) -> BaselinesConfig:
        return BaselinesConfig.model_validate(self.baselines)

    def context(self, name: str) -> BuildContext:
        """What system ``name``'s spec hooks get from this run."""
        spec, cfg = spec_for(name), self.config
        return BuildContext(name=name, backbone=self.backbone, experts=self.experts, multitask=self.multitask,
                            run_dir=Path(self.run_dir), settings=getattr(cfg, spec.name, None), baselines=cfg)


def fusion_examples(expert_configs: dict, n_per_axis: int, data_dir: Path | None = None) -> list[tuple[str, str, int]]:
    """(prompt, completion, axis index) triples from each expert's own training data.

    Labels are per sample (H3Fusion's gating loss): a benign Alpaca row in the harmless
    expert's mix is labelled helpful, as that is the behaviour it teaches.
    """
    from mocae.experts.dataset import select_examples

    triples = []
    for axis in AXES:
        rows = select_examples(expert_configs[axis], data_dir)[:n_per_axis]
        triples += [(r.prompt, r.completion, AXES.index(r.axis)) for r in rows]
    return triples


def examples_per_axis(name: str, baselines) -> int:
    """Training pairs per axis of a trained system's stage (its own setting, else the shared one)."""
    spec = spec_for(name)
    return spec.examples_per_axis(baselines) if spec.examples_per_axis else baselines.fusion_examples_per_axis


# ---- loading: one system of a run, or any saved folder (AutoSystem) ----------------------------
def detect(path: str | Path) -> SystemSpec:
    """The spec that saved ``path``: its marker's, else the first whose files are all there.

    Raises:
        FileNotFoundError: not a saved system folder. LoadError: a damaged marker, or one naming
            a system that is not registered.
    """
    from mocae.errors import LoadError

    path = Path(path)
    name = read_marker(path)
    if name is not None:
        found = next((s for s in SPECS if s.name == name), None)
        if found is None or found.from_pretrained is None:
            raise LoadError(path / SYSTEM_FILE, f"names system {name!r}, which cannot be loaded here "
                                                f"(registered: {', '.join(s.name for s in SPECS)})")
        return found
    for spec in SPECS:
        if spec.files and spec.from_pretrained and all((path / f).is_file() for f in spec.files):
            return spec
    known = "; ".join(f"{s.name}: {' + '.join(s.files)}" for s in SPECS if s.files)
    raise FileNotFoundError(f"{path.resolve()} is not a saved system: no {SYSTEM_FILE} and none of the files "
                            f"that identify one ({known})")


class AutoSystem:
    """Opens any saved system, like transformers' ``AutoModel``: ``AutoSystem.from_pretrained(path)``."""

    @staticmethod
    def inspect(path: str | Path, backbone: str | None = None) -> tuple[SystemSpec, str | None]:
        """(spec, the backbone it belongs to) of a saved folder, its files checked, nothing loaded."""
        spec = detect(path)
        return spec, spec.inspect(Path(path), backbone) if spec.inspect else None

    @staticmethod
    def from_pretrained(path: str | Path, backbone: str | None = None):
        """(model, tokenizer) of ``path``: ``"base"`` (the backbone) or a saved system folder.

        Args:
            backbone: backbone override (a peft adapter; default: the one recorded with it).
        """
        from mocae.backbones import DEFAULT_BACKBONE, check_backbone_name, load_backbone

        if backbone is not None:
            check_backbone_name(backbone)
        if str(path) == "base":
            return load_backbone(backbone or DEFAULT_BACKBONE)
        return detect(path).from_pretrained(Path(path), backbone)


def load_system(source: str | Path, run: RunSystems | None = None, backbone: str | None = None,
                device: str | None = None):
    """(model, tokenizer) of a system, on the resolved device (``mocae.device``).

    Args:
        source: with ``run``, a system name of that run; without, ``"base"`` or any saved system
            folder (``AutoSystem``: MoCaE, H3Fusion, X-LoRA, MoTE, a merge, a peft adapter).
        run: a ``mocae run``'s systems (``RunSystems.load(run_dir)``).
        backbone: backbone override for ``"base"`` or an adapter folder.
        device: ``auto`` / ``cpu`` / ``cuda`` (default ``$MOCAE_DEVICE``).

    Raises:
        ValueError: an unknown system, one this run did not build, or one composed of others.
        FileNotFoundError: not a saved system folder.
    """
    from mocae.device import place

    if run is None:
        model, tokenizer = AutoSystem.from_pretrained(source, backbone)
    else:
        spec, ctx = spec_for(source), run.context(source)
        if spec.compose is not None:
            raise ValueError(f"{source!r} is composed from other systems' results: it has no model")
        model, tokenizer = spec.from_pretrained(ctx.folder) if spec.saved else spec.build(ctx)
    return place(model, device), tokenizer


def save_system(name: str, model, tokenizer, path: str | Path) -> Path:
    """Save a built system with its spec's ``save_pretrained`` (which writes the marker)."""
    spec = spec_for(name)
    if spec.save_pretrained is None:
        raise ValueError(f"{name!r} is rebuilt from its run when evaluated: it has no saved form")
    return spec.save_pretrained(model, tokenizer, Path(path))


# ---- trained stages ------------------------------------------------------------------------------
def fusion_inputs(name: str, run: RunSystems, examples: list[tuple[str, str, int]]) -> dict:
    """What a trained baseline stage is made of: its settings, its examples, the backbone and experts."""
    examples_sha = hashlib.sha256(json.dumps(examples, ensure_ascii=False).encode()).hexdigest()[:16]
    inputs = {"config": run.context(name).settings, "examples": examples_sha,
              "backbone": backbone_fingerprint(run.backbone)}
    if spec_for(name).reads_experts:  # MoTE trains its own step experts from the base model
        inputs["experts"] = experts_fingerprint(run.experts)
    return stage_inputs(**inputs)


def train_fusion(name: str, run: RunSystems, examples: list[tuple[str, str, int]], progress: bool = True,
                 log: StageLog | None = None) -> Path:
    """Train (or reuse) a trained system's stage (H3Fusion, X-LoRA, MoTE); saved in ``run_dir/<name>``.

    A saved stage is reused only when its ``stage.json`` key matches (settings, examples, backbone
    and experts); otherwise it is retrained and ``log`` says why.

    Args:
        examples: (prompt, completion, axis index into AXES) triples (``fusion_examples``).
        log: the run's stage log (records reused / recomputed and the reason).
    """
    spec = spec_for(name)
    if spec.fit is None:
        raise ValueError(f"{name!r} has no fusion stage (trained systems: {TRAINED})")
    ctx = run.context(name)
    folder = ctx.folder
    report = Path(run.run_dir) / f"{name}_training.json"
    inputs = fusion_inputs(name, run, examples)
    key = stage_key(inputs)
    if folder.is_dir() and report.is_file() and is_current(folder, key):
        if log is not None:
            log.note(name, key, inputs, computed=False)
        return folder
    reason = log.reason(name, inputs, read_stage(folder)) if log is not None else None
    print(f"[{name}] training on {len(examples)} labelled pairs" + (f" ({reason})" if reason else ""), flush=True)
    report.unlink(missing_ok=True)  # an old report must not pass for this stage's
    model, tokenizer, record = spec.fit(ctx, examples, progress)
    spec.save_pretrained(model, tokenizer, folder)
    write_stage(folder, name, key, inputs)
    atomic_write_json(report, {**record, "stage_key": key})
    if log is not None:
        log.note(name, key, inputs, computed=True, reason=reason)
    return folder


def system_fingerprint(name: str, run: RunSystems, stage: str | None = None) -> str:
    """A short id of what system ``name`` of ``run`` is made of, computed without loading it.

    Covers the backbone's identity, every adapter's weights and record, the saved folder of a
    trained system (MoCaE, H3Fusion, X-LoRA, MoTE) and the settings of a merge or Arrow.

    A trained system's folder counts by its ``stage.json`` key (everything that made it: settings,
    data, backbone, experts), not by its weights: retrained on another machine from the same
    inputs, a router may differ in its last bits, and its evaluation (an hour at the bench's sizes)
    still stands, as the stage itself is reused by that key. A folder without a stage record (saved
    by hand) counts by its files. ``stage`` gives that key before the folder is built
    (``mocae.pipeline.trained_stages``).

    Raises:
        ValueError: an unknown system, one this run did not build, or one composed of others.
        FileNotFoundError: a folder the system is made of is missing.
    """
    spec = spec_for(name)
    if spec.compose is not None:
        raise ValueError(f"{name!r} is composed from other systems' results: it has no fingerprint")
    ctx = run.context(name)
    parts: dict = {"system": name, "backbone": backbone_fingerprint(run.backbone)}
    if spec.saved:
        stage = stage or (read_stage(ctx.folder) or {}).get("key")
        parts["folder"] = f"stage:{stage}" if stage else folder_fingerprint(ctx.folder)
    else:
        parts.update(spec.fingerprint(ctx))
    return stage_key(parts)


# ---- efficiency in a fresh process ------------------------------------------------------------
def measure_isolated(name: str, run_dir: str | Path, prompts: list[str], batch_sizes=(1,), new_tokens: int = 32,
                     repeats: int = 2, threads: int | None = None) -> dict:
    """Decode/prefill speed and memory of one system, measured in a child process of its own.

    Returns:
        measure_efficiency's dict plus "rss_before_load_mb" (interpreter + libraries),
        "rss_after_load_mb", "weights_mb" (parameters + buffers) and "torch_threads" (the child's).
    """
    request = {"name": name, "run_dir": str(run_dir), "prompts": prompts, "batch_sizes": list(batch_sizes),
               "new_tokens": new_tokens, "repeats": repeats, "threads": threads}
    proc = subprocess.run([sys.executable, "-m", "mocae.systems"], input=json.dumps(request), text=True,
                          capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {name!r} failed in its child process:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        import os

        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child() -> None:
    import torch

    from mocae.evaluation.efficiency import measure_efficiency

    request = json.loads(sys.stdin.read())
    if request["threads"]:
        torch.set_num_threads(request["threads"])
    before = _current_rss_mb()
    model, tokenizer = load_system(request["name"], RunSystems.load(request["run_dir"]))
    after = _current_rss_mb()
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    result = measure_efficiency(model, tokenizer, request["prompts"], request["batch_sizes"],
                                request["new_tokens"], request["repeats"])
    result.update(rss_before_load_mb=round(before, 1), rss_after_load_mb=round(after, 1), weights_mb=round(weights, 1),
                  torch_threads=torch.get_num_threads())
    print(json.dumps(result))


if __name__ == "__main__":
    _child()
