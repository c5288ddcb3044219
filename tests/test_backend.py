"""Backends: discovery, resolution, namespace inference, dtypes and moving arrays to and from numpy."""

from __future__ import annotations

import importlib.util
import re
import types

import array_api_compat
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ndlowrank import _backend
from ndlowrank._backend import (
    available_backends,
    backend_name,
    compute_dtype,
    device_of,
    from_numpy,
    get_namespace,
    resolve_backend,
    resolve_dtype,
    to_numpy,
)

from _helpers import assert_close

BOTH = r"(?s)(?=.*numpy)(?=.*torch)"
INSTALLED = [
    name
    for name, module in [("numpy", "numpy"), ("torch", "torch"), ("array_api_strict", "array_api_strict")]
    if importlib.util.find_spec(module) is not None
]


# -- discovery ----------------------------------------------------------------------------------


def test_available_backends_lists_the_installed_ones_in_order():
    names = available_backends()
    assert [n for n in names if n != "cupy"] == INSTALLED
    assert names[0] == "numpy"


def test_cupy_is_listed_only_with_a_gpu(monkeypatch):
    if not _backend._cupy_has_gpu():
        assert "cupy" not in available_backends()
    monkeypatch.setattr(_backend, "_cupy_has_gpu", lambda: False)
    assert "cupy" not in available_backends()
    with pytest.raises(ValueError, match=r"backend='cupy' is not available \(no CUDA device was found\)"):
        resolve_backend("cupy")
    monkeypatch.setattr(_backend, "_cupy_has_gpu", lambda: True)
    names = available_backends()
    assert "cupy" in names
    assert names.index("cupy") == names.index("numpy") + 1 + ("torch" in names)


def test_cupy_without_cupy_installed_has_no_gpu():
    if importlib.util.find_spec("cupy") is None:
        assert _backend._cupy_has_gpu() is False


# -- resolve_backend / backend_name ----------------------------------------------------------------


@pytest.mark.parametrize("name", INSTALLED)
def test_resolve_backend_accepts_names_and_modules(name):
    by_name = resolve_backend(name)
    assert backend_name(by_name) == name
    module = pytest.importorskip(name)
    by_module = resolve_backend(module)
    assert backend_name(by_module) == name
    assert by_module is by_name
    assert resolve_backend(by_name) is by_name


def test_resolve_backend_default_is_numpy():
    assert resolve_backend(None) is array_api_compat.numpy
    assert backend_name(resolve_backend(None)) == "numpy"


def test_resolve_backend_accepts_compat_namespaces():
    assert resolve_backend(array_api_compat.numpy) is array_api_compat.numpy
    if importlib.util.find_spec("torch") is not None:
        import array_api_compat.torch as compat_torch

        assert resolve_backend(compat_torch) is compat_torch


@pytest.mark.parametrize("name", ["jax2", "Numpy", "", "tensorflow"])
def test_unknown_backend_name_lists_the_available_ones(name):
    with pytest.raises(ValueError, match=rf"unknown backend='{name}'; available backends: \['numpy'") as info:
        resolve_backend(name)
    for available in available_backends():
        assert repr(available) in str(info.value)


@pytest.mark.parametrize("not_a_namespace", [object(), 3, types.ModuleType("empty")])
def test_objects_that_are_not_namespaces_are_refused(not_a_namespace):
    with pytest.raises(ValueError, match=r"is not an array namespace.*numpy"):
        resolve_backend(not_a_namespace)


def test_backend_name(xp, backend):
    assert backend_name(xp) == backend.name
    assert backend_name(types.ModuleType("somelib")) == "somelib"


# -- namespace inference --------------------------------------------------------------------------


def test_get_namespace_of_one_backend(backend):
    x, y = backend.asarray(np.ones(2)), backend.asarray(np.ones((2, 2)))
    assert backend_name(get_namespace(x, None, y)) == backend.name
    assert backend_name(get_namespace()) == "numpy"
    assert backend_name(get_namespace(None)) == "numpy"


def test_get_namespace_names_the_non_array_argument(backend):
    x = backend.asarray(np.ones(2))
    with pytest.raises(TypeError, match=r"weights must be an array .*got list"):
        get_namespace(x, [1.0, 2.0], names=("x", "weights"))
    with pytest.raises(TypeError, match=r"argument 0 must be an array .*got str"):
        get_namespace("abc")


def test_get_namespace_refuses_two_backends_and_names_both():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"core is a numpy array and factor is a torch array"):
        get_namespace(np.ones(2), torch.ones(2), names=("core", "factor"))
    with pytest.raises(TypeError, match=BOTH):
        get_namespace(torch.ones(2), None, np.ones(2))


def test_get_namespace_refuses_numpy_with_array_api_strict():
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match=r"(?s)(?=.*numpy)(?=.*array_api_strict)"):
        get_namespace(np.ones(2), strict.ones(2))


def test_device_of(backend):
    x = backend.asarray(np.ones(2))
    if backend.device is not None:
        assert device_of(x) == backend.device
    else:
        assert device_of(x) == array_api_compat.device(x)


# -- dtypes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_compute_dtype_lifts_half_precision_to_float32(backend, dtype):
    xp = backend.xp
    if not hasattr(xp, dtype):
        pytest.skip(f"{backend.name} has no {dtype}")
    x = backend.asarray(np.ones(3), dtype)
    assert compute_dtype(xp, x) == xp.float32


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compute_dtype_keeps_single_and_double(backend, dtype):
    xp = backend.xp
    assert compute_dtype(xp, backend.asarray(np.ones(3), dtype)) == getattr(xp, dtype)


@pytest.mark.parametrize("dtype", ["int8", "int32", "int64", "uint8", "bool"])
def test_compute_dtype_promotes_integers_to_the_default_float(backend, dtype):
    xp = backend.xp
    x = backend.asarray(np.ones(3), dtype)
    expected = xp.asarray(0.0, device=backend.device).dtype
    assert compute_dtype(xp, x) == expected
    assert xp.isdtype(expected, "real floating")


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_compute_dtype_refuses_complex(backend, dtype):
    xp = backend.xp
    x = backend.asarray(np.ones(3), dtype)
    with pytest.raises(TypeError, match=r"weight has complex dtype .*complex"):
        compute_dtype(xp, x, name="weight")


def test_resolve_dtype(backend):
    xp = backend.xp
    assert resolve_dtype(xp, None) == xp.float32
    assert resolve_dtype(xp, None, default="float64") == xp.float64
    assert resolve_dtype(xp, "float64") == xp.float64
    assert resolve_dtype(xp, xp.float32) == xp.float32
    for bad in ("int32", "complex64", "float8", "bool", xp.int64):
        with pytest.raises(
            ValueError,
            match=rf"dtype={re.escape(repr(bad))} is not a real floating dtype of the {backend.name}",
        ):
            resolve_dtype(xp, bad)


# -- moving arrays -----------------------------------------------------------------------------------


@given(shape=st.lists(st.integers(1, 5), min_size=0, max_size=4), seed=st.integers(0, 2**32 - 1))
def test_to_numpy_round_trips(backend, shape, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    for dtype in ("float64", "float32"):
        back = to_numpy(backend.asarray(x, dtype))
        assert isinstance(back, np.ndarray)
        assert back.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(back, x.astype(dtype))


def test_to_numpy_of_numpy_is_a_numpy_array():
    x = np.arange(6.0).reshape(2, 3)
    back = to_numpy(x)
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, x)


def test_to_numpy_from_torch_bfloat16_and_requires_grad():
    torch = pytest.importorskip("torch")
    values = np.array([[0.5, -2.0, 3.0], [1.25, 0.0, -0.125]])  # exact in bfloat16
    bf16 = torch.tensor(values, dtype=torch.bfloat16)
    back = to_numpy(bf16)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, values.astype(np.float32))
    leaf = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    np.testing.assert_array_equal(to_numpy(leaf), values)
    np.testing.assert_array_equal(to_numpy(leaf * 2), 2 * values)
    half_grad = torch.tensor(values, dtype=torch.bfloat16, requires_grad=True)
    np.testing.assert_array_equal(to_numpy(half_grad * 1), values.astype(np.float32))


def test_to_numpy_from_array_api_strict_on_another_device():
    strict = pytest.importorskip("array_api_strict")
    values = np.arange(6.0).reshape(2, 3)
    x = strict.asarray(values, device=strict.Device("device1"))
    np.testing.assert_array_equal(to_numpy(x), values)


@pytest.mark.parametrize("dtype", [None, "float32", "float64"])
def test_from_numpy_places_and_casts(backend, dtype):
    xp = backend.xp
    values = np.random.default_rng(0).standard_normal((3, 2))
    out = from_numpy(values, xp, device=backend.device, dtype=None if dtype is None else getattr(xp, dtype))
    expected = values if dtype is None else values.astype(dtype)
    assert_close(out, expected, backend=backend, dtype=getattr(xp, dtype or "float64"), rtol=0)


@given(size=st.integers(1, 12), top=st.integers(1, 12), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_eigh_matches_numpy_in_float64(backend, dtype, size, top, seed):
    """``eigh`` (scipy's subset on numpy, float64 for float32 on torch CUDA) against numpy's float64 one."""
    top = min(top, size)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((size, size)))
    gram = (q * np.arange(1.0, size + 1)) @ q.T  # eigenvalues 1, 2, ..., size: gaps of 1
    expected_values, expected_vectors = np.linalg.eigh(gram)
    xp = backend.xp
    values, vectors = _backend.eigh(xp, backend.asarray(gram, dtype=dtype), top=top)
    rtol = 1e-4 if dtype == "float32" else 1e-10
    assert_close(values, expected_values[size - top :], backend=backend, dtype=getattr(xp, dtype), rtol=rtol)
    assert vectors.dtype == getattr(xp, dtype) and vectors.shape == (size, top)
    # eigenvectors are unique up to sign: compare the projectors onto each one
    got = to_numpy(vectors).astype(np.float64)
    want = expected_vectors[:, size - top :]
    np.testing.assert_allclose(
        np.abs(np.sum(got * want, axis=0)), 1.0, atol=1e-3 if dtype == "float32" else 1e-8
    )
