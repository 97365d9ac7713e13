"""Preference pairs for DPO-trained experts, from training sources only (DESIGN.md section 4).

Every builder returns plain rows ``{prompt, chosen, rejected, source, axis}`` (``source`` is the
dataset the prompt comes from) and refuses an evaluation-side prompt: a prompt of TruthfulQA's
eval half, AlpacaEval's eval side, HarmBench (test, and val: the router calibrates on it),
StrongREJECT, AdvBench or XSTest raises ``ValueError`` naming the prompt and the set. The
loaders below select training sides, so the check only fires when something upstream is wrong.

- honest (``truthfulqa``): TruthfulQA **train-side** questions, a correct answer over an incorrect
  one, up to ``pairs_per_question`` per question. DESIGN measured this recipe: MC2 45.1 -> 62.7.
- helpful (``alpaca_eval_gpt4``): GPT-4's AlpacaEval judgements (davinci-003 vs another model) on
  **judge_train** instructions: winner over loser; draws dropped; repeated judgements of one pair
  are a majority vote (ties dropped). Extension point: on-policy pairs (the base model's own
  samples ranked by a scorer that is not the evaluation judge) belong in ``PREFERENCE_SOURCES``
  and a builder here; they are not built yet.
- harmless: ``refusal_over_compliance``: a safety-tuned-llamas refusal over the base model's own
  answer on that harmful prompt (pairs where the base model already refuses are dropped);
  ``answer_over_refusal``: the base model's answer over a generic refusal on benign prompts that
  sound risky (``benign_sources``: nearest Alpaca / TruthfulQA train questions; never XSTest).
  With ``harmless_chosen: sft_twin`` both refusals come from the expert's SFT twin instead (the SFT
  expert on the same data, trained first): its refusal is chosen on harmful prompts, and its refusal
  of a benign prompt is the rejected side there, so DPO sees the model family's own words on both
  sides (DESIGN section 4: off-policy chosen refusals left this backbone's refusals unchanged).
  The base model's answers are generated greedily in batches (``mocae.generation.generate_batch``)
  and cached as JSON in ``<experts root>/<backbone>/base_answers/`` keyed by a hash of
  (backbone, max new tokens, prompts), a cache of their own (not ``mocae.generation_cache``).

``preference_rows(cfg, data_dir)`` builds the rows an expert config trains on;
``preference_prompts(cfg, data_dir)`` lists their prompts without generating anything (for the
contamination check).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

from mocae.data import (
    Example,
    alpaca_eval_split_map,
    load_advbench,
    load_alpaca_eval,
    load_harmbench,
    load_safety_refusals,
    load_strongreject,
    load_truthfulqa,
    load_xstest,
    normalise_text,
)
from mocae.data.readers import resolve_root
from mocae.experts.config import ExpertConfig
from mocae.experts.train import expert_dir
from mocae.paths import atomic_write_json

# Rejected side of "answer_over_refusal": generic refusals (a safety-tuned-llamas refusal names
# the harm of its own prompt, which would not fit a benign one).
GENERIC_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I cannot help with that request.",
    "I'm sorry, I can't assist with that. Is there something else I can help you with?",
    "As an AI assistant, I can't provide that information.",
)
ROW_KEYS = ("prompt", "chosen", "rejected", "source", "axis")


# The evaluation side -------------------------------------------------------------------------


class EvalSidePrompts:
    """The prompts nothing that trains may read, with the set each belongs to.

    Args:
        sets: {normalised prompt: set name}; see ``eval_side_prompts``.
    """

    def __init__(self, sets: dict[str, str]):
        self.sets = dict(sets)

    def which(self, prompt: str) -> str | None:
        """The evaluated set ``prompt`` belongs to, or None."""
        return self.sets.get(normalise_text(prompt))

    def check(self, prompt: str, builder: str) -> None:
        """Raise when ``prompt`` is on the evaluation side.

        Raises:
            ValueError: naming the prompt, its set and the builder that received it.
        """
        found = self.which(prompt)
        if found is not None:
            raise ValueError(f"{builder} preference pairs: the prompt {prompt[:100]!r} is in the evaluation set "
                             f"{found}; preference data must come from training sources only")


@lru_cache(maxsize=4)
def _eval_side_cached(root: str | None) -> dict[str, str]:
    data_dir = Path(root) if root is not None else None
    sets: dict[str, str] = {}

    def add(name: str, examples) -> None:
        for ex in examples:
            sets.setdefault(normalise_text(ex.prompt), name)

    add("TruthfulQA eval half", load_truthfulqa(data_dir, split="eval"))
    add("AlpacaEval eval side", load_alpaca_eval(data_dir, split="eval"))
    add("HarmBench test", load_harmbench(data_dir, split="test"))
    if data_dir is not None:  # the Hub copy has no val split (its "test" holds all 400)
        add("HarmBench val (router calibration)", load_harmbench(data_dir, split="val"))
    add("StrongREJECT", load_strongreject(data_dir))
    add("AdvBench", load_advbench(data_dir))
    add("XSTest", load_xstest(data_dir))
    return sets


def eval_side_prompts(data_dir: Path | None = None) -> EvalSidePrompts:
    """The evaluation-side prompts of every evaluated set (read once per data directory)."""
    root = resolve_root(data_dir)
    return EvalSidePrompts(_eval_side_cached(str(Path(root).resolve()) if root is not None else None))


def _row(prompt: str, chosen: str, rejected: str, source: str, axis: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": source, "axis": axis}


# Honest ---------------------------------------------------------------------------------------


_NO_COMMENT = re.compile(r"^\s*i have no comment\W*$", re.I)


def honest_pairs(questions: list[Example], pairs_per_question: int, guard: EvalSidePrompts,
                 seed: int = 0) -> list[dict]:
    """Correct over incorrect TruthfulQA answers, up to ``pairs_per_question`` per question.

    Per question the correct answers go best answer first, the others shuffled, "I have no
    comment" last (a model that learns to hedge wins MC2 and loses informativeness); the incorrect
    ones shuffled. The k-th pair takes correct[k mod n_correct] and incorrect[k mod n_incorrect]
    for k below max(n_correct, n_incorrect), so no pair repeats.

    Args:
        questions: TruthfulQA Examples (references {"best", "correct", "incorrect"}), train side.
        guard: ``eval_side_prompts(data_dir)``.

    Raises:
        ValueError: a question is on the evaluation side (TruthfulQA's eval half).
    """
    rng = random.Random(seed)
    out = []
    for ex in questions:
        guard.check(ex.prompt, "honest")
        refs = ex.references or {}
        best = (refs.get("best") or "").strip()
        correct = list(dict.fromkeys(a.strip() for a in refs.get("correct", []) if a.strip()))
        incorrect = list(dict.fromkeys(a.strip() for a in refs.get("incorrect", []) if a.strip()))
        rest = [a for a in correct if a != best]
        rng.shuffle(rest)
        correct = ([best] if best in correct else []) + sorted(rest, key=lambda a: bool(_NO_COMMENT.match(a)))
        rng.shuffle(incorrect)
        if not correct or not incorrect:
            continue
        for k in range(min(pairs_per_question, max(len(correct), len(incorrect)))):
            chosen, rejected = correct[k % len(correct)], incorrect[k % len(incorrect)]
            if normalise_text(chosen) != normalise_text(rejected):
                out.append(_row(ex.prompt, chosen, rejected, ex.source, "honest"))
    return out


# Helpful --------------------------------------------------------------------------------------


def helpful_pairs(annotations: list[dict], sides: dict[str, str], guard: EvalSidePrompts) -> list[dict]:
    """Winner over loser of GPT-4's AlpacaEval judgements, judge-train instructions only.

    Draws (preference 0 or 1.5) are dropped. One (instruction, output_1, output_2) judged more than
    once is decided by majority (a tie is dropped); identical pairs are kept once.

    Args:
        annotations: ``load_alpaca_eval_annotations`` dicts (preference 1: output_1 better, 2: output_2).
        sides: ``alpaca_eval_split_map(data_dir)``: {normalised instruction: side}.
        guard: ``eval_side_prompts(data_dir)``.

    Raises:
        ValueError: an instruction is not on the judge-train side (eval, judge-dev, or not AlpacaEval).
    """
    votes: dict[tuple[str, str, str], int] = defaultdict(int)
    first: dict[tuple[str, str, str], str] = {}
    for r in annotations:
        instruction = r["instruction"].strip()
        guard.check(instruction, "helpful")
        side = sides.get(normalise_text(instruction))
        if side != "judge_train":
            where = f"AlpacaEval's {side} side" if side else "no AlpacaEval instruction"
            raise ValueError(f"helpful preference pairs: the instruction {instruction[:100]!r} is {where}; "
                             "only judge_train instructions may be trained on")
        if r["preference"] not in (1.0, 2.0):
            continue
        key = (normalise_text(instruction), r["output_1"], r["output_2"])
        first.setdefault(key, instruction)
        votes[key] += 1 if r["preference"] == 2.0 else -1
    out, seen = [], set()
    for key, vote in votes.items():
        if vote == 0:
            continue
        _, out1, out2 = key
        chosen, rejected = (out2, out1) if vote > 0 else (out1, out2)
        if not chosen.strip() or chosen.strip() == rejected.strip():
            continue
        dedupe = (key[0], chosen.strip(), rejected.strip())
        if dedupe not in seen:
            seen.add(dedupe)
            out.append(_row(first[key], chosen.strip(), rejected.strip(), "alpaca_eval", "helpful"))
    return out


# Harmless -------------------------------------------------------------------------------------


def _is_refusal(answer: str) -> bool:
    # The string-match detector is a pure function (no torch, no evaluation state); imported lazily.
    from mocae.refusal import is_refusal

    return is_refusal(answer)


def harmless_pairs(harmful: list[Example], benign: list[Example], base_answers: dict[str, str],
                   guard: EvalSidePrompts, seed: int = 0, twin_answers: dict[str, str] | None = None) -> list[dict]:
    """Refusal over the base model's compliance (harmful) and its answer over a refusal (benign).

    Args:
        harmful: harmful training prompts with a refusal as completion (safety-tuned-llamas).
        benign: benign prompts that sound risky (``benign_examples``); their completions are unused.
        base_answers: {prompt: the base model's greedy answer} for every prompt above.
        guard: ``eval_side_prompts(data_dir)``.
        twin_answers: {prompt: the SFT twin's greedy answer} (``harmless_chosen='sft_twin'``): on a
            harmful prompt its refusal is chosen instead of the dataset's (no refusal, no pair); on a
            benign prompt its refusal, where it refuses, is rejected instead of a generic one.

    Returns:
        Rows; a harmful prompt the base model already refuses, or a benign one it refuses (or
        answers with nothing), makes no pair.

    Raises:
        ValueError: a prompt is on the evaluation side (HarmBench, StrongREJECT, AdvBench, XSTest, ...),
            or a base answer is missing.
    """
    rng = random.Random(seed)
    out = []
    for ex in harmful + benign:
        guard.check(ex.prompt, "harmless")
        for who, answers in (("base-model", base_answers), ("SFT twin", twin_answers)):
            if answers is not None and ex.prompt not in answers:
                raise ValueError(f"harmless preference pairs: no {who} answer for {ex.prompt[:100]!r}")
    def twin_refusal(prompt: str) -> str:  # the twin's answer where it refuses, else ""
        answer = twin_answers[prompt].strip()
        return answer if answer and _is_refusal(answer) else ""

    for ex in harmful:
        answer = base_answers[ex.prompt].strip()
        refusal = twin_refusal(ex.prompt) if twin_answers is not None else (ex.completion or "").strip()
        if refusal and answer and not _is_refusal(answer):
            out.append(_row(ex.prompt, refusal, answer, ex.source, "harmless"))
    for ex in benign:
        answer = base_answers[ex.prompt].strip()
        if answer and not _is_refusal(answer):
            rejected = (twin_refusal(ex.prompt) if twin_answers is not None else "") or rng.choice(GENERIC_REFUSALS)
            out.append(_row(ex.prompt, answer, rejected, ex.source, "harmless"))
    return out


def base_answers(prompts: list[str], backbone: str, cache: Path, max_new_tokens: int,
                 model_and_tokenizer=None, batch_size: int = 16, progress: bool = True,
                 adapter: Path | None = None) -> dict[str, str]:
    """The base model's greedy answers to ``prompts`` (or an adapter's), from ``cache`` when asked before.

    Args:
        prompts: user messages.
        backbone: the backbone's name (part of the cache key; its weights are fixed per name).
        cache: folder of ``<key>.json`` files, key = sha256 of (backbone, max_new_tokens, prompts
            [, the adapter folder's name]).
        model_and_tokenizer: the loaded base model (no adapter) and tokenizer; loaded when needed.
            With ``adapter`` a fresh copy is loaded instead (peft would wrap this one in place).
        adapter: an expert's adapter folder: its answers instead of the base model's. Its folder
            name is the expert's stage key, so a retrained expert is a new cache entry.

    Returns:
        {prompt: answer}.
    """
    prompts = list(dict.fromkeys(prompts))
    if not prompts:
        return {}
    keyed = [backbone, max_new_tokens, prompts] + ([Path(adapter).name] if adapter is not None else [])
    key = hashlib.sha256(json.dumps(keyed, ensure_ascii=False).encode()).hexdigest()
    path = Path(cache) / f"{key[:16]}.json"
    if path.is_file():
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("prompts") == prompts:
            return dict(zip(prompts, record["answers"]))
    from mocae.generation import generate_batch

    if model_and_tokenizer is None or adapter is not None:
        from mocae.backbones import load_backbone

        model_and_tokenizer = load_backbone(backbone)
    model, tokenizer = model_and_tokenizer
    if adapter is not None:
        from peft import PeftModel

        from mocae.experts.checks import check_adapter

        check_adapter(adapter, backbone, model=model)
        model = PeftModel.from_pretrained(model, str(adapter))
    was_training = model.training
    model.eval()
    try:
        answers = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 progress=progress, desc="SFT twin answers" if adapter is not None else "base answers")
    finally:
        model.train(was_training)
    atomic_write_json(path, {"backbone": backbone, "max_new_tokens": max_new_tokens, "greedy": True,
                             "adapter": Path(adapter).name if adapter is not None else None,
                             "prompts": prompts, "answers": answers})
    return dict(zip(prompts, answers))


# Per expert config ---------------------------------------------------------------------------


def _cap(rows: list[dict], max_pairs: int | None, seed: int) -> list[dict]:
    """Shuffle, then take up to ``max_pairs`` round-robin over prompts (every prompt's first pair first)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    rank: dict[str, int] = defaultdict(int)
    keyed = []
    for i, r in enumerate(rows):
        p = normalise_text(r["prompt"])
        keyed.append((rank[p], i, r))
        rank[p] += 1
    ordered = [r for *_, r in sorted(keyed, key=lambda t: (t[0], t[1]))]
    return ordered if max_pairs is None else ordered[:max_pairs]


def _harmless_inputs(cfg: ExpertConfig, data_dir, guard: EvalSidePrompts, embed=None):
    """(harmful, benign) Examples the harmless pairs are built from, evaluated prompts filtered out."""
    from mocae.experts.dataset import benign_examples

    sources = cfg.pair_sources()
    n = cfg.max_pairs
    refusals = [e for e in load_safety_refusals(data_dir) if e.completion and guard.which(e.prompt) is None]
    rng = random.Random(cfg.seed)
    rng.shuffle(refusals)
    if "answer_over_refusal" not in sources:
        return refusals[:n], []
    if "refusal_over_compliance" not in sources:
        n_harmful = 0
        n_benign = n if n is not None else len(refusals)
    else:
        n_harmful = len(refusals) if n is None else min(len(refusals), round(n * (1 - cfg.benign_fraction)))
        n_benign = (n - n_harmful) if n is not None else round(n_harmful * cfg.benign_fraction / (1 - cfg.benign_fraction))
    # benign_examples ranks "alpaca_nearest" rows against the refusal prompts (all of them when no
    # harmful pairs are wanted); XSTest is never a benign source.
    benign = benign_examples(cfg, n_benign, refusals[:n_harmful] or refusals, data_dir, embed=embed)
    benign = [e for e in benign if guard.which(e.prompt) is None]
    return refusals[:n_harmful], benign


def preference_prompts(cfg: ExpertConfig, data_dir: Path | None = None, embed=None) -> list[dict]:
    """The prompts ``cfg``'s pairs are built from, ``{prompt, source, axis}``, without generating.

    For harmless this is a superset of the trained prompts (a prompt whose base answer makes no
    pair is dropped later). The contamination check can register these before any model runs.
    """
    guard = eval_side_prompts(data_dir)
    if cfg.axis == "harmless":
        harmful, benign = _harmless_inputs(cfg, data_dir, guard, embed)
        return [{"prompt": e.prompt, "source": e.source, "axis": "harmless"} for e in harmful + benign]
    seen, out = set(), []
    for r in preference_rows(cfg, data_dir):
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            out.append({"prompt": r["prompt"], "source": r["source"], "axis": r["axis"]})
    return out


def preference_rows(cfg: ExpertConfig, data_dir: Path | None = None, *, root: Path | None = None,
                    model_and_tokenizer=None, progress: bool = False, embed=None) -> list[dict]:
    """The preference pairs ``cfg`` (an expert with trainer "dpo") trains on, in training order.

    Args:
        cfg: the expert's config (``pair_sources()``, ``max_pairs``, ``pairs_per_question``, seed...).
        data_dir: dataset directory (default ``$MOCAE_DATA_DIR``).
        root: experts root (default ``$MOCAE_CACHE/experts``): harmless caches base answers under it.
        model_and_tokenizer: the loaded base model, for harmless (loaded on demand otherwise).
        progress: progress bar while generating base answers.
        embed: texts -> unit-norm embeddings for ``alpaca_nearest`` (default MiniLM).

    Returns:
        Rows ``{prompt, chosen, rejected, source, axis}``, capped at ``max_pairs`` (round-robin over
        prompts), shuffled with ``cfg.seed``.

    Raises:
        ValueError: no pairs, or an evaluation-side prompt reached a builder.
    """
    guard = eval_side_prompts(data_dir)
    sources = cfg.pair_sources()
    rows: list[dict] = []
    if cfg.axis == "honest":
        from mocae.data.heldout import evaluated, without_evaluated_answers

        held = evaluated(data_dir)  # answers shared with eval-side questions are not trained on
        questions = [without_evaluated_answers(q, held) for q in load_truthfulqa(data_dir, split="train")]
        rows = honest_pairs([q for q in questions if q.references["correct"] and q.references["incorrect"]],
                            cfg.pairs_per_question, guard, cfg.seed)
    elif cfg.axis == "helpful":
        if "alpaca_eval_gpt4" in sources:
            # A pure data loader (mocae.data only, no torch); imported lazily.
            from mocae.data.judge_files import load_alpaca_eval_annotations

            sides = alpaca_eval_split_map(data_dir)
            train_side = [a for a in load_alpaca_eval_annotations(data_dir)
                          if sides.get(normalise_text(a["instruction"])) == "judge_train"]
            rows = helpful_pairs(train_side, sides, guard)
    elif cfg.axis == "harmless":
        harmful, benign = _harmless_inputs(cfg, data_dir, guard, embed)
        prompts = [e.prompt for e in harmful + benign]
        cache = expert_dir(cfg, root).parent / "base_answers"
        answers = base_answers(prompts, cfg.backbone, cache, cfg.base_answer_tokens,
                               model_and_tokenizer=model_and_tokenizer, progress=progress)
        twin = None
        if cfg.harmless_chosen == "sft_twin":
            from mocae.experts.train import train_expert  # trains with its own backbone copy

            twin_dir = train_expert(cfg.sft_twin(), root=root, data_dir=data_dir, progress=progress)
            twin = base_answers(prompts, cfg.backbone, cache, cfg.base_answer_tokens, progress=progress,
                                adapter=twin_dir)
        rows = harmless_pairs(harmful, benign, answers, guard, cfg.seed, twin_answers=twin)
    else:
        raise ValueError(f"no preference pairs for axis {cfg.axis!r}")
    rows = _cap(rows, cfg.max_pairs, cfg.seed)
    if not rows:
        raise ValueError(f"no preference pairs for axis {cfg.axis!r} from {sources} (check the data files)")
    return rows


def pair_counts(rows: list[dict]) -> dict[str, int]:
    """Pairs per prompt source, for training.json."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["source"]] = counts.get(r["source"], 0) + 1
    return counts
