"""Rank selection: select_ranks by tolerance, energy and parameter budget; budget_ranks; validate_ranks.

Each rule is checked on every installed backend against an independent float64 numpy
reference (``np.linalg.svd`` of the unfoldings) or against the decomposition it promises.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ndlowrank as nl
from ndlowrank._backend import to_numpy
from ndlowrank.ranks import budget_ranks

from _helpers import normal, valid_multilinear

DTYPES = ["float32", "float64"]
# energy slack (times the total energy) for a tie in the energy rule, by dtype
ENERGY_TIE = {"float32": 1e-5, "float64": 1e-10}

seeds = st.integers(0, 2**32 - 1)
tols = st.one_of(st.sampled_from([1e-5, 1e-3, 0.1, 0.5]), st.floats(1e-5, 0.99))
energies = st.one_of(st.sampled_from([1e-3, 0.5, 0.9, 0.99, 1.0]), st.floats(1e-3, 1.0))


def np_unfold(x: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)


def squared_spectrum(y: np.ndarray) -> np.ndarray:
    """Squared singular values, padded with zeros to the row count."""
    out = np.zeros(y.shape[0])
    s = np.linalg.svd(y, compute_uv=False)
    out[: s.size] = s**2
    return out


def n_params(shape, ranks) -> int:
    return math.prod(ranks) + sum(i * r for i, r in zip(shape, ranks, strict=True))


def low_rank(seed: int, shape, ranks, *, orthonormal: bool = True) -> np.ndarray:
    """A tensor of multilinear ranks ``ranks``: Gaussian core, orthonormal or Gaussian factors."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(tuple(ranks))
    for n, (i, r) in enumerate(zip(shape, ranks, strict=True)):
        q = rng.standard_normal((i, r))
        if orthonormal:
            q = np.linalg.qr(q)[0]
        x = np.moveaxis(np.tensordot(q, np.moveaxis(x, n, 0), axes=1), 0, n)
    return x


def decaying(seed: int, shape, decay: float) -> np.ndarray:
    """Gaussian entries with each mode's slices scaled by ``logspace(0, -decay)``."""
    x = normal(seed, *shape)
    for n, size in enumerate(shape):
        x = x * np.logspace(0, -decay, size).reshape([size if k == n else 1 for k in range(len(shape))])
    return x


def sthosvd_error(x: np.ndarray, ranks) -> float:
    t = nl.sthosvd(x, ranks)
    return float(np.linalg.norm(x - to_numpy(t.to_dense())) / np.linalg.norm(x))


@st.composite
def shapes(draw, min_size: int = 1, max_size: int = 7):
    return tuple(draw(st.lists(st.integers(min_size, max_size), min_size=2, max_size=4)))


def assert_int_tuple(ranks, shape) -> None:
    assert isinstance(ranks, tuple)
    assert all(type(r) is int for r in ranks), ranks
    assert len(ranks) == len(shape)
    assert all(1 <= r <= i for r, i in zip(ranks, shape, strict=True)), (ranks, shape)


# -- tol ----------------------------------------------------------------------------------------


@given(shape=shapes(), seed=seeds, decay=st.floats(0.0, 6.0), tol=tols, dtype=st.sampled_from(DTYPES))
def test_tol_rule_gives_the_sthosvd_ranks(backend, shape, seed, decay, tol, dtype):
    x = backend.asarray(decaying(seed, shape, decay), dtype)
    ranks = nl.select_ranks(x, tol=tol)
    assert_int_tuple(ranks, shape)
    assert ranks == nl.sthosvd(x, tol=tol).ranks


# -- energy -------------------------------------------------------------------------------------


@given(shape=shapes(), seed=seeds, decay=st.floats(0.0, 6.0), energy=energies, dtype=st.sampled_from(DTYPES))
def test_energy_rule_matches_the_svd_of_each_unfolding(backend, shape, seed, decay, energy, dtype):
    """Per mode, the fewest ``r`` whose leading squared singular values reach ``energy`` of the total."""
    x = decaying(seed, shape, decay).astype(dtype).astype(np.float64)
    ranks = nl.select_ranks(backend.asarray(x, dtype), energy=energy)
    assert_int_tuple(ranks, shape)
    for n, r in enumerate(ranks):
        spectrum = squared_spectrum(np_unfold(x, n))
        kept = np.cumsum(spectrum)
        target, slack = energy * kept[-1], ENERGY_TIE[dtype] * kept[-1]
        # r reaches the target, and r - 1 does not (up to a tie)
        assert kept[r - 1] >= target - slack, (n, r, kept, target)
        assert r == 1 or kept[r - 2] <= target + slack, (n, r, kept, target)


@given(shape=shapes(), seed=seeds)
def test_energy_one_keeps_every_nonzero_singular_value(backend, shape, seed):
    ranks = nl.select_ranks(backend.asarray(normal(seed, *shape)), energy=1.0)
    expected = tuple(min(i, math.prod(shape) // i) for i in shape)
    assert ranks == expected


@given(shape=shapes(min_size=2), seed=seeds, data=st.data())
def test_energy_finds_the_ranks_of_an_exactly_low_rank_tensor(backend, shape, seed, data):
    ranks = valid_multilinear([data.draw(st.integers(1, i), label="rank") for i in shape])
    x = backend.asarray(low_rank(seed, shape, ranks))
    assert nl.select_ranks(x, energy=1 - 1e-9) == ranks


# -- budget -------------------------------------------------------------------------------------


@given(shape=shapes(), seed=seeds, decay=st.floats(0.0, 4.0), data=st.data())
def test_budget_rule_fits_the_budget(backend, shape, seed, decay, data):
    minimum, full = 1 + sum(shape), n_params(shape, shape)
    budget = data.draw(st.integers(minimum, full + 10), label="budget")
    ranks = nl.select_ranks(backend.asarray(decaying(seed, shape, decay)), budget=budget)
    assert_int_tuple(ranks, shape)
    assert n_params(shape, ranks) <= budget


@given(shape=shapes(), seed=seeds, decay=st.floats(0.0, 4.0), data=st.data())
def test_budget_ranks_never_exceed_the_product_of_the_other_ranks(backend, shape, seed, decay, data):
    """A rank above the product of the others buys parameters that capture nothing."""
    budget = data.draw(st.integers(1 + sum(shape), n_params(shape, shape) + 10), label="budget")
    ranks = nl.select_ranks(backend.asarray(decaying(seed, shape, decay)), budget=budget)
    for n, r in enumerate(ranks):
        assert r <= math.prod(ranks[:n] + ranks[n + 1 :]), (n, ranks)


@given(shape=shapes(), seed=seeds, extra=st.integers(0, 1))
def test_the_minimum_budget_gives_ranks_one(backend, shape, seed, extra):
    """``1 + sum(I_n)`` pays for ranks all 1; one more parameter buys nothing (growing a rank costs ``I_n + 1``)."""
    ranks = nl.select_ranks(backend.asarray(normal(seed, *shape)), budget=1 + sum(shape) + extra)
    assert ranks == (1,) * len(shape)


@settings(max_examples=15)
@given(shape=shapes(min_size=2), seed=seeds, orthonormal=st.booleans(), data=st.data())
def test_a_generous_budget_gives_the_ranks_of_an_exactly_low_rank_tensor(
    backend, shape, seed, orthonormal, data
):
    """With every size affordable, the budget buys the multilinear ranks and nothing for rounding noise."""
    ranks = valid_multilinear([data.draw(st.integers(1, i), label="rank") for i in shape])
    x = low_rank(seed, shape, ranks, orthonormal=orthonormal)
    budget = n_params(shape, shape) + data.draw(st.integers(0, 100), label="extra")
    chosen = nl.select_ranks(backend.asarray(x), budget=budget)
    assert chosen == ranks
    assert sthosvd_error(x, chosen) <= 1e-10


def test_a_generous_budget_ignores_rounding_noise():
    """Regression: Gaussian factors leave Gram eigenvalues of ~1e-16 of the energy, which must buy nothing."""
    rng = np.random.default_rng(0)
    shape, ranks = (4, 6, 8), (1, 2, 2)
    core = rng.standard_normal((1, 2, 6))  # mode 2 has rank 2 (at most 1 * 2)
    x = nl.tucker_to_tensor(
        core, [rng.standard_normal((i, c)) for i, c in zip(shape, core.shape, strict=True)]
    )
    assert nl.sthosvd(x, tol=1e-8).ranks == ranks
    assert nl.select_ranks(x, budget=n_params(shape, shape)) == ranks


def test_a_bigger_budget_lowers_the_error_along_a_sweep():
    """On a tensor with a clearly decaying spectrum the greedy's error falls with the budget."""
    shape = (5, 6, 4)
    x = decaying(3, shape, 2.0)
    budgets = [*range(1 + sum(shape), n_params(shape, shape), 7), n_params(shape, shape)]
    errors = [sthosvd_error(x, nl.select_ranks(x, budget=b)) for b in budgets]
    assert errors[-1] <= 1e-12
    assert errors[0] > 1e-2


@pytest.mark.xfail(
    reason="the greedy budget rule is not monotone: it scores each step by the full tensor's "
    "mode spectra, which ignore how the modes interact, so on flat spectra a bigger budget can "
    "end 10-20% worse (here budget 36 picks (3, 3, 1) at error 0.81 after smaller budgets "
    "reached 0.68 with (2, 2, 2))",
    strict=True,
    raises=AssertionError,
)
def test_a_bigger_budget_never_gives_a_larger_error():
    shape = (3, 4, 6)
    x = normal(6, *shape)
    best = math.inf
    for budget in range(1 + sum(shape), n_params(shape, shape) + 1):
        ranks = nl.select_ranks(x, budget=budget)
        error = sthosvd_error(x, ranks)
        assert error <= best * (1 + 1e-2), (budget, ranks, error, best)
        best = min(best, error)


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 2), (7,), (1, 1, 1)])
def test_budget_below_the_minimum_names_the_budget_and_the_minimum(backend, shape):
    x = backend.asarray(normal(0, *shape))
    minimum = 1 + sum(shape)
    for budget in (minimum - 1, 0, -5):
        with pytest.raises(ValueError, match=rf"budget={budget}\b.*\b{minimum}\b"):
            nl.select_ranks(x, budget=budget)
    assert nl.select_ranks(x, budget=minimum) == (1,) * len(shape)


@pytest.mark.parametrize("budget", [100.0, 100.5, "100", True])
def test_budget_that_is_not_an_int_is_a_type_error(backend, budget):
    with pytest.raises(TypeError, match="budget"):
        nl.select_ranks(backend.asarray(normal(0, 3, 4, 5)), budget=budget)


def test_budget_accepts_numpy_integers(backend):
    x = backend.asarray(normal(0, 3, 4, 5))
    assert nl.select_ranks(x, budget=np.int64(40)) == nl.select_ranks(x, budget=40)


# -- several tensors sharing one budget ---------------------------------------------------------


@given(
    shapes_=st.lists(shapes(), min_size=1, max_size=3),
    seed=seeds,
    data=st.data(),
)
def test_budget_ranks_shares_one_budget(shapes_, seed, data):
    spectra = [
        [squared_spectrum(np_unfold(normal(seed + k, *shape), n)) for n in range(len(shape))]
        for k, shape in enumerate(shapes_)
    ]
    minimum = sum(1 + sum(shape) for shape in shapes_)
    budget = data.draw(st.integers(minimum, minimum + 300), label="budget")
    chosen = budget_ranks(spectra, shapes_, budget)
    assert len(chosen) == len(shapes_)
    for ranks, shape in zip(chosen, shapes_, strict=True):
        assert_int_tuple(ranks, shape)
    assert sum(n_params(s, r) for s, r in zip(shapes_, chosen, strict=True)) <= budget
    if len(shapes_) == 1:
        x = normal(seed, *shapes_[0])
        assert chosen[0] == nl.select_ranks(x, budget=budget)


def test_budget_ranks_never_grow_beyond_a_short_spectrum():
    """A spectrum shorter than the mode caps its rank (used to shrink trained adapters)."""
    spectra = [[np.array([4.0, 3.0]), np.array([5.0, 1.0, 0.5])]]
    # mode 0 stops at 2; mode 1 stops there too: a rank above the product of the others buys nothing
    assert budget_ranks(spectra, [(10, 10)], 10_000) == [(2, 2)]
    spectra = [[np.array([4.0, 3.0]), np.array([5.0, 1.0, 0.5]), np.array([2.0, 1.0])]]
    assert budget_ranks(spectra, [(10, 10, 10)], 10_000) == [(2, 3, 2)]


# -- every rule ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", [{"tol": 0.1}, {"energy": 0.9}, {"budget": 100}])
def test_zero_tensor_gives_ranks_one(backend, rule):
    assert nl.select_ranks(backend.asarray(np.zeros((3, 4, 5))), **rule) == (1, 1, 1)


@pytest.mark.parametrize("rule", [{"tol": 0.2}, {"energy": 0.8}, {"budget": 60}])
@given(shape=shapes(), seed=seeds)
def test_every_backend_selects_what_numpy_selects(backend, rule, shape, seed):
    x = decaying(seed, shape, 3.0)
    ranks, expected = nl.select_ranks(backend.asarray(x), **rule), nl.select_ranks(x, **rule)
    if ranks != expected and "budget" in rule:
        # the greedy may break an exact tie (equal spectra, equal costs) either way
        assert n_params(shape, ranks) == n_params(shape, expected)
        assert sthosvd_error(x, ranks) == pytest.approx(sthosvd_error(x, expected), rel=1e-9)
        return
    assert ranks == expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", [{"tol": 0.2}, {"energy": 0.8}, {"budget": 60}])
def test_extreme_scales_select_the_same_ranks(backend, rule, dtype):
    x = decaying(1, (4, 5, 6), 2.0)
    expected = nl.select_ranks(x, **rule)
    for scale in (2.0**-100, 2.0**100):  # powers of two keep the values exact
        assert nl.select_ranks(backend.asarray(x * scale, dtype), **rule) == expected


@pytest.mark.parametrize(
    "rules",
    [{}, {"tol": 0.1, "energy": 0.9}, {"tol": 0.1, "budget": 100}, {"energy": 0.9, "budget": 100}],
    ids=["none", "tol+energy", "tol+budget", "energy+budget"],
)
def test_exactly_one_rule(backend, rules):
    with pytest.raises(ValueError, match="exactly one of tol=, energy= or budget="):
        nl.select_ranks(backend.asarray(normal(0, 3, 4, 5)), **rules)


@pytest.mark.parametrize("energy", [0, 0.0, -0.1, 1.0000001, 1.5, float("nan"), float("inf"), "a", True])
def test_energy_outside_zero_one_is_a_value_error(backend, energy):
    with pytest.raises(ValueError, match="energy"):
        nl.select_ranks(backend.asarray(normal(0, 3, 4, 5)), energy=energy)


@pytest.mark.parametrize("tol", [0, 1, -0.1, 1.5, float("nan")])
def test_tol_outside_zero_one_is_a_value_error(backend, tol):
    with pytest.raises(ValueError, match="tol"):
        nl.select_ranks(backend.asarray(normal(0, 3, 4, 5)), tol=tol)


@pytest.mark.parametrize("energy", [np.float32(0.5), np.float64(0.5), 0.5])
def test_energy_accepts_python_and_numpy_floats(backend, energy):
    """Regression: numpy float32 scalars were refused (tol= accepted them)."""
    x = backend.asarray(normal(0, 3, 4, 5))
    assert nl.select_ranks(x, energy=energy) == nl.select_ranks(x, energy=0.5)


# -- validate_ranks -------------------------------------------------------------------------------


@given(shape=shapes(), data=st.data())
def test_validate_ranks_accepts_ints_sequences_and_arrays(shape, data):
    ranks = tuple(data.draw(st.integers(1, i), label="rank") for i in shape)
    assert nl.validate_ranks(ranks, shape) == ranks
    assert nl.validate_ranks(list(ranks), shape) == ranks
    assert nl.validate_ranks(np.array(ranks), shape) == ranks
    assert nl.validate_ranks([np.int64(r) for r in ranks], shape) == ranks
    rank = data.draw(st.integers(1, min(shape)), label="int rank")
    assert nl.validate_ranks(rank, shape) == (rank,) * len(shape)
    big = data.draw(st.integers(1, 20), label="clipped")
    assert nl.validate_ranks(big, shape, clip=True) == tuple(min(big, i) for i in shape)


@pytest.mark.parametrize(
    "ranks, clip, error, match",
    [
        ((2, 5, 2), False, ValueError, r"ranks\[1\]=5 is invalid for mode 1 of size 4"),
        ((2, 0, 2), False, ValueError, r"ranks\[1\]=0 .*mode 1 of size 4"),
        (6, False, ValueError, r"ranks\[0\]=6 .*mode 0 of size 3"),
        (0, True, ValueError, r"ranks\[0\]=0"),
        ((2, 5, 2), True, ValueError, r"ranks\[1\]=5"),  # clip applies to an int only
        ((2, 2), False, ValueError, r"2 entries.*3 modes"),
        ((2, 2.0, 2), False, TypeError, r"ranks\[1\] must be an int"),
        ((2, True, 2), False, TypeError, r"ranks\[1\] must be an int"),
        (2.0, False, TypeError, "ranks must be an int or a sequence"),
        ("222", False, TypeError, "ranks must be an int or a sequence"),
        (None, False, TypeError, "ranks must be an int or a sequence"),
    ],
)
def test_validate_ranks_errors_name_the_mode_rank_and_size(ranks, clip, error, match):
    with pytest.raises(error, match=match):
        nl.validate_ranks(ranks, (3, 4, 5), clip=clip)
