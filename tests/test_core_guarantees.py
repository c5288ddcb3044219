"""The core never returns inf or NaN from finite input, keeps its tolerance promise, and refuses by name.

References are float64 numpy computations, independent of the code under test.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ndlowrank as nl
from ndlowrank._backend import to_numpy
from ndlowrank.decompose import TOL_FLOOR_EPS, ToleranceWarning


def _relative_error(x, t) -> float:
    x64 = to_numpy(x).astype(np.float64)
    dense = to_numpy(t.to_dense()).astype(np.float64)
    return float(np.linalg.norm(x64 - dense) / np.linalg.norm(x64))


# -- class 6: large finite values --------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, value",
    [("float32", 2.5e38), ("float32", 3e38), ("float64", 1.5e308), ("float64", 1e308), ("float16", 6e4)],
)
@pytest.mark.parametrize("method", ["sthosvd", "hosvd", "hooi", "randomized"])
def test_core_beyond_the_dtype_raises_instead_of_overflowing(backend, dtype, value, method):
    if dtype == "float16" and backend.name == "array_api_strict":
        pytest.skip("array_api_strict has no float16")
    x = backend.asarray(np.full((30, 20), value, dtype=np.float64).astype(dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no overflow on the way either
        with pytest.raises(ValueError, match=rf"cannot be represented in .*{dtype}"):
            nl.tucker(x, (2, 2), method=method, **({"seed": 0} if method == "randomized" else {}))


@given(
    exponent=st.sampled_from([-140, -120, -60, -30, 30, 60, 100, 120]),
    seed=st.integers(0, 2**16),
)
def test_extreme_magnitudes_in_float32_are_decomposed_exactly_scaled(exponent, seed):
    """Scaling the input by a power of two scales the core by it and leaves the factors alone."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((6, 5, 4)).astype(np.float32)
    scaled = np.ldexp(x, exponent).astype(np.float32)
    if not np.array_equal(np.ldexp(scaled.astype(np.float64), -exponent), x):
        return  # the scaled input itself is not exact in float32 (subnormal or beyond the range)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        reference, t = nl.sthosvd(x, (3, 3, 2)), nl.sthosvd(scaled, (3, 3, 2))
    assert np.isfinite(t.core).all()
    for f, g in zip(reference.factors, t.factors, strict=True):
        np.testing.assert_allclose(g, f, atol=1e-5)
    np.testing.assert_allclose(np.ldexp(reference.core.astype(np.float64), exponent), t.core, rtol=1e-5,
                               atol=abs(np.ldexp(1e-5, exponent)) * np.abs(reference.core).max())  # fmt: skip


@pytest.mark.parametrize("value", [1e20, 1e30, 1e36])
def test_select_ranks_and_extract_on_large_float32_values(value, tmp_path, capsys):
    x = (value * np.random.default_rng(0).standard_normal((40, 30))).astype(np.float32)
    ranks = nl.select_ranks(x, energy=0.99)
    assert ranks == nl.select_ranks(x.astype(np.float64) / value, energy=0.99)
    from safetensors.numpy import save_file

    from ndlowrank.cli import main

    save_file({"w": np.zeros_like(x)}, str(tmp_path / "base.safetensors"))
    save_file({"w": x}, str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "a.safetensors"
    assert main(["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "-o", str(out),
                 "-q", "--min-size", "10", "--budget", "800"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "nan" not in printed and "inf" not in printed


def test_extract_of_values_whose_core_overflows_is_an_error(tmp_path, capsys):
    from safetensors.numpy import save_file

    from ndlowrank.cli import main

    save_file({"w": np.zeros((40, 30), np.float32)}, str(tmp_path / "base.safetensors"))
    save_file({"w": np.full((40, 30), 3e38, np.float32)}, str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "a.safetensors"
    with pytest.raises(SystemExit) as exit_:
        main(["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "-o", str(out),
              "-q", "--min-size", "10"])  # fmt: skip
    assert exit_.value.code == 2
    assert "cannot be represented in float32" in capsys.readouterr().err
    assert not out.exists()


# -- class 8: what is not supported is refused by name -------------------------------------------


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda: np.matrix(np.ones((4, 5))), "numpy.matrix"),
        (lambda: np.ma.masked_array(np.ones((4, 5)), mask=np.eye(4, 5)), "masked array"),
        (lambda: np.ma.masked_array(np.ones((4, 5, 3))), "masked array"),
        (
            lambda: np.ones((4, 5), dtype=np.longdouble) if np.finfo(np.longdouble).bits > 64 else None,
            "wider than float64",
        ),
        (lambda: np.ones((4, 5), dtype=np.complex64), "complex"),
        (lambda: np.ones((4, 5), dtype=object), "not numeric"),
        (lambda: np.ones((4, 5), dtype="datetime64[s]"), "not numeric"),
        (lambda: np.ones((4, 5), dtype=[("a", float)]), "not numeric"),
        (lambda: np.full((4, 5), "a"), "not numeric"),
    ],
    ids=["matrix", "masked", "masked-3d", "float128", "complex", "object", "datetime", "structured", "str"],
)
@pytest.mark.parametrize("function", ["sthosvd", "hosvd", "hooi", "select_ranks"])
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # numpy.matrix's own
def test_unsupported_arrays_are_refused_by_name(make, pattern, function):
    x = make()
    if x is None:
        pytest.skip("numpy's longdouble is float64 here")
    calls = {
        "sthosvd": lambda: nl.sthosvd(x, 2),
        "hosvd": lambda: nl.hosvd(x, 2),
        "hooi": lambda: nl.hooi(x, 2),
        "select_ranks": lambda: nl.select_ranks(x, energy=0.9),
    }
    with pytest.raises(TypeError, match=pattern):
        calls[function]()


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # numpy.matrix's own
@pytest.mark.parametrize("kind", ["matrix", "masked"])
def test_tensor_algebra_refuses_numpy_subclasses(kind):
    wrap = np.matrix if kind == "matrix" else np.ma.masked_array
    pattern = r"numpy\.matrix" if kind == "matrix" else "numpy masked array"
    with pytest.raises(TypeError, match=rf"x is a {pattern}"):
        nl.unfold(wrap(np.ones((4, 5))), 0)
    with pytest.raises(TypeError, match=rf"matrix is a {pattern}"):
        nl.mode_product(np.ones((4, 5, 3)), wrap(np.ones((2, 5))), 1)
    with pytest.raises(TypeError, match=rf"factors\[1\] is a {pattern}"):
        nl.TuckerTensor(np.ones((2, 2)), [np.ones((4, 2)), wrap(np.ones((3, 2)))])


@pytest.mark.parametrize("part", ["core", "factor"])
def test_complex_tucker_tensor_is_refused(part):
    core, factors = np.ones((2, 2)), [np.ones((4, 2)), np.ones((3, 2))]
    if part == "core":
        core = core * 1j
    else:
        factors[1] = factors[1] * (1 + 1j)
    with pytest.raises(TypeError, match="complex Tucker tensors are not supported"):
        nl.TuckerTensor(core, factors)


# -- class 9: the tolerance rule -----------------------------------------------------------------


def _steep(shape: tuple[int, ...], decay: float, seed: int) -> np.ndarray:
    """A tensor whose every unfolding has singular values falling by ``decay`` per index."""
    rng = np.random.default_rng(seed)
    core = rng.standard_normal(shape)
    for n, size in enumerate(shape):
        core = core * np.reshape(decay ** np.arange(size), [-1 if k == n else 1 for k in range(len(shape))])
    return nl.multi_mode_product(core, [np.linalg.qr(rng.standard_normal((i, i)))[0] for i in shape])


@given(
    shape=st.sampled_from([(40, 30, 20), (60, 50), (20, 20, 20)]),
    decay=st.sampled_from([0.5, 0.3, 0.1]),
    tol=st.sampled_from([1e-2, 1e-3, 1e-4, 3e-5]),
    solver=st.sampled_from(["gram", "auto", "svd"]),
    seed=st.integers(0, 2**16),
)
def test_tolerance_guarantee_holds_for_every_solver_in_float32(shape, decay, tol, solver, seed):
    x = _steep(shape, decay, seed).astype(np.float32)
    t = nl.sthosvd(x, tol=tol, solver=solver)
    assert _relative_error(x, t) <= tol


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-7), ("float32", 2e-6), ("float64", 1e-15)])
def test_tolerance_below_the_dtype_warns(backend, dtype, tol):
    x = backend.asarray(np.random.default_rng(0).standard_normal((6, 5, 4)), dtype)
    with pytest.warns(ToleranceWarning, match=rf"tol={tol:g} is below what .*{dtype} can reach"):
        nl.sthosvd(x, tol=tol)
    with pytest.warns(ToleranceWarning):
        nl.tucker(x, tol=tol, method="hooi")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tolerance_at_the_floor_is_met_without_warning(dtype):
    tol = TOL_FLOOR_EPS * float(np.finfo(dtype).eps)
    for seed in range(5):
        x = np.random.default_rng(seed).standard_normal((30, 20, 10)).astype(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ToleranceWarning)
            t = nl.sthosvd(x, tol=tol)
        assert _relative_error(x, t) <= tol


# -- unclear messages of the core ---------------------------------------------------------------


def test_order_must_be_a_sequence_of_modes():
    x = np.ones((4, 5, 3))
    with pytest.raises(TypeError, match=r"order must be a sequence of modes, a permutation of 0..2"):
        nl.sthosvd(x, 2, order=1)
    with pytest.raises(TypeError, match="order must be a sequence"):
        nl.sthosvd(x, 2, order=[0, 1.5, 2])
    with pytest.raises(ValueError, match="must be a permutation"):
        nl.sthosvd(x, 2, order=[0, 0, 1])


def test_hooi_takes_a_plain_list_of_factors_as_init(backend):
    x = backend.asarray(np.random.default_rng(0).standard_normal((8, 7, 6)))
    start = nl.sthosvd(x, (3, 3, 2))
    from_list = nl.hooi(x, (3, 3, 2), init=list(start.factors), max_iter=5)
    from_tensor = nl.hooi(x, (3, 3, 2), init=start, max_iter=5)
    assert _relative_error(x, from_list) == pytest.approx(_relative_error(x, from_tensor), rel=1e-9)
    assert _relative_error(x, from_list) <= _relative_error(x, start) + 1e-12
    with pytest.raises(ValueError, match="init holds 2 factors but x has 3 modes"):
        nl.hooi(x, (3, 3, 2), init=list(start.factors[:2]))
    with pytest.raises(ValueError, match=r"init's factors have shapes"):
        nl.hooi(x, (3, 3, 2), init=[start.factors[0], start.factors[2], start.factors[1]])


def test_hooi_takes_numpy_scalars():
    x = np.random.default_rng(0).standard_normal((6, 5, 4))
    a = nl.hooi(x, 2, max_iter=np.int64(3), tol=np.float32(1e-3))
    b = nl.hooi(x, 2, max_iter=3, tol=float(np.float32(1e-3)))
    np.testing.assert_array_equal(a.core, b.core)
    with pytest.raises(ValueError, match="max_iter must be a non-negative int"):
        nl.hooi(x, 2, max_iter=2.0)
    with pytest.raises(ValueError, match="tol must be a non-negative float"):
        nl.hooi(x, 2, tol=True)


def test_rank_zero_tucker_tensor_is_refused():
    with pytest.raises(ValueError, match=r"core has shape \(2, 0\): every rank must be >= 1"):
        nl.TuckerTensor(np.ones((2, 0)), [np.ones((4, 2)), np.ones((3, 0))])


@pytest.mark.parametrize(
    "shape, error, pattern",
    [
        ((2, -3, -2), ValueError, r"shape\[1\]=-3"),
        ((2, 3.0, 2), TypeError, r"shape\[1\] must be an int, got 3.0"),
        ((2, 1.5, 4), TypeError, r"shape\[1\] must be an int"),
        ("abc", TypeError, r"shape\[0\] must be an int"),
    ],
)
def test_fold_checks_its_shape(shape, error, pattern):
    with pytest.raises(error, match=pattern):
        nl.fold(np.ones((2, 6)), 0, shape)


@pytest.mark.parametrize("matrices", [None, 3, np.ones((5, 4))], ids=["None", "int", "one-array"])
def test_multi_mode_product_needs_a_sequence_of_matrices(matrices):
    with pytest.raises(TypeError, match="matrices must be a sequence of arrays"):
        nl.multi_mode_product(np.ones((4, 3)), matrices)


def test_scale_of_principal_and_huge_scales_follow_one_rule():
    with pytest.raises(ValueError, match="too large"):
        nl.tucker_delta((4, 3), 2, init="zero_factor", scale=1e308)
    d = nl.tucker_delta((4, 3), 2, init="zero_factor", scale=1e6, seed=0)
    assert math.isfinite(float(np.abs(d.to_dense()).max()))


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: nl.unfold(None, 0), "x must be an array"),
        (lambda: nl.fold(None, 0, (2, 3)), "matrix must be an array"),
        (lambda: nl.mode_product(np.ones((4, 3)), None, 0), "matrix must be an array"),
        (lambda: nl.multi_mode_product(None, [np.ones((2, 4))]), "x must be an array"),
        (lambda: nl.tucker_to_tensor(None, []), "core must be an array"),
        (lambda: nl.tucker_to_tensor(np.ones((2, 2)), None), "factors must be a sequence of arrays"),
        (lambda: nl.TuckerTensor(None, []), "core must be an array"),
        (lambda: nl.TuckerTensor(np.ones((2, 2)), np.ones((3, 2))), "wrap a single array in a list"),
        (lambda: nl.sthosvd(None, 2), "x must be an array"),
        (lambda: nl.tucker(None, 0.5), "x must be an array"),
        (lambda: nl.tucker_sketch(None, 2), "x must be an array"),
        (lambda: nl.select_ranks(None, energy=0.9), "x must be an array"),
        (lambda: nl.hooi(np.ones((4, 3)), 2, callback=3), "callback must be callable"),
    ],
)
def test_missing_arrays_and_bad_callables_are_named(call, pattern):
    with pytest.raises(TypeError, match=pattern):
        call()


@pytest.mark.parametrize("option", ["oversample", "power_iters"])
@pytest.mark.parametrize("value", [-1, 1.5, "a", True])
def test_randomized_options_are_checked(option, value):
    with pytest.raises(ValueError, match=rf"{option} must be a non-negative int"):
        nl.sthosvd(np.ones((6, 5)), 2, solver="randomized", seed=0, **{option: value})


def test_a_device_the_backend_does_not_have_is_named():
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"device='tpu' is not a device of the torch backend"):
        nl.tucker_delta((3, 3), 2, backend="torch", device="tpu")


def test_meta_tensor_is_refused_by_name():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="x is on the meta device"):
        nl.sthosvd(torch.ones(3, 4, device="meta"), 2)


def test_extract_of_a_difference_beyond_float32_says_so(tmp_path, capsys):
    from safetensors.numpy import save_file

    from ndlowrank.cli import main

    save_file({"w": np.full((40, 30), -3e38, np.float32)}, str(tmp_path / "base.safetensors"))
    save_file({"w": np.full((40, 30), 3e38, np.float32)}, str(tmp_path / "tuned.safetensors"))
    with pytest.raises(SystemExit):
        main(["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "-o",
              str(tmp_path / "a.safetensors"), "-q", "--min-size", "10"])  # fmt: skip
    assert "TUNED − BASE exceeds float32's range" in capsys.readouterr().err


@pytest.mark.parametrize(
    "method",
    [
        lambda x, **options: nl.hooi(x, 2, **options),
        lambda x, **options: nl.non_negative_tucker(x, 2, **options),
        lambda x, **options: nl.masked_tucker(x, 2, np.ones(x.shape, dtype=bool), **options),
        lambda x, **options: nl.partial_tucker(x, 2, modes=[0], **options),
    ],
)
def test_iterative_methods_check_their_stopping_options_alike(method):
    x = np.ones((4, 3, 3))
    for max_iter in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_iter must be a non-negative int"):
            method(x, max_iter=max_iter)
    for tol in (-1.0, "0", float("nan")):
        with pytest.raises(ValueError, match="tol must be a non-negative float"):
            method(x, tol=tol)
    method(x, max_iter=np.int64(2), tol=np.float32(0.0))
