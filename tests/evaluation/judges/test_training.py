"""The judges' training loop: early stopping on a held-out score keeps the best state it saw."""

from __future__ import annotations

import torch

from mocae.evaluation.judges import training
from mocae.evaluation.judges.encoder import Scorer, load_encoder
from tiny_judges import build_tiny_encoder

TEXTS = [f"answer {i} is {'good' if i % 2 else 'bad'}" for i in range(32)]


def _fit(tmp_path, scores):
    """Fit a tiny pairwise scorer with ``select_checks`` 3; ``select`` returns ``scores`` in turn."""
    tokenizer, model = load_encoder(build_tiny_encoder(tmp_path / "enc", TEXTS))
    scorer = Scorer(model, n_out=1)
    start = {k: v.clone() for k, v in scorer.state_dict().items()}
    encs = training.tokenize(tokenizer, TEXTS, None, 16)
    pairs = [(i, i + 1, 1.0) for i in range(0, 32, 2)]
    cfg = training.FitConfig(epochs=3, batch_size=4, lr=1e-2, head_lr=1e-1, select_checks=3)
    feed = iter(scores)
    summary = training.fit_pairwise(scorer, tokenizer, encs, pairs, list(range(len(pairs))), cfg,
                                    log=lambda *_: None, select=lambda: next(feed))
    return scorer, start, summary


def _same(scorer, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in scorer.state_dict().items())


def test_early_stopping_keeps_the_best_check(tmp_path):
    # 16 pairs, 4 per batch (2 pairs = 4 sequences), 3 epochs: 24 steps, checks at 0, 8, 16, 24.
    scorer, start, summary = _fit(tmp_path, [0.5, 0.4, 0.3, 0.2])
    assert [c["step"] for c in summary["checks"]] == [0, 8, 16, 24]
    assert summary["selected_step"] == 0 and _same(scorer, start)  # nothing beat the starting point


def test_early_stopping_keeps_training_when_it_helps(tmp_path):
    scorer, start, summary = _fit(tmp_path, [0.1, 0.2, 0.3, 0.4])
    assert summary["selected_step"] == 24 and not _same(scorer, start)
