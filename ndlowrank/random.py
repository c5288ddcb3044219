"""Random Tucker tensors, on any backend (TensorLy's ``random_tucker``)."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ._backend import from_numpy, resolve_backend, resolve_dtype
from ._validation import check_shape, make_rng, validate_ranks
from .tucker import TuckerTensor

__all__ = ["random_tucker"]


def random_tucker(
    shape: int | Sequence[int],
    ranks: int | Sequence[int],
    *,
    orthogonal: bool = False,
    non_negative: bool = False,
    seed: int | np.random.Generator | None = None,
    backend: str | ModuleType | None = None,
    device: Any = None,
    dtype: Any = None,
) -> TuckerTensor:
    """A random Tucker tensor of the given shape and multilinear ranks.

    The core and factors are drawn in float64 numpy from ``seed`` and then moved to the
    backend, so a seed gives the same numbers (up to the dtype's rounding) everywhere.

    Parameters
    ----------
    shape : int or sequence of int
        ``(I_0, ..., I_{N-1})``.
    ranks : int or sequence of int
        ``1 <= ranks[n] <= I_n``; an int applies to every mode.
    orthogonal : bool, default False
        Factors with orthonormal columns (from a QR of Gaussian matrices), a Gaussian core.
    non_negative : bool, default False
        Core and factors uniform in ``[0, 1)``. Cannot be combined with ``orthogonal``.
    seed : int or numpy.random.Generator, optional
    backend : str or module, optional
        ``"numpy"`` (default), ``"torch"``, ``"cupy"``, ``"array_api_strict"`` or a namespace.
    device, dtype : optional
        Where and in which real floating dtype (default float64) the arrays are created.

    Returns
    -------
    TuckerTensor
        Call ``.to_dense()`` for the full tensor.

    Raises
    ------
    ValueError
        For an invalid shape, rank or seed, or ``orthogonal`` with ``non_negative``.

    Examples
    --------
    >>> import ndlowrank as nl
    >>> t = nl.random_tucker((5, 6, 7), (2, 3, 2), orthogonal=True, seed=0)
    >>> t.ranks
    (2, 3, 2)
    >>> bool(abs(float(t.norm()) - float((t.core**2).sum()) ** 0.5) < 1e-12)
    True
    """
    sizes = check_shape(shape)
    ranks = validate_ranks(ranks, sizes)
    if orthogonal and non_negative:
        raise ValueError("orthogonal=True and non_negative=True exclude each other: pick one")
    xp = resolve_backend(backend)
    dtype = resolve_dtype(xp, dtype, default="float64")
    rng = make_rng(seed)
    draw = rng.random if non_negative else rng.standard_normal
    core = draw(ranks)
    factors = [draw((size, rank)) for size, rank in zip(sizes, ranks, strict=True)]
    if orthogonal:
        factors = [np.linalg.qr(f)[0] for f in factors]
    parts = [from_numpy(a, xp, device=device, dtype=dtype) for a in (core, *factors)]
    return TuckerTensor(parts[0], parts[1:])
