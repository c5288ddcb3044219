"""Argument checks shared by the core: shapes and ranks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["check_shape", "validate_ranks"]


def _is_int(value: Any) -> bool:
    """An int-like scalar (Python or numpy int, 0-D integer array), not a bool or an array."""
    return not isinstance(value, bool) and hasattr(value, "__index__") and getattr(value, "ndim", 0) == 0


def _as_int(value: Any, what: str) -> int:
    if not _is_int(value):
        raise TypeError(f"{what} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def check_shape(shape: Any, *, name: str = "shape") -> tuple[int, ...]:
    """Validate a tensor shape: a non-empty sequence of positive ints.

    Raises
    ------
    TypeError
        If ``shape`` is not a sequence of ints.
    ValueError
        If it is empty or a size is not positive (the message names the mode).
    """
    if _is_int(shape):
        shape = (shape,)
    if hasattr(shape, "tolist"):  # a numpy or torch array of sizes
        shape = shape.tolist()
    if not isinstance(shape, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(shape).__name__}")
    sizes = tuple(_as_int(s, f"{name}[{n}]") for n, s in enumerate(shape))
    if not sizes:
        raise ValueError(f"{name} must have at least one mode, got {tuple(shape)}")
    for n, size in enumerate(sizes):
        if size < 1:
            raise ValueError(f"{name}[{n}]={size}: every mode must have size >= 1")
    return sizes


def validate_ranks(ranks: Any, shape: Sequence[int], *, clip: bool = False) -> tuple[int, ...]:
    """Check a ``ranks`` argument against a tensor shape and return one int per mode.

    Parameters
    ----------
    ranks : int or sequence of int
        An int applies to every mode; a sequence gives one rank per mode.
    shape : sequence of int
        The tensor's shape ``(I_0, ..., I_{N-1})``.
    clip : bool, default False
        Clip an *int* ``ranks`` to each mode's size (``ranks=8`` on a mode of size 3
        gives 3). A sequence is always validated strictly.

    Returns
    -------
    tuple of int
        ``(r_0, ..., r_{N-1})`` with ``1 <= r_n <= I_n``.

    Raises
    ------
    TypeError
        If a rank is not an int.
    ValueError
        If the number of ranks differs from the number of modes, or a rank is outside
        ``[1, I_n]``; the message names the mode, the rank and the dimension.

    Examples
    --------
    >>> from ndlowrank import validate_ranks
    >>> validate_ranks(2, (4, 5, 3))
    (2, 2, 2)
    >>> validate_ranks(8, (16, 16, 3, 3), clip=True)
    (8, 8, 3, 3)
    """
    shape = tuple(int(s) for s in shape)
    if hasattr(ranks, "tolist") and getattr(ranks, "ndim", 0) == 1:  # a numpy or torch array of ranks
        ranks = ranks.tolist()
    if _is_int(ranks):
        rank = int(ranks)
        if clip and rank >= 1:
            return tuple(min(rank, size) for size in shape)
        ranks = (rank,) * len(shape)
    elif not isinstance(ranks, Sequence) or isinstance(ranks, str):
        raise TypeError(f"ranks must be an int or a sequence of ints, got {ranks!r} ({type(ranks).__name__})")
    checked = tuple(_as_int(r, f"ranks[{n}]") for n, r in enumerate(ranks))
    if len(checked) != len(shape):
        raise ValueError(
            f"ranks={checked} has {len(checked)} entries but the tensor of shape {shape} "
            f"has {len(shape)} modes"
        )
    for n, (rank, size) in enumerate(zip(checked, shape, strict=True)):
        if not 1 <= rank <= size:
            raise ValueError(
                f"ranks[{n}]={rank} is invalid for mode {n} of size {size}: "
                f"each rank must satisfy 1 <= rank <= {size}"
            )
    return checked
