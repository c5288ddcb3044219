"""Leading left singular subspaces of a matrix: the kernel of every Tucker algorithm.

Three solvers compute the top-``r`` left singular vectors of ``y`` (``I × m``):

``"gram"``
    eigenvectors of the Gram matrix ``y yᵀ`` with a symmetric eigensolver (the backend's
    native one where it is faster, see :func:`ndlowrank._backend.eigh`). Fastest, but
    squaring halves the usable precision: singular values below about ``√eps`` of the
    largest are lost in rounding.
``"svd"``
    the thin SVD of ``y``: backward stable at any spectrum, slower than the Gram path.
``"randomized"``
    a randomized range finder (Halko, Martinsson & Tropp 2011) with oversampling and
    power iterations, then an SVD of the small projected matrix: for large modes with
    small ranks. Needs a rank.
``"auto"``
    the Gram path, checked: the Gram matrix's rounding error is estimated as
    ``δ = 10 · eps · √m · trace(y yᵀ)``. The result is accepted when everything that
    matters stands clear of it (with a fixed rank: the ``r``-th eigenvalue ``≥ δ``;
    with an energy budget for the discarded part: the budget ``≥ δ · √I``). Otherwise
    the Gram matrix is formed again in float64 (from float32 input) and checked the same
    way, and if that is still not enough the SVD path is taken. Tall matrices
    (``I > m``) always use the SVD, which is then the cheaper path.

With an energy budget (``sthosvd(tol=...)``) ``"gram"`` is checked as ``"auto"`` is, since
the budget is a guarantee: a Gram matrix too coarse to resolve it is formed again in float64,
then replaced by the SVD, so the tolerance holds with every solver.

Every solver returns vectors with a deterministic sign: the largest-magnitude entry of
each vector is positive, so results are reproducible and backends agree.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from ._backend import device_of, eigh, from_numpy, times_power_of_two, to_numpy
from .tenalg import unfold

__all__ = ["SOLVERS", "leading_subspace", "mode_spectrum", "rank_for_budget"]

SOLVERS = ("auto", "gram", "svd", "randomized")

_GRAM_SAFETY = 10.0


def rank_for_budget(spectrum: np.ndarray, budget: float) -> int:
    """Fewest ``r >= 1`` whose discarded energy ``sum(spectrum[r:])`` is at most ``budget``.

    ``spectrum`` holds squared singular values in decreasing order (float64 numpy).
    """
    tails = np.concatenate([np.cumsum(spectrum[::-1])[::-1], [0.0]])
    return max(1, int(np.argmax(tails <= budget)))


def _fix_signs(u: Any, *, xp: ModuleType) -> Any:
    """Flip each column so that its largest-magnitude entry is positive."""
    rows = xp.arange(u.shape[0], device=device_of(u))
    largest = xp.argmax(xp.abs(u), axis=0)
    picked = xp.sum(xp.where(rows[:, None] == largest[None, :], u, 0.0), axis=0)
    one = xp.ones((), dtype=u.dtype, device=device_of(u))
    return u * xp.where(picked < 0, -one, one)[None, :]


def _gram_eigh(y: Any, rank: int | None, dtype: Any, *, xp: ModuleType) -> tuple[Any, np.ndarray, float]:
    """Top eigenpairs of ``y yᵀ`` formed in ``dtype``: vectors, eigenvalues (desc.) and trace."""
    y = y if y.dtype == dtype else xp.astype(y, dtype)
    gram = y @ y.T
    trace = float(xp.sum(xp.linalg.diagonal(gram)))
    values, vectors = eigh(xp, gram, top=rank)
    values = np.clip(to_numpy(values)[::-1].astype(np.float64), 0.0, None)
    return xp.flip(vectors, axis=1), values, trace


def _gram_is_accurate(
    values: np.ndarray,
    trace: float,
    *,
    shape: tuple[int, int],
    eps: float,
    rank: int | None,
    budget: float | None,
) -> bool:
    rows, cols = shape
    delta = _GRAM_SAFETY * eps * math.sqrt(cols) * trace
    if rank is not None:
        return rank >= rows or values[rank - 1] >= delta
    assert budget is not None
    return budget >= delta * math.sqrt(rows)


def _svd(y: Any, *, xp: ModuleType, full: bool = False) -> tuple[Any, np.ndarray]:
    """Thin SVD (all ``I`` left vectors with ``full``); the spectrum is padded with zeros to ``I``."""
    u, s, _ = xp.linalg.svd(y, full_matrices=full)
    values = np.zeros(y.shape[0])
    values[: s.shape[0]] = to_numpy(s).astype(np.float64) ** 2
    return u, values


def _randomized(
    y: Any, rank: int, *, oversample: int, power_iters: int, rng: np.random.Generator, xp: ModuleType
) -> tuple[Any, np.ndarray]:
    rows, cols = y.shape
    width = min(rank + oversample, rows, cols)
    omega = from_numpy(rng.standard_normal((cols, width)), xp, device=device_of(y), dtype=y.dtype)
    basis, _ = xp.linalg.qr(y @ omega)
    for _ in range(power_iters):
        basis, _ = xp.linalg.qr(y @ (y.T @ basis))
    u_small, values = _svd(basis.T @ y, xp=xp)
    return basis @ u_small, values


def leading_subspace(
    y: Any,
    *,
    rank: int | None = None,
    budget: float | None = None,
    solver: str = "auto",
    oversample: int = 10,
    power_iters: int = 2,
    rng: np.random.Generator | None = None,
    xp: ModuleType,
) -> tuple[Any, np.ndarray]:
    """Top left singular vectors of ``y`` and its squared singular values.

    Parameters
    ----------
    y : array, shape (I, m)
        In a float32 or float64 dtype.
    rank : int, optional
        Number of vectors. Without it, ``budget`` chooses the fewest vectors whose
        discarded energy (sum of the other squared singular values) is at most ``budget``.
    budget : float, optional
        Energy that may be discarded, in the units of ``y``'s squared entries.
    solver : {"auto", "gram", "svd", "randomized"}
        See the module docstring.

    Returns
    -------
    u : array, shape (I, r)
        Orthonormal columns in ``y``'s dtype, namespace and device, signs fixed.
    spectrum : numpy.ndarray of float64
        Squared singular values in decreasing order (all of them unless the Gram path
        computed only the top ``rank``).
    """
    rows, cols = y.shape
    if rank is not None and rank > cols:
        # more vectors than the matrix has singular values: complete the basis
        u, spectrum = _svd(y, xp=xp, full=True)
    elif solver == "randomized":
        assert rank is not None and rng is not None
        u, spectrum = _randomized(y, rank, oversample=oversample, power_iters=power_iters, rng=rng, xp=xp)
    elif solver == "svd" or (solver == "auto" and rows > cols):
        u, spectrum = _svd(y, xp=xp)
    else:
        # a budget (tol=) is a guarantee, so the Gram path is checked for it whatever the solver
        u, spectrum = _checked_gram(
            y, rank=rank, budget=budget, check=solver == "auto" or rank is None, xp=xp
        )
    if rank is None:
        assert budget is not None
        rank = rank_for_budget(spectrum, budget)
    u = u[:, :rank]
    if u.dtype != y.dtype:
        u = xp.astype(u, y.dtype)
    return _fix_signs(u, xp=xp), spectrum


def _checked_gram(
    y: Any, *, rank: int | None, budget: float | None, check: bool, xp: ModuleType
) -> tuple[Any, np.ndarray]:
    """The Gram path; with ``check``, climb to float64 and then to the SVD when it is not accurate."""
    dtypes = [y.dtype] if y.dtype == xp.float64 or not check else [y.dtype, xp.float64]
    for dtype in dtypes:
        u, spectrum, trace = _gram_eigh(y, rank, dtype, xp=xp)
        eps = float(xp.finfo(dtype).eps)
        accurate = _gram_is_accurate(spectrum, trace, shape=y.shape, eps=eps, rank=rank, budget=budget)
        if not check or accurate:
            return u, spectrum
    return _svd(y, xp=xp)


def mode_spectrum(x: Any, mode: int, *, xp: ModuleType) -> np.ndarray:
    """Squared singular values of ``unfold(x, mode)``, decreasing, as float64 numpy (length ``I_mode``).

    Eigenvalues of the smaller Gram matrix; for rank *selection* by energy, where an
    absolute error of ``eps · ‖x‖²`` per value does not matter.
    """
    y = unfold(x, mode)
    rows, cols = y.shape
    peak = float(xp.max(xp.abs(y)))
    exponent = math.frexp(peak)[1] if math.isfinite(peak) else 0  # so that squaring cannot overflow
    y = y if exponent == 0 else times_power_of_two(y, -exponent)
    gram = y @ y.T if rows <= cols else y.T @ y
    values = np.sort(to_numpy(xp.linalg.eigvalsh(gram)).astype(np.float64))[::-1]
    values = np.ldexp(values, 2 * exponent)
    spectrum = np.zeros(rows)
    spectrum[: min(rows, cols)] = np.clip(values[: min(rows, cols)], 0.0, None)
    return spectrum
