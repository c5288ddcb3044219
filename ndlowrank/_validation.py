"""Argument checks shared by the core: shapes, ranks, scales and seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "MAX_SCALE",
    "MIN_PRINCIPAL_SCALE",
    "check_scale",
    "check_seed",
    "check_shape",
    "make_rng",
    "validate_ranks",
]

MAX_SCALE = 1e6
"""Largest ``|scale|`` of a delta: beyond it ``scale · ΔW`` leaves float16's range at modest ranks
and overflows float32 long before the parameters do."""

MIN_PRINCIPAL_SCALE = 1e-6
"""Smallest ``|scale|`` of a ``"principal"`` delta, whose core is the start's core divided by ``scale``."""


def _is_int(value: Any) -> bool:
    """An int-like scalar (Python or numpy int, 0-D integer array), not a bool or an array."""
    return not isinstance(value, bool) and hasattr(value, "__index__") and getattr(value, "ndim", 0) == 0


def _as_int(value: Any, what: str) -> int:
    if not _is_int(value):
        raise TypeError(f"{what} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def check_shape(shape: Any, *, name: str = "shape", minimum: int = 1) -> tuple[int, ...]:
    """Validate a tensor shape: a non-empty sequence of ints, each at least ``minimum`` (1, or 0 to allow empty modes).

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
        if size < minimum:
            raise ValueError(f"{name}[{n}]={size}: every mode must have size >= {minimum}")
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


def check_scale(scale: Any, *, principal: bool = False) -> float:
    """Validate the multiplier of a delta and return it as a float: the one rule for every ``scale``.

    ``scale`` must be a real number (not a bool) with ``|scale| <= MAX_SCALE`` (1e6);
    with ``principal=True`` (the core is divided by it) also ``|scale| >= MIN_PRINCIPAL_SCALE``
    (1e-6). :func:`ndlowrank.tucker_delta`, :class:`ndlowrank.TuckerDelta`, the adapters and
    the adapter files all apply it.

    Raises
    ------
    TypeError
        If ``scale`` is not a real number.
    ValueError
        If it is not finite or outside the bounds above (the message gives them).

    Examples
    --------
    >>> from ndlowrank._validation import check_scale
    >>> check_scale(4)
    4.0
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"scale must be a real number, got {scale!r} ({type(scale).__name__})")
    try:
        value = float(scale)
    except OverflowError:  # an int beyond float's range, such as 10**400
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if abs(value) > MAX_SCALE:
        raise ValueError(
            f"scale={value!r} is too large: |scale| <= {MAX_SCALE:g} keeps scale · ΔW representable; "
            "scale the learning rate or the initial values instead"
        )
    if principal and abs(value) < MIN_PRINCIPAL_SCALE:
        raise ValueError(
            f"init='principal' divides the core by scale, so it needs |scale| >= {MIN_PRINCIPAL_SCALE:g}, "
            f"got scale={value!r}"
        )
    return value


def check_seed(seed: Any, *, generator: bool = True) -> Any:
    """Validate a seed: ``None``, a non-negative int (returned as ``int``) or, with ``generator``, a numpy ``Generator``.

    Raises
    ------
    ValueError
        For anything else (a bool, a string, a float, a negative int), naming ``seed``.
    """
    if seed is None or (generator and isinstance(seed, np.random.Generator)):
        return seed
    if not _is_int(seed) or int(seed) < 0:
        allowed = (
            "None, a non-negative int or a numpy Generator" if generator else "None or a non-negative int"
        )
        raise ValueError(f"seed must be {allowed}, got {seed!r} ({type(seed).__name__})")
    return int(seed)


def make_rng(seed: Any) -> np.random.Generator:
    """A numpy ``Generator`` from a seed that :func:`check_seed` accepts (a ``Generator`` is returned as is)."""
    return np.random.default_rng(check_seed(seed))
