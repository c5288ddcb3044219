"""Tensor algebra on any array-API backend: unfold, fold and mode-n products.

Conventions (Kolda & Bader, row-major as TensorLy):

- ``unfold(x, n)`` is ``moveaxis(x, n, 0).reshape(I_n, -1)``;
- ``mode_product(x, M, n)`` multiplies mode ``n`` of ``x`` by ``M`` of shape ``(J, I_n)``,
  giving a tensor whose mode ``n`` has size ``J``; ``transpose=True`` uses ``M.T``.

Every function keeps the input's namespace and device, so torch autograd flows through.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any

from ._backend import array_sequence, get_namespace, require_arrays
from ._validation import check_shape

__all__ = ["fold", "mode_product", "multi_mode_product", "tucker_to_tensor", "unfold"]


def check_mode(mode: Any, ndim: int, *, name: str = "mode") -> int:
    """Validate a mode index against ``ndim`` and return it as a non-negative int.

    Negative modes count from the end, as numpy axes do.
    """
    if isinstance(mode, bool) or not hasattr(mode, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(mode).__name__}")
    mode = int(mode)
    if not -ndim <= mode < ndim:
        raise ValueError(f"{name}={mode} is out of range for a tensor with {ndim} modes")
    return mode % ndim


def unfold(x: Any, mode: int) -> Any:
    """Mode-``mode`` unfolding (matricisation) of a tensor.

    Parameters
    ----------
    x : array, shape (I_0, ..., I_{N-1})
        Tensor of any backend.
    mode : int
        The mode that becomes the rows; negative values count from the end.

    Returns
    -------
    array, shape (I_mode, prod of the other I_n)
        ``moveaxis(x, mode, 0).reshape(I_mode, -1)`` (row-major, as TensorLy).

    Examples
    --------
    >>> import numpy as np
    >>> import ndlowrank as nl
    >>> x = np.arange(24.0).reshape(2, 3, 4)
    >>> nl.unfold(x, 1).shape
    (3, 8)
    """
    require_arrays(x=x)
    xp = get_namespace(x, names=("x",))
    mode = check_mode(mode, x.ndim)
    cols = math.prod(x.shape[:mode]) * math.prod(x.shape[mode + 1 :])
    return xp.reshape(xp.moveaxis(x, mode, 0), (x.shape[mode], cols))


def fold(matrix: Any, mode: int, shape: Sequence[int]) -> Any:
    """Inverse of :func:`unfold`: refold a mode-``mode`` unfolding into ``shape``.

    Parameters
    ----------
    matrix : array, shape (shape[mode], prod of the other sizes)
        An unfolding.
    mode : int
        The mode the rows belong to.
    shape : sequence of int
        Shape of the full tensor.

    Returns
    -------
    array of shape ``shape``

    Examples
    --------
    >>> import numpy as np
    >>> import ndlowrank as nl
    >>> x = np.arange(24.0).reshape(2, 3, 4)
    >>> bool((nl.fold(nl.unfold(x, 2), 2, x.shape) == x).all())
    True
    """
    require_arrays(matrix=matrix)
    xp = get_namespace(matrix, names=("matrix",))
    shape = check_shape(shape, minimum=0)
    mode = check_mode(mode, len(shape))
    moved = (shape[mode], *shape[:mode], *shape[mode + 1 :])
    expected = (shape[mode], math.prod(moved[1:]))
    if tuple(matrix.shape) != expected:
        raise ValueError(
            f"matrix has shape {tuple(matrix.shape)}, but folding mode {mode} of a tensor of "
            f"shape {shape} needs {expected}"
        )
    return xp.moveaxis(xp.reshape(matrix, moved), 0, mode)


def _mode_product(x: Any, matrix: Any, mode: int, *, xp: ModuleType) -> Any:
    """``x ×_mode matrix`` for a validated ``matrix`` of shape ``(J, I_mode)``.

    ``x`` is viewed as ``(before, I_mode, after)`` so that no transposition is needed:
    mode 0 and the last mode are one matrix product each, middle modes a batched one.
    """
    shape = tuple(x.shape)
    before, after = math.prod(shape[:mode]), math.prod(shape[mode + 1 :])
    new_shape = (*shape[:mode], matrix.shape[0], *shape[mode + 1 :])
    if after == 1:
        out = xp.reshape(x, (before, shape[mode])) @ matrix.T
    elif before == 1:
        out = matrix @ xp.reshape(x, (shape[mode], after))
    else:
        out = matrix @ xp.reshape(x, (before, shape[mode], after))
    return xp.reshape(out, new_shape)


def _promote(xp: ModuleType, x: Any, matrix: Any) -> tuple[Any, Any]:
    """Cast both operands to their common dtype (torch refuses mixed-dtype matmul)."""
    dtype = xp.result_type(x, matrix)
    return (
        x if x.dtype == dtype else xp.astype(x, dtype),
        matrix if matrix.dtype == dtype else xp.astype(matrix, dtype),
    )


def _check_matrix(x: Any, matrix: Any, mode: int, *, transpose: bool, name: str) -> None:
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(matrix.shape)}")
    inner = matrix.shape[0] if transpose else matrix.shape[1]
    if inner != x.shape[mode]:
        axis = 0 if transpose else 1
        raise ValueError(
            f"{name} has shape {tuple(matrix.shape)}: its dimension {axis} ({inner}) must equal "
            f"the size of mode {mode} ({x.shape[mode]})"
            + (" (transpose=True multiplies by the transpose)" if transpose else "")
        )


def mode_product(x: Any, matrix: Any, mode: int, *, transpose: bool = False) -> Any:
    """Mode-``mode`` product ``x ×_mode matrix`` (Kolda & Bader).

    Parameters
    ----------
    x : array, shape (I_0, ..., I_{N-1})
    matrix : array, shape (J, I_mode), or (I_mode, J) with ``transpose=True``, or (I_mode,)
        A vector contracts mode ``mode`` away (TensorLy's ``mode_dot`` with a vector);
        ``transpose`` has no effect on it.
    mode : int
        Negative values count from the end.
    transpose : bool, default False
        Multiply by ``matrix.T`` instead of ``matrix``.

    Returns
    -------
    array, shape (I_0, ..., J, ..., I_{N-1}), or without mode ``mode`` for a vector
        In the inputs' namespace and device, with their promoted dtype.

    Raises
    ------
    ValueError
        If ``matrix`` is not 2-D or its inner size does not match mode ``mode``.
    TypeError
        If ``x`` and ``matrix`` come from different backends.

    Examples
    --------
    >>> import numpy as np
    >>> import ndlowrank as nl
    >>> x = np.ones((2, 3, 4))
    >>> nl.mode_product(x, np.ones((5, 3)), 1).shape
    (2, 5, 4)
    >>> nl.mode_product(x, np.ones(3), 1).shape
    (2, 4)
    """
    require_arrays(x=x, matrix=matrix)
    xp = get_namespace(x, matrix, names=("x", "matrix"))
    mode = check_mode(mode, x.ndim)
    if matrix.ndim == 1:
        return _vector_product(x, matrix, mode, xp=xp)
    _check_matrix(x, matrix, mode, transpose=transpose, name="matrix")
    x, matrix = _promote(xp, x, matrix)
    return _mode_product(x, matrix.T if transpose else matrix, mode, xp=xp)


def _vector_product(x: Any, vector: Any, mode: int, *, xp: ModuleType) -> Any:
    """``x ×_mode vector``: the mode is contracted and disappears."""
    if vector.shape[0] != x.shape[mode]:
        raise ValueError(
            f"matrix is a vector of length {vector.shape[0]}; contracting mode {mode} needs "
            f"length {x.shape[mode]}"
        )
    x, vector = _promote(xp, x, vector)
    out = _mode_product(x, vector[None, :], mode, xp=xp)
    return xp.reshape(out, (*x.shape[:mode], *x.shape[mode + 1 :]))


def _product_order(steps: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Order ``(mode, J, I)`` products to minimise the flops of the whole chain.

    Each product costs ``J * size`` where ``size`` is the current tensor size, and it
    scales the size by ``J / I``. Swapping two neighbours shows that applying ``a``
    before ``b`` is cheaper exactly when ``1/J_a - 1/I_a > 1/J_b - 1/I_b``, so sorting by
    that key (largest first) is optimal: the biggest reductions go first.
    """
    return sorted(steps, key=lambda s: 1.0 / s[2] - 1.0 / s[1])


def multi_mode_product(
    x: Any,
    matrices: Sequence[Any],
    modes: Iterable[int] | None = None,
    *,
    skip: int | Iterable[int] | None = None,
    transpose: bool = False,
) -> Any:
    """Product of ``x`` with several matrices, one per mode.

    Parameters
    ----------
    x : array, shape (I_0, ..., I_{N-1})
    matrices : sequence of arrays
        ``matrices[k]`` multiplies mode ``modes[k]``; each has shape ``(J_k, I_{modes[k]})``
        (or its transpose with ``transpose=True``).
    modes : iterable of int, optional
        The mode of each matrix; by default ``0, 1, ..., len(matrices) - 1``.
        Modes must be distinct.
    skip : int or iterable of int, optional
        Mode(s) whose matrix is left out. This refers to a *mode*, not to a position in
        ``matrices``; skipping a mode that no matrix multiplies is an error.
    transpose : bool, default False
        Multiply by every matrix's transpose.

    Returns
    -------
    array
        The product; the matrices are applied in the order that costs the fewest flops
        (the largest size reductions first), which does not change the result.

    Examples
    --------
    >>> import numpy as np
    >>> import ndlowrank as nl
    >>> core = np.ones((2, 3, 4))
    >>> factors = [np.ones((5, 2)), np.ones((6, 3)), np.ones((7, 4))]
    >>> nl.multi_mode_product(core, factors).shape
    (5, 6, 7)
    >>> nl.multi_mode_product(core, factors, skip=1).shape
    (5, 3, 7)
    """
    require_arrays(x=x)
    matrices = array_sequence(matrices, "matrices")
    names = ("x", *(f"matrices[{k}]" for k in range(len(matrices))))
    xp = get_namespace(x, *matrices, names=names)
    mode_list = list(range(len(matrices))) if modes is None else list(modes)
    if len(mode_list) != len(matrices):
        raise ValueError(f"got {len(matrices)} matrices but {len(mode_list)} modes")
    mode_list = [check_mode(m, x.ndim, name=f"modes[{k}]") for k, m in enumerate(mode_list)]
    if len(set(mode_list)) != len(mode_list):
        raise ValueError(f"modes={mode_list} repeats a mode; each mode can be multiplied once")
    skipped: set[int] = set()
    if skip is not None:
        skip_list = [skip] if hasattr(skip, "__index__") else list(skip)
        skipped = {check_mode(s, x.ndim, name="skip") for s in skip_list}
        missing = skipped - set(mode_list)
        if missing:
            raise ValueError(f"skip={sorted(missing)} names modes that no matrix multiplies")
    steps = []
    by_mode = {}
    for k, (mode, matrix) in enumerate(zip(mode_list, matrices, strict=True)):
        if mode in skipped:
            continue
        _check_matrix(x, matrix, mode, transpose=transpose, name=f"matrices[{k}]")
        out_size, in_size = matrix.shape[::-1] if transpose else matrix.shape
        steps.append((mode, int(out_size), int(in_size)))
        by_mode[mode] = matrix
    result = x
    for mode, _, _ in _product_order(steps):
        result, matrix = _promote(xp, result, by_mode[mode])
        result = _mode_product(result, matrix.T if transpose else matrix, mode, xp=xp)
    return result


def tucker_to_tensor(core: Any, factors: Sequence[Any]) -> Any:
    """Dense tensor of a Tucker decomposition: ``core ×_0 factors[0] ×_1 ... ×_{N-1} factors[N-1]``.

    Parameters
    ----------
    core : array, shape (r_0, ..., r_{N-1})
    factors : sequence of N arrays, ``factors[n]`` of shape (I_n, r_n)

    Returns
    -------
    array, shape (I_0, ..., I_{N-1})

    Examples
    --------
    >>> import numpy as np
    >>> import ndlowrank as nl
    >>> nl.tucker_to_tensor(np.ones((1, 1)), [np.ones((3, 1)), np.ones((2, 1))]).shape
    (3, 2)
    """
    require_arrays(core=core)
    factors = array_sequence(factors, "factors")
    if len(factors) != core.ndim:
        raise ValueError(f"core has {core.ndim} modes but {len(factors)} factors were given")
    return multi_mode_product(core, factors)
