"""Reading JSON / JSONL / CSV data files and checking their fields, with errors that say where.

Every reader returns ``(Where, record)`` pairs, so a field check further down can still name the
file and row; field checks take that ``Where`` to build their ``DataError``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mocae.data.records import DataError
# Defined with the other paths (mocae.stages reads it too); the data loaders import it from here.
from mocae.paths import resolve_root  # noqa: F401


def data_file(root: Path, rel: str) -> Path:
    """``root / rel``, or a FileNotFoundError naming the full path and MOCAE_DATA_DIR."""
    path = Path(root) / rel
    if not path.is_file():
        env = os.environ.get("MOCAE_DATA_DIR")
        raise FileNotFoundError(
            f"data file not found: {path}. Set MOCAE_DATA_DIR (now {env!r}) to the data directory "
            f"holding {rel}, or pass data_dir=."
        )
    return path


Rows = list[tuple["Where", dict]]


@dataclass(frozen=True)
class Where:
    """A position in a data file, for error messages."""

    file: str
    row: int | None = None
    line: int | None = None

    def error(self, problem: str, field: str | None = None) -> DataError:
        return DataError(self.file, problem, row=self.row, line=self.line, field=field)


def _open_text(path: Path, name: str) -> str:
    # utf-8-sig reads plain UTF-8 too, and drops a leading byte-order mark (TruthfulQA.csv has
    # one) that would otherwise end up in the first CSV column name or make json.loads fail.
    try:
        if path.suffix == ".gz":
            import gzip

            with gzip.open(path, "rt", encoding="utf-8-sig") as f:
                return f.read()
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(name, f"is not valid UTF-8 ({e.reason} at byte {e.start})") from e
    except (OSError, EOFError) as e:
        raise DataError(name, f"cannot be read: {e}") from e


def _iter_json_list(root: Path, rel: str) -> Iterator[tuple[Where, dict]]:
    """Rows of a JSON file holding a list of objects.

    Args:
        root: the data directory.
        rel: the file relative to it (also used in error messages).

    Yields:
        (Where, record) with 1-based rows.
    """
    text = _open_text(data_file(root, rel), rel)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(rel, f"is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    if not isinstance(data, list):
        raise DataError(rel, f"must hold a JSON list of objects, found {type(data).__name__}")
    for i, rec in enumerate(data, start=1):
        where = Where(rel, row=i)
        if not isinstance(rec, dict):
            raise where.error(f"must be a JSON object, found {type(rec).__name__}")
        yield where, rec


def _iter_jsonl(root: Path, rel: str) -> Iterator[tuple[Where, dict]]:
    """Objects of a JSON-lines file, skipping blank lines; positions are line numbers."""
    text = _open_text(data_file(root, rel), rel)
    # split("\n"), not splitlines(): JSON strings may hold U+2028, which splitlines breaks on.
    for n, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        where = Where(rel, line=n)
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            raise where.error(f"is not valid JSON: {e.msg} at column {e.colno}") from e
        if not isinstance(rec, dict):
            raise where.error(f"must be a JSON object, found {type(rec).__name__}")
        yield where, rec


def _iter_csv(root: Path, rel: str, columns: tuple[str, ...]) -> Iterator[tuple[Where, dict]]:
    """Rows of a CSV file with a header, as dicts.

    ``strict`` quoting turns a broken quote into an error instead of a silently merged row.

    Args:
        root: the data directory.
        rel: the file relative to it.
        columns: columns that must be in the header.

    Yields:
        (Where, row) with 1-based data rows (the header is not counted).
    """
    text = _open_text(data_file(root, rel), rel)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(rel, "is empty (no header row)")
        header = [h.strip() for h in header]
        for col in columns:
            if col not in header:
                raise DataError(rel, f"is missing from the header {header}", field=col)
        for i, values in enumerate(reader, start=1):
            where = Where(rel, row=i)
            if not any(v.strip() for v in values):
                continue  # a trailing blank line is not a row
            if len(values) > len(header):
                raise where.error(f"has {len(values)} fields but the header has {len(header)}")
            # Short rows leave fields absent, so the field check reports "is missing".
            yield where, dict(zip(header, values))
    except csv.Error as e:
        raise DataError(rel, f"is not valid CSV: {e} (near line {reader.line_num})") from e


# Field checks -------------------------------------------------------------------------------


def text_field(rec: dict, field: str, where: Where, *, allow_empty: bool = False) -> str:
    """``rec[field]`` as a string; a DataError if missing, not a string, or blank.

    Args:
        rec: the record.
        field: the field name.
        where: its position, for the error.
        allow_empty: accept "" / whitespace (e.g. Alpaca's optional ``input``).
    """
    if field not in rec or rec[field] is None:
        raise where.error("is missing", field)
    value = rec[field]
    if not isinstance(value, str):
        raise where.error(f"must be a string, found {type(value).__name__}", field)
    if not allow_empty and not value.strip():
        raise where.error("is empty", field)
    return value


def optional_text(rec: dict, field: str, where: Where) -> str | None:
    """``rec[field]`` if present and a string (blank -> None); a DataError if of another type."""
    value = rec.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise where.error(f"must be a string or null, found {type(value).__name__}", field)
    return value if value.strip() else None


def label_field(rec: dict, field: str, where: Where, allowed: tuple[str, ...]) -> str:
    """A string field whose value must be one of ``allowed``."""
    value = text_field(rec, field, where).strip()
    if value not in allowed:
        raise where.error(f"has {value!r}, expected one of {list(allowed)}", field)
    return value


def answers_field(rec: dict, field: str, where: Where) -> list[str]:
    """A ';'-separated answer list (TruthfulQA CSV), or a list of strings (Hub).

    Empty pieces are dropped: the CSV has trailing ';' on some rows.
    """
    value = rec.get(field)
    if isinstance(value, list):
        if not all(isinstance(a, str) for a in value):
            raise where.error("must be a list of strings", field)
        pieces = value
    else:
        pieces = text_field(rec, field, where).split(";")
    answers = [a.strip() for a in pieces if a.strip()]
    if not answers:
        raise where.error("has no answers", field)
    return answers


def targets_field(rec: dict, field: str, where: Where, *, exactly_one: bool) -> dict[str, int]:
    """TruthfulQA MC targets ``{answer: 0/1}``; at least one (or exactly one) answer is 1."""
    value = rec.get(field)
    if value is None:
        raise where.error("is missing", field)
    if not isinstance(value, dict) or not value:
        raise where.error(f"must be a non-empty object {{answer: 0/1}}, found {type(value).__name__}", field)
    for answer, label in value.items():
        if type(label) is not int or label not in (0, 1):
            raise where.error(f"has label {label!r} for {answer!r}, expected 0 or 1", field)
    correct = sum(value.values())
    if correct == 0 or (exactly_one and correct != 1):
        need = "exactly one" if exactly_one else "at least one"
        raise where.error(f"has {correct} correct answers, expected {need}", field)
    return dict(value)


# Eager wrappers: a missing or malformed file fails at the call, not at the first iteration.


def read_json_list(root: Path, rel: str) -> Rows:
    """Rows of a JSON file holding a list of objects, as (Where, record) with 1-based rows."""
    return list(_iter_json_list(root, rel))


def read_jsonl(root: Path, rel: str) -> Rows:
    """Objects of a JSON-lines file as (Where, record); positions are line numbers."""
    return list(_iter_jsonl(root, rel))


def read_csv(root: Path, rel: str, columns: tuple[str, ...]) -> Rows:
    """Rows of a headed CSV file as (Where, row) with 1-based data rows; ``columns`` must be in the header."""
    return list(_iter_csv(root, rel, columns))
