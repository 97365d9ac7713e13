"""``expert_<axis>`` and ``multitask``: one peft LoRA adapter on the backbone.

A single expert is the adapter ``mocae train-expert`` wrote for one axis; the multi-task expert
is one LoRA trained on the union of the experts' training sets. Both load the same way: the
folder is checked against its backbone first (``mocae.experts.checks``), then peft loads it.
"""

from __future__ import annotations

from pathlib import Path

from mocae import AXES
from mocae.experts.checks import ADAPTER_CONFIG, check_adapter, recorded_backbone
from mocae.spec import BuildContext, SystemSpec


def adapter_backbone(path: str | Path, backbone: str | None = None) -> str:
    """The backbone to load an adapter folder into: ``backbone``, else the one its
    ``training.json`` records, else the default backbone."""
    from mocae.backbones import DEFAULT_BACKBONE

    return backbone or recorded_backbone(path, adapter_config=False) or DEFAULT_BACKBONE


def load_adapter(path: str | Path, backbone: str | None = None, model_and_tokenizer=None):
    """(PeftModel in eval mode, tokenizer) of the adapter in ``path`` on its backbone.

    Raises:
        FileNotFoundError / LoadError: the folder is not an adapter, is damaged or does not fit
            the backbone (checked before peft loads it, tensor shapes included).
    """
    from peft import PeftModel

    from mocae.backbones import load_backbone

    name = adapter_backbone(path, backbone)
    check_adapter(path, name)  # the small files, before the backbone loads
    model, tokenizer = model_and_tokenizer or load_backbone(name)
    check_adapter(path, name, model=model)  # a named error before peft's page of size mismatches
    return PeftModel.from_pretrained(model, str(path)).eval(), tokenizer


def inspect_adapter(path: str | Path, backbone: str | None = None) -> str:
    """Check an adapter folder's files without loading anything; returns its backbone."""
    name = adapter_backbone(path, backbone)
    check_adapter(path, name)
    return name


def _save(model, tokenizer, path) -> Path:
    model.save_pretrained(path)
    return Path(path)


def _adapter_path(ctx: BuildContext) -> str:
    """The adapter folder of system ``ctx.name`` (``expert_<axis>`` or ``multitask``) in its run."""
    if ctx.name == "multitask":
        if ctx.multitask is None:
            raise ValueError("this run trained no multitask expert (add 'multitask' to systems)")
        return ctx.multitask
    axis = ctx.name.removeprefix("expert_")
    if axis not in ctx.experts:
        raise ValueError(f"unknown system {ctx.name!r}: this run has no {axis!r} expert")
    return ctx.experts[axis]


def _build(ctx: BuildContext):
    return load_adapter(_adapter_path(ctx), ctx.backbone)


def _fingerprint(ctx: BuildContext) -> dict:
    from mocae.stages import expert_fingerprint

    return {"adapter": expert_fingerprint(_adapter_path(ctx))}


_ADAPTER = dict(build=_build, fingerprint=_fingerprint, save_pretrained=_save, from_pretrained=load_adapter,
                inspect=inspect_adapter)
EXPERT = SystemSpec(name="expert", names=tuple(f"expert_{a}" for a in AXES), files=(ADAPTER_CONFIG,),
                    description="one per-axis LoRA expert", **_ADAPTER)
MULTITASK = SystemSpec(name="multitask", description="one LoRA on the union of the experts' training sets",
                       **_ADAPTER)
