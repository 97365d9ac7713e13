"""Routing splits: disjoint, labelled by axis, and never trained or calibrated on evaluated prompts."""

from pathlib import Path

import pytest

from mocae.data import load_advbench, load_harmbench, load_strongreject, normalise_text
from mocae.mixture.routing_data import routing_splits

FIXTURE_DATA = Path(__file__).parents[1] / "fixtures" / "data"


@pytest.fixture
def splits():
    return routing_splits(n_per_axis=20, n_test_per_axis=4, data_dir=FIXTURE_DATA)


def test_splits_are_disjoint_and_cover_every_axis(splits):
    seen = {}
    for name, split in splits.items():
        assert all(c > 0 for c in split.counts().values()), (name, split.counts())
        for prompt in split.prompts:
            key = normalise_text(prompt)
            assert key not in seen or seen[key] == name, f"{prompt!r} in {seen.get(key)} and {name}"
            seen[key] = name


def test_no_evaluated_prompt_is_used_to_train_or_calibrate(splits):
    evaluated = {normalise_text(e.prompt) for loader in (load_harmbench, load_strongreject, load_advbench)
                 for e in loader(FIXTURE_DATA)}
    for name in ("train", "calib"):
        assert not evaluated & {normalise_text(p) for p in splits[name].prompts}, name


def test_calibration_classes_are_balanced(splits):
    counts = splits["calib"].counts()
    assert len(set(counts.values())) == 1, counts


def test_of_gives_one_labels_prompts_in_order():
    from mocae.mixture.routing_data import RoutingSplit

    split = RoutingSplit(["a", "b", "c", "d"], [1, 0, 1, 2], ["s"] * 4)
    assert split.of(1) == ["a", "c"] and split.of(0) == ["b"] and split.of(2) == ["d"]
