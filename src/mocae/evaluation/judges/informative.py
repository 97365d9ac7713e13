"""Informativeness judge: P(answer is informative) for a question and answer.

Trained on ``truthfulqa/finetune_info.jsonl`` restricted to training-half questions and
validated by AUC on eval-half questions. Two classifiers share the frozen encoder: one also
reads the question's TruthfulQA reference answers (an informative answer says something a
reference says, right or wrong), one reads only question and answer. ``score`` uses the
references when given or when the question is a TruthfulQA question (the judge keeps the
reference table), and the plain classifier otherwise.
"""

from __future__ import annotations

import numpy as np

from mocae.data import normalise_text
from mocae.evaluation.judges import metrics
from mocae.evaluation.judges.encoder import load_encoder
from mocae.evaluation.judges.features import FeatureJudge, fit_classifier, reference_features, surface
from mocae.evaluation.judges.truthful import judge_rows


class InformativeJudge(FeatureJudge):
    """``score(questions, answers)`` -> P(informative).

    ``model`` holds {"plain": classifier, "with_refs": classifier, "references": {question: refs}}.
    """

    kind = "informative"

    def _matrix(self, questions, answers, references, vec) -> np.ndarray:
        rows = []
        for k, (q, a) in enumerate(zip(questions, answers)):
            av, qv = vec(a), vec(q)
            # The answer's embedding says what kind of statement it is; q*a how it relates to the question.
            row = [*surface(a), float(qv @ av), float(len(a.split())), *av, *(qv * av)]
            if references is not None:
                ref = references[k]
                row += reference_features(av, qv, a, [(t, vec(t)) for t in ref.get("correct", [])],
                                          [(t, vec(t)) for t in ref.get("incorrect", [])])
            rows.append(row)
        return np.array(rows, dtype=np.float32)

    def score(self, questions: list[str], answers: list[str], references: list[dict] | None = None) -> list[float]:
        """P(the answer is informative) for each (question, answer).

        Args:
            questions, answers: what was asked and answered.
            references: optional {"correct", "incorrect"} per answer; by default the TruthfulQA
                references of the question when it is one.
        """
        if len(questions) != len(answers):
            raise ValueError("questions and answers must have the same length")
        table = self.model["references"]
        refs = list(references) if references is not None else [table.get(normalise_text(q)) for q in questions]
        out = np.zeros(len(answers))
        for use_refs in (True, False):
            idx = [i for i, r in enumerate(refs) if (r is not None) == use_refs]
            if idx:
                X = self.features([questions[i] for i in idx], [answers[i] for i in idx],
                                  [refs[i] for i in idx] if use_refs else None)
                out[idx] = self.model["with_refs" if use_refs else "plain"].predict_proba(X)[:, 1]
        return out.tolist()


def train(data_dir=None, *, encoder=None, max_length: int = 128, max_iter: int = 300, seed: int = 0,
          log=print, **_unused) -> InformativeJudge:
    """Fit the informativeness judge on training-half questions and validate on eval-half ones.

    Returns:
        the judge, with ``validation["info_auc_heldout_questions"]`` (references looked up, as
        ``score`` does for TruthfulQA questions) and the AUC without references.
    """
    tokenizer, model = load_encoder(encoder)
    judge = InformativeJudge(tokenizer, model, max_length=max_length)
    judge._memo = {}
    q, a, r, y = judge_rows("info", "train", data_dir)
    log(f"informative: {len(a)} training rows from {len(set(q))} questions; embedding...")
    from mocae.data import load_truthfulqa

    table = {normalise_text(ex.prompt): ex.references for ex in load_truthfulqa(data_dir)}
    judge.model = {"plain": fit_classifier(judge.features(q, a), y, seed=seed, max_iter=max_iter),
                   "with_refs": fit_classifier(judge.features(q, a, r), y, seed=seed, max_iter=max_iter),
                   "references": table}
    qe, ae, re_, ye = judge_rows("info", "eval", data_dir)
    plain = judge.model["plain"].predict_proba(judge.features(qe, ae))[:, 1]
    judge.validation = {
        "info_auc_heldout_questions": metrics.auc(ye, judge.score(qe, ae)),
        "info_auc_heldout_questions_no_references": metrics.auc(ye, plain),
        "n_train_rows": len(a), "n_train_questions": len(set(q)),
        "n_eval_rows": len(ae), "n_eval_questions": len(set(qe)),
        "method": "frozen all-MiniLM-L6-v2 embeddings of question and answer + similarity to the "
                  "TruthfulQA references + surface cues -> gradient-boosted trees",
        "split": "THE TruthfulQA question split (mocae.data.truthfulqa_split_map, seeded, stratified by "
                 "Type x Category): train side -> fit, eval side -> every AUC here",
        "side": "eval",
        "validated_on": f"eval-side questions (n={len(set(qe))} questions, {len(ae)} rows)",
    }
    judge._memo = None
    log(f"informative: AUC on held-out questions {judge.validation['info_auc_heldout_questions']:.4f}")
    return judge
