"""TruthfulQA MC1/MC2 through lm-eval, on our question-level eval split, fully offline.

lm-eval's built-in ``truthfulqa_mc1``/``truthfulqa_mc2`` read the Hub dataset and cover all
817 questions, half of which our honest expert trains on. We therefore write the eval-half
records to a local JSONL in the Hub ``truthful_qa/multiple_choice`` schema and register two
tasks that ``include`` lm-eval's own YAMLs, overriding only the name and the dataset. The
prompt (fixed 6-shot QA primer + "Q: ...\\nA:"), the " " + answer continuation, summed
log-likelihood scoring and ``process_results_mc2`` are lm-eval's, byte for byte.

A second pair of tasks scores the chat format the experts are trained in (``chat=True``): the
same YAMLs with the question alone as ``doc_to_text``, run with lm-eval's ``apply_chat_template``
(which renders the user turn and drops the space before the answer). Results name their mode.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from mocae.evaluation.prefix_cache import SharedPrefixLM
from mocae.device import device_of
from mocae.spec import capabilities_of

MODE = ("lm-eval truthfulqa_mc1/mc2 conventions: 6-shot QA primer, ' ' + answer, "
        "summed log-likelihood, no chat template")
MODE_CHAT = ("chat format: the question alone as the user turn of the tokenizer's chat template "
             "(lm-eval apply_chat_template), the answer as the assistant's reply with no leading space, "
             "summed log-likelihood, no primer")
TASK_MC1 = "mocae_truthfulqa_mc1"
TASK_MC2 = "mocae_truthfulqa_mc2"
# Chat format: the experts are trained on (user question -> assistant answer), so they are also
# measured there. Only the prompt differs; lm-eval drops the space before the answer itself.
CHAT_SUFFIX = "_chat"


def _targets(answers: dict[str, int]) -> dict[str, list]:
    """``{answer: 0/1}`` -> the Hub schema ``{"choices": [...], "labels": [...]}``, correct first.

    lm-eval's mc1 YAML has ``doc_to_target: 0``: the correct answer must be choice 0, as in
    the Hub data. A stable sort keeps the file's order within correct and incorrect answers.
    """
    items = sorted(answers.items(), key=lambda kv: -kv[1])
    return {"choices": [a for a, _ in items], "labels": [int(v) for _, v in items]}


def to_hf_docs(examples: Sequence) -> list[dict]:
    """Convert ``load_truthfulqa_mc`` Examples to Hub ``truthful_qa/multiple_choice`` rows.

    Args:
        examples: Examples whose references hold "mc1_targets" and "mc2_targets".

    Returns:
        dicts with question, mc1_targets and mc2_targets ({choices, labels}).
    """
    docs = []
    for ex in examples:
        refs = ex.references or {}
        if "mc1_targets" not in refs or "mc2_targets" not in refs:
            raise ValueError(f"example {ex.prompt[:60]!r} has no mc1_targets/mc2_targets references")
        docs.append({"question": ex.prompt, "mc1_targets": _targets(refs["mc1_targets"]),
                     "mc2_targets": _targets(refs["mc2_targets"])})
    return docs


def _lm_eval_yaml(name: str) -> Path:
    """Path of one of the installed lm-eval's own TruthfulQA task configs."""
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / "truthfulqa" / name
    if not path.is_file():
        raise RuntimeError(f"lm-eval {lm_eval.__version__} has no {path}; mocae expects lm-eval 0.4.x")
    return path


def write_task_dir(docs: list[dict], root: Path) -> Path:
    """Write the docs JSONL and the task YAMLs (primer and chat format) under ``root``; returns the include path.

    Args:
        docs: rows from :func:`to_hf_docs`.
        root: an empty, writable directory (it also holds the datasets cache).

    Returns:
        the directory to pass as ``TaskManager(include_path=...)``.
    """
    import yaml

    data = root / "truthfulqa_mc_eval.jsonl"
    with data.open("w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    for task, base in ((TASK_MC1, "truthfulqa_mc1.yaml"), (TASK_MC2, "truthfulqa_mc2.yaml"),
                       (TASK_MC1 + CHAT_SUFFIX, "truthfulqa_mc1.yaml"), (TASK_MC2 + CHAT_SUFFIX, "truthfulqa_mc2.yaml")):
        config = {
            # Inherit doc_to_text (the primer), doc_to_choice, doc_to_target, metrics and
            # (mc2) process_results from lm-eval itself instead of copying them.
            "include": str(_lm_eval_yaml(base)),
            "task": task,
            # A tag of our own: the inherited "truthfulqa" tag would name lm-eval's tasks.
            "tag": ["mocae_truthfulqa"],
            "dataset_path": "json",
            "dataset_name": None,
            # A private datasets cache: no stale Arrow files from an earlier run, no Hub.
            "dataset_kwargs": {"data_files": {"validation": str(data)},
                               "cache_dir": str(root / "hf_datasets")},
            "validation_split": "validation",
        }
        if task.endswith(CHAT_SUFFIX):
            config["doc_to_text"] = "{{question}}"  # no primer: the question is the user turn
        (tasks / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return tasks


def _question_of(text: str) -> str:
    """The last "Q: ...\nA:" question of a few-shot MC context (the one being scored)."""
    start = text.rfind("Q: ")
    end = text.find("\nA:", start)
    return text[start + 3:end if end >= 0 else None].strip() if start >= 0 else ""


def _chat_question_finder(tokenizer, questions: list[str]):
    """``find(text) -> question`` for chat-format MC contexts: the question whose rendered chat
    prompt the decoded row starts with (the longest, should one prompt prefix another)."""
    from mocae.generation import chat_prompt

    rendered = sorted(((chat_prompt(tokenizer, q), q) for q in questions), key=lambda rq: -len(rq[0]))

    def find(text: str) -> str:
        for prompt, question in rendered:
            at = text.find(prompt)
            if 0 <= at <= 8:  # lm-eval may put a BOS token before the context
                return question
        return ""
    return find


def question_routing(model, tokenizer, questions: list[str], batch_size: int = 16, chat: bool = False):
    """A ``routing_override`` for a routed model: each MC context is routed on its question alone.

    lm-eval's context is a 6-shot primer + the question; routed as is, the router would see
    mostly primer. Routing the chat-formatted question instead is what the model does in chat.
    In chat format (``chat``) the context is that chat-formatted question already.

    Raises (when called): ValueError for a context whose question was not routed beforehand.
    """
    from mocae.data import normalise_text
    from mocae.generation import chat_prompt

    weights = {}
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(questions), batch_size):
            chunk = questions[start:start + batch_size]
            batch = tokenizer([chat_prompt(tokenizer, q) for q in chunk], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device_of(model))
            for q, w in zip(chunk, model.route(batch["input_ids"], batch["attention_mask"])):
                weights[normalise_text(q)] = w
    finally:
        tokenizer.padding_side = side

    find = _chat_question_finder(tokenizer, questions) if chat else None

    def override(input_ids):
        rows = []
        for ids in input_ids:
            if chat:
                question = normalise_text(find(tokenizer.decode(ids, skip_special_tokens=False)))
            else:
                question = normalise_text(_question_of(tokenizer.decode(ids, skip_special_tokens=True)))
            if question not in weights:
                raise ValueError(f"MC context with an unrouted question: {question[:80]!r}")
            rows.append(weights[question])
        return torch.stack(rows)
    return override


LOGITS_BUDGET = 2**28  # floats in one batch's [rows, tokens, vocab] logits (1 GB in fp32)
MC_TOKENS = 256        # primer + question + the longest choice, rounded up


def mc_batch_size(batch_size: int, vocab_size: int) -> int:
    """Rows per MC forward pass so one logits tensor stays within ``LOGITS_BUDGET``.

    lm-eval log-softmaxes the full [rows, tokens, vocab] logits and the prefix cache concatenates
    them, so a 152k-vocabulary model (Qwen2.5) at 16 rows held ~10 GB and was OOM-killed here.
    """
    return max(1, min(batch_size, LOGITS_BUDGET // (MC_TOKENS * vocab_size)))


def truthfulqa_mc(model, tokenizer, examples: Sequence | None = None, data_dir: Path | str | None = None,
                  limit: int | None = None, batch_size: int = 8, prefix_cache: bool = True,
                  bf16: bool = False, chat: bool = False) -> dict:
    """TruthfulQA MC1 and MC2 of an already loaded model, with lm-eval's conventions.

    Args:
        model: a causal LM (a transformers model or a peft ``PeftModel``); its train/eval mode
            is restored afterwards.
        tokenizer: its tokenizer; left or right padding both work (lm-eval pads right itself).
        examples: ``load_truthfulqa_mc`` Examples; default: the eval half from ``data_dir``.
        data_dir: data directory for the default examples (None: ``MOCAE_DATA_DIR``).
        limit: score only the first ``limit`` questions (deterministic).
        batch_size: requests per forward pass (at most; capped by ``mc_batch_size`` for large vocabularies).
        prefix_cache: run the shared 6-shot primer once (:class:`SharedPrefixLM`; same logits,
            ~5x fewer tokens). Off automatically for a system without ``Capabilities.kv_cache`` (X-LoRA).
        bf16: bf16 autocast for the forward passes (faster on CPU; the mode says so).
        chat: score in chat format (:data:`MODE_CHAT`: the question as the user turn of the chat
            template, no primer) instead of lm-eval's 6-shot primer (:data:`MODE`).

    Returns:
        {"mc1", "mc2", "n", "mode", "per_question": [{"question", "mc1", "mc2"}, ...]}.

    Raises:
        ValueError: ``chat`` with a tokenizer that has no chat template, or no examples.
    """
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"chat-format MC needs a chat template; tokenizer "
                         f"{getattr(tokenizer, 'name_or_path', '')!r} has none (switch truthfulqa_mc_chat off)")
    if examples is None:
        from mocae.data import load_truthfulqa_mc

        examples = load_truthfulqa_mc(Path(data_dir) if data_dir is not None else None, split="eval")
    examples = list(examples)[:limit] if limit is not None else list(examples)
    if not examples:
        raise ValueError("truthfulqa_mc got an empty example list (check limit and the data split)")
    docs = to_hf_docs(examples)

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    caps = capabilities_of(model)
    bf16 = caps.autocast_bf16(bf16)  # peft Arrow fails under autocast: scored in fp32
    was_training = model.training
    routed = caps.per_request_routing
    if routed:
        model.routing_override = question_routing(model, tokenizer, [d["question"] for d in docs], batch_size,
                                                  chat=chat)
    tasks = [t + (CHAT_SUFFIX if chat else "") for t in (TASK_MC1, TASK_MC2)]
    try:
        with tempfile.TemporaryDirectory(prefix="mocae_tqa_mc_") as tmp:
            include = write_task_dir(docs, Path(tmp))
            # include_defaults=False: index only our two tasks (fast; no name collisions).
            manager = TaskManager(include_path=str(include), include_defaults=False)
            # HFLM puts the model in eval mode and scores (context, " " + choice) pairs,
            # right-padded internally, so the tokenizer's padding side does not matter.
            scorer = SharedPrefixLM(model) if prefix_cache and caps.kv_cache else model
            # HFLM wraps every forward in its own autocast (disabled unless mixed_precision_dtype).
            rows = mc_batch_size(batch_size, len(tokenizer))
            lm = HFLM(pretrained=scorer, tokenizer=tokenizer, batch_size=rows,
                      mixed_precision_dtype=torch.bfloat16 if bf16 else None)
            out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager,
                                  num_fewshot=0, apply_chat_template=chat, log_samples=True,
                                  bootstrap_iters=0, cache_requests=False)
    finally:
        model.train(was_training)
        if routed:
            model.routing_override = None

    per_task = {}
    for task in tasks:
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        if len(samples) != len(docs):
            raise RuntimeError(f"lm-eval scored {len(samples)} of {len(docs)} questions for {task}")
        per_task[task] = [float(s["acc"]) for s in samples]
    per_question = [{"question": doc["question"], "mc1": m1, "mc2": m2}
                    for doc, m1, m2 in zip(docs, per_task[tasks[0]], per_task[tasks[1]], strict=True)]
    return {
        "mc1": float(out["results"][tasks[0]]["acc,none"]),
        "mc2": float(out["results"][tasks[1]]["acc,none"]),
        "n": len(docs),
        "mode": (MODE_CHAT if chat else MODE) + ("; routed on the question alone" if routed else "") + ("; bf16 autocast" if bf16 else ""),
        "per_question": per_question,
    }
