"""The Hugging Face Hub fallback, used when no local data directory is configured.

Each function here fetches one dataset with ``datasets.load_dataset`` and renames its columns
to the schema of the matching local file, so the loaders validate and map Hub rows with exactly
the code they use for local files. Positions in errors read ``hub:<id> row N``.

Known differences from the local files (documented, not hidden):
- tatsu-lab/alpaca is the full 52k set, not the 5,000-row subset.
- walledai/HarmBench has all 400 text behaviours with no test/val split (records get split "all")
  and no BehaviorID; walledai/* datasets are gated (log in with ``hf auth login``).
- walledai/XSTest has no id column: the 1-based row number is used.
"""

from __future__ import annotations

from typing import Callable, Iterator

from mocae.data.readers import Where

Rows = Iterator[tuple[Where, dict]]

ALPACA_EVAL_FILES = "hf://datasets/tatsu-lab/alpaca_eval/"


def _load(*args, **kwargs):
    # Imported lazily: `datasets` is slow to import and only needed on this path.
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # offline (httpx errors are not OSError), gated or moved: say what to do
        name = args[0] if args[0] != "json" else kwargs.get("data_files", "?")
        raise FileNotFoundError(
            f"no local data directory is set (MOCAE_DATA_DIR) and the Hugging Face Hub fallback failed "
            f"for {name}: {type(err).__name__}: {err}. Set MOCAE_DATA_DIR to a folder with the data files "
            f"(`mocae data check` lists them)") from err


def _rows(name: str, ds, rename: dict[str, str] | None = None, extra: Callable | None = None) -> Rows:
    """Number the rows of ``ds`` and rename columns to the local schema."""
    rename = rename or {}
    for i, rec in enumerate(ds, start=1):
        rec = {rename.get(k, k): v for k, v in dict(rec).items()}
        if extra is not None:
            rec.update(extra(i, rec))
        yield Where(f"hub:{name}", row=i), rec


def alpaca() -> Rows:
    return _rows("tatsu-lab/alpaca", _load("tatsu-lab/alpaca", split="train"))


def alpaca_eval(reference: str = "text_davinci_003") -> Rows:
    """AlpacaEval instructions with the AlpacaEval 1 (davinci-003) or 2 (GPT-4 turbo) reference.

    The Hub repo still ships a loading script that ``datasets`` >= 4 refuses to run, so the JSON
    files are read directly.
    """
    file = {"text_davinci_003": "alpaca_eval.json", "gpt4_1106_preview": "alpaca_eval_gpt4_baseline.json"}[reference]
    ds = _load("json", data_files=ALPACA_EVAL_FILES + file, split="train")
    return _rows(f"tatsu-lab/alpaca_eval/{file}", ds)


def truthfulqa() -> Rows:
    ds = _load("truthfulqa/truthful_qa", "generation", split="validation")
    rename = {"type": "Type", "category": "Category", "question": "Question", "best_answer": "Best Answer",
              "correct_answers": "Correct Answers", "incorrect_answers": "Incorrect Answers", "source": "Source"}
    return _rows("truthfulqa/truthful_qa:generation", ds, rename)


def truthfulqa_mc() -> Rows:
    ds = _load("truthfulqa/truthful_qa", "multiple_choice", split="validation")

    def as_dict(targets):
        # Hub: {"choices": [...], "labels": [...]}; mc_task.json: {answer: label}.
        if isinstance(targets, dict) and "choices" in targets and "labels" in targets:
            return dict(zip(targets["choices"], targets["labels"]))
        return targets

    def extra(_, rec):
        return {k: as_dict(rec.get(k)) for k in ("mc1_targets", "mc2_targets")}

    return _rows("truthfulqa/truthful_qa:multiple_choice", ds, extra=extra)


def harmbench() -> Rows:
    """All three HarmBench text configs, concatenated, in the local CSV's columns."""
    for config in ("standard", "contextual", "copyright"):
        ds = _load("walledai/HarmBench", config, split="train")
        rename = {"prompt": "Behavior", "category": "SemanticCategory", "context": "ContextString"}
        yield from _rows(f"walledai/HarmBench:{config}", ds, rename,
                         extra=lambda i, rec, c=config: {"FunctionalCategory": c,
                                                         "ContextString": rec.get("ContextString") or ""})


def strongreject() -> Rows:
    ds = _load("walledai/StrongREJECT", split="train")
    return _rows("walledai/StrongREJECT", ds, {"prompt": "forbidden_prompt"})


def advbench() -> Rows:
    ds = _load("walledai/AdvBench", split="train")
    return _rows("walledai/AdvBench", ds, {"prompt": "Behavior"},
                 extra=lambda i, rec: {"BehaviorID": f"advbench_{i}"})


def xstest() -> Rows:
    ds = _load("walledai/XSTest", split="test")
    return _rows("walledai/XSTest", ds, extra=lambda i, rec: {"id": str(i)})


def beavertails(split: str) -> Rows:
    """BeaverTails QA pairs; ``split`` is "train" or "test" (the 30k splits)."""
    ds = _load("PKU-Alignment/BeaverTails", split=f"30k_{split}")
    return _rows(f"PKU-Alignment/BeaverTails:30k_{split}", ds)
