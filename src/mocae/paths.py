"""Where mocae reads data and keeps its cache, and how it writes artifacts safely."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: ``$MOCAE_CACHE`` or ``~/.cache/mocae``."""
    root = Path(os.environ.get("MOCAE_CACHE", Path.home() / ".cache" / "mocae")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def data_dir() -> Path | None:
    """The local data directory from ``$MOCAE_DATA_DIR``, or None (then the Hub is used).

    Raises:
        FileNotFoundError: the variable is set but names no directory.
    """
    value = os.environ.get("MOCAE_DATA_DIR")
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"MOCAE_DATA_DIR={value!r} is not a directory")
    return path


def resolve_root(given: Path | str | None) -> Path | None:
    """The data directory to read: ``given``, else ``$MOCAE_DATA_DIR``, else None (use the Hub)."""
    if given is not None:
        return Path(given).expanduser()
    return data_dir()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader never sees a half-written file.

    The temporary file is unique per writer: two processes landing the same file side by side
    each rename a whole copy instead of racing on one shared ``.tmp`` name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _as_if_created(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8) so a reader never sees a half-written file."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text writes str, not {type(text).__name__} (to {path})")
    atomic_write_bytes(path, text.encode("utf-8"))


def _as_if_created(path, mode: int) -> None:
    """Give a mkstemp/mkdtemp path (0600/0700) the mode a plain open/mkdir would: ``mode`` minus the umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, mode & ~mask)


def atomic_write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target`` that replaces ``target`` only on success.

    A reader never sees a half-written model folder; an exception leaves ``target`` as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        _as_if_created(tmp, 0o777)
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.replace(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_save_figure(fig, path: Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG so a reader never sees a half-written image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        _as_if_created(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
