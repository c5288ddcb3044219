"""Rank validation and selection: from an error tolerance, an energy fraction or a budget."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._backend import get_namespace, native_routine, require_arrays
from ._subspace import mode_spectrum, rank_for_budget
from ._validation import check_shape, validate_ranks
from .decompose import PreparedTensor, check_tol, sthosvd

__all__ = ["budget_ranks", "fraction_ranks", "select_ranks", "validate_ranks"]


def _tucker_size(shape: Sequence[int], ranks: Sequence[int]) -> int:
    return math.prod(ranks) + sum(i * r for i, r in zip(shape, ranks, strict=True))


def _grown(
    ranks: list[int], mode: int, caps: Sequence[int], spectra: Sequence[np.ndarray]
) -> list[int] | None:
    """``ranks`` with ``ranks[mode] + 1``, plus the other modes it needs to be worth anything.

    A rank above the product of the other ranks adds parameters that capture nothing (the
    unfolding has no more singular values), so the other mode with the most energy left
    grows with it until ``r_n <= prod_{k != n} r_k``. ``None`` if that is impossible.
    """
    grown = list(ranks)
    grown[mode] += 1
    while grown[mode] > math.prod(r for k, r in enumerate(grown) if k != mode):
        options = [k for k in range(len(grown)) if k != mode and grown[k] < caps[k]]
        if not options:
            return None
        other = max(options, key=lambda k: float(spectra[k][grown[k]]))
        grown[other] += 1
    return grown


def budget_ranks(
    spectra: Sequence[Sequence[np.ndarray]], shapes: Sequence[tuple[int, ...]], budget: int
) -> list[tuple[int, ...]]:
    """Ranks for several Tucker tensors sharing one parameter budget.

    Greedy: starting from all ranks 1, repeatedly take the step that gains the most energy
    (the next squared singular values) per added parameter while the total
    ``sum(prod(r) + sum(I_n r_n))`` fits ``budget``. A step grows one rank by one, together
    with the other ranks it needs to stay useful (no rank above the product of the others).
    A mode's spectrum may be shorter than its size; its length caps the rank (used to shrink
    trained adapters, never grow them). Greedy is not optimal, nor monotone: each step is
    scored on the full tensor's mode spectra, which ignore how the modes interact, so a
    larger budget can end at ranks with a larger error (by up to about 20% on small random
    tensors; ``tests/test_ranks.py`` keeps such a case as an expected failure).

    Parameters
    ----------
    spectra : sequence, one entry per tensor, of per-mode decreasing squared singular values
    shapes : sequence of tensor shapes ``(I_0, ..., I_{N-1})``, which set the parameter costs
    budget : int
        Must be at least ``sum(1 + sum(I_n))`` (all ranks 1); the caller checks it.
    """
    ranks = [[1] * len(shape) for shape in shapes]
    used = sum(1 + sum(shape) for shape in shapes)
    caps = [
        [min(size, len(m)) for size, m in zip(shape, tensor, strict=True)]
        for shape, tensor in zip(shapes, spectra, strict=True)
    ]
    # energy below this is rounding noise, not worth a parameter
    floor = 1e-12 * max((float(m[0]) for tensor in spectra for m in tensor if len(m)), default=0.0)
    while True:
        best, best_score, best_cost = None, 0.0, 0
        for t, (tensor_spectra, shape) in enumerate(zip(spectra, shapes, strict=True)):
            for n in range(len(shape)):
                if ranks[t][n] >= caps[t][n]:
                    continue
                grown = _grown(ranks[t], n, caps[t], tensor_spectra)
                if grown is None:
                    continue
                cost = _tucker_size(shape, grown) - _tucker_size(shape, ranks[t])
                gain = sum(
                    float(tensor_spectra[k][r])
                    for k in range(len(shape))
                    for r in range(ranks[t][k], grown[k])
                )
                if used + cost <= budget and gain > floor and gain / cost > best_score:
                    best, best_score, best_cost = (t, grown), gain / cost, cost
        if best is None:
            return [tuple(r) for r in ranks]
        ranks[best[0]] = best[1]
        used += best_cost


def fraction_ranks(shape: Sequence[int], fraction: float | str = "same") -> tuple[int, ...]:
    """Ranks ``round(c · I_n)`` whose Tucker form stores ``fraction`` of the tensor's numbers.

    TensorLy's ``rank="same"`` / float rule (``validate_tucker_rank``): ``c`` solves
    ``c^N Π I_n + c Σ I_n² = fraction · Π I_n`` (core plus ``I_n × c I_n`` factors).

    Parameters
    ----------
    shape : sequence of int
    fraction : float > 0 or "same", default "same"
        ``"same"`` is 1.0: as many stored numbers as the full tensor.

    Returns
    -------
    tuple of int
        Each rank in ``[1, I_n]``.

    Examples
    --------
    >>> import ndlowrank as nl
    >>> nl.fraction_ranks((10, 20, 30), 0.1)
    (3, 6, 9)
    """
    from scipy.optimize import brentq  # imported here: only this rule needs it

    sizes = check_shape(shape)
    value = 1.0 if fraction == "same" else fraction
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not value > 0
    ):
        raise ValueError(f"fraction={fraction!r} must be a positive float or 'same'")
    total = float(math.prod(sizes))
    squares = float(sum(s * s for s in sizes))
    c = brentq(
        lambda c: total * c ** len(sizes) + squares * c - float(value) * total, 0.0, max(float(value), 1.0)
    )
    return tuple(min(size, max(1, round(size * c))) for size in sizes)


def _mode_spectra(x: Any) -> list[np.ndarray]:
    """Every mode's squared singular values (one pass over a dask array)."""
    if (native := native_routine(x, "mode_spectra")) is not None:
        spectra: list[np.ndarray] = native(x)
        return spectra
    prepared = PreparedTensor(x)
    return [mode_spectrum(prepared.y, n, xp=prepared.xp) for n in range(prepared.y.ndim)]


def select_ranks(
    x: Any, *, tol: float | None = None, energy: float | None = None, budget: int | None = None
) -> tuple[int, ...]:
    """Choose Tucker ranks for ``x`` by one of three rules.

    Parameters
    ----------
    x : array
        Any backend.
    tol : float in (0, 1), optional
        The ST-HOSVD rule: the ranks :func:`ndlowrank.sthosvd` picks for ``tol``, which
        guarantee ``‖x − t‖ ≤ tol · ‖x‖``.
    energy : float in (0, 1], optional
        Per mode, the fewest singular vectors of the mode-n unfolding whose squared
        singular values sum to at least ``energy`` of the total.
    budget : int, optional
        A parameter budget: greedily grows the rank that captures the most energy per
        added parameter while ``prod(r) + sum(I_n r_n) <= budget``.

    Returns
    -------
    tuple of int

    Raises
    ------
    ValueError
        If not exactly one rule is given, a value is out of range, or ``budget`` is below
        the smallest possible Tucker size ``1 + sum(I_n)`` (the message gives that minimum).

    Examples
    --------
    >>> import numpy as np
    >>> import ndlowrank as nl
    >>> x = np.random.default_rng(0).standard_normal((20, 20, 20))
    >>> nl.select_ranks(x, energy=0.5)
    (9, 9, 9)
    >>> r = nl.select_ranks(x, budget=1000)
    >>> int(np.prod(r) + sum(20 * k for k in r)) <= 1000
    True
    """
    given = [
        name for name, value in (("tol", tol), ("energy", energy), ("budget", budget)) if value is not None
    ]
    if len(given) != 1:
        raise ValueError(f"give exactly one of tol=, energy= or budget=, got {given or 'none'}")
    if tol is not None:
        return sthosvd(x, tol=check_tol(tol)).ranks
    require_arrays(x=x)  # a clear TypeError for what is not an array
    get_namespace(x, names=("x",))
    shape = tuple(int(s) for s in x.shape)
    if budget is not None:
        if isinstance(budget, bool) or not hasattr(budget, "__index__"):
            raise TypeError(f"budget must be an int number of parameters, got {budget!r}")
        minimum = 1 + sum(shape)
        if budget < minimum:
            raise ValueError(
                f"budget={budget} is below the smallest Tucker form of shape {shape}: "
                f"all ranks 1 need {minimum} parameters"
            )
    elif (
        isinstance(energy, bool)
        or not isinstance(energy, (int, float, np.integer, np.floating))
        or not 0 < energy <= 1
    ):
        raise ValueError(f"energy={energy!r} must be a fraction in (0, 1]")
    spectra = _mode_spectra(x)
    if budget is not None:
        return budget_ranks([spectra], [shape], int(budget))[0]
    assert energy is not None
    return tuple(rank_for_budget(s, (1.0 - energy) * float(s.sum())) for s in spectra)
