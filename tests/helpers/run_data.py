"""The data of a tiny run: the test fixture data with an AlpacaEval file large enough that every
side of its split is non-empty (``tests/test_pipeline.py``, ``tests/fixtures/behaviour/record.py``)."""

from __future__ import annotations

import json
from pathlib import Path

FIXTURE_DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data"
# A preset whose experts train in seconds on tiny-random (the benchmark scripts' end-to-end tests).
TINY_EXPERTS_PRESET = """\
name: tiny
backbone: tiny-random
experts:
  all: {rank: 2, alpha: 4, max_examples: 3, max_length: 64, batch_size: 2, bf16: false, warmup_ratio: 0,
        learning_rate: 0.01}
"""
# The tiny experts with a small router over them (the calibration-side scripts' runs).
TINY_MOCAE_PRESET = TINY_EXPERTS_PRESET + """\
router: {n_per_axis: 4, n_test_per_axis: 2, epochs: 5, calibrators: [none, temperature]}
systems: [base, expert_helpful, expert_harmless, expert_honest, mocae]
"""


class StandInJudge:
    """A helpful and harmless judge for tests of a script's plumbing (not of a judge): deterministic in the text."""

    validation = {"note": "a stand-in: this test checks the script's plumbing, not a judge"}

    def prefer(self, prompts, a, b):
        return [0.25 + 0.5 * (len(y) > len(x)) for x, y in zip(a, b)]

    def score(self, prompts, outputs, prompt_unsafe=None):
        return [float(len(o) % 2) for o in outputs]


def pipeline_data(root: Path, n_alpaca_eval: int = 24) -> Path:
    """``root`` holding the fixture data (linked) and a made-up AlpacaEval of ``n_alpaca_eval`` rows."""
    root.mkdir(parents=True, exist_ok=True)
    for source in FIXTURE_DATA.iterdir():
        if source.name != "alpaca_eval" and not (root / source.name).exists():
            (root / source.name).symlink_to(source)
    datasets = ["helpful_base", "koala", "selfinstruct"]
    rows = [{"dataset": datasets[i % 3], "instruction": f"Describe item number {i} of the list in one line.",
             "output": f"Item {i} is a short example."} for i in range(n_alpaca_eval)]
    (root / "alpaca_eval").mkdir(exist_ok=True)
    for generator in ("text_davinci_003", "gpt4_1106_preview"):
        (root / "alpaca_eval" / f"reference_{generator}.json").write_text(
            json.dumps([{**r, "generator": generator} for r in rows]))
    return root
