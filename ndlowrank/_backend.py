"""Array namespaces, devices and dtypes: the only module that knows about backends.

Everything else in the core receives an array namespace ``xp`` from here and uses only
the array API standard (plus its ``linalg`` extension) on it. The namespace is inferred
from the input arrays with :func:`array_api_compat.array_namespace`; functions that
create arrays from nothing resolve a ``backend=`` argument with :func:`resolve_backend`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "available_backends",
    "backend_name",
    "compute_dtype",
    "device_of",
    "eigh",
    "from_numpy",
    "get_namespace",
    "native_routine",
    "resolve_backend",
    "resolve_dtype",
    "to_numpy",
]

# name -> (module holding the standard namespace, predicate on a namespace)
_BACKENDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "numpy": ("array_api_compat.numpy", array_api_compat.is_numpy_namespace),
    "torch": ("array_api_compat.torch", array_api_compat.is_torch_namespace),
    "cupy": ("array_api_compat.cupy", array_api_compat.is_cupy_namespace),
    "array_api_strict": ("array_api_strict", array_api_compat.is_array_api_strict_namespace),
}


def _cupy_has_gpu() -> bool:
    try:
        import cupy  # optional dependency

        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except Exception:  # cupy missing, or present without a usable CUDA driver
        return False


def available_backends() -> list[str]:
    """Names of the backends that can be used on this machine.

    ``"cupy"`` is listed only when cupy is installed *and* a CUDA device is present.

    Returns
    -------
    list of str
        A subset of ``["numpy", "torch", "cupy", "array_api_strict"]``, in that order.
    """
    names = []
    for name, (module, _) in _BACKENDS.items():
        if name == "cupy":
            if _cupy_has_gpu():
                names.append(name)
            continue
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        names.append(name)
    return names


def backend_name(xp: ModuleType) -> str:
    """Short name of an array namespace (``"numpy"``, ``"torch"``, ``"dask"``, ...), or its module name."""
    if array_api_compat.is_dask_namespace(xp):
        return "dask"
    for name, (_, is_namespace) in _BACKENDS.items():
        if is_namespace(xp):
            return name
    return str(getattr(xp, "__name__", xp))


def _normalise_namespace(xp: Any) -> ModuleType:
    """Turn ``numpy``, ``torch`` or any namespace object into its array-API-compatible namespace."""
    try:
        probe = xp.asarray(0.0)
        return array_api_compat.array_namespace(probe)
    except Exception as exc:
        raise ValueError(
            f"backend={xp!r} is not an array namespace; pass one of "
            f"{available_backends()} or a module such as numpy or torch"
        ) from exc


def resolve_backend(backend: str | ModuleType | None) -> ModuleType:
    """Return the array namespace for a ``backend=`` argument.

    Parameters
    ----------
    backend : str, module or None
        ``None`` (numpy), a name from :func:`available_backends`, or a namespace
        object (``numpy``, ``torch``, ``array_api_strict``, ``array_api_compat.torch``, ...).

    Returns
    -------
    module
        An array-API-compatible namespace.

    Raises
    ------
    ValueError
        If the name is unknown or the backend is not usable here; the message lists
        the available backends.
    """
    if backend is None:
        backend = "numpy"
    if not isinstance(backend, str):
        return _normalise_namespace(backend)
    available = available_backends()
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend={backend!r}; available backends: {available}")
    if backend not in available:
        why = "no CUDA device was found" if backend == "cupy" else "it is not installed"
        raise ValueError(f"backend={backend!r} is not available ({why}); available backends: {available}")
    return importlib.import_module(_BACKENDS[backend][0])


def _refuse_numpy_subclass(array: Any, name: str) -> None:
    """numpy subclasses whose arithmetic differs from an array's would give wrong numbers: refuse them by name."""
    if isinstance(array, np.matrix):
        raise TypeError(
            f"{name} is a numpy.matrix, whose * and ** are matrix products and which is always 2-D; "
            f"pass np.asarray({name})"
        )
    if isinstance(array, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy masked array, whose mask ndlowrank would ignore; fill the masked entries "
            f"first ({name}.filled(value)) or pass np.asarray({name}) to use the data as is"
        )


def require_arrays(**arrays: Any) -> None:
    """Refuse ``None`` where an array is required (:func:`get_namespace` skips ``None``, as optional arrays)."""
    for name, value in arrays.items():
        if value is None:
            raise TypeError(f"{name} must be an array (numpy, torch, cupy or any array-API array), got None")


def array_sequence(values: Any, name: str) -> list[Any]:
    """``values`` as a list: any iterable of arrays, but not ``None``, a string or one array."""
    if (
        values is None
        or isinstance(values, str)
        or hasattr(values, "shape")
        or not isinstance(values, Iterable)
    ):
        hint = "; wrap a single array in a list" if hasattr(values, "shape") else ""
        raise TypeError(
            f"{name} must be a sequence of arrays, one per mode, got {type(values).__name__}{hint}"
        )
    return list(values)


def get_namespace(*arrays: Any, names: tuple[str, ...] | None = None) -> ModuleType:
    """Infer the array namespace shared by ``arrays``.

    Parameters
    ----------
    *arrays
        Arrays from one backend. ``None`` entries are ignored.
    names
        Argument names, one per array, used in error messages.

    Raises
    ------
    TypeError
        If an argument is not an array, is a ``numpy.matrix`` or a masked array (whose
        arithmetic would give wrong results), or if the arrays come from different
        backends (the message names both).
    """
    names = names or tuple(f"argument {i}" for i in range(len(arrays)))
    found: dict[str, str] = {}
    for name, array in zip(names, arrays, strict=True):
        if array is None:
            continue
        _refuse_numpy_subclass(array, name)
        try:
            xp = array_api_compat.array_namespace(array)
        except TypeError as exc:
            raise TypeError(
                f"{name} must be an array (numpy, torch, cupy or any array-API array), "
                f"got {type(array).__name__}"
            ) from exc
        found.setdefault(backend_name(xp), name)
        if len(found) > 1:
            (first, first_arg), (second, second_arg) = list(found.items())[:2]
            raise TypeError(
                f"arrays from two backends in one call: {first_arg} is a {first} array and "
                f"{second_arg} is a {second} array; convert them to one backend first"
            )
    present = [a for a in arrays if a is not None]
    if not present:
        return resolve_backend(None)
    return array_api_compat.array_namespace(*present)


def device_of(x: Any) -> Any:
    """The device an array lives on (``array_api_compat.device``)."""
    return array_api_compat.device(x)


def resolve_dtype(xp: ModuleType, dtype: Any, *, default: str = "float32") -> Any:
    """Return a real floating dtype of namespace ``xp``.

    ``dtype`` may be ``None`` (then ``default``), a name such as ``"float64"``, or a
    dtype object of the backend (``torch.float16``, ``numpy.float32``, ...).

    Raises
    ------
    ValueError
        If ``dtype`` is not a real floating dtype of the backend.
    """
    if dtype is None:
        dtype = default
    resolved = getattr(xp, dtype, None) if isinstance(dtype, str) else dtype
    try:
        if resolved is not None and array_api_compat.is_numpy_namespace(xp):
            resolved = np.dtype(resolved)
        ok = resolved is not None and xp.isdtype(resolved, "real floating")
    except Exception:
        ok = False
    if not ok:
        raise ValueError(
            f"dtype={dtype!r} is not a real floating dtype of the {backend_name(xp)} backend; "
            "use e.g. 'float32' or 'float64'"
        )
    return resolved


def _itemsize(dtype: Any) -> int:
    size = getattr(dtype, "itemsize", None)
    return int(size) if size is not None else 8


def compute_dtype(xp: ModuleType, x: Any, *, name: str = "x") -> Any:
    """The dtype a decomposition of ``x`` works in.

    float32 and float64 stay as they are; float16 and bfloat16 are lifted to float32;
    booleans and integers are promoted to the namespace's default float dtype.

    Raises
    ------
    TypeError
        For complex input, floats wider than float64 (numpy's float128) and non-numeric
        dtypes (object, string, datetime, structured), which the decompositions do not
        support.
    """
    dtype = x.dtype
    if xp.isdtype(dtype, "complex floating"):
        raise TypeError(f"{name} has complex dtype {dtype}; only real input is supported")
    if not xp.isdtype(dtype, ("bool", "integral", "real floating")):
        raise TypeError(
            f"{name} has dtype {dtype}, which is not numeric; pass real numbers (floats, ints or bools)"
        )
    if xp.isdtype(dtype, "real floating") and _itemsize(dtype) > 8:
        raise TypeError(
            f"{name} has dtype {dtype}, wider than float64, which the decompositions do not support "
            "(it would be computed with less precision); cast it to float64"
        )
    if xp.isdtype(dtype, "real floating"):
        if dtype == xp.float64 or dtype == xp.float32:
            return dtype
        return xp.float32
    return xp.asarray(0.0, device=device_of(x)).dtype


def times_power_of_two(a: Any, exponent: int) -> Any:
    """``a · 2**exponent``, exact, in two steps so that neither multiplier leaves float32's range."""
    half = exponent // 2
    return (a * 2.0**half) * 2.0 ** (exponent - half)


def from_numpy(array: np.ndarray, xp: ModuleType, *, device: Any = None, dtype: Any = None) -> Any:
    """Move a numpy array into namespace ``xp`` on ``device`` with ``dtype``.

    The values are cast from the numpy array, so the same numpy input gives the same
    numbers on every backend (up to the target dtype's rounding).
    """
    try:
        out = xp.asarray(array, device=device)
    except (RuntimeError, ValueError, TypeError) as exc:  # each backend refuses a device its own way
        detail = " ".join(str(exc).split())[:160]
        raise ValueError(
            f"device={device!r} is not a device of the {backend_name(xp)} backend ({detail})"
        ) from None
    return out if dtype is None or out.dtype == dtype else xp.astype(out, dtype)


def to_numpy(x: Any) -> np.ndarray:
    """Copy any supported array to a numpy array on the host (bfloat16 becomes float32)."""
    if array_api_compat.is_numpy_array(x):
        return np.asarray(x)
    if array_api_compat.is_torch_array(x):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return np.asarray(x.numpy())
    if array_api_compat.is_cupy_array(x):
        return np.asarray(x.get())
    if hasattr(x, "to_device"):
        xp = array_api_compat.array_namespace(x)
        if array_api_compat.is_array_api_strict_namespace(xp):
            x = x.to_device(xp.Device("CPU_DEVICE"))
    return np.from_dlpack(x)


def eigh(xp: ModuleType, matrix: Any, *, top: int | None = None) -> tuple[Any, Any]:
    """Eigen-decomposition of a symmetric matrix, eigenvalues in ascending order.

    With ``top``, only the ``top`` largest eigenpairs are returned (still ascending).
    numpy uses scipy's ``eigh(subset_by_index=...)`` (LAPACK ``syevr``), which computes
    only those eigenvectors; every other backend uses its ``linalg.eigh`` (torch's and
    cupy's native solvers behind array-api-compat) and slices.

    A float32 matrix on a torch CUDA device is solved in float64 and rounded back: torch's
    float32 ``eigh`` there is several times slower than its float64 one for mid-sized
    matrices (512×512 on an H200: 15.9 ms against 4.7 ms, and 4.7 ms for cupy's float32);
    at 2048×2048 the two were even, and at 64×64 float32 was 0.15 ms (15%) faster.
    """
    size = matrix.shape[0]
    if top is not None and top < size and array_api_compat.is_numpy_namespace(xp):
        import scipy.linalg  # imported here: only the numpy fast path needs it

        return scipy.linalg.eigh(
            matrix, subset_by_index=(size - top, size - 1), driver="evr", check_finite=False
        )
    if _is_torch_cuda_float32(xp, matrix):
        values, vectors = xp.linalg.eigh(xp.astype(matrix, xp.float64))
        values, vectors = xp.astype(values, matrix.dtype), xp.astype(vectors, matrix.dtype)
    else:
        values, vectors = xp.linalg.eigh(matrix)
    if top is not None:
        values, vectors = values[size - top :], vectors[:, size - top :]
    return values, vectors


def _is_torch_cuda_float32(xp: ModuleType, matrix: Any) -> bool:
    return (
        array_api_compat.is_torch_namespace(xp)
        and matrix.dtype == xp.float32
        and getattr(device_of(matrix), "type", None) == "cuda"
    )


# Whole routines replaced for a kind of array: (predicate on an array, module holding them).
# dask arrays must stay lazy and chunked, which the array-API code (reshapes of whole
# unfoldings, eager eigensolvers) cannot do; ndlowrank._dask reduces over chunks instead.
_NATIVE_ROUTINES: list[tuple[Callable[[Any], bool], str]] = [
    (array_api_compat.is_dask_array, "ndlowrank._dask"),
]


def native_routine(x: Any, name: str) -> Callable[..., Any] | None:
    """The backend's own version of routine ``name`` for array ``x``, or ``None`` for the array-API one.

    For a dask array this is the function of the same name in :mod:`ndlowrank._dask`, which
    keeps the array lazy and chunked.
    """
    for applies, module in _NATIVE_ROUTINES:
        if applies(x):
            routine: Callable[..., Any] = getattr(importlib.import_module(module), name)
            return routine
    return None
