"""Stage fingerprints: every stage of a run is keyed by what made it.

A stage's key is a sha256 over its inputs: its own config, the fingerprints of the folders it
reads (experts, router), the backbone's identity, the data files it reads (content hashes) and
``SPLIT_RULES``. A stage writes ``stage.json`` (key, inputs, time) next to its output; a later
run recomputes it when the key differs, and :class:`StageLog` records in the run's
``stages.json`` which stages were recomputed and why (the inputs that changed).

Fingerprints are cheap: file digests are memoised per (path, size, mtime), so a re-run hashes
an adapter or a data file once, and nothing loads a model to learn that its outputs are fresh.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel

from mocae.errors import read_cached_json
from mocae.paths import atomic_write_json, resolve_root
from mocae.spec import SYSTEM_FILE

# Names the split rules of mocae.data.splits and the held-out filter of mocae.data.heldout: bump it
# when either changes, so that every stage that read a split side (experts, router, evaluation) is
# recomputed instead of reused.
SPLIT_RULES = "truthfulqa-stratified-v1/alpaca-eval-3way-v1/heldout-dropped-v1"
STAGE_FILE = "stage.json"
LOG_FILE = "stages.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json", "training.json")

_digests: dict[tuple, str] = {}


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, memoised per (path, size, mtime_ns) within the process."""
    path = Path(path).resolve()
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _digests:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _digests[memo] = h.hexdigest()
    return _digests[memo]


def folder_fingerprint(path: str | Path, exclude: Iterable[str] = (STAGE_FILE, SYSTEM_FILE)) -> str:
    """sha256 over every file of a model folder (relative name + content digest).

    ``stage.json`` (it carries a time), the system marker (a folder saved before markers existed
    must keep its fingerprint, and so its cached evaluation) and hidden or checkpoint files are
    left out.

    Raises:
        FileNotFoundError: ``path`` is not a folder.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: cannot fingerprint it")
    skip = set(exclude)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if rel.name in skip or any(part.startswith(".") or part == "checkpoints" for part in rel.parts):
            continue
        h.update(f"{rel.as_posix()}:{file_digest(file)}\n".encode())
    return h.hexdigest()[:16]


def expert_fingerprint(path: str | Path) -> str:
    """Fingerprint of an expert folder: its adapter weights, adapter config and training record.

    Raises:
        FileNotFoundError: the folder has no adapter weights (named).
    """
    path = Path(path)
    found = [name for name in ADAPTER_FILES if (path / name).is_file()]
    if not any(name.startswith("adapter_model") for name in found):
        raise FileNotFoundError(f"{path}: no adapter_model.safetensors: not a trained expert "
                                "(train it with `mocae train-expert` or re-run `mocae run`)")
    h = hashlib.sha256()
    for name in found:
        h.update(f"{name}:{file_digest(path / name)}\n".encode())
    return h.hexdigest()[:16]


def experts_fingerprint(experts: dict) -> dict[str, str]:
    """``expert_fingerprint`` of every named expert folder, by name."""
    return {name: expert_fingerprint(path) for name, path in experts.items()}


def backbone_fingerprint(name: str) -> str:
    """Identity of a backbone, without loading it.

    A registered name, ``tiny-random`` or a Hub id is its own identity (registered wheels are
    pinned); a local folder is identified by its config digest and its files' names and sizes.
    """
    path = Path(name).expanduser()
    if not path.is_dir():
        return name
    h = hashlib.sha256(name.encode())
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        detail = file_digest(file) if file.suffix == ".json" else str(file.stat().st_size)
        h.update(f"{file.name}:{detail}\n".encode())
    return f"{name}@{h.hexdigest()[:16]}"


def data_fingerprint(files: Iterable[str], data_dir: str | Path | None = None) -> dict[str, str]:
    """Content digest of each data file a stage reads, by path relative to the data directory.

    Without a data directory the loaders read the Hub: the files are then named ``hub``. A
    missing file is ``missing`` (its loader fails with the full path when the stage runs).
    """
    root = resolve_root(data_dir)
    out = {}
    for rel in sorted(set(files)):
        if root is None:
            out[rel] = "hub"
        elif (Path(root) / rel).is_file():
            out[rel] = file_digest(Path(root) / rel)[:16]
        else:
            out[rel] = "missing"
    return out


def _jsonable(value):
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def stage_inputs(**inputs) -> dict:
    """The inputs of a stage as plain JSON (pydantic configs dumped), plus ``SPLIT_RULES``."""
    return {"split_rules": SPLIT_RULES, **_jsonable(inputs)}


def stage_key(inputs: dict) -> str:
    """The key of a stage: a short sha256 of its inputs (see :func:`stage_inputs`)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_fields(old, new, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ (dicts are compared key by key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(path)
            else:
                out += changed_fields(old[key], new[key], path)
        return out
    return [] if old == new else [prefix or "<root>"]


def lookup(data, path: str):
    """The value at a dotted path of nested dicts, or ``"unset"``."""
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return "unset"
        data = data[part]
    return data


def read_stage(folder: str | Path) -> dict | None:
    """The ``stage.json`` record of a stage's output folder, or None (absent or unreadable)."""
    record = read_cached_json(Path(folder) / STAGE_FILE, "stage record")
    return record if record is not None and "key" in record else None


def write_stage(folder: str | Path, name: str, key: str, inputs: dict) -> dict:
    """Write ``folder/stage.json``; call it last, once the stage's output is complete."""
    record = {"stage": name, "key": key, "inputs": inputs, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(Path(folder) / STAGE_FILE, record)
    return record


def is_current(folder: str | Path, key: str) -> bool:
    """True when ``folder`` holds a finished stage made with ``key``."""
    record = read_stage(folder)
    return record is not None and record["key"] == key


def change_reason(before: dict | None, inputs: dict) -> str:
    """Why a stage whose last record is ``before`` (a stage.json record, or None) must be computed."""
    if not before or "inputs" not in before:
        return "no earlier record"
    changed = changed_fields(before["inputs"], inputs)
    return f"changed: {', '.join(changed)}" if changed else "output missing or unfinished"


class StageLog:
    """Which stages a run recomputed or reused, and why; kept in ``run_dir/stages.json``.

    The previous invocation's log (same file) gives the reasons: the inputs that changed. Entries
    of stages this invocation has not reached (yet) are kept under "earlier", so an interrupted
    run still knows, next time, what its later stages were made from.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOG_FILE
        stored = read_cached_json(self.path, "stage log") or {}
        self.previous: dict = {}
        for part in ("earlier", "stages"):  # this invocation's entries win over older ones
            if isinstance(stored.get(part), dict):
                self.previous.update(stored[part])
        self.entries: dict[str, dict] = {}

    def reason(self, name: str, inputs: dict, record: dict | None = None) -> str:
        """Why stage ``name`` must be computed: what changed since its last record."""
        return change_reason(record or self.previous.get(name), inputs)

    def note(self, name: str, key: str, inputs: dict, computed: bool, reason: str | None = None) -> None:
        """Record one stage's outcome (and save the log, so an interrupted run keeps it)."""
        if computed and reason is None:
            reason = self.reason(name, inputs)
        self.entries[name] = {"status": "computed" if computed else "reused", "reason": reason if computed else None,
                              "key": key, "inputs": inputs}
        earlier = {n: e for n, e in self.previous.items() if n not in self.entries}
        atomic_write_json(self.path, {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": self.entries,
                                      "earlier": earlier})

    @property
    def recomputed(self) -> dict[str, str]:
        """{stage: reason} of the stages this run computed."""
        return {n: e["reason"] for n, e in self.entries.items() if e["status"] == "computed"}

    def summary(self) -> str:
        """One line per recomputed stage and one for the reused ones."""
        lines = [f"[stages] recomputed {name}: {why}" for name, why in self.recomputed.items()]
        reused = [n for n, e in self.entries.items() if e["status"] == "reused"]
        if reused:
            lines.append(f"[stages] reused {len(reused)}: {', '.join(reused)}")
        return "\n".join(lines)
