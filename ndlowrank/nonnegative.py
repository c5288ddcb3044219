"""Non-negative Tucker decomposition by multiplicative updates (Kim & Choi 2007)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ._backend import device_of, from_numpy
from ._validation import make_rng, validate_ranks
from .decompose import PreparedTensor, _zero_result, check_iterations, hosvd
from .tenalg import multi_mode_product, unfold
from .tucker import TuckerTensor

__all__ = ["non_negative_tucker"]


def non_negative_tucker(
    x: Any,
    ranks: int | Sequence[int],
    *,
    init: str = "svd",
    max_iter: int = 100,
    tol: float = 1e-8,
    seed: int | np.random.Generator | None = None,
    callback: Callable[[int, float], Any] | None = None,
) -> TuckerTensor:
    """Tucker decomposition with a non-negative core and non-negative factors.

    Multiplicative updates for the Frobenius error (Kim & Choi 2007, as TensorLy's
    ``non_negative_tucker``): each factor, then the core, is multiplied entrywise by the
    ratio of the negative and positive parts of its gradient. Entries stay non-negative
    and the error never increases from one iteration to the next (Lee & Seung's argument).

    Parameters
    ----------
    x : array, shape (I_0, ..., I_{N-1})
        Non-negative entries, any backend.
    ranks : int or sequence of int
    init : {"svd", "random"}, default "svd"
        ``"svd"``: absolute values of the HOSVD's core and factors; ``"random"``: uniform
        entries from ``seed``, scaled to ``x``'s norm.
    max_iter : int, default 100
    tol : float, default 1e-8
        Stop when an iteration lowers the relative error by less than ``tol``.
    seed : int or numpy.random.Generator, optional
        For ``init="random"``.
    callback : callable, optional
        Called as ``callback(iteration, relative_error)`` after each iteration.

    Returns
    -------
    TuckerTensor
        In ``x``'s namespace, device and floating dtype; every entry ``>= 0``.

    Raises
    ------
    ValueError
        If ``x`` has a negative entry, NaN or Inf, or an argument is invalid.

    Examples
    --------
    >>> import ndlowrank as nl
    >>> x = nl.random_tucker((6, 5, 4), 2, non_negative=True, seed=0).to_dense()
    >>> t = nl.non_negative_tucker(x, 2, max_iter=200)
    >>> bool((t.core >= 0).all() and all((f >= 0).all() for f in t.factors))
    True
    >>> bool(((x - t.to_dense()) ** 2).sum() ** 0.5 < 0.05 * (x**2).sum() ** 0.5)
    True
    """
    prepared = PreparedTensor(x)
    xp, y = prepared.xp, prepared.y
    ranks = validate_ranks(ranks, y.shape)
    if init not in ("svd", "random"):
        raise ValueError(f"unknown init={init!r}; use 'svd' or 'random'")
    max_iter, tol = check_iterations(max_iter, tol, callback)
    if float(xp.min(y)) < 0:
        raise ValueError("x has negative entries; a non-negative Tucker decomposition needs x >= 0")
    norm2 = prepared.squared_norm()
    if norm2 == 0:
        return _zero_result(prepared, ranks)
    core, factors = _start(y, ranks, init, seed, norm2, xp=xp)
    tiny = float(xp.finfo(y.dtype).smallest_normal)
    error = math.inf
    for iteration in range(max_iter):
        for n in range(len(ranks)):
            rest = unfold(multi_mode_product(core, factors, skip=n), n)
            numerator = unfold(y, n) @ rest.T
            factors[n] = factors[n] * numerator / xp.clip(factors[n] @ (rest @ rest.T), min=tiny)
        grams = [f.T @ f for f in factors]
        projected = multi_mode_product(y, factors, transpose=True)
        core = core * projected / xp.clip(multi_mode_product(core, grams), min=tiny)
        # ‖x − t‖² = ‖x‖² − 2⟨xᵀ-projection, G⟩ + ⟨G, G ×ₙ AₙᵀAₙ⟩, without forming t
        fitted = float(xp.sum(core * multi_mode_product(core, grams)))
        residual = norm2 - 2 * float(xp.sum(core * projected)) + fitted
        previous, error = error, math.sqrt(max(residual, 0.0) / norm2)
        if callback is not None:
            callback(iteration, error)
        if previous - error < tol:
            break
    return prepared.finish(core, factors)


def _uniform(shape: tuple[int, ...], rng: np.random.Generator, like: Any, *, xp: ModuleType) -> Any:
    return from_numpy(rng.random(shape), xp, device=device_of(like), dtype=like.dtype)


def _start(
    y: Any, ranks: tuple[int, ...], init: str, seed: Any, norm2: float, *, xp: ModuleType
) -> tuple[Any, list[Any]]:
    """Non-negative start: the HOSVD's absolute values, or uniform entries scaled to ``‖y‖``."""
    if init == "svd":
        start = hosvd(y, ranks)
        return xp.abs(start.core), [xp.abs(f) for f in start.factors]
    rng = make_rng(seed)
    factors = [_uniform((size, r), rng, y, xp=xp) for size, r in zip(y.shape, ranks, strict=True)]
    core = _uniform(ranks, rng, y, xp=xp)
    scale = math.sqrt(norm2) / float(TuckerTensor(core, factors).norm())
    return core * scale, factors
