"""The one record type every loader returns, and the error every loader raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from mocae import AXES

SPLITS = ("train", "val", "eval", "test", "all", "judge_train", "judge_dev")


@dataclass(frozen=True)
class Example:
    """One prompt (and optionally its reference completion) from one dataset.

    Args:
        prompt: the user turn, already assembled (e.g. Alpaca instruction + input).
        completion: the target answer for training, or None for prompt-only eval sets.
        axis: which expert the example belongs to, one of ``mocae.AXES``.
        source: the dataset name (a key of ``mocae.data.DATASETS``).
        split: "train", "val", "eval", "test" (or "all" when a source has no split).
        references: reference answers used by metrics and judges, or None.
        meta: anything else worth keeping (category, label, id, 1-based row...).
    """

    prompt: str
    completion: str | None
    axis: str
    source: str
    split: str
    references: dict | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        # Catch loader bugs at construction rather than deep inside training.
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")


class DataError(ValueError):
    """A data file does not match its schema.

    The message always says where: ``"<file> row 17: field 'instruction' is missing"``.
    ``row`` is the 1-based data row (JSON list element or CSV row after the header);
    ``line`` is used instead for line-oriented files (jsonl).

    Args:
        file: the file as the user knows it, e.g. "alpaca/alpaca_5000.json" or "hub:tatsu-lab/alpaca".
        problem: what is wrong, e.g. "is missing".
        row: 1-based data row, if the problem is in a row.
        line: 1-based line number (jsonl), if the problem is on a line.
        field: the field concerned, if any.
    """

    def __init__(self, file, problem: str, *, row: int | None = None, line: int | None = None,
                 field: str | None = None):
        self.file, self.problem, self.row, self.line, self.field = str(file), problem, row, line, field
        where = self.file
        if row is not None:
            where += f" row {row}"
        if line is not None:
            where += f" line {line}"
        what = f"field {field!r} {problem}" if field is not None else problem
        super().__init__(f"{where}: {what}")

    def __reduce__(self):
        # Keyword-only arguments break the default exception pickling (multiprocessing).
        return (_rebuild_data_error, (self.file, self.problem, self.row, self.line, self.field))


def _rebuild_data_error(file, problem, row, line, field):
    return DataError(file, problem, row=row, line=line, field=field)


def normalise_text(text: str) -> str:
    """Collapse whitespace and lowercase: the key used to match prompts/questions across files."""
    return " ".join(text.split()).lower()


def exclude_overlap(examples: Iterable[Example], *others: Iterable[Example]) -> list[Example]:
    """Drop examples whose prompt also appears in any of ``others`` (e.g. evaluation sets).

    Args:
        examples: candidate training examples.
        others: example collections that must not be trained on.

    Returns:
        the examples whose normalised prompt is in none of ``others``, order kept.
    """
    banned = {normalise_text(ex.prompt) for group in others for ex in group}
    return [ex for ex in examples if normalise_text(ex.prompt) not in banned]
