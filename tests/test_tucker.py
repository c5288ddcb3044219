"""TuckerTensor: description, tuple behaviour, to_dense / norm against dense references, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ndlowrank as nl

from _helpers import assert_close, einsum_tucker
from _helpers import normal as _normal

TOL = {"rtol": 1e-10, "atol": 1e-10}
BOTH = r"(?s)(?=.*numpy)(?=.*torch)"


@st.composite
def tucker_cases(draw):
    """Shape (1 to 5 modes, sizes 1 to 7), ranks with 1 <= r_n <= I_n, and a seed."""
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=5)))
    ranks = tuple(draw(st.integers(1, i)) for i in shape)
    return shape, ranks, draw(st.integers(0, 2**32 - 1))


def _draw(shape, ranks, seed):
    core = _normal(seed, *ranks)
    factors = [_normal(seed + 1 + n, i, r) for n, (i, r) in enumerate(zip(shape, ranks, strict=True))]
    return core, factors


def _tucker(backend, core, factors, dtype=None):
    return nl.TuckerTensor(backend.asarray(core, dtype), [backend.asarray(f, dtype) for f in factors])


@given(case=tucker_cases())
def test_description(backend, case):
    shape, ranks, seed = case
    t = _tucker(backend, *_draw(shape, ranks, seed))
    assert t.shape == shape
    assert t.ranks == ranks
    assert t.ndim == len(shape)
    assert t.n_params == math.prod(ranks) + sum(i * r for i, r in zip(shape, ranks, strict=True))
    assert t.dtype == backend.xp.float64
    if backend.device is not None:
        assert str(t.device) == str(backend.device)


@given(case=tucker_cases())
def test_to_dense_matches_einsum(backend, case):
    core, factors = _draw(*case)
    dense = _tucker(backend, core, factors).to_dense()
    assert_close(dense, einsum_tucker(core, factors), backend=backend, dtype=backend.xp.float64, **TOL)


@given(case=tucker_cases())
def test_norm_matches_the_dense_norm(backend, case):
    core, factors = _draw(*case)
    norm = _tucker(backend, core, factors).norm()
    assert tuple(norm.shape) == ()
    expected = np.linalg.norm(einsum_tucker(core, factors))
    assert_close(norm, np.asarray(expected), backend=backend, dtype=backend.xp.float64, **TOL)


def test_norm_of_a_zero_core_is_zero(backend):
    t = _tucker(backend, np.zeros((2, 3)), [_normal(0, 4, 2), _normal(1, 5, 3)])
    assert_close(t.norm(), np.asarray(0.0), backend=backend, rtol=0)


def test_float32_to_dense_and_norm(backend):
    core, factors = _draw((4, 3, 5), (2, 3, 2), 0)
    t = _tucker(backend, core, factors, "float32")
    dense = einsum_tucker(core, factors)
    f32 = {"backend": backend, "dtype": backend.xp.float32, "rtol": 1e-5, "atol": 1e-5}
    assert_close(t.to_dense(), dense, **f32)
    assert_close(t.norm(), np.asarray(np.linalg.norm(dense)), **f32)


def test_behaves_like_a_tuple(backend):
    core, factors = _draw((4, 3), (2, 1), 0)
    t = _tucker(backend, core, factors)
    assert len(t) == 2
    assert t[0] is t.core
    assert t[1] is t.factors
    assert t[-1] is t.factors
    unpacked_core, unpacked_factors = t
    assert unpacked_core is t.core
    assert len(unpacked_factors) == 2
    assert all(a is b for a, b in zip(unpacked_factors, t.factors, strict=True))
    assert isinstance(t.factors, tuple)
    with pytest.raises(IndexError):
        t[2]


def test_accepts_any_iterable_of_factors(backend):
    core, factors = _draw((4, 3), (2, 1), 0)
    t = nl.TuckerTensor(backend.asarray(core), (backend.asarray(f) for f in factors))
    assert t.shape == (4, 3)


def test_repr_mentions_shape_and_ranks(backend):
    t = _tucker(backend, *_draw((4, 3, 5), (2, 1, 3), 0))
    text = repr(t)
    assert text.startswith("TuckerTensor(")
    assert "shape=(4, 3, 5)" in text
    assert "ranks=(2, 1, 3)" in text
    assert backend.name in text


# -- bad input ----------------------------------------------------------------------------------


def test_wrong_number_of_factors(backend):
    core = backend.asarray(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"2 modes \(shape \(2, 3\)\) but 1 factors"):
        nl.TuckerTensor(core, [backend.asarray(np.ones((4, 2)))])
    with pytest.raises(ValueError, match=r"2 modes .* but 3 factors"):
        nl.TuckerTensor(core, [backend.asarray(np.ones((4, 2)))] * 3)


def test_factor_must_be_2d(backend):
    core = backend.asarray(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"factors\[1\] must be 2-D, got shape \(5, 3, 1\)"):
        nl.TuckerTensor(core, [backend.asarray(np.ones((4, 2))), backend.asarray(np.ones((5, 3, 1)))])
    with pytest.raises(ValueError, match=r"factors\[0\] must be 2-D, got shape \(4,\)"):
        nl.TuckerTensor(core, [backend.asarray(np.ones(4)), backend.asarray(np.ones((5, 3)))])


def test_factor_columns_must_match_the_core_and_the_message_names_the_mode(backend):
    core = backend.asarray(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"mode 1: factors\[1\] has 2 columns .* size 3 on mode 1"):
        nl.TuckerTensor(core, [backend.asarray(np.ones((4, 2))), backend.asarray(np.ones((5, 2)))])


def test_mixing_numpy_and_torch_is_a_type_error_naming_both():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=BOTH):
        nl.TuckerTensor(np.ones((2, 1)), [np.ones((4, 2)), torch.ones(3, 1, dtype=torch.float64)])
    with pytest.raises(TypeError, match=BOTH):
        nl.TuckerTensor(torch.ones(2, 1), [np.ones((4, 2)), np.ones((3, 1))])


def test_non_array_core_or_factor_is_a_type_error(backend):
    with pytest.raises(TypeError, match=r"core must be an array.*list"):
        nl.TuckerTensor([[1.0]], [backend.asarray(np.ones((2, 1)))] * 2)
    with pytest.raises(TypeError, match=r"factors\[0\] must be an array.*list"):
        nl.TuckerTensor(backend.asarray(np.ones((1, 1))), [[[1.0]], backend.asarray(np.ones((2, 1)))])
