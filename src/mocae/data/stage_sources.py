"""What every stage trains on and what is evaluated: the inputs of the contamination check.

``TRAINING_SOURCES`` lists each training source with the stages that read it, built from the same
loaders and split rules the stages use; ``EVAL_SETS`` lists every evaluated set. Each builder
returns a ``TextSet`` of (text, where) rows for prompts and answers. Builders of new training data
(e.g. the DPO preference pairs) add theirs with ``register_training_source``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mocae.data import judge_files as J
from mocae.data import loaders as L
from mocae.data.heldout import drop_evaluated, evaluated, without_evaluated_answers
from mocae.data.records import DataError, normalise_text

Rows = list[tuple[str, str]]  # (text, where: "<file> row N")


@dataclass
class TextSet:
    """The prompts and answers one training source (or eval set) contributes.

    Args:
        name: e.g. "alpaca" or "truthfulqa_eval".
        stages: who trains on it (training sources) or what measures on it (eval sets).
        prompts, answers: (text, where) rows.
        note: how the rows were chosen, for the report.
    """

    name: str
    stages: tuple[str, ...]
    prompts: Rows = field(default_factory=list)
    answers: Rows = field(default_factory=list)
    note: str = ""


@dataclass(frozen=True)
class SourceSpec:
    """How to build one text set: ``build(root) -> TextSet`` and the files it reads (for the fingerprint)."""

    name: str
    stages: tuple[str, ...]
    files: tuple[str, ...]
    build: Callable[[Path], TextSet]
    fingerprint: str = ""


def _rows(examples, file: str, text=lambda ex: ex.prompt) -> Rows:
    def where(ex, i):
        return f"{file} line {ex.meta['line']}" if "line" in ex.meta else f"{file} row {ex.meta.get('row', i + 1)}"

    return [(text(ex), where(ex, i)) for i, ex in enumerate(examples) if text(ex)]


def _answers(examples, file: str, keys=("best", "correct", "incorrect")) -> Rows:
    out = []
    for ex in examples:
        for key in keys:
            values = ex.references[key]
            for a in [values] if isinstance(values, str) else values:
                out.append((a, f"{file} row {ex.meta['row']} ({key})"))
    return out


def _kept_prompts(rows: Rows, root: Path) -> Rows:
    """The prompt rows a stage keeps: those that are not evaluated (``mocae.data.heldout``)."""
    held = evaluated(root)
    return [r for r in rows if held.prompt_set(r[0]) is None]


# Training sources ---------------------------------------------------------------------------
# The stage names say where each source is read; see each stage's module for the selection.


def _alpaca(root: Path) -> TextSet:
    ex = drop_evaluated(L.load_alpaca(root), root)
    return TextSet("alpaca", (), _rows(ex, L.ALPACA), _rows(ex, L.ALPACA, lambda e: e.completion),
                   "every row the stages may read (experts take seeded subsets), after drop_evaluated")


def _safety_refusals(root: Path) -> TextSet:
    ex = drop_evaluated(L.load_safety_refusals(root), root)
    return TextSet("safety_refusals", (), _rows(ex, L.SAFETY_REFUSALS),
                   _rows(ex, L.SAFETY_REFUSALS, lambda e: e.completion),
                   "every row the stages may read, after drop_evaluated")


def _truthfulqa_train(root: Path) -> TextSet:
    held = evaluated(root)
    questions = L.load_truthfulqa(root, split="train")
    # Every reference answer a stage may read, less the evaluated ones the stages drop
    # (``drop_evaluated`` / ``without_evaluated_answers``): correct / incorrect lists and best answers.
    kept = [without_evaluated_answers(q, held) for q in questions]
    answers = _answers(kept, L.TRUTHFULQA, ("correct", "incorrect"))
    answers += [(a, w) for a, w in _answers(kept, L.TRUTHFULQA, ("best",)) if held.answer_set(a) is None]
    return TextSet("truthfulqa_train", (), _rows(questions, L.TRUTHFULQA), answers,
                   "train-side questions and their answers, less the evaluated answers the stages drop")


def _truthfulqa_judge(kind: str):
    def build(root: Path) -> TextSet:
        ex = drop_evaluated(L.load_truthfulqa_judge(root, split="train", kind=kind), root)
        rel = L.TRUTHFULQA_JUDGE[kind]
        return TextSet(f"truthfulqa_judge_{kind}", (), _rows(ex, rel), _rows(ex, rel, lambda e: e.completion),
                       "train-side questions with the judged answers")
    return build


def _refusal_direction_harmless(root: Path) -> TextSet:
    rel = L.REFUSAL_DIRECTION.format(kind="harmless", split="train")
    return TextSet("refusal_direction_harmless", (), _kept_prompts(_rows(L.load_refusal_direction_harmless(root), rel),
                                                                   root))


def _alpaca_seed_tasks(root: Path) -> TextSet:
    return TextSet("alpaca_seed_tasks", (), _kept_prompts(_rows(L.load_alpaca_seed_tasks(root), L.ALPACA_SEED_TASKS),
                                                          root))


def _harmbench_val(root: Path) -> TextSet:
    return TextSet("harmbench_val", (), _kept_prompts(_rows(L.load_harmbench(root, split="val"), L.HARMBENCH["val"]),
                                                      root))


def helpful_judge_rows(root: Path) -> list[dict]:
    """The AlpacaEval annotations the helpful judge may read: those of judge-train and judge-dev instructions.

    Raises:
        DataError: an annotated instruction is not one of AlpacaEval's 805.
    """
    sides = L.alpaca_eval_split_map(root)
    out = []
    for i, r in enumerate(J.load_alpaca_eval_annotations(root), start=1):
        side = sides.get(normalise_text(r["instruction"]))
        if side is None:
            raise DataError(J.ALPACA_EVAL_ANNOTATIONS, f"is not an instruction of {L.ALPACA_EVAL}",
                            line=i, field="instruction")
        if side in ("judge_train", "judge_dev"):
            out.append({**r, "line": i})
    return out


def _helpful_judge(root: Path) -> TextSet:
    rows = helpful_judge_rows(root)
    rel = J.ALPACA_EVAL_ANNOTATIONS
    answers = [(r[k], f"{rel} line {r['line']} ({k})") for r in rows for k in ("output_1", "output_2") if r[k]]
    return TextSet("alpaca_eval_annotations", (), [(r["instruction"], f"{rel} line {r['line']}") for r in rows],
                   answers, "annotations of judge_train + judge_dev instructions (both outputs)")


def harmless_judge_xstest_rows(root: Path) -> list[dict]:
    """The XSTest completions the harmless judge may train on: those of *unsafe* prompts only.

    The 250 safe prompts are the over-refusal eval set, so no completion of them is trained on.
    """
    held = evaluated(root)  # two unsafe contrasts nearly duplicate their safe twins ("Why was Hitler right ...")
    return [r for r in J.load_xstest_completions(root) if r["prompt_unsafe"] and held.prompt_set(r["prompt"]) is None]


def _harmless_judge(root: Path) -> TextSet:
    rows = harmless_judge_xstest_rows(root)
    where = [f"{J.XSTEST_COMPLETIONS.format(model=r['model'])} id {r['id']}" for r in rows]
    return TextSet("xstest_completions_unsafe", (), [(r["prompt"], w) for r, w in zip(rows, where)],
                   [(r["completion"], w) for r, w in zip(rows, where) if r["completion"]],
                   "XSTest v2 completions of unsafe prompts (all five models)")


_XSTEST_FILES = tuple(J.XSTEST_COMPLETIONS.format(model=m) for m in J.XSTEST_MODELS) + (L.XSTEST,)
_FUSION = "fusion baselines (H3Fusion, X-LoRA, MoTE chains: expert rows)"
TRAINING_SOURCES: dict[str, SourceSpec] = {s.name: s for s in [
    SourceSpec("alpaca", ("expert helpful", "expert harmless (benign rows)", "multitask", "router LM loss",
                          _FUSION, "harmless judge (extra rows)"), (L.ALPACA,), _alpaca),
    SourceSpec("safety_refusals", ("expert harmless", "multitask", "router train", "router LM loss", _FUSION,
                                   "harmless judge (extra rows)"), (L.SAFETY_REFUSALS,), _safety_refusals),
    SourceSpec("truthfulqa_train", ("expert honest", "expert harmless (benign rows)", "multitask",
                                    "router train + calib", "router LM loss", _FUSION,
                                    "truthful + informative judges (references)"), (L.TRUTHFULQA,),
               _truthfulqa_train),
    SourceSpec("truthfulqa_judge_truth", ("truthful judge",), (L.TRUTHFULQA_JUDGE["truth"], L.TRUTHFULQA),
               _truthfulqa_judge("truth")),
    SourceSpec("truthfulqa_judge_info", ("informative judge",), (L.TRUTHFULQA_JUDGE["info"], L.TRUTHFULQA),
               _truthfulqa_judge("info")),
    SourceSpec("refusal_direction_harmless", ("router train",),
               (L.REFUSAL_DIRECTION.format(kind="harmless", split="train"),), _refusal_direction_harmless),
    SourceSpec("alpaca_seed_tasks", ("router calib",), (L.ALPACA_SEED_TASKS,), _alpaca_seed_tasks),
    SourceSpec("harmbench_val", ("router calib",), (L.HARMBENCH["val"],), _harmbench_val),
    SourceSpec("alpaca_eval_annotations", ("helpful judge",),
               (J.ALPACA_EVAL_ANNOTATIONS, L.ALPACA_EVAL, L.ALPACA_EVAL_GPT4), _helpful_judge),
    SourceSpec("xstest_completions_unsafe", ("harmless judge",), _XSTEST_FILES, _harmless_judge),
]}
# Read by no stage, so not checked: refusal_direction harmful splits (they overlap AdvBench,
# StrongREJECT and HarmBench test), PyRIT refusal sets and hh-rlhf (judge validation only).
NOT_TRAINED_ON = ("refusal_direction_harmful (overlaps AdvBench, StrongREJECT, HarmBench test)",
                  "pyrit_scorer_evals refusal sets (harmless judge validation only)",
                  "hh_rlhf harmless-base test (harmless judge validation only)",
                  "jailbreak templates (evaluation only)")


def register_training_source(name: str, stages: tuple[str, ...], build: Callable[[Path], TextSet],
                             files: tuple[str, ...] = (), fingerprint: str = "") -> None:
    """Add a training source (e.g. the DPO preference pairs) to every later check.

    Args:
        name: unique source name.
        stages: the stages that train on it.
        build: ``build(data_root) -> TextSet`` with the rows the stage really reads.
        files: data files (relative to the data dir) it reads, for the check's fingerprint.
        fingerprint: anything else that determines its rows (e.g. a config hash).
    """
    if name in TRAINING_SOURCES and TRAINING_SOURCES[name].build is not build:
        raise ValueError(f"training source {name!r} is already registered")
    TRAINING_SOURCES[name] = SourceSpec(name, tuple(stages), tuple(files), build, fingerprint)


# Evaluated sets -----------------------------------------------------------------------------


def _alpaca_eval(root: Path) -> TextSet:
    ex = L.load_alpaca_eval(root, split="eval")
    return TextSet("alpaca_eval", (), _rows(ex, L.ALPACA_EVAL),
                   _answers(ex, L.ALPACA_EVAL, tuple(ex[0].references) if ex else ()),
                   "eval-side instructions, davinci-003 and GPT-4-turbo references")


def _harmbench_test(root: Path) -> TextSet:
    ex = L.load_harmbench(root, split="test")
    rows = _rows(ex, L.HARMBENCH["test"])
    # A contextual prompt is context + behaviour: the behaviour alone must not be trained on either.
    rows += [(e.meta["behavior"], f"{L.HARMBENCH['test']} row {e.meta['row']} (behavior)")
             for e in ex if e.meta["functional_category"] == "contextual"]
    return TextSet("harmbench_test", (), rows, note="standard + contextual (+ copyright) behaviours")


def _truthfulqa_eval(root: Path) -> TextSet:
    ex = L.load_truthfulqa(root, split="eval")
    answers = _answers(ex, L.TRUTHFULQA)
    for e in L.load_truthfulqa_mc(root, split="eval"):
        choices = dict.fromkeys([*e.references["mc1_targets"], *e.references["mc2_targets"]])
        answers += [(c, f"{L.TRUTHFULQA_MC} row {e.meta['row']} (choice)") for c in choices]
    return TextSet("truthfulqa_eval", (), _rows(ex, L.TRUTHFULQA), answers,
                   "eval-side questions, reference answers and MC choices")


def _simple(name: str, loader, rel: str, note: str = "") -> Callable[[Path], TextSet]:
    return lambda root: TextSet(name, (), _rows(loader(root), rel), note=note)


EVAL_SETS: dict[str, SourceSpec] = {s.name: s for s in [
    SourceSpec("alpaca_eval", ("win rates", "reference NLL", "router test"), (L.ALPACA_EVAL, L.ALPACA_EVAL_GPT4),
               _alpaca_eval),
    SourceSpec("harmbench_test", ("safety score", "jailbreak safety (wrapped)", "router test"),
               (L.HARMBENCH["test"],), _harmbench_test),
    SourceSpec("strongreject", ("safety score", "jailbreak safety (wrapped)", "router test"), (L.STRONGREJECT,),
               _simple("strongreject", L.load_strongreject, L.STRONGREJECT)),
    SourceSpec("advbench", ("router shifted (jailbreak-wrapped)",), (L.ADVBENCH,),
               _simple("advbench", L.load_advbench, L.ADVBENCH)),
    SourceSpec("xstest_safe", ("over-refusal", "router shifted"), (L.XSTEST,),
               _simple("xstest_safe", lambda r: L.load_xstest(r, label="safe"), L.XSTEST, "the 250 safe prompts")),
    SourceSpec("truthfulqa_eval", ("MC1/MC2", "judged truthfulness", "router test + shifted"),
               (L.TRUTHFULQA, L.TRUTHFULQA_MC), _truthfulqa_eval),
]}


def build_sets(specs: dict[str, SourceSpec], root: Path) -> tuple[list[TextSet], list[dict]]:
    """(built sets, one status row per spec); a spec whose file is absent is "missing", not built."""
    built, status = [], []
    for spec in specs.values():
        absent = [f for f in spec.files if not (root / f).is_file()]
        row = {"name": spec.name, "stages": list(spec.stages), "files": list(spec.files)}
        if absent:
            status.append({**row, "status": "missing", "missing": absent[0]})
            continue
        ts = spec.build(root)
        ts.stages = spec.stages
        built.append(ts)
        status.append({**row, "status": "ok", "prompts": len(ts.prompts), "answers": len(ts.answers),
                       "note": ts.note})
    return built, status
