"""THE split rules of the evaluated sources: one seeded, stratified split per source, from one place.

Nothing that trains (a judge, an expert, a router, a preference set) may read an eval-side prompt
or its reference answers, and every consumer must agree on which side a prompt is on. So the
rules live here and nowhere else; loaders tag every ``Example`` with its side and
``mocae data check`` (``mocae.data.contamination``) proves the sides never meet.

- **TruthfulQA** (817 questions): question level, stratified by Type x Category, half of each
  stratum per side. A stratum with an odd count gives its extra question to the side that keeps
  its Type and its Category balanced, so per Type and per Category the two sides differ by at
  most one question. (The file is sorted by Type: the old "first half" rule trained on
  Adversarial questions only.)
- **AlpacaEval** (805 instructions): stratified by its ``dataset`` field into judge-train /
  judge-dev / eval. The helpful judge trains on judge-train and picks settings on judge-dev;
  win rates are measured on eval only.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence

SPLIT_SEED = 0
TRUTHFULQA_SIDES = ("train", "eval")
ALPACA_EVAL_SIDES = ("judge_train", "judge_dev", "eval")
# 805 instructions -> 362 judge-train / 81 judge-dev / 362 eval (the eval side must keep >= 320).
ALPACA_EVAL_FRACTIONS = (0.45, 0.10, 0.45)


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Counts per side for ``n`` items: largest remainder, so they sum to ``n``."""
    raw = [f * n for f in fractions]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def stratified_split(keys: Sequence[str], strata: Sequence[str], sides: Sequence[str],
                     fractions: Sequence[float], seed: int = SPLIT_SEED) -> dict[str, str]:
    """Assign each key a side, the same shares in every stratum.

    Args:
        keys: unique item keys (e.g. normalised questions), in file order.
        strata: one stratum label per key.
        sides: side names, e.g. ("judge_train", "judge_dev", "eval").
        fractions: share of each stratum per side (sums to 1).
        seed: shuffles each stratum before it is cut.

    Returns:
        {key: side}.
    """
    if len(keys) != len(strata):
        raise ValueError(f"stratified_split: {len(keys)} keys but {len(strata)} strata")
    if len(set(keys)) != len(keys):
        raise ValueError("stratified_split: keys must be unique")
    if len(sides) != len(fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError("stratified_split: one fraction per side, summing to 1")
    groups: dict[str, list[str]] = defaultdict(list)
    for key, stratum in zip(keys, strata):
        groups[stratum].append(key)
    rng = random.Random(seed)
    out = {}
    for stratum in sorted(groups):
        members = sorted(groups[stratum])
        rng.shuffle(members)
        start = 0
        for side, count in zip(sides, _allocate(len(members), fractions)):
            out.update({k: side for k in members[start:start + count]})
            start += count
    return out


def split_truthfulqa(keys: Sequence[str], types: Sequence[str], categories: Sequence[str],
                     seed: int = SPLIT_SEED) -> dict[str, str]:
    """THE TruthfulQA split: question level, stratified by Type x Category.

    Each stratum's even part is halved at random; the odd questions left over are placed so that
    per stratum, per Type and per Category the sides differ by at most one question (TruthfulQA
    has two Types, so a Category holds at most two odd strata).

    Args:
        keys: normalised questions (``normalise_text``), unique.
        types, categories: each question's ``Type`` and ``Category``.

    Returns:
        {normalised question: "train" | "eval"}.
    """
    if not len(keys) == len(types) == len(categories):
        raise ValueError("split_truthfulqa: keys, types and categories must have the same length")
    if len(set(keys)) != len(keys):
        raise ValueError("split_truthfulqa: questions must be unique")
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for key, t, c in zip(keys, types, categories):
        groups[(t, c)].append(key)
    rng = random.Random(seed)
    out: dict[str, str] = {}
    leftovers = []
    for stratum in sorted(groups):
        members = sorted(groups[stratum])
        rng.shuffle(members)
        half = len(members) // 2
        out.update({k: "train" for k in members[:half]})
        out.update({k: "eval" for k in members[half:2 * half]})
        if len(members) % 2:
            leftovers.append((stratum, members[-1]))
    # A category with an odd stratum of each Type sends one of the two to each side (its Category
    # stays balanced); these pairs go first, alternating, so the Type balances stay within one.
    # Single odd strata then each go to the side that brings its Type (then the total) back to even.
    by_category: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for (t, c), key in leftovers:
        by_category[c].append((t, key))
    pairs = [v for v in by_category.values() if len(v) == 2]
    singles = [v[0] for v in by_category.values() if len(v) == 1]
    rng.shuffle(pairs)
    rng.shuffle(singles)
    balance: Counter = Counter()  # train minus eval, per Type

    def put(t: str, key: str, sign: int) -> None:
        out[key] = "train" if sign > 0 else "eval"
        balance[t] += sign

    for (t1, k1), (t2, k2) in pairs:
        sign = -1 if balance[t1] > 0 else +1 if balance[t1] < 0 else rng.choice((-1, 1))
        put(t1, k1, sign)
        put(t2, k2, -sign)
    for t, key in singles:
        if balance[t]:
            sign = -1 if balance[t] > 0 else +1
        else:
            total = sum(balance.values())
            sign = -1 if total > 0 else +1 if total < 0 else rng.choice((-1, 1))
        put(t, key, sign)
    return out


def split_alpaca_eval(keys: Sequence[str], datasets: Sequence[str], seed: int = SPLIT_SEED) -> dict[str, str]:
    """THE AlpacaEval split: stratified by the ``dataset`` field into judge-train / judge-dev / eval.

    Args:
        keys: normalised instructions (``normalise_text``), unique.
        datasets: each instruction's ``dataset`` field (helpful_base, koala, oasst, selfinstruct, vicuna).

    Returns:
        {normalised instruction: "judge_train" | "judge_dev" | "eval"}.
    """
    return stratified_split(keys, datasets, ALPACA_EVAL_SIDES, ALPACA_EVAL_FRACTIONS, seed)


def side_counts(sides: dict[str, str], strata: dict[str, str]) -> dict[str, dict[str, int]]:
    """{stratum: {side: count}} for a split and each key's stratum (for ``mocae data check``)."""
    out: dict[str, Counter] = defaultdict(Counter)
    for key, side in sides.items():
        out[strata[key]][side] += 1
    return {s: dict(c) for s, c in sorted(out.items())}
