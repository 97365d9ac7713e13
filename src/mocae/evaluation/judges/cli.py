"""``mocae judges train|validate``: make a judge, or print the held-out report of a saved one."""

from __future__ import annotations

import argparse
import json
import sys

from mocae.evaluation.judges.store import KINDS


def _limits(args) -> dict:
    keys = ("time_budget", "epochs", "max_length", "encoder", "seed")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _cmd_train(args: argparse.Namespace) -> int:
    from mocae.evaluation.judges import load_judge, train_judge

    kinds = KINDS if args.kind == "all" else (args.kind,)
    for kind in kinds:
        folder = train_judge(kind, data_dir=args.data_dir, out_dir=args.out if len(kinds) == 1 else None,
                             **_limits(args))
        print(f"{kind} judge saved to {folder}")
        print(json.dumps(load_judge(kind, folder).validation, indent=2))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from mocae.evaluation.judges import judge_dir, load_judge

    folder = args.dir or judge_dir(args.kind)
    # The report is a JSON file beside the weights; load the judge anyway to prove it loads.
    judge = load_judge(args.kind, folder)
    print(f"{args.kind} judge in {folder}")
    print(json.dumps(judge.validation, indent=2))
    return 0


def add_judges_command(subparsers) -> None:
    """Register ``judges train`` and ``judges validate`` on the main parser's subparsers.

    Args:
        subparsers: the object ``ArgumentParser.add_subparsers()`` returned; handlers are set as
            ``func`` (the main CLI calls ``args.func(args)``).
    """
    p = subparsers.add_parser("judges", help="train or inspect the offline judges (truthful, informative, "
                                             "harmless, helpful)")
    sub = p.add_subparsers(dest="judges_command", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a judge on local data, validate it on held-out data, save it "
                                     "to $MOCAE_CACHE/judges/<kind>/")
    t.add_argument("--kind", required=True, choices=[*KINDS, "all"])
    t.add_argument("--data-dir", default=None, help="data directory (default $MOCAE_DATA_DIR)")
    t.add_argument("--out", default=None, help="judge folder (default $MOCAE_CACHE/judges/<kind>)")
    t.add_argument("--time-budget", type=float, default=None, help="seconds of fine-tuning before stopping")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--max-length", type=int, default=None, help="tokens per input")
    t.add_argument("--encoder", default=None, help="BERT folder to start from (default all-MiniLM-L6-v2)")
    t.add_argument("--seed", type=int, default=None)
    t.set_defaults(func=_cmd_train)
    v = sub.add_parser("validate", help="print a saved judge's held-out validation report")
    v.add_argument("--kind", required=True, choices=list(KINDS))
    v.add_argument("--dir", default=None, help="judge folder (default $MOCAE_CACHE/judges/<kind>)")
    v.set_defaults(func=_cmd_validate)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m mocae.evaluation.judges.cli``) until the main CLI registers it."""
    parser = argparse.ArgumentParser(prog="mocae")
    add_judges_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:  # as the main CLI does: the message says what to do
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
