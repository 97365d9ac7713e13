"""Typed configuration: pydantic models with help text, loaded from YAML presets.

The presets ship inside the package (``mocae/configs/*.yaml``, read through ``importlib.resources``),
so they are found after a plain ``pip install`` as well as in a checkout.

A preset's header comment shows the command that runs it. Loading rejects unknown fields and
wrong types with an error naming the file and the field, so a typo never silently falls back
to a default.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or value that does not fit its schema."""


def config_hash(config: BaseModel, length: int = 12) -> str:
    """A short stable hash of a config: runs and artifacts are keyed by it."""
    payload = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def validate_config(model_cls: type[M], data: dict, source: str = "<config>") -> M:
    """Build ``model_cls`` from ``data``, turning pydantic errors into one readable ConfigError.

    Raises:
        ConfigError: naming ``source`` and every offending field.
    """
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in e['loc'])}': {e['msg']}"
            + (f" (got {e['input']!r})" if e["type"] != "missing" else "")
            for e in err.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def presets_dir() -> Path:
    """The folder of the packaged presets (mocae installs unzipped, so it is a real folder)."""
    return Path(str(resources.files("mocae") / "configs"))


def resolve_preset(name_or_path: str | Path) -> Path:
    """A preset name (``quick``) maps to the packaged ``mocae/configs/quick.yaml``; a path is used as is.

    Raises:
        FileNotFoundError: listing the presets that exist.
    """
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} and path.is_file():
        return path
    candidate = presets_dir() / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in presets_dir().glob("*.yaml"))
    raise FileNotFoundError(f"no preset or YAML file {str(name_or_path)!r}; presets: {known}")


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping.

    Raises:
        ConfigError: the file is not valid YAML or not a mapping.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a nested config dict.

    Raises:
        ConfigError: an override without ``=`` or one that descends into a non-mapping.
    """
    data = json.loads(json.dumps(data))  # a deep copy
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.path=value (e.g. eval.n_helpful=64)")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from None
    return data


def load_config(model_cls: type[M], path: str | Path, overrides: dict | list[str] | None = None) -> M:
    """Load a YAML file into ``model_cls``, with overrides applied on top.

    Args:
        overrides: a dict merged at the top level, or ``dotted.key=value`` strings.
    """
    data = load_yaml(path)
    if isinstance(overrides, dict):
        data = {**data, **overrides}
    elif overrides:
        data = apply_overrides(data, overrides)
    source = str(path) + (f" with {' '.join(overrides)}" if isinstance(overrides, list) and overrides else "")
    return validate_config(model_cls, data, source=source)
