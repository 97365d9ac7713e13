"""Shared training loop of the fine-tuned judges: pointwise (BCE) and pairwise (Bradley-Terry).

CPU-bound by design: one thread, dynamic padding over length-sorted batches, and a wall-clock
budget after which training stops and the model as it stands is kept (the report records it).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from mocae.evaluation.judges.encoder import Scorer, length_order


def single_thread() -> None:
    """Use one CPU thread: the machine is shared, and one thread is also what scales here."""
    torch.set_num_threads(1)


@dataclass
class FitConfig:
    """How to fine-tune a scorer.

    Args:
        epochs: passes over the training data.
        lr: learning rate of the encoder; head_lr: of the new head (it starts from scratch).
        batch_size: sequences per step.
        max_length: tokens per (first, second) input, truncating the longer side first.
        time_budget: seconds of training after which it stops where it is.
        seed: shuffling and head initialisation.
        freeze_layers: keep the embeddings and the first k transformer layers fixed (cheaper
            backward pass, so more training pairs fit in the time budget).
        select_checks: early stopping on held-out data (0 = off): with a ``select`` score given
            to the fit, the scorer is scored before training and at this many evenly spaced
            steps (the last one included), and the best-scoring state is kept. Scoring time does
            not count against ``time_budget``.
    """

    epochs: int = 2
    lr: float = 3e-5
    head_lr: float = 1e-3
    batch_size: int = 16
    max_length: int = 256
    time_budget: float = 600.0
    seed: int = 0
    weight_decay: float = 0.01
    freeze_layers: int = 0
    select_checks: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def tokenize(tokenizer, first: list[str], second: list[str] | None = None, max_length: int = 256) -> list[dict]:
    """Token ids of each text (or text pair), unpadded, truncated to ``max_length``."""
    enc = tokenizer(first, second, truncation="longest_first" if second is not None else True,
                    max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(first))]


def collate(encs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized inputs into tensors."""
    width = max(len(e["input_ids"]) for e in encs)
    out = {}
    for key, fill in (("input_ids", pad_id), ("token_type_ids", 0), ("attention_mask", 0)):
        if key in encs[0]:
            out[key] = torch.tensor([e[key] + [fill] * (width - len(e[key])) for e in encs])
    return out


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _extra(extra: np.ndarray | None, idx: list[int]) -> torch.Tensor | None:
    return None if extra is None else torch.as_tensor(extra[idx], dtype=torch.float32)


def _batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of similar length in random order (sort within shuffled chunks of 50 batches)."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    chunk = batch_size * 50
    out = []
    for s in range(0, len(idx), chunk):
        part = sorted(idx[s:s + chunk], key=lambda i: lengths[i])
        out += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(out)
    return out


def freeze(scorer: Scorer, k: int) -> None:
    """Fix the embeddings and the first ``k`` layers of a BERT encoder (k = 0: train everything)."""
    if k <= 0:
        return
    bert = scorer.encoder
    for p in bert.embeddings.parameters():
        p.requires_grad_(False)
    for layer in bert.encoder.layer[:k]:
        for p in layer.parameters():
            p.requires_grad_(False)


def _run(scorer: Scorer, batches_per_epoch, loss_fn, cfg: FitConfig, log, select=None) -> dict:
    """The optimisation loop: AdamW, linear warm-up (10%) then decay, stop at the time budget.

    Args:
        batches_per_epoch: callable(epoch) -> list of batches (whatever loss_fn takes).
        loss_fn: callable(batch) -> scalar loss tensor.
        select: callable() -> held-out score of the scorer as it stands (higher is better), for
            early stopping at ``cfg.select_checks`` steps; None: keep the last state.

    Returns:
        {"steps", "seconds", "stopped_early", "last_loss"} for the judge's report, plus
        {"selected_step", "checks"} with ``select``.
    """
    torch.manual_seed(cfg.seed)
    plan = [batches_per_epoch(e) for e in range(cfg.epochs)]
    total = max(1, sum(len(p) for p in plan))
    freeze(scorer, cfg.freeze_layers)
    head = list(scorer.head.parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in scorer.parameters() if id(p) not in head_ids and p.requires_grad]
    opt = torch.optim.AdamW([{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr}],
                            weight_decay=cfg.weight_decay)
    warm = max(1, total // 10)
    start = time.monotonic()
    paused = 0.0  # seconds spent in ``select``: not training time
    n_checks = cfg.select_checks if select is not None else 0
    check_at = {math.ceil(total * k / n_checks) for k in range(1, n_checks + 1)} if n_checks else set()
    checks, best = [], None  # best: (score, step, state)

    def elapsed() -> float:
        return time.monotonic() - start - paused

    def check(at: int) -> None:
        nonlocal best, paused
        t = time.monotonic()
        scorer.eval()
        score = float(select())
        scorer.train()
        checks.append({"step": at, "score": round(score, 4)})
        log(f"  check at step {at}: held-out score {score:.4f}")
        if best is None or score > best[0]:
            best = (score, at, {k: v.detach().clone() for k, v in scorer.state_dict().items()})
        paused += time.monotonic() - t

    def factor(s: int) -> float:
        # Warm up, then decay linearly to 0 by the last step or by the time budget, whichever
        # comes first: a run cut by the budget still ends at a small learning rate. The clock
        # enters only once the budget is on course to cut the run: otherwise the schedule would
        # depend on the machine's speed, and a judge retrained elsewhere would not be the same.
        done = (s - warm) / max(1, total - warm)
        if s and elapsed() / s * total > cfg.time_budget:
            done = max(done, elapsed() / cfg.time_budget)
        return min((s + 1) / warm, max(0.0, 1.0 - done))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    scorer.train()
    step, ema, stopped = 0, None, False
    if n_checks:
        check(0)  # the starting point competes too: training must beat it on held-out data
    for epoch, batches in enumerate(plan):
        for batch in batches:
            if elapsed() > cfg.time_budget:
                stopped = True
                break
            loss = loss_fn(batch)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(scorer.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            if step % 25 == 0 or step == total:
                log(f"  epoch {epoch + 1} step {step}/{total} loss {ema:.4f} ({elapsed():.0f}s)")
            if step in check_at:
                check(step)
        if stopped:
            log(f"  time budget {cfg.time_budget:.0f}s reached after {step}/{total} steps")
            break
    out = {"steps": step, "planned_steps": total, "seconds": round(elapsed(), 1),
           "stopped_early": stopped, "last_loss": None if ema is None else round(ema, 4)}
    if n_checks:
        if checks[-1]["step"] != step:  # cut by the time budget before the last planned check
            check(step)
        scorer.load_state_dict(best[2])
        out.update(selected_step=best[1], checks=checks, select_seconds=round(paused, 1))
        log(f"  kept the state of step {best[1]} (held-out score {best[0]:.4f})")
    scorer.eval()
    return out


def fit_pointwise(scorer: Scorer, tokenizer, encs: list[dict], targets: np.ndarray, cfg: FitConfig,
                  extra: np.ndarray | None = None, log=print) -> dict:
    """Binary cross-entropy on each output; NaN targets are masked (multi-task rows).

    Args:
        encs: tokenized inputs (``tokenize``).
        targets: (n, n_out) array of 0/1 or NaN.
        extra: (n, n_extra) extra features, if the scorer has any.

    Returns:
        the training summary of ``_run``.
    """
    targets = np.asarray(targets, dtype=np.float32).reshape(len(encs), -1)
    lengths = [len(e["input_ids"]) for e in encs]
    rng = random.Random(cfg.seed)
    pad = _pad_id(tokenizer)

    def loss_fn(idx):
        logits = scorer(**collate([encs[i] for i in idx], pad), extra=_extra(extra, idx))
        y = torch.as_tensor(targets[idx])
        mask = ~torch.isnan(y)
        return nn.functional.binary_cross_entropy_with_logits(logits[mask], y[mask])

    return _run(scorer, lambda e: _batches(lengths, cfg.batch_size, rng), loss_fn, cfg, log)


def fit_pairwise(scorer: Scorer, tokenizer, encs: list[dict], pairs: list[tuple[int, int, float]],
                 groups: list[int], cfg: FitConfig, extra: np.ndarray | None = None, log=print,
                 select=None) -> dict:
    """Bradley-Terry loss: P(b beats a) = sigmoid(s_b - s_a) against the label.

    Pairs that share a sequence (e.g. the same reference output) share its forward pass: a
    batch takes whole groups of pairs until it holds ``batch_size`` distinct sequences.

    Args:
        encs: the distinct tokenized sequences.
        pairs: (index of a, index of b, 1.0 if b is better else 0.0).
        groups: a group id per pair (pairs of one group go in one batch).
        select: held-out score for early stopping (``_run``).

    Returns:
        the training summary of ``_run``.
    """
    by_group: dict[int, list[int]] = {}
    for k, g in enumerate(groups):
        by_group.setdefault(g, []).append(k)
    rng = random.Random(cfg.seed)
    pad = _pad_id(tokenizer)

    def plan(epoch):
        keys = list(by_group)
        rng.shuffle(keys)
        out, cur, seqs = [], [], set()
        for g in keys:
            cur += by_group[g]
            seqs.update(i for k in by_group[g] for i in pairs[k][:2])
            if len(seqs) >= cfg.batch_size:
                out.append(cur)
                cur, seqs = [], set()
        if cur:
            out.append(cur)
        return out

    def loss_fn(batch):
        seq = sorted({i for k in batch for i in pairs[k][:2]})
        pos = {i: j for j, i in enumerate(seq)}
        s = scorer(**collate([encs[i] for i in seq], pad), extra=_extra(extra, seq))[:, 0]
        a = torch.tensor([pos[pairs[k][0]] for k in batch])
        b = torch.tensor([pos[pairs[k][1]] for k in batch])
        y = torch.tensor([float(pairs[k][2]) for k in batch])
        return nn.functional.binary_cross_entropy_with_logits(s[b] - s[a], y)

    return _run(scorer, plan, loss_fn, cfg, log, select)


@torch.no_grad()
def predict(scorer: Scorer, tokenizer, encs: list[dict], extra: np.ndarray | None = None,
            batch_size: int = 32) -> np.ndarray:
    """Logits (n, n_out) of the scorer, in input order (batches sorted by length for speed)."""
    scorer.eval()
    out = np.zeros((len(encs), scorer.n_out), dtype=np.float32)
    order = length_order([len(e["input_ids"]) for e in encs])
    pad = _pad_id(tokenizer)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        out[idx] = scorer(**collate([encs[i] for i in idx], pad), extra=_extra(extra, idx)).numpy()
    return out


def sigmoid(x) -> np.ndarray:
    from scipy.special import expit  # no overflow warning for large logits

    return expit(np.asarray(x, dtype=np.float64))


def log_len(text: str) -> float:
    """log(1 + characters): the length signal fed to judges as an explicit feature."""
    return math.log1p(len(text))
