"""TensorLy parity: each test beside the TensorLy test or function it is ported from.

TensorLy's own results are the reference wherever both libraries define the same thing.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ndlowrank as nl

from _helpers import assert_close, import_peer


def _tensorly():
    tl = import_peer("tensorly")
    tl.set_backend("numpy")
    return tl


# -- tensorly/tenalg/tests/test_n_mode_product.py::test_mode_dot (vector case) -------------


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data())
def test_mode_product_with_a_vector_matches_tensorly(backend, shape, data):
    tl = _tensorly()
    mode = data.draw(st.integers(0, len(shape) - 1))
    rng = np.random.default_rng(len(shape))
    x, v = rng.standard_normal(shape), rng.standard_normal(shape[mode])
    out = nl.mode_product(backend.asarray(x), backend.asarray(v), mode)
    assert_close(out, tl.tenalg.mode_dot(x, v, mode), backend=backend, rtol=1e-10, atol=1e-12)


def test_mode_product_vector_of_wrong_length():
    with pytest.raises(ValueError, match="vector of length 4; contracting mode 1 needs length 3"):
        nl.mode_product(np.ones((2, 3)), np.ones(4), 1)


# -- tensorly/tests/test_tucker_tensor.py::test_tucker_mode_dot ----------------------------


@pytest.mark.parametrize("vector", [False, True])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_tucker_mode_product_matches_tensorly(backend, mode, vector):
    tl = _tensorly()
    from tensorly.tucker_tensor import tucker_mode_dot

    t = nl.random_tucker((5, 4, 3), (2, 3, 2), seed=mode)
    shape = (t.shape[mode],) if vector else (6, t.shape[mode])
    m = np.random.default_rng(0).standard_normal(shape)
    ours = nl.tucker_mode_product(nl.TuckerTensor(*_moved(t, backend)), backend.asarray(m), mode)
    theirs = tl.tucker_to_tensor(tucker_mode_dot((t.core, list(t.factors)), m, mode))
    assert ours.ranks == (t.ranks[:mode] + t.ranks[mode + 1 :] if vector else t.ranks)
    assert_close(ours.to_dense(), theirs, backend=backend, rtol=1e-10, atol=1e-12)


def _moved(t, backend):
    return backend.asarray(np.asarray(t.core)), [backend.asarray(np.asarray(f)) for f in t.factors]


def test_tucker_mode_product_transpose_and_delta_scale():
    t = nl.random_tucker((5, 4), (2, 2), seed=1)
    m = np.random.default_rng(2).standard_normal((4, 7))
    np.testing.assert_allclose(
        nl.tucker_mode_product(t, m, -1, transpose=True).to_dense(), t.to_dense() @ m, rtol=1e-12
    )
    d = nl.tucker_delta((5, 4), 2, init="orthogonal", scale=3.0, seed=0, dtype="float64")
    d.core[...] = 1.0
    np.testing.assert_allclose(nl.tucker_mode_product(d, m.T, 1).to_dense(), d.to_dense() @ m, rtol=1e-12)
    with pytest.raises(TypeError, match="TuckerTensor"):
        nl.tucker_mode_product(np.ones((2, 2)), m, 0)


# -- tensorly/random/tests/test_base.py::test_random_tucker --------------------------------


def test_random_tucker_like_tensorly(backend):
    t = nl.random_tucker(
        (6, 5, 4), (2, 3, 4), orthogonal=True, seed=0, backend=backend.xp, device=backend.device
    )
    assert t.shape == (6, 5, 4) and t.ranks == (2, 3, 4)
    for factor in t.factors:
        assert_close(factor.T @ factor, np.eye(factor.shape[1]), rtol=0, atol=1e-12)
    positive = nl.random_tucker(
        (6, 5, 4), 2, non_negative=True, seed=0, backend=backend.xp, device=backend.device
    )
    assert bool(backend.xp.all(positive.to_dense() >= 0))
    again = nl.random_tucker(
        (6, 5, 4), (2, 3, 4), orthogonal=True, seed=0, backend=backend.xp, device=backend.device
    )
    assert_close(again.core, t.core, backend=backend, rtol=0)


def test_random_tucker_refuses_bad_arguments():
    with pytest.raises(ValueError, match="exclude each other"):
        nl.random_tucker((3, 3), 2, orthogonal=True, non_negative=True)
    with pytest.raises(ValueError, match=r"ranks\[1\]=4"):
        nl.random_tucker((3, 3), (2, 4))


# -- tensorly/decomposition/tests/test_tucker.py::test_non_negative_tucker -----------------


@pytest.mark.parametrize("init", ["svd", "random"])
def test_non_negative_tucker_ported(backend, init):
    tl = _tensorly()
    from tensorly.decomposition import non_negative_tucker

    reference = nl.random_tucker((3, 4, 3), (3, 4, 3), non_negative=True, seed=0)
    x = reference.to_dense()
    t = nl.non_negative_tucker(backend.asarray(x), (3, 4, 3), init=init, max_iter=40, seed=0)
    assert all(bool(backend.xp.all(f >= 0)) for f in (t.core, *t.factors))
    dense = np.asarray(nl._backend.to_numpy(t.to_dense()))
    error = np.linalg.norm(x - dense) / np.linalg.norm(x)
    assert error < 1.0 and np.abs(x - dense).max() < 1.0  # TensorLy's tol_norm_2 and tol_max_abs
    # same algorithm, same start ("svd"), same number of iterations: errors close to TensorLy's
    if init == "svd":
        theirs = tl.tucker_to_tensor(non_negative_tucker(x, [3, 4, 3], n_iter_max=40, init="svd", tol=0.0))
        their_error = np.linalg.norm(x - theirs) / np.linalg.norm(x)
        assert error <= 1.5 * their_error + 1e-6
    single = nl.non_negative_tucker(backend.asarray(x), 3, max_iter=2)
    assert single.ranks == (3, 3, 3)


def test_non_negative_tucker_error_never_increases():
    x = np.abs(np.random.default_rng(0).standard_normal((8, 7, 6)))
    errors = []
    nl.non_negative_tucker(
        x, (3, 3, 2), init="random", seed=1, max_iter=60, tol=0.0, callback=lambda i, e: errors.append(e)
    )
    assert len(errors) == 60
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(errors))
    final = nl.non_negative_tucker(x, (3, 3, 2), init="random", seed=1, max_iter=60, tol=0.0)
    measured = np.linalg.norm(x - final.to_dense()) / np.linalg.norm(x)
    assert measured == pytest.approx(errors[-1], rel=1e-8)


def test_non_negative_tucker_refuses_negative_input():
    with pytest.raises(ValueError, match="negative entries"):
        nl.non_negative_tucker(-np.ones((3, 3)), 1)
    with pytest.raises(ValueError, match="unknown init"):
        nl.non_negative_tucker(np.ones((3, 3)), 1, init="nndsvd")


# -- tensorly/decomposition/tests/test_tucker.py::test_partial_tucker ----------------------


def test_partial_tucker_ported(backend):
    rng = np.random.default_rng(1234)
    x = rng.random((3, 4, 3))
    core, factors = nl.partial_tucker(backend.asarray(x), [4, 3], modes=[1, 2], max_iter=200)
    assert_close(nl.multi_mode_product(core, factors, [1, 2]), x, backend=backend, rtol=0, atol=1e-10)
    core, factors = nl.partial_tucker(backend.asarray(x), [3, 1], modes=[1, 2], max_iter=100)
    assert [tuple(f.shape) for f in factors] == [(4, 3), (3, 1)]
    assert tuple(core.shape) == (3, 3, 1)


def test_partial_tucker_matches_tensorly_error():
    _tensorly()
    from tensorly.decomposition import partial_tucker

    x = np.random.default_rng(5).random((6, 7, 5))
    core, factors = nl.partial_tucker(x, [3, 2], modes=[0, 2], max_iter=100, tol=1e-10)
    ours = np.linalg.norm(x - nl.multi_mode_product(core, factors, [0, 2]))
    (tcore, tfactors), _ = partial_tucker(x, rank=[3, 2], modes=[0, 2], n_iter_max=100, tol=1e-10)
    theirs = np.linalg.norm(x - nl.multi_mode_product(tcore, tfactors, [0, 2]))
    assert ours <= theirs * (1 + 1e-6)


def test_partial_tucker_refuses_bad_modes_and_dask():
    with pytest.raises(ValueError, match="each once"):
        nl.partial_tucker(np.ones((3, 3)), 1, modes=[0, 0])
    da = pytest.importorskip("dask.array")
    with pytest.raises(TypeError, match=r"does not take dask arrays.*x.compute"):
        nl.partial_tucker(da.ones((3, 3), chunks=2), 1, modes=[0])


# -- tensorly/decomposition/tests/test_tucker.py::test_masked_tucker -----------------------


def test_masked_tucker_ported(backend):
    rng = np.random.default_rng(1234)
    x = rng.random((3, 3, 3))
    ones = backend.asarray(np.ones((3, 3, 3)))
    masked = nl.tucker(backend.asarray(x), (2, 2, 2), method="hooi", mask=ones)
    plain = nl.tucker(backend.asarray(x), (2, 2, 2), method="hooi")
    assert_close(masked.to_dense(), plain.to_dense(), backend=backend, rtol=0, atol=1e-3)
    # mask an outlier: the decomposition ignores it
    tensor = nl.random_tucker((5, 5, 5), (1, 1, 1), seed=1234).to_dense()
    corrupted, mask = tensor.copy(), np.ones((5, 5, 5))
    corrupted[0, 0, 0], mask[0, 0, 0] = 1.0, 0
    t = nl.tucker(backend.asarray(corrupted), (1, 1, 1), method="hooi", mask=backend.asarray(mask))
    assert_close(t.to_dense(), tensor, backend=backend, rtol=0, atol=1e-3)


def test_masked_tucker_observed_error_never_increases():
    rng = np.random.default_rng(3)
    x = nl.random_tucker((8, 7, 6), (2, 2, 2), seed=3).to_dense() + 0.01 * rng.standard_normal((8, 7, 6))
    mask = rng.random(x.shape) > 0.3
    x[~mask] = np.nan  # values there are never read
    errors = []
    nl.masked_tucker(x, 2, mask, tol=0.0, max_iter=30, callback=lambda i, e: errors.append(e))
    assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(errors))
    with pytest.raises(ValueError, match="mask has shape"):
        nl.masked_tucker(x, 2, mask[:4])
    with pytest.raises(ValueError, match='mask= needs method="hooi"'):
        nl.tucker(x, 2, mask=mask)


# -- tensorly/tests/test_tucker_tensor.py::test_validate_tucker_rank -----------------------


@pytest.mark.parametrize("fraction", ["same", 0.5, 0.1, 0.01, 2.0])
@pytest.mark.parametrize("shape", [(10, 20, 30), (3, 4, 3), (16, 16, 3, 3)])
def test_fraction_ranks_match_tensorly(shape, fraction):
    _tensorly()
    from tensorly.tucker_tensor import validate_tucker_rank

    expected = tuple(
        min(s, int(r)) for s, r in zip(shape, validate_tucker_rank(shape, fraction), strict=True)
    )
    assert nl.fraction_ranks(shape, fraction) == expected


def test_tucker_takes_a_fraction():
    x = np.random.default_rng(0).standard_normal((10, 20, 30))
    assert nl.tucker(x, 0.1).ranks == nl.fraction_ranks(x.shape, 0.1) == (3, 6, 9)
    assert nl.tucker(x, "same").ranks == nl.fraction_ranks(x.shape, 1.0)
    with pytest.raises(TypeError, match="ranks must be an int"):
        nl.tucker(x, "half")
    with pytest.raises(ValueError, match="fraction='half'"):
        nl.fraction_ranks(x.shape, "half")


@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    rows=st.integers(0, 4),
    data=st.data(),
)
def test_tucker_mode_product_identity(backend, shape, rows, data):
    """``tucker_mode_product(t, M, n)`` equals ``mode_product(t.to_dense(), M, n)``; ``rows=0`` is a vector."""
    mode = data.draw(st.integers(0, len(shape) - 1))
    ranks = [data.draw(st.integers(1, size)) for size in shape]
    t = nl.random_tucker(shape, ranks, seed=len(shape), backend=backend.xp, device=backend.device)
    rng = np.random.default_rng(rows)
    m = backend.asarray(rng.standard_normal((rows, shape[mode]) if rows else shape[mode]))
    expected = nl.mode_product(t.to_dense(), m, mode)
    assert_close(
        nl.tucker_mode_product(t, m, mode).to_dense(), expected, backend=backend, rtol=1e-10, atol=1e-12
    )


def test_partial_tucker_core_out_of_the_dtype_range_is_refused():
    x = np.full((4, 4, 4), 3e38, dtype=np.float32)  # finite, but ‖x‖ exceeds float32's largest
    with pytest.raises(ValueError, match="cannot be represented in float32"):
        nl.partial_tucker(x, 1, modes=[0, 1, 2])
    core, _ = nl.partial_tucker(x / 2**20, 1, modes=[0, 1, 2])  # rescaled and undone exactly
    assert np.isfinite(core).all() and core.dtype == np.float32
