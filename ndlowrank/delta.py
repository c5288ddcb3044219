"""N-dimensional low-rank weight deltas in Tucker form."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ._backend import backend_name, device_of, from_numpy, get_namespace, resolve_backend, resolve_dtype
from ._validation import check_scale, check_shape, make_rng, validate_ranks
from .init import get_init, principal
from .tucker import TuckerTensor

__all__ = ["TuckerDelta", "tucker_delta"]


class TuckerDelta(TuckerTensor):
    """A weight delta ``ΔW = scale · core ×_0 factors[0] ... ×_{N-1} factors[N-1]``.

    A :class:`TuckerTensor` with a plain multiplier ``scale``; :meth:`to_dense` and
    :meth:`norm` include it, :attr:`n_params` does not count it.

    Parameters
    ----------
    core, factors
        As for :class:`TuckerTensor`.
    scale : float, default 1.0
        Multiplier of the delta (the paper's ``scale``; ``alpha / r`` in LoRA terms).
    """

    def __init__(self, core: Any, factors: Sequence[Any], scale: float = 1.0) -> None:
        super().__init__(core, factors)
        self.scale = check_scale(scale)

    def _scale(self) -> float:
        return self.scale

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", scale={self.scale})"


def tucker_delta(
    shape: Sequence[int],
    ranks: int | Sequence[int],
    *,
    init: str = "zero_core",
    scale: float = 1.0,
    backend: str | ModuleType | None = None,
    device: Any = None,
    dtype: Any = None,
    seed: int | np.random.Generator | None = None,
    weight: Any = None,
) -> TuckerDelta:
    """Create a Tucker-form weight delta that starts at zero (or at a weight's principal part).

    Parameters
    ----------
    shape : sequence of int
        Shape of the weight the delta changes, e.g. ``(out, in, kh, kw)`` for a conv kernel.
    ranks : int or sequence of int
        Multilinear ranks; an int applies to every mode. Each must satisfy
        ``1 <= ranks[n] <= shape[n]``.
    init : str, default "zero_core"
        ``"zero_core"`` (the FLoRA paper's: zero core, ``kaiming_normal_(a=sqrt(3))``
        factors, i.e. std ``1/sqrt(2 r_n)``), ``"zero_factor"`` (mode-0 factor zero, as
        LoRA zeroes ``B``; core ``N(0, 1/prod(ranks))``), ``"orthogonal"`` (orthonormal
        factor columns, zero core), or ``"principal"`` (needs ``weight``: the ST-HOSVD of
        the weight at ``ranks``, so ``to_dense()`` is the weight's principal part; replace
        the weight by ``weight - d.to_dense()`` to keep the model's function unchanged).
    scale : float, default 1.0
        Multiplier applied in :meth:`TuckerDelta.to_dense`; ``|scale| <= 1e6``, and
        ``|scale| >= 1e-6`` with ``init="principal"`` (the guarantees page of the docs).
    backend : str or module, optional
        ``"numpy"`` (default), ``"torch"``, ``"cupy"``, ``"array_api_strict"`` or a
        namespace object.
    device : optional
        Device of the backend (``"cuda:0"`` for torch, ...); the backend's default if omitted.
    dtype : str or dtype, optional
        Real floating dtype; default ``float32``.
    seed : int or numpy.random.Generator, optional
        Makes the draw reproducible. The numbers are drawn with numpy and then moved,
        so the same seed gives the same values on every backend. Unused by ``"principal"``.
    weight : array, optional
        The weight of shape ``shape`` that ``init="principal"`` decomposes. The delta is
        then built on the weight's backend and device, in ``dtype`` or else the weight's
        floating dtype.

    Returns
    -------
    TuckerDelta
        With ``to_dense()`` equal to zero (for ``"principal"``: the weight's principal part).

    Raises
    ------
    ValueError
        For a bad shape, rank, init, backend, dtype or seed, or a scale that is not finite
        or out of bounds (the message names it).
    TypeError
        For a rank or size that is not an int, or a scale that is not a real number.

    Examples
    --------
    >>> import ndlowrank as nl
    >>> d = nl.tucker_delta((64, 32, 3, 3), (8, 8, 3, 3), seed=0)
    >>> d.n_params, float(abs(d.to_dense()).max())
    (1362, 0.0)
    """
    shape = check_shape(shape)
    ranks = validate_ranks(ranks, shape)
    scale = check_scale(scale, principal=init == "principal")
    if init == "principal":
        return _principal_delta(
            weight, shape, ranks, scale=scale, backend=backend, device=device, dtype=dtype
        )
    draw = get_init(init)
    if weight is not None:
        raise ValueError(f"weight= is only used by init='principal', not by init={init!r}")
    rng = make_rng(seed)
    xp = resolve_backend(backend)
    dtype = resolve_dtype(xp, dtype)
    core, factors = draw(shape, ranks, rng)
    return TuckerDelta(
        from_numpy(core, xp, device=device, dtype=dtype),
        [from_numpy(f, xp, device=device, dtype=dtype) for f in factors],
        scale=scale,
    )


def _principal_delta(
    weight: Any,
    shape: tuple[int, ...],
    ranks: tuple[int, ...],
    *,
    scale: float,
    backend: Any,
    device: Any,
    dtype: Any,
) -> TuckerDelta:
    if weight is None:
        raise ValueError("init='principal' needs weight=, the array whose principal part the delta takes")
    xp = get_namespace(weight, names=("weight",))
    if backend is not None and backend_name(resolve_backend(backend)) != backend_name(xp):
        raise TypeError(
            f"weight is a {backend_name(xp)} array but backend={backend!r}; drop backend= or convert"
        )
    if tuple(weight.shape) != shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but shape={shape}")
    core, factors = principal(weight, ranks)
    dtype = core.dtype if dtype is None else resolve_dtype(xp, dtype)
    device = device_of(weight) if device is None else device
    arrays = [xp.asarray(a, dtype=dtype, device=device) for a in (core / scale, *factors)]
    return TuckerDelta(arrays[0], arrays[1:], scale=scale)
