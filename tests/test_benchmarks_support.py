"""The helpers the benchmark scripts rely on: log-log slopes, parameter counts, budgets, fronts."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks._common import tucker_params
from benchmarks._plots import loglog_slope
from benchmarks.bench_kernels import (
    Fit,
    best_within,
    flattened_svd_fits,
    pareto,
    rank_grid,
)
from benchmarks.bench_scaling import sthosvd_flops


@given(
    c=st.floats(min_value=1e-6, max_value=1e6),
    p=st.floats(min_value=-3.0, max_value=3.0),
    xs=st.lists(st.floats(min_value=1e-3, max_value=1e6), min_size=2, max_size=12, unique=True),
)
def test_loglog_slope_recovers_the_exponent(c, p, xs):
    if max(xs) / min(xs) < 1.01:  # the fit is ill-conditioned on nearly equal sizes
        xs = [*xs, max(xs) * 10.0]
    ys = [c * x**p for x in xs]
    assert loglog_slope(xs, ys) == pytest.approx(p, abs=1e-6)


def test_loglog_slope_fits_noisy_data_by_least_squares():
    xs = [1.0, 10.0, 100.0]
    ys = [
        1.0,
        10.0 * math.e,
        100.0,
    ]  # log y = log x + (0, 1, 0): the middle point lifts the line, not its slope
    assert loglog_slope(xs, ys) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("xs", "ys", "match"),
    [
        ([1.0], [2.0], "at least two"),
        ([1.0, 2.0], [1.0], "at least two"),
        ([], [], "at least two"),
        ([3.0, 3.0, 3.0], [1.0, 2.0, 3.0], "all x values are equal"),
    ],
)
def test_loglog_slope_rejects_bad_input(xs, ys, match):
    with pytest.raises(ValueError, match=match):
        loglog_slope(xs, ys)


@pytest.mark.parametrize(
    ("xs", "ys"),
    [
        ([1.0, 0.0], [1.0, 2.0]),
        ([1.0, 2.0], [1.0, -2.0]),
        ([1.0, 2.0], [1.0, math.nan]),
        ([1.0, math.inf], [1.0, 2.0]),
    ],
)
def test_loglog_slope_needs_positive_finite_values(xs, ys):
    with pytest.raises(ValueError, match="positive finite values"):
        loglog_slope(xs, ys)


def test_tucker_params_counts_core_and_factors():
    import ndlowrank as nl

    rng = np.random.default_rng(0)
    shape, ranks = (7, 6, 3, 3), (4, 2, 3, 1)
    t = nl.hosvd(rng.standard_normal(shape), ranks)
    stored = t.core.size + sum(f.size for f in t.factors)
    assert tucker_params(shape, ranks) == stored == t.n_params == 4 * 2 * 3 * 1 + 28 + 12 + 9 + 3


def test_flattened_svd_fits_match_an_explicit_truncation():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 3, 2, 2)).astype(np.float32)
    fits = flattened_svd_fits(w)
    matrix = w.astype(np.float64).reshape(5, 12)
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    assert [f.ranks for f in fits] == [(r,) for r in range(1, 6)]
    for fit in fits:
        (r,) = fit.ranks
        left, right = u[:, :r] * s[:r], vt[:r]  # the two matrices a rank-r flattened adapter stores
        assert fit.params == left.size + right.size == r * (5 + 12)
        explicit = np.linalg.norm(matrix - left @ right) / np.linalg.norm(matrix)
        assert fit.error == pytest.approx(explicit, abs=1e-12)
    assert fits[-1].error == pytest.approx(0.0, abs=1e-7)
    assert all(a.error >= b.error for a, b in itertools.pairwise(fits))


def test_best_within_picks_the_lowest_error_inside_the_budget():
    fits = [Fit((1,), 10, 0.9), Fit((2,), 20, 0.5), Fit((3,), 30, 0.6), Fit((4,), 40, 0.1)]
    assert best_within(fits, 5) is None
    assert best_within(fits, 10) == fits[0]
    assert best_within(fits, 35) == fits[1]  # 0.5 beats the larger fit's 0.6
    assert best_within(fits, 40) == fits[3]  # the budget is inclusive
    assert best_within([], 100) is None
    tie = [Fit((1,), 30, 0.2), Fit((2,), 20, 0.2)]
    assert best_within(tie, 30) == tie[1]  # equal errors: the cheaper one


def test_pareto_keeps_only_undominated_fits():
    fits = [
        Fit((1,), 30, 0.3),
        Fit((2,), 10, 0.5),
        Fit((3,), 20, 0.6),
        Fit((4,), 40, 0.3),
        Fit((5,), 50, 0.1),
    ]
    assert [f.ranks for f in pareto(fits)] == [(2,), (1,), (5,)]


def test_rank_grid_clips_to_the_modes_without_repeats():
    grid = rank_grid((8, 4, 3, 3), channel_ranks=(2, 4, 8), spatial_ranks=(1, 3, 5))
    assert grid == [
        (2, 2, 1, 1),
        (2, 2, 3, 3),
        (4, 4, 1, 1),
        (4, 4, 3, 3),
        (8, 4, 1, 1),
        (8, 4, 3, 3),
    ]


def test_sthosvd_flops_counts_gram_eigh_and_projection():
    # one mode of size 4 with 6 columns, rank 2: Gram 4·4·6, eigh 4³, projection 2·4·6
    assert sthosvd_flops((4, 6), (2, 6)) == 4 * 4 * 6 + 4**3 + 2 * 4 * 6 + (6 * 6 * 2 + 6**3 + 6 * 6 * 2)
    # cubes at a fixed rank ratio approach the n⁴ = N^(4/3) law
    sides = [256, 512, 1024]
    flops = [sthosvd_flops((n,) * 3, (n // 8,) * 3) for n in sides]
    assert loglog_slope([n**3 for n in sides], flops) == pytest.approx(4 / 3, abs=0.01)
