"""Initialisation strategies for Tucker deltas: a small registry.

The random strategies in :data:`INITS` draw a core and factors in float64 numpy from a
:class:`numpy.random.Generator`; :func:`ndlowrank.tucker_delta` then casts and moves
them to the requested backend, which is why one seed gives the same numbers on numpy,
torch and cupy. Every one of them starts at ``ΔW = 0``.

``"principal"`` is different: it is computed from a given weight, on that weight's
backend (:func:`principal`), and starts at the weight's best Tucker approximation, to be
subtracted from the weight (the N-D analogue of PiSSA).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .decompose import sthosvd

__all__ = ["INITS", "KNOWN_INITS", "get_init", "principal", "register_init"]

Shape = tuple[int, ...]
Draw = tuple[np.ndarray, list[np.ndarray]]
InitFn = Callable[[Shape, Shape, np.random.Generator], Draw]

INITS: dict[str, InitFn] = {}


def register_init(name: str) -> Callable[[InitFn], InitFn]:
    """Decorator adding an init strategy ``fn(shape, ranks, rng) -> (core, factors)``."""

    def decorate(fn: InitFn) -> InitFn:
        INITS[name] = fn
        return fn

    return decorate


def get_init(name: Any) -> InitFn:
    """Look up a random init strategy by name.

    Raises
    ------
    ValueError
        If ``name`` is not a known strategy; the message lists them all.
    """
    if not isinstance(name, str) or name not in INITS:
        raise ValueError(f"unknown init={name!r}; known inits: {sorted(KNOWN_INITS)}")
    return INITS[name]


def _kaiming_factor(size: int, rank: int, rng: np.random.Generator) -> np.ndarray:
    """``kaiming_normal_(a=sqrt(3))`` on an ``(size, rank)`` matrix: std ``1/sqrt(2 rank)``."""
    return rng.standard_normal((size, rank)) / math.sqrt(2.0 * rank)


def _orthonormal_factor(size: int, rank: int, rng: np.random.Generator) -> np.ndarray:
    """Haar-distributed ``(size, rank)`` matrix with orthonormal columns."""
    q, r = np.linalg.qr(rng.standard_normal((size, rank)))
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    return q * signs


@register_init("zero_core")
def zero_core(shape: Shape, ranks: Shape, rng: np.random.Generator) -> Draw:
    """The FLoRA paper's init: zero core, factors ``kaiming_normal_(a=sqrt(3))``."""
    factors = [_kaiming_factor(i, r, rng) for i, r in zip(shape, ranks, strict=True)]
    return np.zeros(ranks), factors


@register_init("zero_factor")
def zero_factor(shape: Shape, ranks: Shape, rng: np.random.Generator) -> Draw:
    """LoRA-like init: the mode-0 (output) factor is zero, the others as in ``zero_core``.

    The core is standard normal scaled by ``1/sqrt(prod(ranks))``, so its norm is about 1.
    """
    core = rng.standard_normal(ranks) / math.sqrt(math.prod(ranks))
    factors = [_kaiming_factor(i, r, rng) for i, r in zip(shape[1:], ranks[1:], strict=True)]
    return core, [np.zeros((shape[0], ranks[0])), *factors]


@register_init("orthogonal")
def orthogonal(shape: Shape, ranks: Shape, rng: np.random.Generator) -> Draw:
    """Orthonormal factor columns (QR of a Gaussian matrix, signs fixed), zero core."""
    factors = [_orthonormal_factor(i, r, rng) for i, r in zip(shape, ranks, strict=True)]
    return np.zeros(ranks), factors


KNOWN_INITS = (*INITS, "principal")


def principal(weight: Any, ranks: Sequence[int]) -> tuple[Any, list[Any]]:
    """Core and factors of the rank-``ranks`` ST-HOSVD of ``weight``, on its backend.

    ``core ×_n factors[n]`` is the weight's best quasi-optimal Tucker approximation; the
    caller replaces the weight by ``weight - approximation`` so that the sum is unchanged.
    """
    core, factors = sthosvd(weight, ranks)
    return core, list(factors)
