"""The judges' data files: their loaders live in ``mocae.data.judge_files`` (so ``mocae data check``
and the contamination check read them too); re-exported here for the judges."""

from mocae.data.judge_files import (  # noqa: F401
    ALPACA_EVAL_ANNOTATIONS,
    HH_HARMLESS,
    PYRIT_REFUSAL,
    XSTEST_COMPLETIONS,
    XSTEST_LABELS,
    XSTEST_MODELS,
    load_alpaca_eval_annotations,
    load_hh_harmless,
    load_pyrit_refusal,
    load_xstest_completions,
    split_last_turn,
)
