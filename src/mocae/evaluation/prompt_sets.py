"""The evaluation prompt sets: the same seeded subsets for every system, so differences pair up.

AlpacaEval is read from its eval side only (THE split of ``mocae.data.splits``: no judge ever
trained on these instructions). The harmful set is HarmBench test (the functional categories
asked for) + StrongREJECT; ``harmful_jailbreak`` wraps some of those same prompts in the 9
DAN-family jailbreak templates, spread round robin, for a paired jailbreak-minus-plain
difference. TruthfulQA's MC and judged sets may differ in size (``n_truthfulqa_judged``).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mocae.evaluation.harness import EvalConfig

GPT4 = "gpt4_1106_preview"  # AlpacaEval 2's reference: its answers' NLL is the judge-free content metric


def _subset(items: list, n: int | None, seed: int) -> list:
    """A seeded random subset in file order (first-N would skew HarmBench's categories)."""
    if n is None or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def eval_prompts(cfg: EvalConfig, data_dir: Path | None = None) -> dict:
    """The prompt sets (lists of ``Example``) for ``cfg``; the same for every system.

    AlpacaEval comes from its eval side only. ``harmful_jailbreak`` wraps harmful prompts in the
    jailbreak templates, template ``k % 9`` for the k-th; each keeps ``meta["plain_index"]``, its
    prompt's index in ``harmful``, for the paired jailbreak-minus-plain difference.

    Raises:
        FileNotFoundError: a data or reference file is missing (named).
        ValueError: a prompt set ends up empty.
    """
    from mocae.data import (load_alpaca_eval, load_harmbench, load_strongreject, load_truthfulqa,
                            load_truthfulqa_mc, load_xstest, normalise_text)
    from mocae.data.loaders import ALPACA_EVAL_GPT4, load_jailbreak_templates
    from mocae.paths import data_dir as default_data_dir

    alpaca = load_alpaca_eval(data_dir, split="eval")
    needed = {cfg.reference} | ({GPT4} if cfg.reference_nll else set())
    if alpaca and not needed <= set(alpaca[0].references):
        root = data_dir or default_data_dir()
        raise FileNotFoundError(f"reference file not found: {Path(root or '.') / ALPACA_EVAL_GPT4} "
                                f"(needed for reference={cfg.reference!r} and the GPT-4 reference NLL)")
    harmbench = [e for e in load_harmbench(data_dir) if e.meta["functional_category"] in cfg.harmbench_functional]
    strongreject = load_strongreject(data_dir)
    n_hb = None if cfg.n_harmful is None else min(len(harmbench), math.ceil(cfg.n_harmful / 2))
    n_sr = None if cfg.n_harmful is None else cfg.n_harmful - n_hb
    harmful = _subset(harmbench, n_hb, cfg.seed) + _subset(strongreject, n_sr, cfg.seed)
    tq_eval = load_truthfulqa(data_dir, split="eval")
    mc_keys = {normalise_text(e.prompt) for e in _subset(tq_eval, cfg.n_truthfulqa, cfg.seed)}
    n_judged = cfg.n_truthfulqa if cfg.n_truthfulqa_judged is None else cfg.n_truthfulqa_judged
    sets = {
        "alpaca_eval": _subset(alpaca, cfg.n_helpful, cfg.seed),
        "harmful": harmful,
        "harmful_jailbreak": jailbreak_set(harmful, load_jailbreak_templates(data_dir), cfg.n_jailbreak, cfg.seed),
        "xstest_safe": _subset(load_xstest(data_dir, label="safe"), cfg.n_xstest_safe, cfg.seed),
        "truthfulqa": _subset(tq_eval, n_judged, cfg.seed),
        "truthfulqa_mc": [e for e in load_truthfulqa_mc(data_dir, split="eval") if normalise_text(e.prompt) in mc_keys],
    }
    for name, examples in sets.items():
        if not examples:
            raise ValueError(f"prompt set {name!r} is empty (check the data files and the eval config)")
    return sets


def jailbreak_set(harmful: list, templates: list, n: int, seed: int = 0) -> list:
    """``n`` harmful prompts (a seeded subset, at most all) wrapped in the templates round robin.

    Args:
        harmful: the plain harmful set (Examples).
        templates: :func:`mocae.data.loaders.load_jailbreak_templates` Examples.
        n: wrapped prompts wanted.

    Returns:
        Examples (source "jailbreak") whose meta holds the plain prompt's ``plain_index``, its
        ``request`` and ``source``, and the ``template`` name.
    """
    from mocae.data import Example
    from mocae.data.loaders import wrap_jailbreak

    if not templates:
        raise ValueError("no jailbreak templates loaded")
    picked = _subset(list(range(len(harmful))), n, seed)
    out = []
    for k, i in enumerate(picked):
        template, plain = templates[k % len(templates)], harmful[i]
        meta = {"plain_index": i, "request": plain.prompt, "source": plain.source,
                "category": plain.meta.get("category", "?"), "template": template.meta["name"]}
        out.append(Example(wrap_jailbreak(template, plain.prompt), None, "harmless", "jailbreak", "test", meta=meta))
    return out
