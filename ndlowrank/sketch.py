"""Single-pass randomized Tucker: a sketch of the tensor, read once (Sun et al. 2019)."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import array_api_compat.numpy as npx
import numpy as np

from ._backend import device_of, from_numpy, get_namespace, native_routine, require_arrays
from ._validation import make_rng, validate_ranks
from .decompose import PreparedTensor, _zero_result, sthosvd
from .tenalg import multi_mode_product, unfold

__all__ = ["tucker_sketch"]


def _widths(
    value: Any, default: Sequence[int], shape: Sequence[int], minimum: Sequence[int], name: str
) -> list[int]:
    """One sketch width per mode: the default, or validated ``value`` (at least ``minimum``)."""
    if value is None:
        return [min(d, size) for d, size in zip(default, shape, strict=True)]
    widths = validate_ranks(value, shape, clip=True)
    for n, (width, low) in enumerate(zip(widths, minimum, strict=True)):
        if width < low:
            raise ValueError(f"{name}[{n}]={width} is below {low}, the smallest width this mode allows")
    return list(widths)


def _khatri_rao(matrices: Sequence[Any], *, xp: ModuleType) -> Any:
    """Column-wise Kronecker product, rows in the row-major order of :func:`ndlowrank.unfold`."""
    out = matrices[0]
    for matrix in matrices[1:]:
        out = xp.reshape(out[:, None, :] * matrix[None, :, :], (-1, matrix.shape[1]))
    return out


def tucker_sketch(
    x: Any,
    ranks: int | Sequence[int],
    *,
    width: int | Sequence[int] | None = None,
    core_width: int | Sequence[int] | None = None,
    seed: int | np.random.Generator | None = None,
) -> Any:
    """Randomized Tucker decomposition from one pass over ``x`` (Sun, Guo, Luo, Tropp & Udell 2019).

    Everything read from ``x`` is linear in it and computed in a single pass: a factor
    sketch ``V_n = x₍ₙ₎ Ω_n`` per mode, ``Ω_n`` the Khatri-Rao product of small Gaussian
    matrices (never formed for dask arrays), and a core sketch ``H = x ×ₙ Φ_nᵀ``. Then, in
    memory: ``Q_n`` an orthonormal basis of ``V_n``, ``W = H ×ₙ (Φ_nᵀ Q_n)⁺``, and an ST-HOSVD
    of the small ``W`` to ``ranks``. The memory this needs beyond ``x``'s chunks is that of
    the sketches, ``Σ I_n k_n + Π s_n`` numbers; for a tensor streamed in slices or chunks,
    it suits data that can be read only once. A dask array is read exactly once (the
    NaN/Inf check included); ST-HOSVD reads it ``N + 1`` times, and is more accurate.

    Parameters
    ----------
    x : array, shape (I_0, ..., I_{N-1})
        Any backend, or a dask array.
    ranks : int or sequence of int
    width : int or sequence of int, optional
        Columns ``k_n`` of each factor sketch, ``>= ranks[n]``; default ``2 r_n + 1``
        (clipped to ``I_n``).
    core_width : int or sequence of int, optional
        Sizes ``s_n`` of the core sketch, ``>= k_n``; default ``2 k_n + 1`` (clipped).
    seed : int or numpy.random.Generator, optional
        The same seed gives the same result on every backend.

    Returns
    -------
    TuckerTensor
        Orthonormal factors; numpy arrays for a dask input.

    Examples
    --------
    >>> import numpy as np
    >>> import ndlowrank as nl
    >>> x = nl.random_tucker((30, 25, 20), 3, seed=0).to_dense()
    >>> t = nl.tucker_sketch(x, 3, seed=0)
    >>> bool(np.linalg.norm(x - t.to_dense()) < 1e-8 * np.linalg.norm(x))
    True
    """
    require_arrays(x=x)  # a clear TypeError for what is not an array
    get_namespace(x, names=("x",))
    shape = tuple(int(s) for s in x.shape)
    if len(shape) < 2:
        raise ValueError(f"x has shape {shape}; tucker_sketch needs at least 2 modes")
    ranks = validate_ranks(ranks, shape)
    widths = _widths(width, [2 * r + 1 for r in ranks], shape, ranks, "width")
    core_widths = _widths(core_width, [2 * k + 1 for k in widths], shape, widths, "core_width")
    rng = make_rng(seed)
    omegas = [
        [rng.standard_normal((size, widths[n])) for k, size in enumerate(shape) if k != n]
        for n in range(len(shape))
    ]
    phis = [rng.standard_normal((size, s)) for size, s in zip(shape, core_widths, strict=True)]
    if (native := native_routine(x, "sketches")) is not None:
        prepared, factor_sketches, core_sketch = native(x, omegas, phis)
        if prepared.is_zero:
            return prepared.zero(ranks)
        xp: ModuleType = npx
    else:
        prepared = PreparedTensor(x)
        if prepared.is_zero:
            return _zero_result(prepared, ranks)
        xp, y = prepared.xp, prepared.y
        move = lambda a: from_numpy(a, xp, device=device_of(y), dtype=y.dtype)  # noqa: E731
        factor_sketches = [
            unfold(y, n) @ _khatri_rao([move(o) for o in omegas[n]], xp=xp) for n in range(y.ndim)
        ]
        phis = [move(p) for p in phis]
        core_sketch = multi_mode_product(y, phis, transpose=True)
    bases = [xp.linalg.qr(v)[0] for v in factor_sketches]
    solves = [xp.linalg.pinv(p.T @ q) for p, q in zip(phis, bases, strict=True)]
    small = sthosvd(multi_mode_product(core_sketch, solves), ranks, solver="svd")
    factors = [q @ u for q, u in zip(bases, small.factors, strict=True)]
    return prepared.finish(small.core, factors)
