"""Tensor algebra: unfold / fold, mode-n products, their identities, autograd and bad input.

Every identity is a hypothesis property checked on each installed backend against an
independent float64 numpy reference (``np.moveaxis`` + ``reshape``, ``np.einsum``).
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ndlowrank as nl
from ndlowrank.tenalg import _product_order

from _helpers import LETTERS, assert_close, einsum_tucker
from _helpers import normal as _normal

TOL = {"rtol": 1e-10, "atol": 1e-10}
BOTH = r"(?s)(?=.*numpy)(?=.*torch)"  # the message names both backends, in any order

sizes = st.integers(1, 7)
seeds = st.integers(0, 2**32 - 1)


def einsum_mode_product(x: np.ndarray, matrix: np.ndarray, mode: int) -> np.ndarray:
    """Independent reference for ``x ×_mode matrix`` with ``matrix`` of shape ``(J, I_mode)``."""
    idx = LETTERS[: x.ndim]
    out = idx.replace(idx[mode], "z")
    return np.einsum(f"{idx},z{idx[mode]}->{out}", x, matrix)


@st.composite
def mode_cases(draw, min_ndim: int = 1):
    """A shape (1 to 6 modes, sizes 1 to 7), a mode (possibly negative), an output size, a seed."""
    shape = tuple(draw(st.lists(sizes, min_size=min_ndim, max_size=6)))
    mode = draw(st.integers(-len(shape), len(shape) - 1))
    return shape, mode, draw(sizes), draw(seeds)


@st.composite
def multi_cases(draw):
    """A shape, a non-sorted subset of modes (some given as negative), output sizes and a skip."""
    shape = tuple(draw(st.lists(sizes, min_size=1, max_size=5)))
    ndim = len(shape)
    order = draw(st.permutations(range(ndim)))
    modes = list(order[: draw(st.integers(1, ndim))])
    given_modes = [m - ndim if draw(st.booleans()) else m for m in modes]
    out_sizes = [draw(sizes) for _ in modes]
    skip = draw(
        st.one_of(
            st.none(),
            st.sampled_from(given_modes),
            st.lists(st.sampled_from(given_modes), unique=True).map(tuple),
        )
    )
    return shape, modes, given_modes, out_sizes, skip, draw(seeds)


def _skipped(skip, ndim: int) -> set[int]:
    if skip is None:
        return set()
    return {s % ndim for s in ([skip] if isinstance(skip, int) else skip)}


# -- unfold / fold ------------------------------------------------------------------------


@given(case=mode_cases())
def test_unfold_matches_numpy_moveaxis_reshape(backend, case):
    shape, mode, _, seed = case
    x = _normal(seed, *shape)
    expected = np.moveaxis(x, mode, 0).reshape(shape[mode], -1)
    actual = nl.unfold(backend.asarray(x), mode)
    assert_close(actual, expected, backend=backend, dtype=backend.xp.float64, rtol=0)


@given(case=mode_cases())
def test_fold_inverts_unfold(backend, case):
    shape, mode, _, seed = case
    x = _normal(seed, *shape)
    bx = backend.asarray(x)
    assert_close(nl.fold(nl.unfold(bx, mode), mode, shape), x, backend=backend, rtol=0)
    matrix = np.moveaxis(x, mode, 0).reshape(shape[mode], -1)
    assert_close(nl.unfold(nl.fold(backend.asarray(matrix), mode, shape), mode), matrix, rtol=0)


@given(case=mode_cases())
def test_negative_mode_counts_from_the_end(backend, case):
    shape, mode, j, seed = case
    bx = backend.asarray(_normal(seed, *shape))
    positive, negative = mode % len(shape), mode % len(shape) - len(shape)
    assert_close(nl.unfold(bx, negative), nl.unfold(bx, positive), rtol=0)
    m = backend.asarray(_normal(seed + 1, j, shape[mode]))
    assert_close(nl.mode_product(bx, m, negative), nl.mode_product(bx, m, positive), rtol=0)


def test_fold_inverts_unfold_with_a_zero_size_mode(backend):
    x = np.zeros((0, 3))
    unfolded = nl.unfold(backend.asarray(x), 0)
    assert tuple(unfolded.shape) == (0, 3)
    assert tuple(nl.fold(unfolded, 0, x.shape).shape) == (0, 3)


# -- mode_product ---------------------------------------------------------------------------


@given(case=mode_cases())
def test_mode_product_matches_einsum(backend, case):
    shape, mode, j, seed = case
    x, m = _normal(seed, *shape), _normal(seed + 1, j, shape[mode])
    actual = nl.mode_product(backend.asarray(x), backend.asarray(m), mode)
    expected = einsum_mode_product(x, m, mode % len(shape))
    assert_close(actual, expected, backend=backend, dtype=backend.xp.float64, **TOL)


@given(case=mode_cases(min_ndim=2), data=st.data())
def test_mode_products_on_different_modes_commute(backend, case, data):
    shape, mode, j, seed = case
    other = data.draw(st.sampled_from([n for n in range(len(shape)) if n != mode % len(shape)]))
    k = data.draw(sizes)
    bx = backend.asarray(_normal(seed, *shape))
    a = backend.asarray(_normal(seed + 1, j, shape[mode]))
    b = backend.asarray(_normal(seed + 2, k, shape[other]))
    ab = nl.mode_product(nl.mode_product(bx, a, mode), b, other)
    ba = nl.mode_product(nl.mode_product(bx, b, other), a, mode)
    assert_close(ab, ba, backend=backend, **TOL)


@given(case=mode_cases(), k=sizes)
def test_repeated_mode_product_is_product_with_the_matrix_product(backend, case, k):
    shape, mode, j, seed = case
    bx = backend.asarray(_normal(seed, *shape))
    a = backend.asarray(_normal(seed + 1, j, shape[mode]))
    b = backend.asarray(_normal(seed + 2, k, j))
    twice = nl.mode_product(nl.mode_product(bx, a, mode), b, mode)
    assert_close(twice, nl.mode_product(bx, b @ a, mode), backend=backend, **TOL)


@given(case=mode_cases())
def test_transpose_true_equals_the_transposed_matrix(backend, case):
    shape, mode, j, seed = case
    x, m = _normal(seed, *shape), _normal(seed + 1, shape[mode], j)
    bx, bm = backend.asarray(x), backend.asarray(m)
    actual = nl.mode_product(bx, bm, mode, transpose=True)
    assert_close(actual, nl.mode_product(bx, bm.T, mode), backend=backend, **TOL)
    assert_close(actual, einsum_mode_product(x, m.T, mode % len(shape)), **TOL)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mode_product_keeps_namespace_device_and_dtype(backend, dtype):
    x, m = _normal(0, 2, 3, 4), _normal(1, 5, 3)
    actual = nl.mode_product(backend.asarray(x, dtype), backend.asarray(m, dtype), 1)
    rtol = 1e-5 if dtype == "float32" else 1e-12
    expected = einsum_mode_product(x, m, 1)
    assert_close(actual, expected, backend=backend, dtype=getattr(backend.xp, dtype), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("x_dtype, m_dtype", [("float32", "float64"), ("float64", "float32")])
def test_mixed_float_dtypes_promote_to_float64(backend, x_dtype, m_dtype):
    xp = backend.xp
    x, m = _normal(0, 2, 3, 4), _normal(1, 5, 4)
    bx, bm = backend.asarray(x, x_dtype), backend.asarray(m, m_dtype)
    expected = einsum_mode_product(x, m, 2)
    opts = {"backend": backend, "dtype": xp.float64, "rtol": 1e-6, "atol": 1e-6}
    assert_close(nl.mode_product(bx, bm, 2), expected, **opts)
    m0 = _normal(2, 3, 2)
    bm0 = backend.asarray(m0, x_dtype)
    both = nl.multi_mode_product(bx, [bm, bm0], modes=[2, 0])
    assert_close(both, einsum_mode_product(expected, m0, 0), **opts)


# -- multi_mode_product -----------------------------------------------------------------------


@given(case=multi_cases(), transpose=st.booleans())
def test_multi_mode_product_equals_sequential_products(backend, case, transpose):
    shape, modes, given_modes, out_sizes, skip, seed = case
    x = _normal(seed, *shape)
    mats = [
        _normal(seed + 1 + k, shape[m], j) if transpose else _normal(seed + 1 + k, j, shape[m])
        for k, (m, j) in enumerate(zip(modes, out_sizes, strict=True))
    ]
    skipped = _skipped(skip, len(shape))
    expected, sequential = x, backend.asarray(x)
    for mode, mat in zip(modes, mats, strict=True):
        if mode not in skipped:
            expected = einsum_mode_product(expected, mat.T if transpose else mat, mode)
            sequential = nl.mode_product(sequential, backend.asarray(mat), mode, transpose=transpose)
    actual = nl.multi_mode_product(
        backend.asarray(x),
        [backend.asarray(m) for m in mats],
        modes=given_modes,
        skip=skip,
        transpose=transpose,
    )
    assert_close(actual, expected, backend=backend, dtype=backend.xp.float64, **TOL)
    assert_close(actual, sequential, **TOL)


@pytest.mark.parametrize("skip", [0, -3, [0], (0,), range(1)])
def test_skip_names_a_mode_not_a_position(backend, skip):
    """TensorLy's ``multi_mode_dot(x, ms, modes=[2, 0], skip=0)`` skips the wrong matrix."""
    x = _normal(0, 2, 3, 4)
    for_mode_2, for_mode_0 = _normal(1, 5, 4), _normal(2, 6, 2)
    bx = backend.asarray(x)
    mats = [backend.asarray(for_mode_2), backend.asarray(for_mode_0)]
    actual = nl.multi_mode_product(bx, mats, modes=[2, 0], skip=skip)
    assert_close(actual, einsum_mode_product(x, for_mode_2, 2), backend=backend, **TOL)
    assert tuple(actual.shape) == (2, 3, 5)


def test_default_modes_are_the_leading_modes(backend):
    x, a, b = _normal(0, 2, 3, 4), _normal(1, 5, 2), _normal(2, 6, 3)
    actual = nl.multi_mode_product(backend.asarray(x), [backend.asarray(a), backend.asarray(b)])
    expected = einsum_mode_product(einsum_mode_product(x, a, 0), b, 1)
    assert_close(actual, expected, backend=backend, **TOL)


def test_multi_mode_product_with_every_mode_skipped_returns_the_input(backend):
    x = _normal(0, 2, 3)
    actual = nl.multi_mode_product(backend.asarray(x), [backend.asarray(_normal(1, 4, 3))], [1], skip=1)
    assert_close(actual, x, backend=backend, rtol=0)


@given(shape=st.lists(sizes, min_size=1, max_size=5), data=st.data())
def test_tucker_to_tensor_matches_einsum(backend, shape, data):
    ranks = [data.draw(st.integers(1, i)) for i in shape]
    seed = data.draw(seeds)
    core = _normal(seed, *ranks)
    factors = [_normal(seed + 1 + n, i, r) for n, (i, r) in enumerate(zip(shape, ranks, strict=True))]
    actual = nl.tucker_to_tensor(backend.asarray(core), [backend.asarray(f) for f in factors])
    expected = einsum_tucker(core, factors)
    assert_close(actual, expected, backend=backend, dtype=backend.xp.float64, **TOL)


@given(jis=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=4), data=st.data())
def test_product_order_minimises_the_cost_of_the_chain(jis, data):
    modes = data.draw(st.permutations(range(len(jis))))
    steps = [(mode, j, i) for mode, (j, i) in zip(modes, jis, strict=True)]

    def cost(order) -> Fraction:
        size, total = Fraction(math.prod(i for _, _, i in order)), Fraction(0)
        for _, j, i in order:
            total += j * size
            size = size * j / i
        return total

    chosen = _product_order(list(steps))
    assert sorted(chosen) == sorted(steps)
    assert cost(chosen) == min(cost(order) for order in itertools.permutations(steps))


# -- autograd -------------------------------------------------------------------------------------


@given(case=mode_cases())
def test_mode_product_gradients_match_torch_einsum(case):
    torch = pytest.importorskip("torch")
    shape, mode, j, seed = case
    mode %= len(shape)
    x0, m0 = _normal(seed, *shape), _normal(seed + 1, j, shape[mode])
    out_shape = (*shape[:mode], j, *shape[mode + 1 :])
    weight = torch.from_numpy(_normal(seed + 2, *out_shape))

    def grads(product):
        x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
        m = torch.tensor(m0, dtype=torch.float64, requires_grad=True)
        (product(x, m) * weight).sum().backward()
        return x.grad, m.grad

    idx = LETTERS[: len(shape)]
    spec = f"{idx},z{idx[mode]}->{idx.replace(idx[mode], 'z')}"
    for ours, reference in zip(
        grads(lambda x, m: nl.mode_product(x, m, mode)),
        grads(lambda x, m: torch.einsum(spec, x, m)),
        strict=True,
    ):
        assert ours is not None
        assert_close(ours, reference, dtype=torch.float64, **TOL)


@given(case=multi_cases())
def test_multi_mode_product_gradients_match_torch_einsum(case):
    torch = pytest.importorskip("torch")
    shape, modes, given_modes, out_sizes, _, seed = case
    x0 = _normal(seed, *shape)
    mats0 = [
        _normal(seed + 1 + k, j, shape[m]) for k, (m, j) in enumerate(zip(modes, out_sizes, strict=True))
    ]
    out_shape = list(shape)
    for m, j in zip(modes, out_sizes, strict=True):
        out_shape[m] = j
    weight = torch.from_numpy(_normal(seed + 99, *out_shape))

    idx = LETTERS[: len(shape)]
    out = list(idx)
    operands = []
    for k, m in enumerate(modes):
        new = chr(ord("n") + k)
        operands.append(f"{new}{idx[m]}")
        out[m] = new
    spec = f"{idx},{','.join(operands)}->{''.join(out)}"

    def grads(product):
        x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
        mats = [torch.tensor(m, dtype=torch.float64, requires_grad=True) for m in mats0]
        (product(x, mats) * weight).sum().backward()
        return [x.grad, *(m.grad for m in mats)]

    ours = grads(lambda x, mats: nl.multi_mode_product(x, mats, modes=given_modes))
    reference = grads(lambda x, mats: torch.einsum(spec, x, *mats))
    for a, b in zip(ours, reference, strict=True):
        assert a is not None
        assert_close(a, b, dtype=torch.float64, **TOL)


# -- bad input ----------------------------------------------------------------------------------


def test_mixing_numpy_and_torch_is_a_type_error_naming_both():
    torch = pytest.importorskip("torch")
    x, m = np.ones((2, 3)), np.ones((4, 3))
    tx, tm = torch.ones(2, 3, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match=BOTH):
        nl.mode_product(x, tm, 1)
    with pytest.raises(TypeError, match=BOTH):
        nl.mode_product(tx, m, 1)
    with pytest.raises(TypeError, match=BOTH):
        nl.multi_mode_product(x, [np.ones((5, 2)), tm], modes=[0, 1])
    with pytest.raises(TypeError, match=BOTH):
        nl.multi_mode_product(tx, [m], modes=[1])
    with pytest.raises(TypeError, match=BOTH):
        nl.tucker_to_tensor(np.ones((1, 1)), [np.ones((2, 1)), torch.ones(3, 1)])


def test_non_arrays_are_a_type_error(backend):
    x = backend.asarray(np.ones((2, 3)))
    with pytest.raises(TypeError, match="list"):
        nl.mode_product(x, [[1.0, 2.0, 3.0]], 1)
    with pytest.raises(TypeError, match="list"):
        nl.mode_product([[1.0, 2.0, 3.0]], backend.asarray(np.ones((2, 3))), 1)
    with pytest.raises(TypeError, match=r"matrices\[0\].*list"):
        nl.multi_mode_product(x, [[[1.0, 2.0]]])
    with pytest.raises(TypeError, match="list"):
        nl.unfold([[1.0]], 0)
    with pytest.raises(TypeError, match="list"):
        nl.fold([[1.0]], 0, (1, 1))


@pytest.mark.parametrize("mode", [3, -4, 10])
def test_mode_out_of_range_is_a_value_error(backend, mode):
    x = backend.asarray(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=rf"mode={mode}\b.*3 modes"):
        nl.mode_product(x, backend.asarray(np.ones((2, 2))), mode)
    with pytest.raises(ValueError, match=rf"mode={mode}\b"):
        nl.unfold(x, mode)
    with pytest.raises(ValueError, match=rf"mode={mode}\b"):
        nl.fold(backend.asarray(np.ones((2, 12))), mode, (2, 3, 4))
    with pytest.raises(ValueError, match=rf"modes\[1\]={mode}\b"):
        nl.multi_mode_product(x, [backend.asarray(np.ones((2, 2)))] * 2, modes=[0, mode])


@pytest.mark.parametrize("mode", [1.0, "1", True, None])
def test_non_integer_mode_is_a_type_error(backend, mode):
    x = backend.asarray(np.ones((2, 3)))
    with pytest.raises(TypeError, match="mode must be an int"):
        nl.mode_product(x, backend.asarray(np.ones((3, 3))), mode)


def test_matrix_with_the_wrong_inner_size_names_the_mode(backend):
    x = backend.asarray(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"\(5, 2\).*mode 1 \(3\)"):
        nl.mode_product(x, backend.asarray(np.ones((5, 2))), 1)
    with pytest.raises(ValueError, match=r"mode 2 \(4\).*transpose"):
        nl.mode_product(x, backend.asarray(np.ones((5, 4))), 2, transpose=True)
    with pytest.raises(ValueError, match=r"matrices\[1\].*mode 0 \(2\)"):
        mats = [backend.asarray(np.ones((5, 3))), backend.asarray(np.ones((5, 3)))]
        nl.multi_mode_product(x, mats, modes=[1, 0])


def test_matrix_must_be_2d(backend):
    x = backend.asarray(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"2-D.*\(1, 5, 3\)"):
        nl.mode_product(x, backend.asarray(np.ones((1, 5, 3))), 1)
    with pytest.raises(ValueError, match=r"2-D.*\(\)"):  # a vector contracts the mode; a scalar is refused
        nl.mode_product(x, backend.asarray(np.ones(())), 1)
    with pytest.raises(ValueError, match=r"matrices\[0\] must be 2-D"):
        nl.multi_mode_product(x, [backend.asarray(np.ones((1, 5, 2)))])


def test_fold_with_the_wrong_matrix_shape(backend):
    with pytest.raises(ValueError, match=r"\(3, 7\).*mode 1.*\(2, 3, 4\).*\(3, 8\)"):
        nl.fold(backend.asarray(np.ones((3, 7))), 1, (2, 3, 4))
    with pytest.raises(ValueError, match=r"\(4, 6\)"):
        nl.fold(backend.asarray(np.ones((6, 4))), 2, (2, 3, 4))


def test_multi_mode_product_bad_modes_and_skip(backend):
    x = backend.asarray(np.ones((2, 3, 4)))
    a, b = backend.asarray(np.ones((5, 2))), backend.asarray(np.ones((5, 2)))
    with pytest.raises(ValueError, match=r"modes=\[0, 0\] repeats"):
        nl.multi_mode_product(x, [a, b], modes=[0, 0])
    with pytest.raises(ValueError, match=r"modes=\[0, 0\] repeats"):
        nl.multi_mode_product(x, [a, b], modes=[0, -3])
    with pytest.raises(ValueError, match="2 matrices but 1 modes"):
        nl.multi_mode_product(x, [a, b], modes=[0])
    with pytest.raises(ValueError, match="1 matrices but 2 modes"):
        nl.multi_mode_product(x, [a], modes=[0, 1])
    with pytest.raises(ValueError, match=r"skip=\[2\]"):
        nl.multi_mode_product(x, [a], modes=[0], skip=2)
    with pytest.raises(ValueError, match=r"skip=\[1, 2\]"):
        nl.multi_mode_product(x, [a], modes=[0], skip=[0, 1, 2])
    with pytest.raises(ValueError, match=r"skip=5\b"):
        nl.multi_mode_product(x, [a], modes=[0], skip=5)


def test_tucker_to_tensor_with_the_wrong_number_of_factors(backend):
    with pytest.raises(ValueError, match="2 modes but 1 factors"):
        nl.tucker_to_tensor(backend.asarray(np.ones((1, 1))), [backend.asarray(np.ones((2, 1)))])
