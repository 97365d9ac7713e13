"""The ``mocae`` command line.

Each subcommand is a thin wrapper over the Python API: parse arguments, call one function,
print its result. Heavy imports (torch, transformers) happen inside the handlers so that
``mocae --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mocae import AXES, __version__

DESCRIPTION = """\
mocae: align a language model to be helpful, harmless and honest at once with a
Mixture of Calibrated Experts (one LoRA expert per axis, a calibrated router mixing them).

Environment:
  MOCAE_DATA_DIR  local dataset directory (see `mocae data check`); unset = Hugging Face Hub
  MOCAE_CACHE     cache for converted backbones, experts and runs (default ~/.cache/mocae)
"""

EPILOG = """\
examples:
  mocae backbones                                   list backbones and whether they load offline
  mocae data check                                  validate every dataset file, count rows
  mocae generate --prompt "Is the Earth flat?"      answer one prompt with the default backbone
  mocae run --preset quick                          the main job (what `make run` does)
  mocae train-expert --axis honest                  one LoRA expert (reused if already trained)
  mocae fit-router --out runs/m/mocae               router + calibrators over the preset's experts
  mocae calibrate --model runs/m/mocae --calibrator fractal
  mocae chat --model runs/m/mocae                   interactive, with routing bars
  mocae eval --model base --preset quick            HHH report (results.json/.md, plots)
  mocae judges train --kind truthful                train an offline judge (and report its agreement)
"""


def _cmd_backbones(args: argparse.Namespace) -> int:
    from mocae.backbones import list_backbones

    rows = list_backbones()
    width = max(len(r["name"]) for r in rows)
    print(f"{'name':<{width}}  {'params':>6}  {'offline':<7}  {'cached':<6}  description")
    for r in rows:
        print(
            f"{r['name']:<{width}}  {r['params']:>6}  {'yes' if r['available'] else 'no':<7}  "
            f"{'yes' if r['cached'] else 'no':<6}  {r['description']}"
        )
        if not r["available"]:
            print(f"{'':<{width}}  install: {r['install']}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from mocae.data import check_data, format_check_table
    from mocae.paths import data_dir

    root = Path(args.data_dir).resolve() if args.data_dir else data_dir()
    if root is None:
        print("error: no data directory: set MOCAE_DATA_DIR or pass --data-dir", file=sys.stderr)
        return 2
    rows = check_data(root)
    print(f"data directory: {root}")
    print(format_check_table(rows))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from mocae.backbones import load_backbone
    from mocae.generation import generate_streamed

    model, tokenizer = load_backbone(args.backbone)
    generate_streamed(
        model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, system=args.system
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from mocae.pipeline import run_pipeline

    run_pipeline(args.preset, run_dir=args.run_dir, progress=not args.no_progress, overrides=args.set)
    return 0


def _cmd_train_expert(args: argparse.Namespace) -> int:
    from mocae.config import load_yaml, validate_config
    from mocae.experts.config import ExpertConfig
    from mocae.experts.train import expert_dir, is_trained, train_expert
    from mocae.pipeline import load_run_config

    if args.config:
        data = load_yaml(args.config)
        source = args.config
    else:
        data = load_run_config(args.preset).expert_configs()[args.axis].model_dump()
        source = f"preset {args.preset}"
    data["axis"] = args.axis
    if args.backbone:
        data["backbone"] = args.backbone
    cfg = validate_config(ExpertConfig, data, source=source)
    reused = is_trained(expert_dir(cfg))
    path = train_expert(cfg)
    print(f"{'reused' if reused else 'trained'} {args.axis} expert: {path}")
    return 0


def _load_router_config(path: str | None):
    from mocae.config import load_config
    from mocae.mixture.fit import RouterFitConfig

    return load_config(RouterFitConfig, path) if path else RouterFitConfig()


def _cmd_fit_router(args: argparse.Namespace) -> int:
    from mocae.mixture.fit import fit_router, format_calibration_table
    from mocae.mixture.model import MoCaEConfig, MoCaEModel
    from mocae.paths import atomic_write_json
    from mocae.pipeline import load_run_config, train_experts

    experts = dict(e.split("=", 1) for e in args.expert) if args.expert else None
    if experts is None:
        experts = {a: str(p) for a, p in train_experts(load_run_config(args.preset)).items()}
    backbone = args.backbone or load_run_config(args.preset).backbone
    cfg = _load_router_config(args.config)
    model = MoCaEModel.build(MoCaEConfig(backbone=backbone, experts=experts, routing="sequence",
                                         feature_layer=args.feature_layer, router_input=args.router_input,
                                         calibrator="none"))
    out = Path(args.out)
    report = fit_router(model, cfg, cache=out.parent / "features", plot_dir=out.parent)
    model.save_pretrained(out)
    atomic_write_json(out.parent / f"{out.name}_calibration.json", report)
    print(format_calibration_table(report))
    print(f"saved MoCaE model to {out}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from mocae.mixture.fit import fit_router, format_calibration_table
    from mocae.mixture.model import MoCaEModel
    from mocae.paths import atomic_write_json

    cfg = _load_router_config(args.config)
    if args.calibrator:
        extra = [] if args.calibrator == "auto" else [args.calibrator]
        cfg = cfg.model_copy(update={"default_calibrator": args.calibrator,
                                     "calibrators": list(dict.fromkeys([*cfg.calibrators, *extra]))})
    path = Path(args.model)
    model = MoCaEModel.from_pretrained(path)
    report = fit_router(model, cfg, cache=path.parent / "features", plot_dir=path.parent, train=False)
    model.save_pretrained(path)
    atomic_write_json(path.parent / f"{path.name}_calibration.json", report)
    print(format_calibration_table(report))
    print(f"reliability diagram: {report['reliability_diagram']}; {path} now uses {report['default_calibrator']!r}")
    return 0


def _routing_bars(routing: dict | None, width: int = 30) -> str:
    if routing is None:
        return "  (token routing: weights vary per token)"
    return "\n".join(f"  {axis:<9} {'#' * round(p * width):<{width}} {p:5.1%}" for axis, p in routing.items())


def _cmd_chat(args: argparse.Namespace) -> int:
    from mocae.mixture.model import MoCaEModel

    model = MoCaEModel.from_pretrained(args.model)
    print(f"MoCaE chat ({', '.join(model.axes)}); empty line or Ctrl-D to quit")
    while True:
        try:
            prompt = input("you> ").strip()
        except EOFError:
            break
        if not prompt:
            break
        answer = model.chat(prompt, max_new_tokens=args.max_new_tokens)[0]
        print(f"mocae> {answer['text']}\n{_routing_bars(answer['routing'])}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand (kept separate so tests can inspect it)."""
    parser = argparse.ArgumentParser(
        prog="mocae", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mocae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("backbones", help="list registered backbones, their size and availability")
    p.set_defaults(func=_cmd_backbones)

    p = sub.add_parser("data", help="dataset utilities")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = data_sub.add_parser(
        "check", help="validate every dataset file found and print row counts per axis and split"
    )
    p.add_argument("--data-dir", help="dataset directory (default: $MOCAE_DATA_DIR)")
    p.set_defaults(func=_cmd_data_check)

    p = sub.add_parser("generate", help="answer one prompt, streamed, in the backbone's chat format")
    p.add_argument("--backbone", default="smollm2-135m",
                   help="registry name (see `mocae backbones`), HF id or local path")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation budget (default 256)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "train-expert", help="train (or reuse) one per-axis LoRA expert; resumes if interrupted",
        description="Train one LoRA expert with trl's SFTTrainer. Settings come from a preset's "
                    "experts section or an ExpertConfig YAML file (see mocae/experts/config.py).",
    )
    p.add_argument("--axis", required=True, choices=AXES, help="which expert")
    p.add_argument("--backbone", default=None, help="override the backbone")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--preset", default="quick", help="preset whose experts section to use (default quick)")
    group.add_argument("--config", default=None, help="ExpertConfig YAML file")
    p.set_defaults(func=_cmd_train_expert)

    p = sub.add_parser(
        "fit-router", help="build MoCaE from experts: train the router, fit calibrators, save",
        description="Train the sequence router on held-out axis-labelled prompts (gating cross-entropy), "
                    "fit every calibrator on a split the router never saw, report accuracy/ECE/Brier/NLL "
                    "in distribution and under shift, and save the model.",
    )
    p.add_argument("--expert", action="append", metavar="AXIS=DIR",
                   help="an expert adapter folder (repeat per axis); default: the preset's experts")
    p.add_argument("--preset", default="quick", help="preset whose experts/backbone to use (default quick)")
    p.add_argument("--backbone", default=None, help="backbone the experts were trained on")
    p.add_argument("--config", default=None, help="RouterFitConfig YAML (see mocae/mixture/fit.py)")
    p.add_argument("--feature-layer", type=int, default=None, help="pooled layer (default: middle)")
    p.add_argument("--router-input", choices=["hidden", "embedding"], default="embedding",
                   help="router features: the base model's hidden state or a MiniLM sentence embedding")
    p.add_argument("--out", required=True, help="output folder for the MoCaE model")
    p.set_defaults(func=_cmd_fit_router)

    p = sub.add_parser("calibrate", help="refit the calibrators of a saved MoCaE model and report before/after")
    p.add_argument("--model", required=True, help="a folder written by fit-router / mocae run")
    p.add_argument("--calibrator", default=None,
                   help="calibrator to install: none, temperature, importance, fractal, a+b, or auto "
                        "(lowest cross-validated NLL on the calibration split)")
    p.add_argument("--config", default=None, help="RouterFitConfig YAML")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("chat", help="chat with a MoCaE model; shows the routing bars per answer")
    p.add_argument("--model", required=True, help="a saved MoCaE folder")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser(
        "run", help="the main job: experts, MoCaE, baselines, evaluation and report, resumably",
        description="Train (or reuse) the experts, fit and calibrate the MoCaE router, build the baselines the "
                    "preset lists, evaluate every system and write the report (RUN_DIR/summary.md, "
                    "RUN_DIR/eval/results.{json,md}, plots). Interrupt it anywhere and run the same command "
                    "again: finished stages and systems are reused.")
    p.add_argument("--preset", default="quick",
                   help="preset in configs/ (quick, full, trinityx, alignx, h3fusion, mote) or a YAML file path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field, e.g. --set eval.n_helpful=64 --set 'systems=[base, mocae]' "
                        "(repeatable; changes the run's hash)")
    p.add_argument("--run-dir", default=None,
                   help="where to write the run (default: runs/<preset>-<config hash>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_run)

    from mocae.evaluation.cli import add_eval_command  # cheap: argparse/json/pathlib only

    add_eval_command(sub)
    from mocae.evaluation.judges import add_judges_command

    add_judges_command(sub)
    from mocae.serve.cli import add_serve_commands  # serve, export: argparse only

    add_serve_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mocae`` console script."""
    # Two cores here: torch's default of all cores plus interop threads oversubscribes.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from mocae.backbones import BackboneUnavailable

    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, BackboneUnavailable) as err:
        # Errors we raise name the file/row/field or the package to install: show them plainly
        # (MOCAE_DEBUG=1 shows the traceback instead).
        if os.environ.get("MOCAE_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
