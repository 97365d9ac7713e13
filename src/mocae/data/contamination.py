"""The contamination check: no training source of any stage shares a prompt or an answer with an evaluated set.

Every stage's training rows are enumerated from the same loaders and split rules the stages use
(``mocae.data.stage_sources.TRAINING_SOURCES``), and every evaluated set from the ones the
harness reads (``EVAL_SETS``). Each (source, eval set) pair is compared on prompts and on answers:

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
from pathlib import Path
from typing import Callable

import numpy as np

from mocae import paths
from mocae.data import stage_sources as S
from mocae.data.heldout import MIN_ANSWER_WORDS
from mocae.data.readers import resolve_root
from mocae.data.records import normalise_text
from mocae.data.stage_sources import (  # noqa: F401  (the check's public inputs, re-exported)
    EVAL_SETS,
    NOT_TRAINED_ON,
    Rows,
    SourceSpec,
    TextSet,
    build_sets,
    harmless_judge_xstest_rows,
    helpful_judge_rows,
    register_training_source,
)
from mocae.stages import file_digest

THRESHOLD = 0.95
MAX_EXAMPLES = 5
# Answers shorter than MIN_ANSWER_WORDS (mocae.data.heldout) are phrases any two questions share
# ("No.", TruthfulQA's stock non-answer "I have no comment."): not compared (the report says so).
CHECK_VERSION = 2  # 2: training sources are read after drop_evaluated, as the stages read them
Embedder = Callable[[list[str]], np.ndarray]


class ContaminationError(ValueError):
    """A training source shares a prompt or an answer with an evaluated set; ``report`` says which."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


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
        for i in np.flatnonzero((sims >= threshold).any(axis=1)):
            ti = start + int(i)
            # the most similar eval text that is not the same text (equal ones are counted as exact)
            hits = [j for j in np.argsort(-sims[i]) if sims[i, j] >= threshold
                    and normalise_text(e_texts[j]) != normalise_text(t_texts[ti])]
            if not hits:
                continue
            out["near"] += 1
            if len(out["examples"]) < max_examples:
                ej = int(hits[0])
                out["examples"].append({"kind": "near", "cosine": round(float(sims[i, ej]), 4),
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
    train_sets, train_status = build_sets(S.TRAINING_SOURCES, root)
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
    """A hash of everything the verdict depends on: the data files' contents (not their times: a
    fresh copy of the same files keeps its verdict), the sources registered, the split rules and
    this module's code."""
    h = hashlib.sha256(json.dumps([CHECK_VERSION, exact_only, threshold]).encode())
    for spec in [*S.TRAINING_SOURCES.values(), *EVAL_SETS.values()]:
        h.update(f"\0{spec.name}\0{spec.fingerprint}".encode())
        for rel in spec.files:
            p = Path(root) / rel
            h.update(f"\0{rel}:{file_digest(p) if p.is_file() else 'missing'}".encode())
    for module in (__file__, S.__file__, Path(__file__).with_name("splits.py"), Path(__file__).with_name("heldout.py")):
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
