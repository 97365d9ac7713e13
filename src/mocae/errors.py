"""One error type for files mocae reads back, and the readers that raise it.

Whatever is wrong with a saved artifact (cut off, not JSON, the wrong schema, a truncated
safetensors file, an adapter for another backbone), the user sees one line: which file, what is
wrong with it, and the command that writes it again. Readers catch the library's own errors
(``json.JSONDecodeError``, ``SafetensorError``, ``OSError``) at the file boundary and re-raise
them as ``LoadError``, so no caller has to know which library read the file.
"""

from __future__ import annotations

import json
from pathlib import Path


class LoadError(ValueError):
    """A saved file that cannot be used as it is.

    Args:
        path: the file (or folder) at fault.
        problem: what is wrong with it, in a few words.
        rebuild: the command that writes it again (optional).
    """

    def __init__(self, path: str | Path, problem: str, rebuild: str | None = None):
        self.path = Path(path)
        self.problem = problem
        self.rebuild = rebuild
        super().__init__(f"{path}: {problem}" + (f"; rebuild with: {rebuild}" if rebuild else ""))


def read_json(path: str | Path, rebuild: str | None = None, expect: type = dict):
    """Read a JSON file written by mocae.

    Args:
        path: the file.
        rebuild: command named in the error when the file is unusable.
        expect: the type of the top-level value (dict by default; ``object`` for any).

    Returns:
        The parsed value.

    Raises:
        FileNotFoundError: the file does not exist.
        LoadError: unreadable, not JSON (e.g. cut off) or not an ``expect``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as err:
        raise LoadError(path, f"cannot be read ({err})", rebuild) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        body = text.strip()
        closed = not body or {"{": "}", "[": "]"}.get(body[0]) in (None, body[-1])
        what = "not valid JSON" if closed else "cut off (its JSON does not end)"
        raise LoadError(path, f"{what} (line {err.lineno}, column {err.colno}: {err.msg})", rebuild) from None
    if not isinstance(value, expect):
        raise LoadError(path, f"expected a JSON {expect.__name__}, found {type(value).__name__}", rebuild)
    return value


def read_cached_json(path: str | Path, what: str, then: str = "treating it as absent") -> dict | None:
    """A JSON object from a cache file, or None: absent, or (with a warning naming the file) unusable.

    Caches are never trusted blindly and never crash a run: a damaged entry is a miss.

    Args:
        what: what the file is, for the warning ("evaluation cache", "stage record"...).
        then: what the caller does instead, for the warning.
    """
    import warnings

    try:
        return read_json(path)
    except FileNotFoundError:
        return None
    except LoadError as err:
        warnings.warn(f"{what} {err}; {then}", stacklevel=3)
        return None


def safetensors_shapes(path: str | Path, rebuild: str | None = None) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, without reading the tensors.

    Raises:
        FileNotFoundError: the file does not exist.
        LoadError: not a complete safetensors file (truncated, garbage).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise LoadError(path, f"not a complete safetensors file ({err})", rebuild) from None


def load_safetensors(path: str | Path, rebuild: str | None = None) -> dict:
    """``safetensors.torch.load_file`` that names the file when it is damaged.

    Raises:
        FileNotFoundError: the file does not exist.
        LoadError: truncated or not a safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise LoadError(path, f"not a complete safetensors file ({err})", rebuild) from None
