"""Helpfulness judge: P(output b is better than output a) for an instruction.

A MiniLM cross-encoder scores (instruction, output); hand-made style features (log-length,
list/markdown structure, repetition, refusal phrases...) enter its head linearly; pairs are
compared with a Bradley-Terry loss. Trained on AlpacaEval's GPT-4 judgements of THE AlpacaEval
split's judge-train instructions (``mocae.data.alpaca_eval_split_map``), settings chosen on
judge-dev, validated on the eval side only: the instructions win rates are measured on. Each
pair's order is swapped so that exactly half the labels say "b is better". GPT-4 largely
prefers the longer answer, so the report puts "longer answer wins" beside the judge, also on
length-matched pairs, where the judge has to beat it by ``TARGET_GAIN``.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import torch

from mocae.data import DataError, alpaca_eval_split_map, normalise_text
from mocae.data.loaders import ALPACA_EVAL
from mocae.data.splits import ALPACA_EVAL_SIDES
from mocae.evaluation.judges import metrics, training
from mocae.evaluation.judges.encoder import Scorer, load_encoder, load_scorer, save_scorer
from mocae.evaluation.judges.sources import ALPACA_EVAL_ANNOTATIONS, load_alpaca_eval_annotations
from mocae.evaluation.judges.store import Judge
from mocae.refusal import is_refusal

STYLE_NAMES = ("log_chars", "log_words", "distinct_words", "refusal", "bullets", "numbered", "bold",
               "log_lines", "ends_cleanly", "paragraphs", "as_an_ai", "instruction_overlap",
               "ascii_share", "code_block", "colons")
LENGTH_MATCHED = 1.5  # longer/shorter below this counts as length-matched (the definition)
TARGET_GAIN = 0.05  # the judge must beat "longer wins" by 5 points on length-matched pairs
TARGET = ("agreement on length-matched eval-side pairs >= 5 points above 'longer wins', "
          "with the paired 95% interval of the gain above 0")


def style_features(instruction: str, output: str) -> list[float]:
    """Cheap surface features of an output; GPT-4 rewards structure and punishes refusals.

    Counts are log-scaled so a very long output does not dominate the linear head.
    """
    words = output.split()
    lines = output.split("\n")
    inst = set(instruction.lower().split())
    return [
        math.log1p(len(output)), math.log1p(len(words)), len(set(words)) / max(len(words), 1),
        float(is_refusal(output)) if output.strip() else 1.0,
        math.log1p(sum(ln.strip().startswith(("-", "*", "\u2022")) for ln in lines)),
        math.log1p(sum(bool(re.match(r"\s*\d+[.)]", ln)) for ln in lines)),
        math.log1p(output.count("**")), math.log1p(len(lines)),
        float(output.rstrip().endswith((".", "!", "?", "```", ")", '"'))),
        math.log1p(output.count("\n\n")), float("as an ai" in output.lower()),
        len(inst & set(output.lower().split())) / max(len(inst), 1),
        sum(c.isascii() for c in output) / max(len(output), 1), float("```" in output),
        math.log1p(output.count(":")),
    ]


def split_annotations(rows: list[dict], sides: dict[str, str]) -> dict[str, list[dict]]:
    """Annotation rows by their instruction's side of THE AlpacaEval split.

    Args:
        rows: ``load_alpaca_eval_annotations`` dicts (with their "line").
        sides: ``mocae.data.alpaca_eval_split_map``: {normalised instruction: side}.

    Returns:
        {"judge_train": [...], "judge_dev": [...], "eval": [...]}.

    Raises:
        DataError: an annotation's instruction is not an AlpacaEval instruction (file and line named).
    """
    out = {side: [] for side in ALPACA_EVAL_SIDES}
    for r in rows:
        side = sides.get(normalise_text(r["instruction"]))
        if side is None:
            raise DataError(ALPACA_EVAL_ANNOTATIONS, f"is not an instruction of {ALPACA_EVAL}: "
                            f"{r['instruction'][:80]!r}", line=r.get("line"), field="instruction")
        out[side].append(r)
    return out


def balanced_pairs(rows: list[dict], seed: int = 0) -> list[dict]:
    """Decisive judgements as pairs {instruction, a, b, b_better}, half of them with b the winner.

    Draws (preference 0 or 1.5) are dropped. Rows are shuffled and the k-th pair is ordered so
    that its label is k % 2: the judge cannot learn "the second answer tends to win".
    """
    decisive = [r for r in rows if r["preference"] in (1.0, 2.0)]
    random.Random(seed).shuffle(decisive)
    out = []
    for k, r in enumerate(decisive):
        winner, loser = (r["output_2"], r["output_1"]) if r["preference"] == 2.0 else (r["output_1"], r["output_2"])
        b_better = k % 2 == 1
        a, b = (loser, winner) if b_better else (winner, loser)
        out.append({"instruction": r["instruction"], "a": a, "b": b, "b_better": b_better})
    return out


class HelpfulJudge(Judge):
    """Pairwise preference judge. ``prefer(instructions, outputs_a, outputs_b)`` -> P(b better)."""

    kind = "helpful"

    def __init__(self, scorer: Scorer, tokenizer, mean, std, max_length: int = 256, validation=None):
        super().__init__(validation)
        self.scorer, self.tokenizer, self.max_length = scorer, tokenizer, max_length
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def _features(self, instructions, outputs) -> np.ndarray:
        feats = np.array([style_features(i, o) for i, o in zip(instructions, outputs)], dtype=np.float32)
        return (feats - self.mean) / self.std

    def scores(self, instructions: list[str], outputs: list[str]) -> np.ndarray:
        """One utility score per (instruction, output); only differences between outputs mean anything."""
        keys = list(dict.fromkeys(zip(instructions, outputs)))  # score each distinct pair once
        encs = training.tokenize(self.tokenizer, [k[0] for k in keys], [k[1] for k in keys], self.max_length)
        feats = self._features([k[0] for k in keys], [k[1] for k in keys])
        logits = training.predict(self.scorer, self.tokenizer, encs, feats)[:, 0]
        where = {k: i for i, k in enumerate(keys)}
        return np.array([logits[where[k]] for k in zip(instructions, outputs)], dtype=np.float64)

    def prefer(self, instructions: list[str], outputs_a: list[str], outputs_b: list[str]) -> list[float]:
        """P(output_b is better than output_a) for each instruction.

        Args:
            instructions: the user instructions.
            outputs_a, outputs_b: two candidate answers per instruction.
        """
        if not len(instructions) == len(outputs_a) == len(outputs_b):
            raise ValueError("instructions, outputs_a and outputs_b must have the same length")
        if not instructions:
            return []
        s = self.scores(list(instructions) * 2, list(outputs_a) + list(outputs_b))
        n = len(instructions)
        return training.sigmoid(s[n:] - s[:n]).tolist()

    def _meta(self):
        return {"max_length": self.max_length, "mean": self.mean.tolist(), "std": self.std.tolist(),
                "features": list(STYLE_NAMES)}

    def _save(self, folder: Path) -> None:
        save_scorer(self.scorer, self.tokenizer, folder)

    @classmethod
    def _load(cls, folder: Path, meta: dict) -> "HelpfulJudge":
        scorer, tokenizer = load_scorer(folder)
        return cls(scorer, tokenizer, meta["mean"], meta["std"], meta["max_length"])


class StyleJudge:
    """The style-only linear Bradley-Terry model (no encoder): a baseline reported beside the judge."""

    def __init__(self, coef, mean, std):
        self.coef, self.mean, self.std = np.asarray(coef), np.asarray(mean), np.asarray(std)

    def prefer(self, instructions, outputs_a, outputs_b) -> list[float]:
        fa = np.array([style_features(i, o) for i, o in zip(instructions, outputs_a)])
        fb = np.array([style_features(i, o) for i, o in zip(instructions, outputs_b)])
        return training.sigmoid(((fb - fa) / self.std) @ self.coef).tolist()


def _style_weights(x_diff: np.ndarray, b_better: np.ndarray, seed: int) -> np.ndarray:
    """Weights of a logistic regression without intercept on feature differences (antisymmetric)."""
    from sklearn.linear_model import LogisticRegression

    if len(set(b_better.tolist())) < 2:
        return np.zeros(x_diff.shape[1], dtype=np.float32)
    model = LogisticRegression(fit_intercept=False, C=1.0, max_iter=2000, random_state=seed)
    return model.fit(x_diff, b_better).coef_[0].astype(np.float32)


def _gain_interval(hit_judge: np.ndarray, hit_len: np.ndarray, seed: int = 0, n: int = 2000) -> list[float]:
    """95% paired-bootstrap interval of (judge agreement - length agreement), in points of share."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(hit_judge), size=(n, len(hit_judge)))
    gains = hit_judge[idx].mean(1) - hit_len[idx].mean(1)
    return [float(np.quantile(gains, 0.025)), float(np.quantile(gains, 0.975))]


def validation_pairs(rows: list[dict], n_pairs: int | None, n_matched: int | None, seed: int) -> tuple[list[dict], int]:
    """Balanced pairs of one side: a random sample of ``n_pairs`` for the overall figures, then
    every further length-matched pair (up to ``n_matched`` in all), since the length-matched gain
    is the figure that needs a large n and those pairs are a sixth of the side.

    Returns:
        (pairs, n_overall): the first ``n_overall`` pairs are the overall sample.
    """
    pairs = balanced_pairs(rows, seed=seed)
    sample = pairs if n_pairs is None else pairs[:n_pairs]
    matched = metrics.length_ratio([p["a"] for p in pairs], [p["b"] for p in pairs]) < LENGTH_MATCHED
    in_sample = int(matched[: len(sample)].sum())
    room = None if n_matched is None else max(0, n_matched - in_sample)
    extra = [p for p, m in zip(pairs[len(sample):], matched[len(sample):]) if m][:room]
    return sample + extra, len(sample)


def evaluate_pairs(judge, pairs: list[dict], n_overall: int | None = None) -> dict:
    """Agreement of the judge and of "longer wins" with the labels, overall and length-matched.

    Args:
        judge: anything with ``prefer``.
        pairs: balanced pairs {instruction, a, b, b_better}.
        n_overall: the first ``n_overall`` pairs give the overall figures (default all); the
            length-matched figures use every length-matched pair of ``pairs``.

    Returns:
        agreement and length baseline overall, the same on length-matched pairs, the gain over
        "longer wins" there with its paired 95% interval, ``target_met``, and the n of each.
    """
    n_overall = len(pairs) if n_overall is None else n_overall
    ins, a, b = [p["instruction"] for p in pairs], [p["a"] for p in pairs], [p["b"] for p in pairs]
    y = np.array([p["b_better"] for p in pairs])
    p_judge = np.array(judge.prefer(ins, a, b))
    p_len = metrics.length_preference(a, b)
    matched = metrics.length_ratio(a, b) < LENGTH_MATCHED
    head = slice(0, n_overall)
    out = {"agreement": metrics.agreement(p_judge[head], y[head]),
           "length_baseline_agreement": metrics.agreement(p_len[head], y[head]),
           "n_pairs": n_overall, "n_length_matched": int(matched.sum())}
    if matched.any():
        out["agreement_length_matched"] = metrics.agreement(p_judge[matched], y[matched])
        out["length_baseline_length_matched"] = metrics.agreement(p_len[matched], y[matched])
        hit_j = np.where(p_judge == 0.5, 0.5, (p_judge > 0.5) == y)[matched]
        hit_l = np.where(p_len == 0.5, 0.5, (p_len > 0.5) == y)[matched]
        gain = out["agreement_length_matched"] - out["length_baseline_length_matched"]
        ci = _gain_interval(hit_j.astype(float), hit_l.astype(float))
        out.update(length_matched_gain=gain, length_matched_gain_ci95=ci,
                   target_met=bool(gain >= TARGET_GAIN and ci[0] > 0))
    else:
        out["target_met"] = False
    return out


def train(data_dir=None, *, encoder=None, n_train_pairs: int = 4000, n_dev_pairs: int = 400,
          n_eval_pairs: int | None = 1500, n_eval_matched: int | None = None, seed: int = 0, log=print,
          **fit) -> HelpfulJudge:
    """Fine-tune the helpfulness judge on judge-train instructions and validate it on eval ones.

    Args:
        data_dir: data directory (default ``$MOCAE_DATA_DIR``).
        encoder: BERT folder to start from (default all-MiniLM-L6-v2).
        n_train_pairs: judge-train pairs fine-tuned on (CPU budget; the style model uses all).
        n_dev_pairs: judge-dev pairs in the dev sample (plus every length-matched dev pair).
        n_eval_pairs: eval-side pairs in the overall sample (None: all decisive ones).
        n_eval_matched: cap on the length-matched eval-side pairs (None: all, about 2,700 on the
            real data, so the gain's interval is about +-2 points).
        fit: ``FitConfig`` fields (epochs, lr, batch_size, max_length, time_budget...).

    Returns:
        the judge, its ``validation`` filled with eval-side metrics (judge-dev ones under "dev").
    """
    # Chosen by judge-dev agreement on length-matched pairs: freezing the lower half (embeddings
    # + 3 layers) and 192 tokens fit ~3,700 pairs in 10 CPU minutes instead of ~1,700. Early
    # stopping on the same dev figure (before training and at 3 points) keeps the best state.
    defaults = {"epochs": 1, "time_budget": 600, "freeze_layers": 3, "lr": 5e-5, "max_length": 192,
                "select_checks": 3}
    cfg = training.FitConfig(**{**defaults, **fit, "seed": seed})
    sides = split_annotations(load_alpaca_eval_annotations(data_dir), alpaca_eval_split_map(data_dir))
    for side, rows in sides.items():
        if not any(r["preference"] in (1.0, 2.0) for r in rows):
            raise DataError(ALPACA_EVAL_ANNOTATIONS, f"has no decisive judgement of a {side} instruction")
    train_pairs_all = balanced_pairs(sides["judge_train"], seed=seed)
    pairs = {"train": train_pairs_all[:n_train_pairs]}
    pairs["dev"], n_dev = validation_pairs(sides["judge_dev"], n_dev_pairs, None, seed)
    pairs["eval"], n_eval = validation_pairs(sides["eval"], n_eval_pairs, n_eval_matched, seed)
    log(f"helpful: {len(pairs['train'])} judge-train / {len(pairs['dev'])} judge-dev / "
        f"{len(pairs['eval'])} eval-side pairs")
    tokenizer, enc_model = load_encoder(encoder)
    # Style features of every judge-train pair (cheap: no encoder) fit a linear Bradley-Terry
    # model first; its weights start the scorer's head, so fine-tuning learns what style and
    # length miss instead of slowly rediscovering length through a small head learning rate.
    fa = np.array([style_features(p["instruction"], p["a"]) for p in train_pairs_all], dtype=np.float32)
    fb = np.array([style_features(p["instruction"], p["b"]) for p in train_pairs_all], dtype=np.float32)
    both = np.concatenate([fa, fb])
    mean, std = both.mean(0), both.std(0) + 1e-6
    coef = _style_weights((fb - fa) / std, np.array([p["b_better"] for p in train_pairs_all]), seed)
    scorer = Scorer(enc_model, n_extra=len(STYLE_NAMES), n_out=1, seed=seed)
    with torch.no_grad():
        scorer.head.weight[0, -len(STYLE_NAMES):] = torch.as_tensor(coef)
    judge = HelpfulJudge(scorer, tokenizer, mean, std, cfg.max_length)
    style_only = StyleJudge(coef, mean, std)
    seqs = list(dict.fromkeys((p["instruction"], o) for p in pairs["train"] for o in (p["a"], p["b"])))
    index = {s: i for i, s in enumerate(seqs)}
    feats = np.array([style_features(i, o) for i, o in seqs], dtype=np.float32)
    encs = training.tokenize(tokenizer, [s[0] for s in seqs], [s[1] for s in seqs], cfg.max_length)
    train_pairs = [(index[(p["instruction"], p["a"])], index[(p["instruction"], p["b"])], float(p["b_better"]))
                   for p in pairs["train"]]
    group_of = {ins: g for g, ins in enumerate(dict.fromkeys(p["instruction"] for p in pairs["train"]))}
    groups = [group_of[p["instruction"]] for p in pairs["train"]]
    dev_matched = [p for p in pairs["dev"] if metrics.length_ratio([p["a"]], [p["b"]])[0] < LENGTH_MATCHED]

    def dev_score() -> float:  # the selection figure: agreement on length-matched judge-dev pairs
        return evaluate_pairs(judge, dev_matched or pairs["dev"])["agreement"]

    summary = training.fit_pairwise(scorer, tokenizer, encs, train_pairs, groups, cfg,
                                    extra=(feats - mean) / std, log=log, select=dev_score)
    report = {"side": "eval",
              "split": "THE AlpacaEval split (mocae.data.alpaca_eval_split_map, stratified by dataset): "
                       "trained on judge_train instructions, settings chosen on judge_dev, every figure "
                       "outside 'dev' on eval-side instructions only; pairs balanced by swapping, draws dropped",
              "target": TARGET,
              "selection": "early stopping on judge_dev length-matched agreement (training.checks); the "
                           "'dev' figures are of the selected state, so optimistic; eval-side ones are untouched",
              "n_instructions": {side: len({normalise_text(r["instruction"]) for r in rows})
                                 for side, rows in sides.items()},
              "n_decisive_pairs_available": {side: sum(r["preference"] in (1.0, 2.0) for r in rows)
                                             for side, rows in sides.items()},
              "training": {**summary, **cfg.as_dict(), "n_train_pairs": len(train_pairs),
                           "n_style_pairs": len(train_pairs_all)}}
    for side, n_overall in (("dev", n_dev), ("eval", n_eval)):
        res = evaluate_pairs(judge, pairs[side], n_overall)
        res["style_only"] = evaluate_pairs(style_only, pairs[side], n_overall)
        log(f"helpful {side}: {json.dumps(res)}")
        if side == "dev":
            report["dev"] = res
        else:
            report.update(res)
    judge.validation = report
    return judge
