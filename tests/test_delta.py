"""tucker_delta / TuckerDelta: zero at init, seeding, dtype and device, scale, rank validation, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ndlowrank as nl
from ndlowrank._backend import to_numpy

from _helpers import assert_close, einsum_tucker
from _helpers import normal as _normal

INIT_NAMES = sorted(nl.INITS)


@st.composite
def delta_cases(draw):
    """Shape (1 to 4 modes, sizes 1 to 6), ranks with 1 <= r_n <= I_n, and a seed."""
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
    ranks = tuple(draw(st.integers(1, i)) for i in shape)
    return shape, ranks, draw(st.integers(0, 2**32 - 1))


def _delta(backend, shape, ranks, **options):
    return nl.tucker_delta(shape, ranks, backend=backend.name, device=backend.device, **options)


def _arrays(d) -> list[np.ndarray]:
    return [to_numpy(d.core), *(to_numpy(f) for f in d.factors)]


def test_known_inits():
    assert {"zero_core", "zero_factor", "orthogonal"} <= set(nl.INITS)


@given(case=delta_cases(), init=st.sampled_from(INIT_NAMES))
def test_to_dense_is_exactly_zero_at_init(backend, case, init):
    shape, ranks, seed = case
    d = _delta(backend, shape, ranks, init=init, seed=seed, dtype="float64")
    dense = d.to_dense()
    assert_close(dense, np.zeros(shape), backend=backend, dtype=backend.xp.float64, rtol=0, atol=0)
    assert float(to_numpy(d.norm())) == 0.0


@given(case=delta_cases(), init=st.sampled_from(INIT_NAMES))
def test_shapes_ranks_and_n_params(backend, case, init):
    shape, ranks, seed = case
    d = _delta(backend, shape, ranks, init=init, seed=seed)
    assert isinstance(d, nl.TuckerDelta)
    assert isinstance(d, nl.TuckerTensor)
    assert d.shape == shape
    assert d.ranks == ranks
    assert tuple(d.core.shape) == ranks
    assert [tuple(f.shape) for f in d.factors] == list(zip(shape, ranks, strict=True))
    assert d.n_params == math.prod(ranks) + sum(i * r for i, r in zip(shape, ranks, strict=True))


@given(case=delta_cases())
def test_int_ranks_apply_to_every_mode(case):
    shape, _, seed = case
    rank = min(shape)
    assert nl.tucker_delta(shape, rank, seed=seed).ranks == (rank,) * len(shape)


@given(case=delta_cases())
def test_orthogonal_factors_are_orthonormal(backend, case):
    shape, ranks, seed = case
    d = _delta(backend, shape, ranks, init="orthogonal", seed=seed, dtype="float64")
    for factor, rank in zip(d.factors, ranks, strict=True):
        assert_close(factor.T @ factor, np.eye(rank), backend=backend, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rank", [2, 8])
def test_zero_core_factor_std_is_one_over_sqrt_two_rank(backend, rank):
    d = _delta(backend, (4000, rank), rank, init="zero_core", seed=0, dtype="float64")
    big = to_numpy(d.factors[0])
    assert big.shape == (4000, rank)
    assert abs(big.mean()) < 0.02
    assert big.std() == pytest.approx(1.0 / math.sqrt(2.0 * rank), rel=0.03)


def test_zero_factor_zeroes_the_output_factor_only(backend):
    d = _delta(backend, (6, 5, 4), (3, 2, 2), init="zero_factor", seed=0, dtype="float64")
    core, factors = _arrays(d)[0], _arrays(d)[1:]
    assert not factors[0].any()
    assert factors[1].any() and factors[2].any() and core.any()


@given(case=delta_cases(), init=st.sampled_from(INIT_NAMES), data=st.data())
def test_same_seed_gives_the_same_numbers_on_every_backend(backend, case, init, data):
    shape, ranks, seed = case
    dtypes = [name for name in ("float64", "float32", "float16") if hasattr(backend.xp, name)]
    dtype = data.draw(st.sampled_from(dtypes))
    reference = nl.tucker_delta(shape, ranks, init=init, seed=seed, backend="numpy", dtype="float64")
    d = _delta(backend, shape, ranks, init=init, seed=seed, dtype=dtype)
    arrays = [d.core, *d.factors]
    for actual, expected in zip(arrays, _arrays(reference), strict=True):
        cast = expected.astype(dtype)  # the float64 draw rounded once to the target dtype
        assert_close(actual, cast, backend=backend, dtype=getattr(backend.xp, dtype), rtol=0, atol=0)


@pytest.mark.parametrize("init", INIT_NAMES)
def test_different_seeds_give_different_numbers(backend, init):
    first = _arrays(_delta(backend, (5, 4, 3), (3, 2, 2), init=init, seed=1))
    second = _arrays(_delta(backend, (5, 4, 3), (3, 2, 2), init=init, seed=2))
    assert any(not np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_numpy_generator_as_seed(backend):
    from_int = _arrays(_delta(backend, (5, 4, 3), 2, seed=7))
    from_generator = _arrays(_delta(backend, (5, 4, 3), 2, seed=np.random.default_rng(7)))
    for a, b in zip(from_int, from_generator, strict=True):
        np.testing.assert_array_equal(a, b)


def test_generator_seed_is_consumed(backend):
    rng = np.random.default_rng(7)
    first = _arrays(_delta(backend, (5, 4), 2, seed=rng))
    second = _arrays(_delta(backend, (5, 4), 2, seed=rng))
    assert not np.array_equal(first[1], second[1])


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_dtype_by_name_is_honoured(backend, dtype):
    xp = backend.xp
    if not hasattr(xp, dtype):
        pytest.skip(f"{backend.name} has no {dtype}")
    d = _delta(backend, (5, 4, 3), 2, seed=0, dtype=dtype)
    expected = getattr(xp, dtype)
    for array in (d.core, *d.factors, d.to_dense()):
        assert array.dtype == expected
    assert d.dtype == expected


def test_default_dtype_is_float32(backend):
    d = _delta(backend, (5, 4, 3), 2, seed=0)
    assert d.core.dtype == backend.xp.float32
    assert all(f.dtype == backend.xp.float32 for f in d.factors)


def test_backend_dtype_objects_are_honoured():
    torch = pytest.importorskip("torch")
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        d = nl.tucker_delta((5, 4), 2, backend="torch", dtype=dtype, seed=0)
        assert d.core.dtype == dtype
        assert all(f.dtype == dtype for f in d.factors)
        assert d.to_dense().dtype == dtype
    d = nl.tucker_delta((5, 4), 2, backend=torch, dtype=torch.float16, seed=0)
    assert d.core.dtype == torch.float16
    assert nl.tucker_delta((5, 4), 2, dtype=np.float16, seed=0).core.dtype == np.float16
    assert nl.tucker_delta((5, 4), 2, dtype=np.dtype("float64"), seed=0).core.dtype == np.float64


def test_device_is_honoured(backend):
    d = _delta(backend, (5, 4, 3), (2, 3, 1), seed=0, dtype="float64")
    for array in (d.core, *d.factors, d.to_dense(), d.norm()):
        assert_close(array, to_numpy(array), backend=backend, rtol=0)
    if backend.device is not None:
        assert str(d.device) == str(backend.device)


def test_default_backend_is_numpy():
    d = nl.tucker_delta((5, 4), 2, seed=0)
    assert type(d.core) is np.ndarray
    assert all(type(f) is np.ndarray for f in d.factors)


@given(case=delta_cases(), scale=st.floats(-8.0, 8.0, allow_nan=False))
def test_scale_multiplies_to_dense_and_norm(backend, case, scale):
    shape, ranks, seed = case
    core = _normal(seed, *ranks)
    factors = [_normal(seed + 1 + n, i, r) for n, (i, r) in enumerate(zip(shape, ranks, strict=True))]
    d = nl.TuckerDelta(backend.asarray(core), [backend.asarray(f) for f in factors], scale=scale)
    dense = einsum_tucker(core, factors)
    opts = {"backend": backend, "dtype": backend.xp.float64, "rtol": 1e-10, "atol": 1e-10}
    assert_close(d.to_dense(), scale * dense, **opts)
    assert_close(d.norm(), np.asarray(abs(scale) * np.linalg.norm(dense)), **opts)
    assert d.n_params == math.prod(ranks) + sum(i * r for i, r in zip(shape, ranks, strict=True))


def test_scale_is_stored_and_shown(backend):
    d = _delta(backend, (5, 4), 2, scale=4, seed=0)
    assert d.scale == 4.0
    assert isinstance(d.scale, float)
    text = repr(d)
    assert text.startswith("TuckerDelta(")
    assert "shape=(5, 4)" in text and "ranks=(2, 2)" in text and "scale=4.0" in text


def test_validate_ranks_clips_ints_but_not_tuples():
    assert nl.validate_ranks(8, (16, 16, 3, 3), clip=True) == (8, 8, 3, 3)
    assert nl.validate_ranks(2, (4, 5, 3)) == (2, 2, 2)
    assert nl.validate_ranks([1, 2, 3], (4, 5, 3), clip=True) == (1, 2, 3)
    with pytest.raises(ValueError, match=r"ranks\[2\]=5 .*mode 2 of size 3"):
        nl.validate_ranks((1, 2, 5), (4, 5, 3), clip=True)
    with pytest.raises(ValueError, match=r"ranks\[0\]=0"):
        nl.validate_ranks(0, (4, 5, 3), clip=True)
    with pytest.raises(ValueError, match=r"ranks\[2\]=8 .*size 3"):
        nl.validate_ranks(8, (16, 16, 3), clip=False)


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, ranks, error, pattern",
    [
        ((4, 5, 3), 0, ValueError, r"ranks\[0\]=0 .*mode 0 of size 4"),
        ((4, 5, 3), (1, 0, 1), ValueError, r"ranks\[1\]=0 .*mode 1 of size 5"),
        ((4, 5, 3), (1, -2, 1), ValueError, r"ranks\[1\]=-2"),
        ((4, 5, 3), (2, 2, 5), ValueError, r"ranks\[2\]=5 .*mode 2 of size 3"),
        ((4, 5, 3), 4, ValueError, r"ranks\[1\]=4 .*mode 1 of size 5|ranks\[2\]=4 .*mode 2 of size 3"),
        ((4, 5, 3), (2, 2), ValueError, r"ranks=\(2, 2\) has 2 entries .*\(4, 5, 3\) has 3 modes"),
        ((4, 5, 3), (2, 2, 2, 2), ValueError, r"4 entries .* 3 modes"),
        ((4, 5, 3), 2.0, TypeError, r"ranks must be an int .*2\.0"),
        ((4, 5, 3), (2, 2.5, 2), TypeError, r"ranks\[1\] must be an int, got 2\.5"),
        ((4, 5, 3), True, TypeError, r"ranks must be an int .*True"),
        ((4, 5, 3), (2, True, 2), TypeError, r"ranks\[1\] must be an int, got True"),
        ((4, 5, 3), "2", TypeError, r"ranks must be an int .*'2'"),
        ((4, 0, 3), 1, ValueError, r"shape\[1\]=0"),
        ((4, -2, 3), 1, ValueError, r"shape\[1\]=-2"),
        ((), 1, ValueError, r"shape must have at least one mode"),
        ((4, 2.0), 1, TypeError, r"shape\[1\] must be an int"),
    ],
)
def test_bad_shape_or_ranks(shape, ranks, error, pattern):
    with pytest.raises(error, match=pattern):
        nl.tucker_delta(shape, ranks)


@pytest.mark.parametrize(
    "options, error, pattern",
    [
        ({"init": "kaiming"}, ValueError, r"init='kaiming'.*'zero_core'"),
        ({"init": None}, ValueError, r"init=None.*'orthogonal'"),
        ({"dtype": "int32"}, ValueError, r"dtype='int32' is not a real floating dtype"),
        ({"dtype": "complex128"}, ValueError, r"dtype='complex128'"),
        ({"dtype": "float8"}, ValueError, r"dtype='float8'"),
        ({"dtype": np.int64}, ValueError, r"dtype=.*int64"),
        ({"seed": -1}, ValueError, r"seed.*-1"),
        ({"seed": 1.5}, ValueError, r"seed.*1\.5"),
        ({"seed": True}, ValueError, r"seed.*True"),
        ({"scale": float("nan")}, ValueError, r"scale must be a finite number, got nan"),
        ({"scale": float("inf")}, ValueError, r"scale must be a finite number, got inf"),
        ({"scale": "2.0"}, TypeError, r"scale must be a real number, got '2\.0'"),
        ({"scale": None}, TypeError, r"scale must be a real number, got None"),
        ({"backend": "jax2"}, ValueError, r"unknown backend='jax2'; available backends: \['numpy'"),
        ({"backend": object()}, ValueError, r"backend=<object .*> is not an array namespace"),
    ],
)
def test_bad_options(options, error, pattern):
    with pytest.raises(error, match=pattern):
        nl.tucker_delta((4, 5, 3), 2, **options)


def test_bad_dtype_on_every_backend(backend):
    with pytest.raises(ValueError, match=rf"dtype='int32' .*{backend.name}"):
        _delta(backend, (4, 5), 2, dtype="int32")


def test_tucker_delta_scale_is_checked_by_the_class_too(backend):
    core, factors = backend.asarray(np.zeros((1, 1))), [backend.asarray(np.ones((2, 1)))] * 2
    with pytest.raises(ValueError, match="finite"):
        nl.TuckerDelta(core, factors, scale=float("-inf"))
    with pytest.raises(TypeError, match="real number"):
        nl.TuckerDelta(core, factors, scale=True)


@pytest.mark.parametrize("dtype", [3, "torch.float16"])
def test_foreign_dtype_object_on_numpy_is_a_value_error(dtype):
    if dtype == "torch.float16":
        dtype = pytest.importorskip("torch").float16
    with pytest.raises(ValueError, match=r"dtype=.* is not a real floating dtype of the numpy backend"):
        nl.tucker_delta((4, 5), 2, dtype=dtype)


@pytest.mark.parametrize("argument", ["ranks", "shape"])
def test_numpy_array_ranks_or_shape_are_accepted_or_refused_by_name(argument):
    shape, ranks = (4, 5), (2, 2)
    if argument == "ranks":
        ranks = np.array(ranks)
    else:
        shape = np.array(shape)
    try:
        d = nl.tucker_delta(shape, ranks)
    except (TypeError, ValueError) as exc:
        assert argument in str(exc), str(exc)
    else:
        assert (d.shape, d.ranks) == ((4, 5), (2, 2))


# -- init="principal" -----------------------------------------------------------------------


@given(case=delta_cases(), scale=st.sampled_from([1.0, 0.5, 4.0]))
def test_principal_is_the_sthosvd_of_the_weight(backend, case, scale):
    shape, ranks, seed = case
    weight = backend.asarray(_normal(seed, *shape))
    d = nl.tucker_delta(shape, ranks, init="principal", weight=weight, scale=scale)
    reference = nl.sthosvd(weight, ranks)
    # the delta carries the scale, so its dense form is the weight's ST-HOSVD approximation
    assert_close(d.to_dense(), reference.to_dense(), backend=backend, rtol=1e-9, atol=1e-12)
    assert d.scale == scale and d.ranks == ranks


def test_principal_full_ranks_reproduce_the_weight(backend):
    weight = backend.asarray(_normal(0, 5, 4, 3))
    d = nl.tucker_delta((5, 4, 3), (5, 4, 3), init="principal", weight=weight)
    assert_close(d.to_dense(), to_numpy(weight), backend=backend, rtol=1e-10, atol=1e-12)


def test_principal_keeps_the_weights_dtype_unless_told():
    torch = pytest.importorskip("torch")
    weight = torch.randn(6, 5, 3, dtype=torch.float64)
    assert nl.tucker_delta((6, 5, 3), 2, init="principal", weight=weight).dtype == torch.float64
    d = nl.tucker_delta((6, 5, 3), 2, init="principal", weight=weight, dtype="float32")
    assert d.dtype == torch.float32


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        ({"init": "principal"}, ValueError, "needs weight="),
        ({"init": "principal", "weight": np.ones((4, 4))}, ValueError, r"weight has shape \(4, 4\)"),
        ({"init": "principal", "weight": np.ones((4, 3)), "scale": 0.0}, ValueError, r"\|scale\| >= 1e-06"),
        (
            {"init": "principal", "weight": np.ones((4, 3)), "backend": "torch"},
            TypeError,
            "numpy array but backend",
        ),
        ({"init": "zero_core", "weight": np.ones((4, 3))}, ValueError, "only used by init='principal'"),
    ],
)
def test_principal_bad_input(options, error, pattern):
    if options.get("backend") == "torch":
        pytest.importorskip("torch")
    with pytest.raises(error, match=pattern):
        nl.tucker_delta((4, 3), 2, **options)
