"""``mocae eval``: evaluate the base model and optionally a trained system, write the report.

Hooked into the main parser by ``add_eval_command(sub)`` in ``mocae.cli.build_parser``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PRESETS = ("quick", "full")


def _adapter_backbone(path: Path) -> str | None:
    """The backbone an adapter was trained on (mocae's training.json), if recorded."""
    from mocae.errors import read_json

    record = path / "training.json"
    return read_json(record).get("backbone") if record.is_file() else None


def system_loaders(model: str, backbone: str | None = None) -> dict:
    """{name: loader} for ``mocae eval --model``: always the base model, plus DIR when given.

    Args:
        model: "base", a saved MoCaE folder (mocae_config.json) or a peft adapter folder.
        backbone: backbone override; default: the one recorded with DIR, else smollm2-135m.

    Raises:
        FileNotFoundError: DIR is neither a MoCaE nor a peft adapter folder.
        LoadError: a file in DIR is damaged or belongs to another backbone (checked here, before
            any model loads).
        UnknownBackbone: the backbone name is not known (see ``check_backbone_name``).
    """
    from mocae.backbones import DEFAULT_BACKBONE, check_backbone_name, load_backbone
    if backbone is not None:
        check_backbone_name(backbone)
    if model == "base":
        name = backbone or DEFAULT_BACKBONE
        return {"base": lambda: load_backbone(name)}
    path = Path(model)
    if (path / "mocae_config.json").is_file():
        from mocae.mixture.model import check_saved

        recorded = check_saved(path)[0].backbone  # every file checked now, not after the base is evaluated

        def load_mocae():
            from mocae.mixture.model import MoCaEModel

            mocae = MoCaEModel.from_pretrained(path)
            return mocae, mocae.tokenizer
        loader = load_mocae
    elif (path / "adapter_config.json").is_file():
        from mocae.experts.checks import check_adapter

        recorded = _adapter_backbone(path)
        check_adapter(path, backbone or recorded or DEFAULT_BACKBONE)  # now, not after the base is evaluated

        def load_adapter():
            from peft import PeftModel

            name = backbone or recorded or DEFAULT_BACKBONE
            base, tokenizer = load_backbone(name)
            check_adapter(path, name, model=base)  # tensor shapes, before peft loads them
            return PeftModel.from_pretrained(base, str(path)).eval(), tokenizer
        loader = load_adapter
    else:
        raise FileNotFoundError(f"--model {model}: not 'base' and not a model folder (no mocae_config.json or "
                                f"adapter_config.json in {path.resolve()})")
    base_name = check_backbone_name(backbone or recorded or DEFAULT_BACKBONE)
    name = path.resolve().name if path.resolve().name != "base" else "system"
    return {"base": lambda: load_backbone(base_name), name: loader}


def load_eval_config(preset: str):
    """EvalConfig from a preset name (quick, full -> configs/eval_<name>.yaml) or a YAML path."""
    from mocae.config import load_config, resolve_preset
    from mocae.evaluation.harness import EvalConfig

    path = resolve_preset(f"eval_{preset}" if preset in PRESETS else preset)
    return load_config(EvalConfig, path)


def _cmd_eval(args: argparse.Namespace) -> int:
    from mocae.evaluation.harness import evaluate
    from mocae.evaluation.report import format_results_table

    cfg = load_eval_config(args.preset)
    systems = system_loaders(args.model, args.backbone)
    preset = Path(args.preset).stem if args.preset not in PRESETS else args.preset
    out = Path(args.out) if args.out else Path("runs") / f"eval-{preset}"
    results = evaluate(systems, cfg, out, force=args.force, progress=not args.no_progress)
    print(format_results_table(results))
    print(f"report: {out / 'results.md'} (json: {out / 'results.json'}; plots in {out})")
    return 0


def add_eval_command(subparsers) -> argparse.ArgumentParser:
    """Add ``mocae eval`` to the main CLI's subparsers; returns its parser."""
    p = subparsers.add_parser(
        "eval", help="evaluate base (and a trained system) on every HHH metric; writes results.json/.md, plots",
        description="Win rate vs AlpacaEval's reference and vs the base model (raw and length-controlled), "
                    "safety on HarmBench/StrongREJECT, over-refusal on XSTest, TruthfulQA MC1/MC2 and judged "
                    "TI, router calibration and efficiency. Needs the trained judges (`mocae judges train`). "
                    "Finished systems are cached in OUT/systems and generations in $MOCAE_CACHE/generations.",
    )
    p.add_argument("--model", required=True, metavar="{base|DIR}",
                   help="'base', a saved MoCaE folder or a peft adapter folder (the base model is always "
                        "evaluated too, first)")
    p.add_argument("--backbone", default=None, help="backbone (default: recorded with DIR, else smollm2-135m)")
    p.add_argument("--preset", default="quick", help="quick, full or an EvalConfig YAML (default quick)")
    p.add_argument("--out", default=None, help="output folder (default runs/eval-<preset>)")
    p.add_argument("--force", action="store_true", help="re-evaluate systems already in OUT/systems")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval)
    return p
