"""The Tucker tensor container: a core and one factor matrix per mode."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from ._backend import array_sequence, backend_name, device_of, get_namespace, require_arrays
from .tenalg import check_mode, mode_product, multi_mode_product

__all__ = ["TuckerTensor", "tucker_mode_product"]


class TuckerTensor:
    """A tensor in Tucker form, ``core ×_0 factors[0] ×_1 ... ×_{N-1} factors[N-1]``.

    Behaves like the tuple ``(core, factors)``: ``core, factors = t`` unpacks it.

    Parameters
    ----------
    core : array, shape (r_0, ..., r_{N-1})
    factors : sequence of N arrays
        ``factors[n]`` has shape ``(I_n, r_n)``. All arrays must come from one backend.

    Raises
    ------
    ValueError
        If the number of factors differs from the core's modes, a factor is not 2-D, a
        factor's column count differs from the core's size on that mode (the message
        names the mode), or a rank is 0.
    TypeError
        If the core and the factors come from different backends, or are complex, or if
        the core is ``None`` or ``factors`` is not a sequence of arrays (one array alone).

    Examples
    --------
    >>> import numpy as np
    >>> import ndlowrank as nl
    >>> t = nl.TuckerTensor(np.ones((2, 1)), [np.ones((4, 2)), np.ones((3, 1))])
    >>> t.shape, t.ranks, t.n_params
    ((4, 3), (2, 1), 13)
    >>> core, factors = t
    """

    def __init__(self, core: Any, factors: Sequence[Any]) -> None:
        require_arrays(core=core)
        factors = tuple(array_sequence(factors, "factors"))
        names = ("core", *(f"factors[{n}]" for n in range(len(factors))))
        self._xp = get_namespace(core, *factors, names=names)
        if self._xp.isdtype(core.dtype, "complex floating") or any(
            self._xp.isdtype(f.dtype, "complex floating") for f in factors
        ):
            raise TypeError("complex Tucker tensors are not supported (norm and products assume real values)")
        if 0 in tuple(core.shape):
            raise ValueError(f"core has shape {tuple(core.shape)}: every rank must be >= 1")
        if len(factors) != core.ndim:
            raise ValueError(
                f"core has {core.ndim} modes (shape {tuple(core.shape)}) but "
                f"{len(factors)} factors were given"
            )
        for n, factor in enumerate(factors):
            if factor.ndim != 2:
                raise ValueError(f"factors[{n}] must be 2-D, got shape {tuple(factor.shape)}")
            if factor.shape[1] != core.shape[n]:
                raise ValueError(
                    f"mode {n}: factors[{n}] has {factor.shape[1]} columns but the core has "
                    f"size {core.shape[n]} on mode {n}; they must be equal"
                )
        self.core = core
        self.factors = factors

    # -- tuple-like behaviour --------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        return iter((self.core, self.factors))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> Any:
        return (self.core, self.factors)[index]

    # -- description -----------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the full tensor, ``(I_0, ..., I_{N-1})``."""
        return tuple(int(f.shape[0]) for f in self.factors)

    @property
    def ranks(self) -> tuple[int, ...]:
        """Multilinear ranks of the representation, ``(r_0, ..., r_{N-1})``."""
        return tuple(int(s) for s in self.core.shape)

    @property
    def ndim(self) -> int:
        """Number of modes."""
        return len(self.factors)

    @property
    def n_params(self) -> int:
        """Stored numbers: ``prod(r_n) + sum(I_n * r_n)``."""
        return math.prod(self.ranks) + sum(i * r for i, r in zip(self.shape, self.ranks, strict=True))

    @property
    def dtype(self) -> Any:
        """dtype of the core."""
        return self.core.dtype

    @property
    def device(self) -> Any:
        """Device of the core."""
        return device_of(self.core)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, ranks={self.ranks}, "
            f"n_params={self.n_params}, backend={backend_name(self._xp)}, dtype={self.dtype})"
        )

    # -- computation -----------------------------------------------------------------
    def _scale(self) -> float:
        return 1.0

    def to_dense(self) -> Any:
        """The full tensor, in the core's namespace, device and dtype."""
        dense = multi_mode_product(self.core, self.factors)
        scale = self._scale()
        return dense if scale == 1.0 else scale * dense

    def norm(self) -> Any:
        """Frobenius norm, computed without forming the full tensor.

        Uses ``‖G ×_n A_n‖² = ⟨G, G ×_n (A_nᵀ A_n)⟩``, which costs ``O(sum I_n r_n² +
        prod(r) sum r_n)`` instead of ``O(prod I_n)``; the parts are scaled to at most 1 in
        magnitude first, so values near 1e30 or 1e-30 neither overflow nor underflow.

        Returns
        -------
        0-D array in the core's namespace.
        """
        xp = self._xp
        # divide every part by its largest magnitude first, so that squaring neither
        # overflows (1e30 in float32) nor underflows (1e-30); the scales multiply back at the end
        parts = [self.core, *self.factors]
        peaks = [xp.max(xp.abs(p)) for p in parts]
        scaled = [
            p / xp.where(peak > 0, peak, xp.ones_like(peak)) for p, peak in zip(parts, peaks, strict=True)
        ]
        core, factors = scaled[0], scaled[1:]
        weighted = multi_mode_product(core, [f.T @ f for f in factors])
        norm = xp.sqrt(xp.clip(xp.sum(core * weighted), min=0.0))
        for peak in peaks:
            norm = norm * peak
        return abs(self._scale()) * norm


def tucker_mode_product(t: TuckerTensor, matrix: Any, mode: int, *, transpose: bool = False) -> TuckerTensor:
    """Mode-``mode`` product of a Tucker tensor, without forming the full tensor.

    ``t ×_mode M`` only changes one factor, ``A_mode ← M A_mode``; a vector ``v`` contracts
    the mode away: the core absorbs ``vᵀ A_mode`` and the factor is dropped (TensorLy's
    ``tucker_mode_dot``).

    Parameters
    ----------
    t : TuckerTensor
    matrix : array, shape (J, I_mode), or (I_mode, J) with ``transpose=True``, or (I_mode,)
    mode : int
        Negative values count from the end.
    transpose : bool, default False
        Multiply by ``matrix.T`` (no effect on a vector).

    Returns
    -------
    TuckerTensor
        Equal to ``mode_product(t.to_dense(), matrix, mode)``.

    Raises
    ------
    ValueError
        If ``matrix`` does not fit mode ``mode`` (the message gives both sizes).

    Examples
    --------
    >>> import numpy as np
    >>> import ndlowrank as nl
    >>> t = nl.random_tucker((4, 5, 6), 2, seed=0)
    >>> m = np.ones((3, 5))
    >>> bool(np.allclose(nl.tucker_mode_product(t, m, 1).to_dense(), nl.mode_product(t.to_dense(), m, 1)))
    True
    >>> nl.tucker_mode_product(t, np.ones(6), 2).shape
    (4, 5)
    """
    if not isinstance(t, TuckerTensor):
        raise TypeError(f"t must be a TuckerTensor, got {type(t).__name__}")
    mode = check_mode(mode, t.ndim)
    factors = list(t.factors)
    # the factor has I_mode rows, so the product checks matrix against the full size I_mode
    changed = mode_product(factors[mode], matrix, 0, transpose=transpose)
    scale = t._scale()  # a TuckerDelta's scale moves into the core
    core = t.core if scale == 1.0 else t.core * scale
    if matrix.ndim == 1:
        del factors[mode]
        return TuckerTensor(mode_product(core, changed, mode), factors)
    factors[mode] = changed
    return TuckerTensor(core, factors)
