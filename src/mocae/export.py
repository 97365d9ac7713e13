"""Export a fixed mixture of a MoCaE model as one plain peft LoRA adapter (exact).

For every LoRA module and normalised weights ``w`` the mixture's update is
``sum_e w_e s_e B_e A_e`` with ``s_e = alpha_e / r_e``. Concatenating the ranks,

    A_cat = [w_1 s_1 A_1; ...; w_E s_E A_E]   (sum r_e x d_in)
    B_cat = [B_1, ..., B_E]                   (d_out x sum r_e)

gives ``B_cat A_cat`` equal to that sum, so one rank-(sum r_e) adapter with scaling 1
reproduces MoCaE with static weights exactly (no SVD, no approximation). peft's own
``add_weighted_adapter(combination_type="cat")`` does this (it folds ``w_e s_e`` into A and
sets ``lora_alpha = r``); we reuse it and only guard its traps: it silently does nothing when
the name exists, falls back to ``linear`` (not exact) for a single adapter, and with rsLoRA
its new scaling is ``alpha / sqrt(r)`` instead of 1, which we fold back into A.

Any engine that loads peft adapters serves the result: ``PeftModel.from_pretrained`` or vLLM's
multi-LoRA (``LoRARequest``), which has no per-request adapter weighting of its own.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

EXPORT_NAME = "mocae_export"
EXPORT_RECORD = "mocae_export.json"


def parse_weights(text: str | dict, axes: list[str]) -> list[float]:
    """``helpful=1,harmless=0.5,honest=2`` (or a dict) -> weights in ``axes`` order, normalised to sum 1.

    ``axes`` are the model's expert names (any two or more); those left out get 0. Raises
    ValueError naming the expert or value at fault.
    """
    if isinstance(text, str):
        pairs = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            if "=" not in item:
                example = ",".join(f"{a}={i + 1}" for i, a in enumerate(axes[:3]))
                raise ValueError(f"--weights: {item!r} is not AXIS=VALUE (e.g. {example})")
            axis, value = (s.strip() for s in item.split("=", 1))
            if axis in pairs:
                raise ValueError(f"--weights: axis {axis!r} given twice")
            try:
                pairs[axis] = float(value)
            except ValueError:
                raise ValueError(f"--weights: {axis}={value!r} is not a number") from None
    else:
        pairs = {str(k): float(v) for k, v in text.items()}
    unknown = sorted(set(pairs) - set(axes))
    if unknown:
        raise ValueError(f"--weights: unknown axes {unknown}; this model's axes are {axes}")
    for axis, value in pairs.items():
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"--weights: {axis}={value} must be a finite non-negative number")
    total = sum(pairs.values())
    if total <= 0:
        raise ValueError("--weights: at least one axis needs a positive weight")
    return [pairs.get(a, 0.0) / total for a in axes]


def cat_adapter(peft_model, adapters: list[str], weights: list[float], name: str = EXPORT_NAME) -> str:
    """Add adapter ``name`` to ``peft_model``: the exact rank concatenation of ``adapters`` mixed by ``weights``.

    Raises:
        ValueError: the name is taken, an adapter uses DoRA (not a product B A: no exact concatenation),
            or the adapters target different modules.
    """
    from peft.tuners.lora import LoraLayer

    if name in peft_model.peft_config:
        raise ValueError(f"adapter {name!r} already exists (peft would silently keep the old one)")
    for a in adapters:
        if getattr(peft_model.peft_config[a], "use_dora", False):
            raise ValueError(f"expert {a!r} uses DoRA: its update is not a plain B A, rank concatenation is not exact")
    if len(adapters) == 1:  # peft switches to "linear" (sqrt(weight) on A and B) for one adapter
        adapters, weights = adapters * 2, [weights[0] / 2] * 2
    peft_model.add_weighted_adapter(adapters, list(weights), name, combination_type="cat")
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            s = module.scaling[name]
            if s != 1.0:  # rsLoRA: alpha / sqrt(r); keep B A equal to the mixture whatever peft scales by
                with torch.no_grad():
                    module.lora_A[name].weight /= s
    return name


def export_mixture(model_dir: str | Path, weights: str | dict, out: str | Path) -> dict:
    """Write MoCaE ``model_dir``'s experts mixed by fixed ``weights`` as one peft adapter folder ``out``.

    Returns:
        The export record (also written as ``out/mocae_export.json``): axes, normalised weights,
        rank, source folder.
    """
    from mocae.mixture.model import MoCaEModel
    from mocae.paths import atomic_directory

    model = MoCaEModel.from_pretrained(model_dir)
    w = parse_weights(weights, model.axes)
    model.mixer.remove()  # peft's own LoRA path back, factors untouched
    peft_model = model.peft_model
    cat_adapter(peft_model, model.axes, w)
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="mocae-export-") as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[EXPORT_NAME])
        saved = next(p.parent for p in Path(tmp).rglob("adapter_config.json"))
        config = json.loads((saved / "adapter_config.json").read_text())
        record = {"source": str(Path(model_dir).resolve()), "backbone": model.mocae_config.backbone,
                  "axes": model.axes, "weights": dict(zip(model.axes, w)), "rank": config["r"],
                  "lora_alpha": config["lora_alpha"], "target_modules": sorted(config["target_modules"]),
                  "method": "rank concatenation (peft add_weighted_adapter cat), exact"}
        with atomic_directory(out) as target:
            for f in saved.iterdir():
                shutil.copy2(f, target / f.name)
            (target / EXPORT_RECORD).write_text(json.dumps(record, indent=2))
            # mocae's loaders read the backbone from training.json, as for a trained expert.
            (target / "training.json").write_text(json.dumps({"backbone": model.mocae_config.backbone,
                                                              "exported_from": record["source"]}, indent=2))
    return record
