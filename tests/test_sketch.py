"""tucker_sketch: the single-pass randomized Tucker decomposition."""

from __future__ import annotations

import numpy as np
import pytest

import ndlowrank as nl

from _helpers import (
    assert_close,
    check_larger_than_memory,
    counted_dask,
    low_rank_tensor,
)

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")


def test_exact_low_rank_is_recovered(backend):
    x = nl.random_tucker((12, 10, 8), (2, 3, 2), seed=0).to_dense()
    t = nl.tucker_sketch(backend.asarray(x), (2, 3, 2), seed=0)
    assert t.ranks == (2, 3, 2)
    assert_close(t.to_dense(), x, backend=backend, rtol=0, atol=1e-10 * np.abs(x).max())


def test_error_close_to_sthosvd_and_improves_with_width():
    x = low_rank_tensor(noise=0.05)
    best = np.linalg.norm(x - nl.sthosvd(x, (3, 4, 2)).to_dense())
    errors = [
        np.mean(
            [np.linalg.norm(x - nl.tucker_sketch(x, (3, 4, 2), width=w, seed=s).to_dense()) for s in range(5)]
        )
        for w in (None, (10, 12, 8))
    ]
    assert best <= errors[1] <= errors[0] < 4 * best  # default widths 2r + 1, then wider


def test_dask_reads_once_and_matches_numpy():
    x = low_rank_tensor()
    lazy, passes = counted_dask(x)
    t = nl.tucker(lazy, (3, 4, 2), method="sketch", seed=3)
    assert passes() == 1
    np.testing.assert_allclose(t.to_dense(), nl.tucker_sketch(x, (3, 4, 2), seed=3).to_dense(), atol=1e-10)


def test_tensor_larger_than_the_memory_limit():
    check_larger_than_memory(lambda x, rank: nl.tucker_sketch(x, rank, seed=0))


def test_bad_widths_and_zero_tensor():
    x = np.ones((5, 6, 7))
    with pytest.raises(ValueError, match=r"width\[1\]=1 is below 2"):
        nl.tucker_sketch(x, 2, width=(3, 1, 3))
    with pytest.raises(ValueError, match=r"core_width\[0\]=2 is below 3"):
        nl.tucker_sketch(x, 2, width=3, core_width=(2, 5, 5))
    with pytest.raises(ValueError, match='method="sketch" needs ranks='):
        nl.tucker(x, tol=0.1, method="sketch")
    assert not nl.tucker_sketch(np.zeros((4, 5)), 2).core.any()
    assert not nl.tucker_sketch(da.zeros((4, 5), chunks=2), 2).core.any()


@pytest.mark.parametrize(
    "call",
    [
        lambda seed: nl.tucker_sketch(np.ones((5, 6, 7)), 2, seed=seed),
        lambda seed: nl.random_tucker((5, 6, 7), 2, seed=seed),
        lambda seed: nl.non_negative_tucker(np.ones((5, 6, 7)), 2, init="random", seed=seed),
    ],
)
def test_bad_seed_is_named(call):
    for seed in (-1, 1.5, "0", True):
        with pytest.raises(ValueError, match="seed must be None, a non-negative int or a numpy Generator"):
            call(seed)
    generator = np.random.default_rng(0)
    assert call(generator).ranks == call(np.random.default_rng(0)).ranks
