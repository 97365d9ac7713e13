"""Offline judges for the three axes, trained here and published with held-out validation.

- ``truthful``: ``score(questions, answers, references)`` -> P(true), references per answer
  ``{"correct": [...], "incorrect": [...]}`` (TruthfulQA's reference answers);
- ``informative``: ``score(questions, answers)`` -> P(informative);
- ``harmless``: ``score(prompts, responses)`` -> P(safe: a refusal, or any completion of a safe
  prompt); also ``refusal(prompts, responses)`` -> P(refusal), for over-refusal;
- ``helpful``: ``prefer(instructions, outputs_a, outputs_b)`` -> P(output_b better than output_a).

Every judge has ``.kind`` and ``.validation`` (its held-out report). Judges live in
``$MOCAE_CACHE/judges/<kind>/``; ``mocae judges train --kind <kind>`` makes one.
This module imports no torch: the heavy parts load on first use.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from mocae.evaluation.judges.store import KINDS, Judge, JudgeNotFound, is_saved, judge_dir

_MODULES = {"truthful": ("truthful", "TruthfulJudge"), "informative": ("informative", "InformativeJudge"),
            "harmless": ("harmless", "HarmlessJudge"), "helpful": ("helpful", "HelpfulJudge")}

__all__ = ["KINDS", "Judge", "JudgeNotFound", "add_judges_command", "judge_dir", "load_judge", "train_judge"]


def _module(kind: str):
    if kind not in _MODULES:
        raise ValueError(f"judge kind must be one of {list(KINDS)}, got {kind!r}")
    return importlib.import_module(f"mocae.evaluation.judges.{_MODULES[kind][0]}")


def load_judge(kind: str, folder: Path | str | None = None) -> Judge:
    """The trained judge of ``kind``, from ``folder`` or ``$MOCAE_CACHE/judges/<kind>/``.

    Args:
        kind: "truthful", "informative", "harmless" or "helpful".
        folder: a judge folder written by ``train_judge`` (default: the cache).

    Raises:
        JudgeNotFound: no judge there; the message says how to train it.
    """
    module = _module(kind)
    folder = Path(folder) if folder is not None else judge_dir(kind)
    if not is_saved(folder):
        raise JudgeNotFound(kind, folder)
    return getattr(module, _MODULES[kind][1]).load(folder)


def train_judge(kind: str, data_dir: Path | str | None = None, out_dir: Path | str | None = None,
                **limits) -> Path:
    """Train a judge, validate it on held-out data, save it atomically with its report.

    Sets torch to one thread (the CPU budget these judges were designed for).

    Args:
        kind: "truthful", "informative", "harmless" or "helpful".
        data_dir: data directory (default ``$MOCAE_DATA_DIR``).
        out_dir: where to save (default ``$MOCAE_CACHE/judges/<kind>/``); replaced only on success.
        limits: passed to the judge's ``train`` (e.g. ``encoder=``, ``time_budget=``, ``epochs=``,
            ``n_train_pairs=``, ``max_length=``, ``seed=``, ``log=``).

    Returns:
        the judge folder.
    """
    module = _module(kind)
    from mocae.evaluation.judges.training import single_thread

    single_thread()
    judge = module.train(data_dir, **limits)
    return judge.save(Path(out_dir) if out_dir is not None else judge_dir(kind))


def add_judges_command(subparsers) -> None:
    """Add ``mocae judges train|validate --kind K`` to the main CLI's subparsers."""
    from mocae.evaluation.judges.cli import add_judges_command as add

    add(subparsers)
