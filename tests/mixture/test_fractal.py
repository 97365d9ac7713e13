"""Box-counting and local (k-NN) dimension estimates on sets of known dimension."""

from __future__ import annotations

import pytest
import torch

from mocae.mixture.fractal import box_counting_dimension, local_dimension_mle, random_projection


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_box_counting_line_in_2d_is_one():
    t = torch.rand(5000, 1, generator=_gen())
    line = torch.cat([t, 0.2 + 0.5 * t], dim=1)
    assert box_counting_dimension(line) == pytest.approx(1.0, abs=0.15)


def test_box_counting_line_in_8d_is_one():
    t = torch.rand(5000, 1, generator=_gen(1))
    direction = torch.rand(8, generator=_gen(2))
    assert box_counting_dimension(t * direction) == pytest.approx(1.0, abs=0.15)


def test_box_counting_square_is_two():
    # eps = 0.4 does not divide 1, so the coarsest grid has 3 x 3 boxes for a 2.5 x 2.5 area:
    # with the default scales the estimate is ~1.84, inside the tolerance.
    square = torch.rand(20000, 2, generator=_gen(3))
    assert box_counting_dimension(square) == pytest.approx(2.0, abs=0.2)


def test_box_counting_orders_sets_and_handles_edges():
    g = _gen(4)
    line = torch.rand(5000, 1, generator=g).repeat(1, 2)
    square = torch.rand(5000, 2, generator=g)
    assert box_counting_dimension(line) < box_counting_dimension(square) - 0.5
    assert box_counting_dimension(torch.full((10, 3), 0.5)) == pytest.approx(0.0)
    # points on the upper face join the last box instead of adding a new one
    corner = torch.tensor([[1.0, 1.0], [0.99, 0.99]])
    assert box_counting_dimension(corner) == pytest.approx(0.0)


@pytest.mark.parametrize("bad", [(0.1,), (0.0, 0.1), (0.1, 2.0)])
def test_box_counting_rejects_bad_eps(bad):
    with pytest.raises(ValueError, match="eps"):
        box_counting_dimension(torch.rand(10, 2), eps=bad)


def test_box_counting_rejects_empty():
    with pytest.raises(ValueError, match="non-empty"):
        box_counting_dimension(torch.zeros(0, 2))


def test_random_projection_is_seeded_and_scaled():
    a, b, c = random_projection(576, 8, seed=0), random_projection(576, 8, seed=0), random_projection(576, 8, seed=1)
    assert a.shape == (576, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # entries N(0, 1/k): the variance is 1/8 up to sampling noise
    assert a.var().item() == pytest.approx(1 / 8, rel=0.1)
    with pytest.raises(ValueError):
        random_projection(0, 8)


def test_local_dimension_matches_known_dimensions():
    g = _gen(5)
    square = torch.rand(3000, 2, generator=g)
    t = torch.rand(3000, 1, generator=g)
    line = torch.cat([t, t, t], dim=1)
    d_square = local_dimension_mle(square, square, k=10, exclude_self=True)
    d_line = local_dimension_mle(line, line, k=10, exclude_self=True)
    assert d_square.shape == (3000,)
    assert d_square.median().item() == pytest.approx(2.0, abs=0.4)
    assert d_line.median().item() == pytest.approx(1.0, abs=0.25)


def test_local_dimension_grows_far_from_the_reference():
    g = _gen(6)
    reference = torch.rand(2000, 2, generator=g)
    near = torch.rand(50, 2, generator=g)
    far = near + 20.0
    assert local_dimension_mle(far, reference).min() > 3 * local_dimension_mle(near, reference).median()


def test_local_dimension_self_exclusion_matters():
    points = torch.rand(500, 2, generator=_gen(7))
    # without exclusion each point is its own nearest neighbour at distance ~0, which drives D_hat to ~0
    assert local_dimension_mle(points, points).max() < 0.5
    assert local_dimension_mle(points, points, exclude_self=True).median() > 1.5
    with pytest.raises(ValueError, match="exclude_self"):
        local_dimension_mle(points[:10], points, exclude_self=True)
    with pytest.raises(ValueError, match="neighbours"):
        local_dimension_mle(points, points[:1])
    with pytest.raises(ValueError, match="widths"):
        local_dimension_mle(points, torch.rand(10, 3))
