"""Tucker decompositions of part of a tensor: some modes only, or the observed entries only."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat

from ._backend import device_of, get_namespace
from ._subspace import leading_subspace
from ._validation import validate_ranks
from .decompose import PreparedTensor, check_iterations, hooi, sthosvd
from .tenalg import check_mode, multi_mode_product, unfold
from .tucker import TuckerTensor

__all__ = ["masked_tucker", "partial_tucker"]


def _refuse_dask(x: Any, name: str) -> None:
    if array_api_compat.is_dask_array(x):
        raise TypeError(
            f"{name} does not take dask arrays; compute the array first (x.compute()) or use "
            "nl.sthosvd / nl.hooi / nl.tucker_sketch, which reduce over its chunks"
        )


def partial_tucker(
    x: Any,
    ranks: int | Sequence[int],
    modes: Sequence[int],
    *,
    max_iter: int = 50,
    tol: float = 1e-5,
) -> tuple[Any, list[Any]]:
    """Tucker decomposition of the given modes only (TensorLy's ``partial_tucker``).

    HOOI restricted to ``modes``, started from an ST-HOSVD of those modes; the other modes
    keep their full size in the core.

    Parameters
    ----------
    x : array, shape (I_0, ..., I_{N-1})
    ranks : int or sequence of int
        One rank per entry of ``modes`` (an int applies to all of them).
    modes : sequence of int
        Distinct modes to decompose; negative values count from the end.
    max_iter, tol
        As in :func:`ndlowrank.hooi`.

    Returns
    -------
    core : array
        ``x ×ₖ factors[k]ᵀ`` over ``modes``: size ``ranks[k]`` on ``modes[k]``, ``I_n`` elsewhere.
    factors : list of arrays
        ``factors[k]`` of shape ``(I_{modes[k]}, ranks[k])``, orthonormal columns.
        ``multi_mode_product(core, factors, modes)`` approximates ``x``.

    Raises
    ------
    ValueError
        For bad modes or ranks, NaN or Inf in ``x``, or a core that ``x``'s dtype cannot
        hold (as :func:`ndlowrank.sthosvd`).

    Examples
    --------
    >>> import numpy as np
    >>> import ndlowrank as nl
    >>> x = np.random.default_rng(0).random((3, 4, 3))
    >>> core, factors = nl.partial_tucker(x, [3, 1], modes=[1, 2])
    >>> core.shape, [f.shape for f in factors]
    ((3, 3, 1), [(4, 3), (3, 1)])
    """
    _refuse_dask(x, "partial_tucker")
    max_iter, tol = check_iterations(max_iter, tol, None)
    prepared = PreparedTensor(x)
    xp, y = prepared.xp, prepared.y
    chosen = [check_mode(m, y.ndim, name=f"modes[{k}]") for k, m in enumerate(modes)]
    if not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"modes={list(modes)} must name at least one mode, each once")
    kept = validate_ranks(ranks, [y.shape[m] for m in chosen])
    full = [y.shape[n] for n in range(y.ndim)]
    for mode, rank in zip(chosen, kept, strict=True):
        full[mode] = rank
    start = sthosvd(y, full, order=chosen + [n for n in range(y.ndim) if n not in chosen])
    factors = [start.factors[m] for m in chosen]
    norm2 = prepared.squared_norm()
    best_error, best = math.inf, list(factors)
    error = math.inf
    for sweep in range(max_iter if norm2 > 0 else 0):
        for k, mode in enumerate(chosen):
            others = [j for j in range(len(chosen)) if j != k]
            projected = multi_mode_product(
                y, [factors[j] for j in others], [chosen[j] for j in others], transpose=True
            )
            factors[k], _ = leading_subspace(unfold(projected, mode), rank=kept[k], xp=xp)
        core = multi_mode_product(y, factors, chosen, transpose=True)
        previous = error
        error = math.sqrt(max(norm2 - float(xp.linalg.vector_norm(core)) ** 2, 0.0) / norm2)
        if error < best_error:
            best_error, best = error, list(factors)
        if sweep > 0 and previous - error <= tol * previous:
            break
    return prepared.restore(multi_mode_product(y, best, chosen, transpose=True), best)


def masked_tucker(
    x: Any,
    ranks: int | Sequence[int],
    mask: Any,
    *,
    max_iter: int = 100,
    tol: float = 1e-7,
    callback: Callable[[int, float], Any] | None = None,
) -> TuckerTensor:
    """Tucker decomposition that fits only the entries where ``mask`` is true (HOOI with imputation).

    The missing entries are first filled with the mean of the observed ones, then, in turn,
    replaced by the current decomposition's values and the decomposition improved by one
    HOOI sweep (an EM / majorise-minimise scheme, TensorLy's ``tucker(..., mask=)``). The
    error on the observed entries never increases.

    Parameters
    ----------
    x : array, shape (I_0, ..., I_{N-1})
        Values at masked-out positions are ignored (they may be NaN).
    ranks : int or sequence of int
    mask : array of bool or 0/1, same shape as ``x``
        True (1) where the entry is observed; same backend as ``x``.
    max_iter : int, default 100
    tol : float, default 1e-7
        Stop when an iteration lowers the relative observed error by less than ``tol``.
    callback : callable, optional
        ``callback(iteration, relative_error_on_observed_entries)``.

    Returns
    -------
    TuckerTensor

    Examples
    --------
    >>> import numpy as np
    >>> import ndlowrank as nl
    >>> x = nl.random_tucker((6, 5, 4), 1, seed=0).to_dense()
    >>> mask = np.ones(x.shape, dtype=bool)
    >>> mask[0, 0, 0] = False
    >>> corrupted = x.copy()
    >>> corrupted[0, 0, 0] = 100.0
    >>> t = nl.masked_tucker(corrupted, 1, mask)
    >>> bool(np.linalg.norm(t.to_dense() - x) < 1e-6 * np.linalg.norm(x))
    True
    """
    _refuse_dask(x, "masked_tucker")
    max_iter, tol = check_iterations(max_iter, tol, callback)
    xp = get_namespace(x, mask, names=("x", "mask"))
    if tuple(mask.shape) != tuple(x.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; it must have x's shape {tuple(x.shape)}")
    observed = mask if mask.dtype == xp.bool else mask != 0
    count = int(xp.sum(xp.astype(observed, xp.int64)))
    if count == 0:
        raise ValueError("mask has no observed entry (all false)")
    zero = xp.zeros((), dtype=x.dtype, device=device_of(x))
    known = xp.where(observed, x, zero)
    prepared = PreparedTensor(known)  # checks the observed values (finite, real)
    y = prepared.y
    ranks = validate_ranks(ranks, y.shape)
    mean = xp.sum(y) / count
    filled = xp.where(observed, y, mean)
    norm2 = prepared.squared_norm()
    t = sthosvd(filled, ranks)
    error = math.inf
    for iteration in range(max_iter):
        dense = t.to_dense()
        residual = float(xp.linalg.vector_norm(xp.where(observed, y - dense, 0.0))) ** 2
        previous, error = error, math.sqrt(residual / norm2) if norm2 > 0 else 0.0
        if callback is not None:
            callback(iteration, error)
        if iteration > 0 and previous - error <= tol * previous:
            break
        t = hooi(xp.where(observed, y, dense), ranks, init=t, max_iter=1)
    return prepared.finish(t.core, t.factors)
