"""The expert-folder contract: an expert adapter folder checked against the backbone it is about
to be loaded into, in one place for every system built from experts.

peft loads an adapter for another backbone either silently (same shapes, wrong model) or with a
page of ``size mismatch`` errors. ``check_adapter`` reads only the small files (the adapter
config, ``training.json`` and the safetensors header) and fails first, with one ``LoadError``
naming the file, what does not fit and the command that retrains the expert. ``check_experts``
checks a set of named experts (MoCaE, the merges, H3Fusion, X-LoRA, Arrow);
``recorded_backbone`` reads which backbone a folder says it belongs to.
"""

from __future__ import annotations

from pathlib import Path

from mocae import AXES
from mocae.errors import LoadError, read_json, safetensors_shapes

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINING_FILE = "training.json"
_PEFT_PREFIX = "base_model.model."


def _names(value: str) -> set[str]:
    """Spellings of one backbone: the name itself, and for a local path its folder name and the
    Hub id of a Hugging Face cache snapshot (``models--org--name``)."""
    names = {value}
    if value.startswith(("/", ".", "~")) or Path(value).exists():
        path = Path(value.rstrip("/")).expanduser()
        names.add(path.name)
        names |= {p[len("models--"):].replace("--", "/") for p in path.parts if p.startswith("models--")}
    return names


def names_backbone(recorded: str | None, backbone: str) -> bool:
    """True when an adapter's recorded base model can be ``backbone`` (unknown counts as yes:
    the tensor shapes decide then)."""
    return not recorded or bool(_names(str(recorded)) & _names(backbone))


def recorded_backbone(path: str | Path, rebuild: str | None = None, adapter_config: bool = True) -> str | None:
    """The backbone an adapter folder records: ``training.json``'s, else (``adapter_config``) the
    adapter config's base model; None when neither says."""
    path = Path(path)
    if (path / TRAINING_FILE).is_file():
        trained_on = read_json(path / TRAINING_FILE, rebuild).get("backbone")
        if trained_on:
            return trained_on
    if adapter_config and (path / ADAPTER_CONFIG).is_file():
        return read_json(path / ADAPTER_CONFIG, rebuild).get("base_model_name_or_path") or None
    return None


def check_experts(backbone: str | None, experts: dict[str, str | Path], model=None, rebuild: str | None = None,
                  same_targets: bool = False) -> dict[str, dict]:
    """``check_adapter`` for every named expert, before any of them loads.

    Args:
        backbone: the backbone they will be loaded into.
        experts: name -> adapter folder.
        model: the loaded backbone; when given, every adapter tensor's shape is checked too.
        rebuild: the command named in load errors (default: retrain that expert).
        same_targets: the experts must also target the same modules (a mixture of them).

    Returns:
        name -> adapter config.

    Raises:
        FileNotFoundError / LoadError: as ``check_adapter``, naming the expert. ValueError: no
            experts, or (``same_targets``) experts that target different modules.
    """
    if not experts:
        raise ValueError("need at least one expert")
    configs = {name: check_adapter(path, backbone, name, model, rebuild) for name, path in experts.items()}
    if same_targets:
        targets = {}
        for name, cfg in configs.items():
            modules = cfg["target_modules"]
            targets[name] = sorted([modules] if isinstance(modules, str) else modules)
        first_name, first = next(iter(targets.items()))
        for name, t in targets.items():
            if t != first:
                raise ValueError(f"experts {first_name!r} and {name!r} target different modules ({first} vs {t}); "
                                 "the mixture needs the same target modules")
    return configs


def check_adapter(path: str | Path, backbone: str | None, axis: str | None = None, model=None,
                  rebuild: str | None = None) -> dict:
    """Check that the adapter in ``path`` belongs to ``backbone``, before peft loads it.

    Args:
        path: a peft adapter folder.
        backbone: the backbone name it will be loaded into (None: not compared with the records).
        axis: the expert's axis (or name), for the message and the rebuild command.
        model: the loaded backbone (plain HF model); when given, every LoRA tensor's shape is
            checked against the module it adapts.
        rebuild: the command named in errors (default: retrain the expert of ``axis``).

    Returns:
        The adapter config.

    Raises:
        FileNotFoundError: not an adapter folder. LoadError: a file is damaged, names another
            base model, or a tensor does not fit the backbone.
    """
    path = Path(path)
    label = f"expert {axis!r}" if axis else "adapter"
    if rebuild is None and axis in AXES:  # a finished expert is reused by train-expert: remove it first
        rebuild = f"rm -r {path} && mocae train-expert --axis {axis} --backbone {backbone}"
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{label}: {cfg_file} not found (not a peft adapter folder)")
    cfg = read_json(cfg_file, rebuild)
    if cfg.get("peft_type", "LORA") != "LORA" or not cfg.get("target_modules"):
        raise LoadError(cfg_file, f"{label} is not a LoRA adapter (peft_type {cfg.get('peft_type')!r}, "
                                  f"target_modules {cfg.get('target_modules')!r})", rebuild)
    recorded = cfg.get("base_model_name_or_path")
    if backbone is not None and not names_backbone(recorded, backbone):
        raise LoadError(cfg_file, f"{label} names base model {recorded!r}, but the backbone is {backbone!r}",
                        rebuild)
    if backbone is not None and (path / TRAINING_FILE).is_file():
        trained_on = read_json(path / TRAINING_FILE, rebuild).get("backbone")
        if trained_on is not None and trained_on != backbone:
            raise LoadError(path / TRAINING_FILE,
                            f"{label} was trained on backbone {trained_on!r}, not {backbone!r}", rebuild)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            return cfg  # an old pickle adapter: peft reads it, no header to check
        raise LoadError(path, f"{label} has no {ADAPTER_WEIGHTS}", rebuild)
    shapes = safetensors_shapes(weights, rebuild)
    if model is not None:
        _check_shapes(shapes, model, weights, backbone, rebuild)
    return cfg


def _check_shapes(shapes: dict, model, weights: Path, backbone: str, rebuild: str | None) -> None:
    """Every lora_A is (r, in_features) and lora_B (out_features, r) of the linear layer it adapts."""
    wrong = []
    for key, shape in shapes.items():
        stem, _, factor = key.removesuffix(".weight").rpartition(".")
        if factor not in ("lora_A", "lora_B"):
            continue  # embeddings, biases, modules_to_save: peft reports those itself
        name = stem.removeprefix(_PEFT_PREFIX)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise LoadError(weights, f"has LoRA weights for {name!r}, a module backbone {backbone!r} does not "
                                     "have (an adapter for another backbone?)", rebuild) from None
        if not hasattr(module, "in_features"):
            continue
        want = module.in_features if factor == "lora_A" else module.out_features
        got = shape[1] if factor == "lora_A" else shape[0]
        if len(shape) != 2 or got != want:
            wrong.append(f"{key} {list(shape)}, its layer is {module.in_features} -> {module.out_features}")
    if wrong:
        raise LoadError(weights, f"{len(wrong)} LoRA tensors do not fit backbone {backbone!r} (first: {wrong[0]}; "
                                 "an adapter for another backbone?)", rebuild)
