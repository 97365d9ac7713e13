"""The contamination check: no training source of any stage shares a prompt or an answer with an evaluated set.

Every stage's training rows are enumerated here from the same loaders and split rules the stages
use (``TRAINING_SOURCES``), and every evaluated set from the ones the harness reads
(``EVAL_SETS``). Each (source, eval set) pair is compared on prompts and on answers:

- **exact**: equal after ``normalise_text`` (whitespace collapsed, lower case);
- **near**: sentence-embedding cosine >= 0.95 (all-MiniLM-L6-v2 by default), which catches
  punctuation, case and one-word variants that exact matching misses.

Where a stage filters a source before training (the router drops safety refusals that are
evaluated prompts), the source here is the rows the expert, the widest reader, trains on; a
filtered subset of clean rows is clean too. Embeddings are cached under
``$MOCAE_CACHE/contamination/`` keyed by a hash of the texts and the encoder, verified on read,
and ``ensure_clean`` caches the whole verdict by the data files' fingerprint so the pipeline pays
for it once.

Builders (e.g. the preference data of DPO) add their rows with ``register_training_source``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mocae import paths
from mocae.data import judge_files as J
from mocae.data import loaders as L
from mocae.data.readers import resolve_root
from mocae.data.records import DataError, normalise_text

THRESHOLD = 0.95
MAX_EXAMPLES = 5
# Answers shorter than this are phrases any two questions share ("No.", "I have no comment.", TruthfulQA's stock non-answer):
# equal answers to different questions are not a leak, so they are counted but not compared.
MIN_ANSWER_WORDS = 5
CHECK_VERSION = 1
Rows = list[tuple[str, str]]  # (text, where: "<file> row N")
Embedder = Callable[[list[str]], np.ndarray]


class ContaminationError(ValueError):
    """A training source shares a prompt or an answer with an evaluated set; ``report`` says which."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


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


# Training sources ---------------------------------------------------------------------------
# The stage names say where each source is read; see each stage's module for the selection.


def _alpaca(root: Path) -> TextSet:
    ex = L.load_alpaca(root)
    return TextSet("alpaca", (), _rows(ex, L.ALPACA), _rows(ex, L.ALPACA, lambda e: e.completion),
                   "all 5,000 rows (experts take seeded subsets)")


def _safety_refusals(root: Path) -> TextSet:
    ex = L.load_safety_refusals(root)
    return TextSet("safety_refusals", (), _rows(ex, L.SAFETY_REFUSALS),
                   _rows(ex, L.SAFETY_REFUSALS, lambda e: e.completion),
                   "all rows: the harmless expert reads them unfiltered")


def _truthfulqa_train(root: Path) -> TextSet:
    ex = L.load_truthfulqa(root, split="train")
    return TextSet("truthfulqa_train", (), _rows(ex, L.TRUTHFULQA), _answers(ex, L.TRUTHFULQA),
                   "train-side questions and their best/correct/incorrect answers")


def _truthfulqa_judge(kind: str):
    def build(root: Path) -> TextSet:
        ex = L.load_truthfulqa_judge(root, split="train", kind=kind)
        rel = L.TRUTHFULQA_JUDGE[kind]
        return TextSet(f"truthfulqa_judge_{kind}", (), _rows(ex, rel), _rows(ex, rel, lambda e: e.completion),
                       "train-side questions with the judged answers")
    return build


def _refusal_direction_harmless(root: Path) -> TextSet:
    rel = L.REFUSAL_DIRECTION.format(kind="harmless", split="train")
    return TextSet("refusal_direction_harmless", (), _rows(L.load_refusal_direction_harmless(root), rel))


def _alpaca_seed_tasks(root: Path) -> TextSet:
    return TextSet("alpaca_seed_tasks", (), _rows(L.load_alpaca_seed_tasks(root), L.ALPACA_SEED_TASKS))


def _harmbench_val(root: Path) -> TextSet:
    return TextSet("harmbench_val", (), _rows(L.load_harmbench(root, split="val"), L.HARMBENCH["val"]))


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
    return [r for r in J.load_xstest_completions(root) if r["prompt_unsafe"]]


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


# Embeddings, cached -------------------------------------------------------------------------


def _text_hash(texts: list[str], model_id: str) -> str:
    h = hashlib.sha256(model_id.encode())
    for t in texts:
        h.update(b"\0" + t.encode())
    return h.hexdigest()


def cached_embeddings(texts: list[str], embed: Embedder, cache_dir: Path | None) -> np.ndarray:
    """``embed(texts)``, unit-normalised, read from / written to ``cache_dir/<hash>.npz``.

    A cache file whose stored hash or shape does not match is recomputed (with a warning).
    """
    if not texts:
        return np.zeros((0, 1), dtype=np.float32)
    key = _text_hash(texts, getattr(embed, "model_id", getattr(embed, "__qualname__", repr(embed))))
    path = Path(cache_dir) / f"{key[:40]}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            with np.load(path) as f:
                if str(f["key"]) == key and f["emb"].shape[0] == len(texts):
                    return f["emb"]
            warnings.warn(f"embedding cache {path} does not match its texts; recomputing", stacklevel=2)
        except (OSError, ValueError, KeyError) as e:
            warnings.warn(f"embedding cache {path} is unreadable ({e}); recomputing", stacklevel=2)
    emb = np.asarray(embed(list(texts)), dtype=np.float32)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        os.close(fd)
        try:
            np.savez(tmp, key=np.array(key), emb=emb)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return emb


# The comparison -----------------------------------------------------------------------------


def _unique(rows: Rows) -> tuple[list[str], list[int]]:
    """Distinct normalised texts (as first written) and, per distinct text, its first row."""
    seen: dict[str, int] = {}
    for i, (text, _) in enumerate(rows):
        seen.setdefault(normalise_text(text), i)
    return [rows[i][0] for i in seen.values()], list(seen.values())


def compare(train: Rows, evald: Rows, *, train_emb=None, eval_emb=None, threshold: float = THRESHOLD,
            max_examples: int = MAX_EXAMPLES, block: int = 2048) -> dict:
    """Overlaps of one training field with one evaluated field.

    Args:
        train, evald: (text, where) rows.
        train_emb, eval_emb: unit-norm embeddings of ``_unique(train)`` / ``_unique(evald)`` texts,
            or None to skip near duplicates.

    Returns:
        {"n_source", "n_eval", "exact", "near", "examples"}: exact counts training rows equal to
        an eval row after normalisation; near counts distinct training texts with cosine >=
        ``threshold`` to an eval text they are not equal to.
    """
    index = {}
    for text, where in evald:
        index.setdefault(normalise_text(text), (text, where))
    out = {"n_source": len(train), "n_eval": len(evald), "exact": 0, "near": None, "examples": []}
    for text, where in train:
        hit = index.get(normalise_text(text))
        if hit is not None:
            out["exact"] += 1
            if len(out["examples"]) < max_examples:
                out["examples"].append({"kind": "exact", "train_row": where, "train_text": text,
                                        "eval_row": hit[1], "eval_text": hit[0]})
    if train_emb is None or eval_emb is None or not len(train_emb) or not len(eval_emb):
        return out
    t_texts, t_rows = _unique(train)
    e_texts, e_rows = _unique(evald)
    out["near"] = 0
    for start in range(0, len(t_texts), block):
        sims = train_emb[start:start + block] @ eval_emb.T
        for i, j in zip(*np.nonzero(sims >= threshold)):
            ti, ej = start + int(i), int(j)
            if normalise_text(t_texts[ti]) == normalise_text(e_texts[ej]):
                continue  # counted as exact
            out["near"] += 1
            if len(out["examples"]) < max_examples:
                out["examples"].append({"kind": "near", "cosine": round(float(sims[i, j]), 4),
                                        "train_row": train[t_rows[ti]][1], "train_text": t_texts[ti],
                                        "eval_row": evald[e_rows[ej]][1], "eval_text": e_texts[ej]})
    return out


def _long_answers(rows: Rows) -> Rows:
    return [r for r in rows if len(r[0].split()) >= MIN_ANSWER_WORDS]


def check_contamination(data_dir: Path | str | None = None, *, embed: Embedder | None = None,
                        exact_only: bool = False, threshold: float = THRESHOLD, max_examples: int = MAX_EXAMPLES,
                        cache_dir: Path | None = None) -> dict:
    """Compare every training source with every evaluated set, prompts and answers.

    Args:
        data_dir: the data directory (default ``$MOCAE_DATA_DIR``).
        embed: texts -> (N, D) embeddings for near duplicates; default all-MiniLM-L6-v2.
        exact_only: skip near duplicates (no encoder is loaded).
        threshold: cosine at or above which two texts are near duplicates.
        max_examples: examples kept per pair.
        cache_dir: embedding cache (default ``$MOCAE_CACHE/contamination``).

    Returns:
        the report: {"training_sources", "eval_sets" (status rows), "pairs" (one per source x set x
        field), "overlaps" (total), "threshold", "exact_only", "not_trained_on", ...}.

    Raises:
        FileNotFoundError: no data directory. DataError: a file does not match its schema.
    """
    root = resolve_root(data_dir)
    if root is None or not Path(root).is_dir():
        raise FileNotFoundError(f"no data directory ({root}): set MOCAE_DATA_DIR or pass data_dir")
    root = Path(root)
    train_sets, train_status = build_sets(TRAINING_SOURCES, root)
    eval_sets, eval_status = build_sets(EVAL_SETS, root)
    if not exact_only and embed is None:
        from mocae.encoder import sentence_embedder

        embed = sentence_embedder()
    cache_dir = Path(cache_dir) if cache_dir is not None else paths.cache_dir() / "contamination"
    emb_cache: dict[tuple[str, str], np.ndarray] = {}

    def emb(ts: TextSet, fld: str, rows: Rows):
        if exact_only:
            return None
        if (ts.name, fld) not in emb_cache:
            emb_cache[(ts.name, fld)] = cached_embeddings(_unique(rows)[0], embed, cache_dir)
        return emb_cache[(ts.name, fld)]

    pairs = []
    for tr in train_sets:
        for ev in eval_sets:
            for fld in ("prompts", "answers"):
                t_rows, e_rows = getattr(tr, fld), getattr(ev, fld)
                if fld == "answers":
                    t_rows, e_rows = _long_answers(t_rows), _long_answers(e_rows)
                if not t_rows or not e_rows:
                    continue
                res = compare(t_rows, e_rows, train_emb=emb(tr, fld, t_rows), eval_emb=emb(ev, fld, e_rows),
                              threshold=threshold, max_examples=max_examples)
                pairs.append({"source": tr.name, "eval_set": ev.name, "field": fld[:-1], **res})
    return {"version": CHECK_VERSION, "data_dir": str(root), "threshold": threshold, "exact_only": exact_only,
            "encoder": None if exact_only else getattr(embed, "model_id", getattr(embed, "__qualname__", "")),
            "min_answer_words": MIN_ANSWER_WORDS, "training_sources": train_status, "eval_sets": eval_status,
            "pairs": pairs, "overlaps": sum(p["exact"] + (p["near"] or 0) for p in pairs),
            "not_trained_on": list(NOT_TRAINED_ON),
            "notes": ["jailbreak-wrapped eval prompts are harmbench_test + strongreject prompts: checked as those",
                      "router train drops safety refusals equal to HarmBench/StrongREJECT/AdvBench prompts; the "
                      "expert reads them all, so all are checked",
                      f"answers under {MIN_ANSWER_WORDS} words are not compared (stock phrases shared by "
                      "unrelated questions)"]}


def overlap_message(report: dict) -> str | None:
    """One message naming every overlapping (source, eval set, field) and its first example, or None."""
    bad = [p for p in report["pairs"] if p["exact"] or p["near"]]
    if not bad:
        return None
    lines = [f"contamination: {len(bad)} (training source, eval set) pairs overlap"]
    for p in bad:
        ex = p["examples"][0]
        lines.append(f"  {p['source']} x {p['eval_set']} ({p['field']}s): {p['exact']} exact, {p['near'] or 0} near;"
                     f" e.g. {ex['kind']}: {ex['train_row']} {ex['train_text'][:80]!r} ~ "
                     f"{ex['eval_row']} {ex['eval_text'][:80]!r}")
    return "\n".join(lines)


def raise_for_overlaps(report: dict) -> None:
    """Raise ``ContaminationError`` naming source, set and an example if the report has any overlap."""
    message = overlap_message(report)
    if message:
        raise ContaminationError(message, report)


def format_contamination_table(report: dict) -> str:
    """The report's pairs as a plain-text table (source, eval set, field, rows, exact, near)."""
    header = ("training source", "eval set", "field", "source rows", "eval rows", "exact", "near")
    table = [header] + [(p["source"], p["eval_set"], p["field"], f"{p['n_source']:,}", f"{p['n_eval']:,}",
                         str(p["exact"]), "-" if p["near"] is None else str(p["near"])) for p in report["pairs"]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for row in report["training_sources"] + report["eval_sets"]:
        if row["status"] == "missing":
            lines.append(f"not checked: {row['name']} ({row['missing']} is missing)")
    return "\n".join(lines)


# The pipeline's gate ------------------------------------------------------------------------


def fingerprint(root: Path, exact_only: bool, threshold: float = THRESHOLD) -> str:
    """A hash of everything the verdict depends on: the data files' sizes and times, the sources
    registered, the split rules and this module's code."""
    h = hashlib.sha256(json.dumps([CHECK_VERSION, exact_only, threshold]).encode())
    for spec in [*TRAINING_SOURCES.values(), *EVAL_SETS.values()]:
        h.update(f"\0{spec.name}\0{spec.fingerprint}".encode())
        for rel in spec.files:
            p = Path(root) / rel
            st = p.stat() if p.is_file() else None
            h.update(f"\0{rel}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}".encode())
    for module in (__file__, Path(__file__).with_name("splits.py")):
        h.update(Path(module).read_bytes())
    return h.hexdigest()


def ensure_clean(data_dir: Path | str | None = None, *, exact_only: bool = False, embed: Embedder | None = None,
                 cache_dir: Path | None = None) -> dict:
    """Run the check unless a passing verdict for the same fingerprint is cached; raise on overlap.

    Returns:
        the report (from the cache when the fingerprint matches).

    Raises:
        ContaminationError: any overlap (the failing report is not cached as a pass).
    """
    root = resolve_root(data_dir)
    if root is None or not Path(root).is_dir():
        raise FileNotFoundError(f"the contamination check reads the local data files, and there is no data "
                                f"directory ({root}): set MOCAE_DATA_DIR (see `mocae data check`)")
    cache_dir = Path(cache_dir) if cache_dir is not None else paths.cache_dir() / "contamination"
    fp = fingerprint(Path(root), exact_only)
    verdict = cache_dir / f"check-{fp[:24]}.json"
    if verdict.is_file():
        try:
            report = json.loads(verdict.read_text(encoding="utf-8"))
            if report.get("fingerprint") == fp and report.get("overlaps") == 0:
                return report
        except (OSError, ValueError):
            pass
        warnings.warn(f"contamination verdict {verdict} does not match; checking again", stacklevel=2)
    report = check_contamination(root, embed=embed, exact_only=exact_only, cache_dir=cache_dir)
    report["fingerprint"] = fp
    raise_for_overlaps(report)
    paths.atomic_write_json(verdict, report)
    return report
