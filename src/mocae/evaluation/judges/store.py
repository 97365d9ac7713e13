"""Where judges live (``$MOCAE_CACHE/judges/<kind>/``), the base class, and the missing-judge error."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from mocae.paths import atomic_directory, atomic_write_json, cache_dir

KINDS = ("truthful", "informative", "harmless", "helpful")
FORMAT = 1


class JudgeNotFound(FileNotFoundError):
    """No trained judge of this kind in the cache; the message gives the command that trains it."""

    def __init__(self, kind: str, folder: Path):
        self.kind, self.folder = kind, Path(folder)
        super().__init__(f"no trained {kind} judge in {folder}: train it with `mocae judges train --kind {kind}`")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"judge kind must be one of {list(KINDS)}, got {kind!r}")
    return kind


def judge_dir(kind: str) -> Path:
    """``$MOCAE_CACHE/judges/<kind>``: the folder a judge is saved to and loaded from by default."""
    return cache_dir() / "judges" / check_kind(kind)


class Judge:
    """Base of the four judges: a kind, a held-out validation report, save/load of a folder.

    Subclasses implement ``_save(folder)`` and ``_load(folder, meta)``.
    """

    kind = ""

    def __init__(self, validation: dict | None = None):
        self.validation = dict(validation or {})

    def save(self, folder: Path) -> Path:
        """Write the judge atomically: a reader never sees a half-written judge folder."""
        folder = Path(folder)
        with atomic_directory(folder) as tmp:
            self._save(tmp)
            atomic_write_json(tmp / "validation.json", self.validation)
            atomic_write_json(tmp / "judge.json", {
                "kind": self.kind, "format": FORMAT, "class": type(self).__name__,
                "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **self._meta()})
        return folder

    def _meta(self) -> dict:
        return {}

    def _save(self, folder: Path) -> None:
        raise NotImplementedError

    @classmethod
    def load(cls, folder: Path) -> "Judge":
        """Restore a judge written by ``save`` from ``folder``."""
        folder = Path(folder)
        meta = json.loads((folder / "judge.json").read_text())
        if meta.get("kind") != cls.kind:
            raise ValueError(f"{folder} holds a {meta.get('kind')!r} judge, not {cls.kind!r}")
        judge = cls._load(folder, meta)
        judge.validation = json.loads((folder / "validation.json").read_text())
        return judge

    @classmethod
    def _load(cls, folder: Path, meta: dict) -> "Judge":
        raise NotImplementedError


def is_saved(folder: Path) -> bool:
    """True when ``folder`` holds a complete judge (``judge.json`` is written last, atomically)."""
    return (Path(folder) / "judge.json").is_file() and (Path(folder) / "validation.json").is_file()
