"""Loaders for the files only the judges train or validate on.

They live in ``mocae.data`` (not beside the judges) so that ``mocae data check`` validates them
and the contamination check reads the same rows the judges do. XSTest completions with human
labels, the PyRIT refusal sets, hh-rlhf harmless pairs and the
AlpacaEval GPT-4 annotations. Each validates its schema and raises ``DataError`` naming the
file, row (or line) and field.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

from mocae.data.loaders import load_xstest
from mocae.data.records import DataError
from mocae.data.readers import Where, data_file, read_jsonl, resolve_root, text_field

XSTEST_MODELS = ("gpt4", "llama2new", "llama2orig", "mistralguard", "mistralinstruct")
XSTEST_COMPLETIONS = "xstest/xstest_v2_completions_{model}_gpteval.csv"
XSTEST_LABELS = ("1_full_compliance", "2_full_refusal", "3_partial_refusal")
PYRIT_REFUSAL = ("pyrit_scorer_evals/refusal_scorer/refusal.csv",
                 "pyrit_scorer_evals/refusal_scorer/refusal_extra.csv")
HH_HARMLESS = "hh_rlhf/harmless-base_test.jsonl.gz"
ALPACA_EVAL_ANNOTATIONS = "alpaca_eval/annotations_alpaca_eval_gpt4_vs_davinci003.jsonl.gz"


def _root(data_dir) -> Path:
    root = resolve_root(data_dir)
    if root is None:
        raise FileNotFoundError("the judges train on local files only: set MOCAE_DATA_DIR or pass data_dir=")
    return root


def _read(root: Path, rel: str) -> str:
    path = data_file(root, rel)
    try:
        if rel.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise DataError(rel, f"cannot be read: {e}") from e


def _csv_rows(text: str, rel: str, columns: tuple[str, ...]) -> list[tuple[Where, dict]]:
    """Rows of a headed CSV, skipping leading ``#`` comment lines (PyRIT's version tags)."""
    lines = text.split("\n")
    skip = 0
    while skip < len(lines) and lines[skip].startswith("#"):
        skip += 1
    reader = csv.DictReader(io.StringIO("\n".join(lines[skip:]), newline=""), strict=True)
    try:
        header = reader.fieldnames or []
        for col in columns:
            if col not in header:
                raise DataError(rel, f"is missing from the header {header}", field=col)
        return [(Where(rel, row=i), rec) for i, rec in enumerate(reader, start=1) if any(rec.values())]
    except csv.Error as e:
        raise DataError(rel, f"is not valid CSV: {e}") from e


def load_xstest_completions(data_dir=None, models: tuple[str, ...] = XSTEST_MODELS) -> list[dict]:
    """XSTest v2 completions with their human ``final_label``, joined to the prompt's safe/unsafe label.

    A response is *safe* when it refuses (full or partial refusal: XSTest counts a partial
    refusal as a refusal) or when the prompt itself is safe (complying with a safe prompt harms
    no one). Only full compliance with an unsafe prompt is unsafe.

    Args:
        data_dir: data directory (default ``$MOCAE_DATA_DIR``).
        models: which completion files to read.

    Returns:
        dicts {model, id, prompt, completion, final_label, prompt_unsafe, refusal, safe}.
    """
    root = _root(data_dir)
    prompts = {ex.meta["id"]: ex for ex in load_xstest(root)}
    out = []
    for model in models:
        rel = XSTEST_COMPLETIONS.format(model=model)
        for where, rec in _csv_rows(_read(root, rel), rel, ("id", "type", "prompt", "completion", "final_label")):
            rid = text_field(rec, "id", where).strip()
            pid = rid.removeprefix("v2-")
            if pid not in prompts:
                raise where.error(f"{rid!r} matches no prompt id in xstest/xstest_prompts.csv", "id")
            if rec["type"].strip() != prompts[pid].meta["type"]:
                raise where.error(f"{rec['type']!r} differs from the prompt file's {prompts[pid].meta['type']!r}",
                                  "type")
            label = text_field(rec, "final_label", where).strip()
            if label not in XSTEST_LABELS:
                raise where.error(f"has {label!r}, expected one of {list(XSTEST_LABELS)}", "final_label")
            unsafe = prompts[pid].meta["label"] == "unsafe"
            refusal = label != "1_full_compliance"
            # An empty completion is a (silent) refusal; keep it as text so the judge sees it.
            completion = rec.get("completion") or ""
            out.append({"model": model, "id": pid, "prompt": text_field(rec, "prompt", where).strip(),
                        "completion": completion, "final_label": label, "prompt_unsafe": unsafe,
                        "refusal": refusal, "safe": refusal or not unsafe})
    return out


def load_pyrit_refusal(data_dir=None, files: tuple[str, ...] = PYRIT_REFUSAL) -> list[dict]:
    """PyRIT's human-scored refusal sets: dicts {objective, response, refusal, file}.

    ``human_score`` 1 means the response refuses the objective, 0 that it does not; the
    objectives mix harmful and benign requests, so these labels are about refusal, not safety.
    """
    root = _root(data_dir)
    out = []
    for rel in files:
        for where, rec in _csv_rows(_read(root, rel), rel, ("objective", "assistant_response", "human_score")):
            score = text_field(rec, "human_score", where).strip()
            if score not in ("0", "1"):
                raise where.error(f"has {score!r}, expected 0 or 1", "human_score")
            out.append({"objective": text_field(rec, "objective", where).strip(),
                        "response": text_field(rec, "assistant_response", where, allow_empty=True),
                        "refusal": score == "1", "file": rel})
    return out


def split_last_turn(dialogue: str, where: Where, field: str) -> tuple[str, str]:
    """(conversation up to the last assistant turn, that turn) of an hh-rlhf transcript."""
    cut = dialogue.rfind("\n\nAssistant:")
    if cut < 0:
        raise where.error("has no '\\n\\nAssistant:' turn", field)
    return dialogue[:cut].strip(), dialogue[cut + len("\n\nAssistant:"):].strip()


def load_hh_harmless(data_dir=None) -> list[dict]:
    """hh-rlhf harmless-base test pairs: dicts {prompt, chosen, rejected} (last assistant turns).

    The prompt is the chosen transcript before its last assistant turn (both transcripts share it).
    """
    root = _root(data_dir)
    out = []
    for where, rec in read_jsonl(root, HH_HARMLESS):
        prompt, chosen = split_last_turn(text_field(rec, "chosen", where), where, "chosen")
        _, rejected = split_last_turn(text_field(rec, "rejected", where), where, "rejected")
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def load_alpaca_eval_annotations(data_dir=None) -> list[dict]:
    """AlpacaEval GPT-4 judgements of model outputs against text-davinci-003.

    Returns:
        dicts {instruction, output_1, output_2, generator_2, preference, line} with preference a
        float: 1 = output_1 (davinci-003) better, 2 = output_2 better, 0 or 1.5 = draw; ``line``
        (1-based) lets a later check name the line of a bad row.
    """
    root = _root(data_dir)
    out = []
    for where, rec in read_jsonl(root, ALPACA_EVAL_ANNOTATIONS):
        pref = rec.get("preference")
        try:
            pref = float(pref)
        except (TypeError, ValueError):
            raise where.error(f"has {pref!r}, expected 0, 1, 1.5 or 2", "preference") from None
        if pref not in (0.0, 1.0, 1.5, 2.0):
            raise where.error(f"has {pref!r}, expected 0, 1, 1.5 or 2", "preference")
        out.append({"instruction": text_field(rec, "instruction", where),
                    "output_1": text_field(rec, "output_1", where, allow_empty=True),
                    "output_2": text_field(rec, "output_2", where, allow_empty=True),
                    "generator_2": str(rec.get("generator_2") or ""), "preference": pref, "line": where.line})
    return out
