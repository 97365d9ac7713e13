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
  MOCAE_DEBUG=1   show the Python traceback of an error (same as --debug)
  MOCAE_DEVICE    auto (CUDA when available, else CPU), cpu, cuda or cuda:N (same as --device)
  MOCAE_DTYPE     auto (bf16 autocast for training and on CUDA), bf16 or fp32 (same as --dtype)
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


# Kept equal to mocae.generation.MAX_NEW_TOKENS (a test checks) without importing torch for --help.
MAX_NEW_TOKENS = 32768
TRUNCATE_HELP = ("a prompt longer than the context window minus --max-new-tokens is cut from the front "
                 "(its end is kept) with a warning; default: refused with an error")


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
    from mocae.data.contamination import check_contamination, format_contamination_table, overlap_message
    from mocae.data.registry import format_split_summary, split_summary
    from mocae.paths import atomic_write_json, cache_dir, data_dir

    root = Path(args.data_dir).resolve() if args.data_dir else data_dir()
    if root is None or not root.is_dir():
        where = f"{root} is not a directory" if root is not None else "no data directory"
        print(f"error: {where}: set MOCAE_DATA_DIR or pass --data-dir", file=sys.stderr)
        return 2
    rows = check_data(root)
    print(f"data directory: {root}")
    print(format_check_table(rows))
    print()
    print(format_split_summary(split_summary(root)))
    print()
    report = check_contamination(root, exact_only=args.exact_only)
    kind = "exact matches only (--exact-only)" if args.exact_only else f"exact + near (cosine >= {report['threshold']})"
    print(f"contamination, {kind}:")
    print(format_contamination_table(report))
    out = Path(args.report) if args.report else cache_dir() / "contamination.json"
    atomic_write_json(out, report)
    print(f"report: {out}")
    message = overlap_message(report)
    if message:
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(f"{len(report['pairs'])} (training source, eval set, field) pairs checked: 0 overlaps")
    return 0


def _check_prompt_args(args: argparse.Namespace) -> None:
    """What can be checked before a model loads: the budget, the prompt, the backbone name."""
    from mocae.generation import check_max_new_tokens, check_prompts

    check_max_new_tokens(args.max_new_tokens, "--max-new-tokens")
    if getattr(args, "prompt", None) is not None:
        try:
            check_prompts([args.prompt])
        except ValueError:
            raise ValueError("--prompt is empty") from None
    if getattr(args, "backbone", None):
        from mocae.backbones import check_backbone_name

        check_backbone_name(args.backbone)


def _cmd_generate(args: argparse.Namespace) -> int:
    from mocae.generation import generate_streamed
    from mocae.systems import load_system

    _check_prompt_args(args)
    model, tokenizer = load_system("base", backbone=args.backbone)
    generate_streamed(
        model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, system=args.system,
        truncate_prompt=args.truncate_prompt,
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from mocae.backbones import check_backbone_name
    from mocae.pipeline import load_run_config, run_pipeline

    # The whole config and its backbone name are checked before anything is written or loaded.
    check_backbone_name(load_run_config(args.preset, args.set).backbone)
    run_pipeline(args.preset, run_dir=args.run_dir, progress=not args.no_progress, overrides=args.set, force=args.force)
    return 0


def _cmd_train_expert(args: argparse.Namespace) -> int:
    from mocae.backbones import check_backbone_name
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
    check_backbone_name(cfg.backbone)
    reused = is_trained(expert_dir(cfg))
    path = train_expert(cfg)
    print(f"{'reused' if reused else 'trained'} {args.axis} expert: {path}")
    return 0


def _load_router_config(path: str | None):
    from mocae.config import load_config
    from mocae.mixture.fit import RouterFitConfig

    return load_config(RouterFitConfig, path) if path else RouterFitConfig()


def _expert_args(items: list[str] | None, named: bool = False) -> dict[str, str] | None:
    """``--expert AXIS=DIR`` options as {axis: folder} in router order (AXES), or None.

    Args:
        named: the router learns from the user's own labelled prompts (``--prompts``), so the
            experts may have any names, in the order given.

    Raises:
        ValueError: a malformed item, an unknown or repeated axis, or a missing axis (the router
            learns from labelled prompts of every axis, in AXES order).
    """
    if not items:
        return None
    experts: dict[str, str] = {}
    for item in items:
        axis, sep, folder = item.partition("=")
        if not sep or not folder:
            raise ValueError(f"--expert {item!r}: expected AXIS=DIR, e.g. --expert honest=runs/m/experts/honest")
        if axis not in AXES and not named:
            raise ValueError(f"--expert {item!r}: unknown axis {axis!r}; the axes are {', '.join(AXES)} "
                             "(experts of other names need --prompts)")
        if axis in experts:
            raise ValueError(f"--expert: axis {axis!r} given twice")
        experts[axis] = folder
    if named:
        return experts
    missing = [a for a in AXES if a not in experts]
    if missing:
        raise ValueError(f"--expert: no expert for axis {', '.join(missing)}; the router is trained on prompts of "
                         f"every axis, so pass one --expert per axis ({', '.join(AXES)})")
    return {a: experts[a] for a in AXES}


def _routing_prompts(path: str | None) -> dict | None:
    """``--prompts FILE``: labelled routing prompts, ``{expert: [prompt, ...]}`` or
    ``{split: {expert: [prompt, ...]}}`` (``mocae.mixture.routing_data.labelled_splits``)."""
    from mocae.errors import read_json

    return None if path is None else read_json(Path(path))


def _cmd_fit_router(args: argparse.Namespace) -> int:
    from mocae.backbones import check_backbone_name
    from mocae.mixture.fit import fit_router, format_calibration_table
    from mocae.mixture.model import MoCaEConfig, MoCaEModel
    from mocae.paths import atomic_write_json
    from mocae.pipeline import load_run_config, train_experts

    prompts = _routing_prompts(args.prompts)
    experts = _expert_args(args.expert, named=prompts is not None)  # before anything is computed
    backbone = check_backbone_name(args.backbone or load_run_config(args.preset).backbone)
    cfg = _load_router_config(args.config)
    if experts is None:
        experts = {a: str(p) for a, p in train_experts(load_run_config(args.preset)).items()}
    model = MoCaEModel.build(MoCaEConfig(backbone=backbone, experts=experts, routing="sequence",
                                         feature_layer=args.feature_layer, router_input=args.router_input,
                                         calibrator="none"))
    out = Path(args.out)
    report = fit_router(model, cfg, cache=out.parent / "features", plot_dir=out.parent, prompts=prompts)
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
    prompts = _routing_prompts(args.prompts)
    model = MoCaEModel.from_pretrained(path)
    report = fit_router(model, cfg, cache=path.parent / "features", plot_dir=path.parent, train=False,
                        prompts=prompts)
    model.save_pretrained(path)
    atomic_write_json(path.parent / f"{path.name}_calibration.json", report)
    print(format_calibration_table(report))
    diagram = report.get("reliability_diagram")  # drawn on a test split, which own prompts may not have
    print((f"reliability diagram: {diagram}; " if diagram else "") + f"{path} now uses {report['default_calibrator']!r}")
    return 0


def _routing_bars(routing: dict | None, width: int = 30) -> str:
    if routing is None:
        return "  (token routing: weights vary per token)"
    return "\n".join(f"  {axis:<9} {'#' * round(p * width):<{width}} {p:5.1%}" for axis, p in routing.items())


def _cmd_chat(args: argparse.Namespace) -> int:
    from mocae.device import place
    from mocae.mixture.model import MoCaEModel

    _check_prompt_args(args)
    model = place(MoCaEModel.from_pretrained(args.model))
    print(f"MoCaE chat ({', '.join(model.axes)}); empty line or Ctrl-D to quit")
    while True:
        try:
            prompt = input("you> ").strip()
        except EOFError:
            break
        if not prompt:
            break
        try:
            answer = model.chat(prompt, max_new_tokens=args.max_new_tokens, truncate_prompt=args.truncate_prompt)[0]
        except ValueError as err:  # e.g. a prompt too long for the context: say so, keep the session
            print(f"mocae: error: {err}", file=sys.stderr, flush=True)
            continue
        print(f"mocae> {answer['text']}\n{_routing_bars(answer['routing'])}", flush=True)
    return 0


def eval_loaders(model: str, backbone: str | None = None) -> dict:
    """{name: loader} for ``mocae eval --model``: always the base model, plus DIR when given.

    Args:
        model: "base" or any saved system folder (``mocae.systems.load_system``).
        backbone: backbone override; default: the one recorded with DIR, else smollm2-135m.

    Raises:
        FileNotFoundError: DIR is not a saved system folder.
        LoadError: a file in DIR is damaged or belongs to another backbone (checked here, before
            any model loads).
        UnknownBackbone: the backbone name is not known (see ``check_backbone_name``).
    """
    from mocae.backbones import DEFAULT_BACKBONE, check_backbone_name
    from mocae.systems import AutoSystem, load_system

    if backbone is not None:
        check_backbone_name(backbone)
    if model == "base":
        name = backbone or DEFAULT_BACKBONE
        return {"base": lambda: load_system("base", backbone=name)}
    path = Path(model)
    _, recorded = AutoSystem.inspect(path, backbone)  # every file checked now, not after the base is evaluated
    base_name = check_backbone_name(backbone or recorded or DEFAULT_BACKBONE)
    name = path.resolve().name if path.resolve().name != "base" else "system"
    return {"base": lambda: load_system("base", backbone=base_name),
            name: lambda: load_system(path, backbone=backbone)}


def _cmd_eval(args: argparse.Namespace) -> int:
    from mocae.evaluation.harness import evaluate
    from mocae.evaluation.report import format_results_table
    from mocae.pipeline import EVAL_PRESETS, load_eval_config

    cfg = load_eval_config(args.preset)
    systems = eval_loaders(args.model, args.backbone)
    preset = Path(args.preset).stem if args.preset not in EVAL_PRESETS else args.preset
    out = Path(args.out) if args.out else Path("runs") / f"eval-{preset}"
    results = evaluate(systems, cfg, out, force=args.force, progress=not args.no_progress)
    print(format_results_table(results))
    print(f"report: {out / 'results.md'} (json: {out / 'results.json'}; plots in {out})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand (kept separate so tests can inspect it)."""
    parser = argparse.ArgumentParser(
        prog="mocae", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mocae {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error instead of one line (or MOCAE_DEBUG=1)")
    parser.add_argument("--device", default=None, help="where to train and generate: auto (default), cpu, cuda, "
                        "cuda:N (or MOCAE_DEVICE); not part of any stage key")
    parser.add_argument("--dtype", default=None, choices=["auto", "bf16", "fp32"],
                        help="autocast: auto (default: bf16 for training and on CUDA, fp32 generation on CPU), "
                             "bf16 or fp32 (or MOCAE_DTYPE)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("backbones", help="list registered backbones, their size and availability")
    p.set_defaults(func=_cmd_backbones)

    p = sub.add_parser("data", help="dataset utilities")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = data_sub.add_parser(
        "check", help="validate every dataset file found, print row counts per axis and split and the splits' "
                      "balance, and check that no training source overlaps an evaluated set (exit 1 if one does)"
    )
    p.add_argument("--data-dir", help="dataset directory (default: $MOCAE_DATA_DIR)")
    p.add_argument("--report", help="where to write the contamination report (default: $MOCAE_CACHE/contamination.json)")
    p.add_argument("--exact-only", action="store_true",
                   help="skip the MiniLM near-duplicate check (exact matches after normalisation only; fast)")
    p.set_defaults(func=_cmd_data_check)

    p = sub.add_parser("generate", help="answer one prompt, streamed, in the backbone's chat format")
    p.add_argument("--backbone", default="smollm2-135m",
                   help="registry name (see `mocae backbones`), HF id or local path")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--max-new-tokens", type=int, default=256, help=f"generation budget (default 256, at most "
                   f"{MAX_NEW_TOKENS} and what the context window leaves after the prompt)")
    p.add_argument("--truncate-prompt", action="store_true", help=TRUNCATE_HELP)
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
                   help="an expert adapter folder (repeat per axis; with --prompts, NAME=DIR for experts of "
                        "any names); default: the preset's experts")
    p.add_argument("--preset", default="quick", help="preset whose experts/backbone to use (default quick)")
    p.add_argument("--backbone", default=None, help="backbone the experts were trained on")
    p.add_argument("--config", default=None, help="RouterFitConfig YAML (see mocae/mixture/fit.py)")
    p.add_argument("--feature-layer", type=int, default=None, help="pooled layer (default: middle)")
    p.add_argument("--router-input", choices=["hidden", "embedding"], default="embedding",
                   help="router features: the base model's hidden state or a MiniLM sentence embedding")
    p.add_argument("--out", required=True, help="output folder for the MoCaE model")
    p.add_argument("--prompts", default=None, metavar="FILE.json",
                   help="your own labelled routing prompts, {expert: [prompt, ...]} (or {split: {expert: [...]}} "
                        "with train, calib, optionally test and shifted); experts may then have any names")
    p.set_defaults(func=_cmd_fit_router)

    p = sub.add_parser("calibrate", help="refit the calibrators of a saved MoCaE model and report before/after")
    p.add_argument("--model", required=True, help="a folder written by fit-router / mocae run")
    p.add_argument("--calibrator", default=None,
                   help="calibrator to install: none, temperature, importance, fractal, a+b, or auto "
                        "(lowest cross-validated NLL on the calibration split)")
    p.add_argument("--config", default=None, help="RouterFitConfig YAML")
    p.add_argument("--prompts", default=None, metavar="FILE.json",
                   help="your own labelled routing prompts, {expert: [prompt, ...]} (or {split: {expert: [...]}} "
                        "with train, calib, optionally test and shifted); experts may then have any names")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("chat", help="chat with a MoCaE model; shows the routing bars per answer")
    p.add_argument("--model", required=True, help="a saved MoCaE folder")
    p.add_argument("--max-new-tokens", type=int, default=200, help=f"budget per answer (default 200, at most "
                   f"{MAX_NEW_TOKENS})")
    p.add_argument("--truncate-prompt", action="store_true", help=TRUNCATE_HELP)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser(
        "run", help="the main job: experts, MoCaE, baselines, evaluation and report, resumably",
        description="Train (or reuse) the experts, fit and calibrate the MoCaE router, build the baselines the "
                    "preset lists, evaluate every system and write the report (RUN_DIR/summary.md, "
                    "RUN_DIR/eval/results.{json,md}, plots). Interrupt it anywhere and run the same command "
                    "again: finished stages and systems are reused.")
    p.add_argument("--preset", default="quick",
                   help="a packaged preset (quick, full, dpo, trinityx, alignx, h3fusion, mote) or a YAML file path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field, e.g. --set eval.n_helpful=64 --set 'systems=[base, mocae]' "
                        "(repeatable; changes the run's hash)")
    p.add_argument("--run-dir", default=None,
                   help="where to write the run (default: runs/<preset>-<config hash>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--force", action="store_true", help="reuse a --run-dir made with another backbone (recomputes it)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "eval", help="evaluate base (and a trained system) on every HHH metric; writes results.json/.md, plots",
        description="Win rate vs AlpacaEval's reference and vs the base model (raw and length-controlled), "
                    "safety on HarmBench/StrongREJECT, over-refusal on XSTest, TruthfulQA MC1/MC2 and judged "
                    "TI, router calibration and efficiency. Needs the trained judges (`mocae judges train`). "
                    "Finished systems are cached in OUT/systems and generations in $MOCAE_CACHE/generations.",
    )
    p.add_argument("--model", required=True, metavar="{base|DIR}",
                   help="'base' or any saved system folder (MoCaE, H3Fusion, X-LoRA, MoTE, a merge, a peft "
                        "adapter); the base model is always evaluated too, first")
    p.add_argument("--backbone", default=None, help="backbone (default: recorded with DIR, else smollm2-135m)")
    p.add_argument("--preset", default="quick", help="quick, full or an EvalConfig YAML (default quick)")
    p.add_argument("--out", default=None, help="output folder (default runs/eval-<preset>)")
    p.add_argument("--force", action="store_true", help="re-evaluate systems already in OUT/systems")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval)

    from mocae.evaluation.judges import add_judges_command

    add_judges_command(sub)
    from mocae.serve.cli import add_serve_commands  # serve, export: argparse only

    add_serve_commands(sub)
    return parser


def _set_device(args: argparse.Namespace) -> None:
    """--device / --dtype, checked now and set through the environment: child processes (efficiency,
    data-parallel ranks) see the same setting."""
    if args.device is not None:
        from mocae.device import resolve

        resolve(args.device)  # an unknown name or a missing GPU fails before anything runs
        os.environ["MOCAE_DEVICE"] = args.device
    if args.dtype is not None:
        os.environ["MOCAE_DTYPE"] = args.dtype


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mocae`` console script.

    A user's mistake (bad config, data, file, name or input) prints one line
    ``mocae: error: ...`` to stderr and returns 2; ``--debug`` or ``MOCAE_DEBUG=1`` re-raises it
    with its traceback. Anything else (a bug) is not caught.
    """
    # Two cores here: torch's default of all cores plus interop threads oversubscribes.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        _set_device(args)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as err:
        if not _is_user_error(err) or args.debug or os.environ.get("MOCAE_DEBUG", "") not in ("", "0"):
            raise
        message = " ".join(str(err).split("\n")).strip() or type(err).__name__
        print(f"mocae: error: {message}", file=sys.stderr)
        return 2


def _is_user_error(err: Exception) -> bool:
    """Errors whose message names the file, field, name or package at fault.

    ConfigError, DataError, LoadError, UnknownBackbone and pydantic's ValidationError are
    ValueErrors; JudgeNotFound is a FileNotFoundError (an OSError).
    """
    from safetensors import SafetensorError  # a damaged file read where no reader named it yet

    from mocae.backbones import BackboneUnavailable

    return isinstance(err, (ValueError, OSError, BackboneUnavailable, SafetensorError))


if __name__ == "__main__":
    sys.exit(main())
