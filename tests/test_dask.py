"""Decompositions of dask arrays: same results as numpy, lazy and chunked, bounded passes and memory."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ndlowrank as nl

from _helpers import (
    check_larger_than_memory,
    counted_dask,
    import_peer,
    low_rank_tensor,
)

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")


def _assert_same(actual: nl.TuckerTensor, expected: nl.TuckerTensor, rtol=1e-9):
    assert isinstance(actual.core, np.ndarray) and actual.core.dtype == expected.core.dtype
    assert actual.ranks == expected.ranks
    dense = expected.to_dense()
    np.testing.assert_allclose(actual.to_dense(), dense, atol=rtol * np.abs(dense).max())
    for a, b in zip(actual.factors, expected.factors, strict=True):  # the same subspaces
        np.testing.assert_allclose(a @ (a.T @ b), b, atol=100 * rtol)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        (nl.sthosvd, {"ranks": (3, 4, 2)}),
        (nl.sthosvd, {"tol": 0.01}),
        (nl.sthosvd, {"ranks": (3, 4, 2), "order": (2, 0, 1)}),
        (nl.hosvd, {"ranks": (3, 4, 2)}),
        (nl.hooi, {"ranks": (3, 4, 2)}),
        (nl.hooi, {"ranks": (2, 2, 2), "init": "hosvd"}),
    ],
)
def test_same_result_as_numpy(method, options):
    x = low_rank_tensor()
    lazy, _ = counted_dask(x)
    _assert_same(method(lazy, **options), method(x, **options), rtol=1e-8)


@settings(max_examples=10)
@given(
    shape=st.lists(st.integers(2, 7), min_size=2, max_size=4),
    chunk=st.integers(1, 4),
    seed=st.integers(0, 100),
)
def test_sthosvd_matches_numpy_for_any_chunking(shape, chunk, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    ranks = [max(1, s // 2) for s in shape]
    lazy = da.from_array(x, chunks=chunk)
    actual, expected = nl.sthosvd(lazy, ranks), nl.sthosvd(x, ranks)
    np.testing.assert_allclose(actual.to_dense(), expected.to_dense(), atol=1e-8)


def test_float32_stays_float32_and_matches_float64_reference():
    x = low_rank_tensor().astype(np.float32)
    t = nl.sthosvd(da.from_array(x, chunks=6), (3, 4, 2))
    assert t.core.dtype == np.float32 and all(f.dtype == np.float32 for f in t.factors)
    reference = nl.sthosvd(x.astype(np.float64), (3, 4, 2))
    np.testing.assert_allclose(t.to_dense(), reference.to_dense(), atol=1e-5)


def test_tol_guarantee_and_select_ranks():
    x = low_rank_tensor(noise=0.05)
    lazy = da.from_array(x, chunks=5)
    t = nl.sthosvd(lazy, tol=0.1)
    assert np.linalg.norm(x - t.to_dense()) <= 0.1 * np.linalg.norm(x)
    for rule in ({"tol": 0.1}, {"energy": 0.95}, {"budget": 400}):
        assert nl.select_ranks(lazy, **rule) == nl.select_ranks(x, **rule)


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda x: nl.hosvd(x, (3, 4, 2)), 3 + 1),
        (lambda x: nl.sthosvd(x, (3, 4, 2)), 3 + 1),
        (lambda x: nl.sthosvd(x, tol=0.01), 3 + 1),
        (lambda x: nl.sthosvd(x, (3, 4, 2), solver="randomized", power_iters=2, seed=0), 3 * 4 + 1),
        (lambda x: nl.sthosvd(x, (3, 4, 2), solver="randomized", power_iters=0, seed=0), 3 * 2 + 1),
        (lambda x: nl.select_ranks(x, energy=0.9), 3),
        (lambda x: nl.select_ranks(x, budget=300), 3),
    ],
)
def test_passes_over_the_data(call, expected):
    lazy, passes = counted_dask(low_rank_tensor())
    call(lazy)
    assert passes() == expected


@pytest.mark.parametrize("init", ["sthosvd", "hosvd", "given"])
def test_hooi_passes(init):
    x = low_rank_tensor(noise=0.3)
    lazy, passes = counted_dask(x)
    start = nl.sthosvd(x, 2) if init == "given" else init
    sweeps = []
    nl.hooi(lazy, 2, init=start, max_iter=4, tol=0.0, callback=lambda i, e: sweeps.append(e))
    start_passes = {"sthosvd": 3, "hosvd": 3, "given": 0}[init]
    assert passes() == start_passes + 3 * len(sweeps) + 1
    assert sweeps == sorted(sweeps, reverse=True)


def test_randomized_error_close_to_sthosvd():
    x = low_rank_tensor(noise=0.01)
    t = nl.sthosvd(da.from_array(x, chunks=6), (3, 4, 2), solver="randomized", seed=1)
    best = nl.sthosvd(x, (3, 4, 2))
    error = np.linalg.norm(x - t.to_dense())
    assert error <= 1.05 * np.linalg.norm(x - best.to_dense())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_is_found_in_the_first_pass():
    x = low_rank_tensor()
    x[3, 2, 1] = np.nan
    lazy, passes = counted_dask(x)
    with pytest.raises(ValueError, match="NaN or Inf"):
        nl.sthosvd(lazy, 2)
    assert passes() == 1


def test_bad_arguments_read_nothing():
    lazy, passes = counted_dask(low_rank_tensor())
    with pytest.raises(ValueError, match=r"ranks\[1\]=99"):
        nl.sthosvd(lazy, (2, 99, 2))
    with pytest.raises(ValueError, match=r'solver="svd" is not available for dask.*solver="auto"'):
        nl.hooi(lazy, 2, solver="svd")
    with pytest.raises(ValueError, match="hosvd does not take"):
        nl.hosvd(lazy, 2, solver="randomized")
    with pytest.raises(ValueError, match="init has factors of shapes"):
        nl.hooi(lazy, 2, init=[np.ones((20, 2)), np.ones((16, 3)), np.ones((12, 2))])
    with pytest.raises(ValueError, match="power_iters must be a non-negative int"):
        nl.sthosvd(lazy, 2, solver="randomized", power_iters=-1)
    with pytest.raises(ValueError, match="seed must be None, a non-negative int"):
        nl.sthosvd(lazy, 2, solver="randomized", seed="zero")
    with pytest.raises(TypeError, match="callback must be callable"):
        nl.hooi(lazy, 2, callback=1)
    assert passes() == 0


def test_hooi_takes_numpy_ints_like_numpy():
    x = low_rank_tensor()
    lazy = da.from_array(x, chunks=(7, 5, 6))
    _assert_same(nl.hooi(lazy, 2, max_iter=np.int64(3)), nl.hooi(x, 2, max_iter=np.int64(3)))


# the first pass's Gram sums may meet inf - inf in dask's own tree sum; that pass is redone rescaled
@pytest.mark.filterwarnings("ignore:invalid value encountered in reduce:RuntimeWarning")
def test_extreme_magnitudes_are_rescaled():
    x = low_rank_tensor() * 1e250
    lazy, passes = counted_dask(x)
    t = nl.sthosvd(lazy, (3, 4, 2))
    assert passes() == 3 + 1 + 1  # one extra pass after the rescale
    reference = nl.sthosvd(x / 1e250, (3, 4, 2))
    np.testing.assert_allclose(t.core / 1e250, reference.core, rtol=1e-8, atol=1e-8)


def test_zero_tensor():
    t = nl.hooi(da.zeros((4, 5, 6), chunks=3), 2)
    assert t.ranks == (2, 2, 2) and not t.core.any()
    assert nl.select_ranks(da.zeros((4, 5, 6), chunks=3), energy=0.5) == (1, 1, 1)


def test_distributed_scheduler():
    distributed = import_peer("dask.distributed")
    x = low_rank_tensor()
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        ) as c,
        distributed.Client(c),
    ):
        lazy = da.from_array(x, chunks=6)
        _assert_same(nl.hooi(lazy, (3, 4, 2)), nl.hooi(x, (3, 4, 2)), rtol=1e-8)


def test_tensor_larger_than_the_memory_limit():
    check_larger_than_memory(nl.sthosvd)


@pytest.mark.parametrize("magnitude", [3e38, 1e-37])
def test_float32_near_its_limits_is_rescaled_like_numpy(magnitude):
    """Projections are computed in float32: entries near its limits are rescaled first, exactly."""
    x = (low_rank_tensor() / np.abs(low_rank_tensor()).max() * magnitude).astype(np.float32)
    lazy, passes = counted_dask(x)
    if magnitude > 1:  # the core reaches ‖x‖, beyond float32: refused as numpy refuses it
        with pytest.raises(ValueError, match="cannot be represented in float32"):
            nl.sthosvd(x, (3, 4, 2))
        with pytest.raises(ValueError, match="cannot be represented in float32"):
            nl.sthosvd(lazy, (3, 4, 2))
        return
    t = nl.sthosvd(lazy, (3, 4, 2))
    assert passes() == 3 + 1 + 1  # one extra pass after the rescale
    reference = nl.sthosvd(x.astype(np.float64), (3, 4, 2))
    np.testing.assert_allclose(t.to_dense(), reference.to_dense(), rtol=0, atol=1e-5 * magnitude)
