"""Each judge learns: on fixtures whose labels follow a clear pattern its held-out AUC exceeds 0.9,
and the same fit on shuffled labels stays near chance (0.5 +- 0.2, on 120 or more held-out items).

Held out means what each judge's report means: eval-side TruthfulQA questions, the held-out
XSTest model's answers to unsafe prompts, eval-side AlpacaEval instructions.
"""

from __future__ import annotations

import pytest

from mocae.data import alpaca_eval_split_map
from mocae.evaluation.judges import helpful, harmless, informative, metrics, truthful
from mocae.evaluation.judges.sources import load_alpaca_eval_annotations
from tiny_judges import build_tiny_encoder, fixture_texts, write_fixture_data

SIZES = {"n_questions": 60, "n_xstest_pairs": 120, "n_instructions": 120, "n_models": 3}
FIT = {"epochs": 3, "batch_size": 16, "max_length": 32, "time_budget": 30, "lr": 1e-3, "head_lr": 1e-2,
       "freeze_layers": 0}
QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """{"learnable": data_dir, "shuffled": data_dir, "encoder": tiny BERT over both}."""
    learnable = write_fixture_data(tmp_path_factory.mktemp("learnable"), **SIZES)
    shuffled = write_fixture_data(tmp_path_factory.mktemp("shuffled"), shuffle_labels=True, seed=1, **SIZES)
    encoder = build_tiny_encoder(tmp_path_factory.mktemp("enc"), fixture_texts(learnable))
    return {"learnable": learnable, "shuffled": shuffled, "encoder": encoder}


def _check(auc_learnable: float, auc_shuffled: float) -> None:
    assert auc_learnable > 0.9
    assert abs(auc_shuffled - 0.5) <= 0.2


@pytest.mark.parametrize("module, key", [(truthful, "auc_heldout_questions"),
                                         (informative, "info_auc_heldout_questions")])
def test_honest_judges_learn(fixtures, module, key):
    aucs = {}
    for which in ("learnable", "shuffled"):
        judge = module.train(fixtures[which], encoder=fixtures["encoder"], max_iter=50, **QUIET)
        assert judge.validation["n_eval_rows"] == 180  # 30 eval-side questions x 6 answers
        aucs[which] = judge.validation[key]
    _check(aucs["learnable"], aucs["shuffled"])


def test_harmless_judge_learns(fixtures):
    aucs = {}
    for which in ("learnable", "shuffled"):
        judge = harmless.train(fixtures[which], encoder=fixtures["encoder"], n_extra=0, **QUIET, **FIT)
        assert judge.validation["n_heldout"] == 120  # the held-out model's answers to the unsafe prompts
        aucs[which] = judge.validation["auc_heldout_model"]
    _check(aucs["learnable"], aucs["shuffled"])


def test_helpful_judge_learns(fixtures):
    aucs = {}
    for which in ("learnable", "shuffled"):
        data = fixtures[which]
        judge = helpful.train(data, encoder=fixtures["encoder"], n_train_pairs=200, n_eval_pairs=None,
                              **QUIET, **FIT)
        sides = helpful.split_annotations(load_alpaca_eval_annotations(data), alpaca_eval_split_map(data))
        pairs = helpful.balanced_pairs(sides["eval"], seed=0)
        assert len(pairs) == judge.validation["n_pairs"] == 162  # 54 eval-side instructions x 3 models
        p = judge.prefer([x["instruction"] for x in pairs], [x["a"] for x in pairs], [x["b"] for x in pairs])
        aucs[which] = metrics.auc([x["b_better"] for x in pairs], p)
        assert judge.validation["agreement"] == pytest.approx(metrics.agreement(p, [x["b_better"] for x in pairs]))
    _check(aucs["learnable"], aucs["shuffled"])


def test_a_judge_does_not_depend_on_what_the_process_ran_before(fixtures):
    """`judges train --kind all` and `--kind harmless` (or a fresh machine) must give the same judge:
    the landed results are keyed by the judges' validation, so any drift re-judges every system."""
    import torch

    fit = {**FIT, "epochs": 1}
    torch.manual_seed(123)
    first = harmless.train(fixtures["learnable"], encoder=fixtures["encoder"], n_extra=0, **QUIET, **fit)
    torch.rand(1000)  # another judge trained first in the same process draws from the global generator
    second = harmless.train(fixtures["learnable"], encoder=fixtures["encoder"], n_extra=0, **QUIET, **fit)
    assert torch.equal(first.scorer.head.weight, second.scorer.head.weight)
    assert first.validation["auc_heldout_model"] == second.validation["auc_heldout_model"]
