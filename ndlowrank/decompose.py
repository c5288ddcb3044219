"""Tucker decompositions: HOSVD, ST-HOSVD, HOOI and a randomized ST-HOSVD.

All of them run on the input's backend and device. They share one preparation step:

- float16 / bfloat16 are computed in float32, integers in the namespace's default float
  dtype; the result comes back in the input's floating dtype (float64 stays float64);
- complex input is a ``TypeError``; NaN or Inf a ``ValueError``;
- tensors whose largest entry is far from 1 are rescaled by a power of two before any
  squaring (exact, so values near 1e-30 or 1e30 neither underflow nor overflow) and the
  core is scaled back at the end.

Each mode's factor comes from :func:`ndlowrank._subspace.leading_subspace`, whose
``solver`` (``"auto"``, ``"gram"``, ``"svd"``, ``"randomized"``) is documented there.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ._backend import (
    compute_dtype,
    device_of,
    get_namespace,
    native_routine,
    require_arrays,
    times_power_of_two,
)
from ._subspace import SOLVERS, leading_subspace
from ._validation import _is_int, make_rng, validate_ranks
from .tenalg import mode_product, multi_mode_product, unfold
from .tucker import TuckerTensor

__all__ = ["METHODS", "ToleranceWarning", "hooi", "hosvd", "sthosvd", "tucker"]

METHODS = ("sthosvd", "hosvd", "hooi", "randomized", "sketch")

# entries are rescaled when the largest magnitude leaves [2**-_SAFE_EXPONENT, 2**_SAFE_EXPONENT]
_SAFE_EXPONENT = 24


class PreparedTensor:
    """An input tensor ready for decomposition: working array, exact scale, output dtype."""

    def __init__(self, x: Any, name: str = "x") -> None:
        require_arrays(**{name: x})
        xp = get_namespace(x, names=(name,))
        if x.ndim < 1:
            raise ValueError(f"{name} must have at least one mode, got a 0-D array")
        if getattr(x, "is_meta", False):
            raise ValueError(f"{name} is on the meta device, which holds no values; materialise it first")
        if math.prod(x.shape) == 0:
            raise ValueError(f"{name} has shape {tuple(x.shape)}: every mode must have size >= 1")
        work = compute_dtype(xp, x, name=name)
        y = x if x.dtype == work else xp.astype(x, work)
        # max and min propagate NaN (array API), so one pair of reductions finds both
        # non-finite entries and the largest magnitude, without a temporary copy
        peak = max(float(xp.max(y)), -float(xp.min(y)))
        if not math.isfinite(peak):
            raise ValueError(f"{name} contains NaN or Inf; decompositions need finite values")
        # peak = m · 2**exponent with m in [0.5, 1): dividing by 2**exponent is exact
        self.exponent = math.frexp(peak)[1] if peak > 0 else 0
        if abs(self.exponent) <= _SAFE_EXPONENT:
            self.exponent = 0
        else:
            y = times_power_of_two(y, -self.exponent)
        self.name = name
        self.xp: ModuleType = xp
        self.y = y
        self.is_zero = peak == 0
        self.out_dtype = x.dtype if xp.isdtype(x.dtype, "real floating") else work

    def squared_norm(self) -> float:
        """``‖y‖²`` of the rescaled working tensor."""
        return float(self.xp.linalg.vector_norm(self.y)) ** 2

    def finish(self, core: Any, factors: Sequence[Any]) -> TuckerTensor:
        """Undo the rescaling and return the result in the output dtype (see :meth:`restore`)."""
        core, factors = self.restore(core, factors)
        return TuckerTensor(core, factors)

    def restore(self, core: Any, factors: Sequence[Any]) -> tuple[Any, list[Any]]:
        """Undo the rescaling of ``core`` and cast it and ``factors`` to the output dtype.

        Raises
        ------
        ValueError
            If the core cannot be represented in the output dtype (its entries, up to
            ``‖x‖``, exceed the dtype's largest value): never an inf or NaN from finite input.
        """
        xp = self.xp
        largest = float(xp.max(xp.abs(core)))
        try:
            too_large = math.ldexp(largest, self.exponent) > float(xp.finfo(self.out_dtype).max)
        except OverflowError:
            too_large = True
        if too_large:
            raise ValueError(
                f"the Tucker core of {self.name} cannot be represented in {self.out_dtype}: its entries reach "
                f"about ‖{self.name}‖, beyond the dtype's largest value {xp.finfo(self.out_dtype).max:.3g}; "
                + ("scale it down first" if self.out_dtype == xp.float64 else "decompose it in float64")
            )
        cast = [a if a.dtype == self.out_dtype else xp.astype(a, self.out_dtype) for a in (core, *factors)]
        core = cast[0] if self.exponent == 0 else times_power_of_two(cast[0], self.exponent)
        return core, cast[1:]


def _check_solver(solver: Any) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver={solver!r}; known solvers: {list(SOLVERS)}")
    return str(solver)


class ToleranceWarning(RuntimeWarning):
    """A relative error bound ``tol`` below what the working dtype can reach: the result may miss it."""


TOL_FLOOR_EPS = 20
"""``tol`` below ``TOL_FLOOR_EPS · eps`` of the working dtype warns (:class:`ToleranceWarning`)."""


def warn_unreachable_tol(tol: float, dtype: Any, xp: ModuleType) -> None:
    """Warn when ``tol`` is below what rounding in ``dtype`` lets a reconstruction reach."""
    floor = TOL_FLOOR_EPS * float(xp.finfo(dtype).eps)
    if tol < floor:
        warnings.warn(
            f"tol={tol:g} is below what {dtype} can reach ({TOL_FLOOR_EPS}·eps = {floor:.1e}): the "
            f"tolerance may not be achieved; decompose in float64 or pass tol >= {floor:.1e}",
            ToleranceWarning,
            stacklevel=3,
        )


def check_iterations(max_iter: Any, tol: Any, callback: Any) -> tuple[int, float]:
    """The stopping options of an iterative method, checked: ``max_iter`` and ``tol`` as int and float.

    Raises
    ------
    ValueError
        If ``max_iter`` is not a non-negative int or ``tol`` not a non-negative number.
    TypeError
        If ``callback`` is neither ``None`` nor callable.
    """
    if not _is_int(max_iter) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative int, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.integer, np.floating)) or not tol >= 0:
        raise ValueError(f"tol must be a non-negative float, got {tol!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(iteration, relative_error), got {callback!r}")
    return int(max_iter), float(tol)


def check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating, np.integer)):
        raise TypeError(f"tol must be a float in (0, 1), got {tol!r} ({type(tol).__name__})")
    if not 0.0 < float(tol) < 1.0:
        raise ValueError(f"tol={tol!r} is outside (0, 1); it is a relative error such as 0.05")
    return float(tol)


def _ranks_or_tol(
    ranks: Any, tol: Any, shape: tuple[int, ...]
) -> tuple[tuple[int, ...] | None, float | None]:
    if (ranks is None) == (tol is None):
        raise ValueError("give exactly one of ranks= (fixed ranks) or tol= (a relative error bound)")
    if ranks is not None:
        return validate_ranks(ranks, shape), None
    return None, check_tol(tol)


def _check_order(order: Any, ndim: int) -> list[int]:
    if order is None:
        return list(range(ndim))
    if not isinstance(order, Sequence) or isinstance(order, str) or not all(_is_int(m) for m in order):
        raise TypeError(
            f"order must be a sequence of modes, a permutation of 0..{ndim - 1} such as "
            f"{list(range(ndim))[::-1]}, got {order!r}"
        )
    modes = [int(m) for m in order]
    if sorted(modes) != list(range(ndim)):
        raise ValueError(f"order={list(order)} must be a permutation of the modes 0..{ndim - 1}")
    return modes


def _zero_result(prepared: PreparedTensor, ranks: Sequence[int]) -> TuckerTensor:
    """Exact decomposition of a zero tensor: zero core, the first columns of the identity."""
    xp, y = prepared.xp, prepared.y
    device = device_of(y)
    factors = [
        xp.eye(size, rank, dtype=y.dtype, device=device) for size, rank in zip(y.shape, ranks, strict=True)
    ]
    core = xp.zeros(tuple(ranks), dtype=y.dtype, device=device)
    return prepared.finish(core, factors)


def hosvd(x: Any, ranks: int | Sequence[int], *, solver: str = "auto") -> TuckerTensor:
    """Truncated higher-order SVD (De Lathauwer, De Moor & Vandewalle 2000).

    Each factor holds the leading left singular vectors of the *full* tensor's mode-n
    unfolding; the core is ``x ×_n factors[n]ᵀ``. Its core is all-orthogonal at full ranks.

    Parameters
    ----------
    x : array, shape (I_0, ..., I_{N-1})
        Any backend; float16/bfloat16 are computed in float32.
    ranks : int or sequence of int
        ``1 <= ranks[n] <= I_n``; an int applies to every mode.
    solver : {"auto", "gram", "svd"}, default "auto"
        How each mode's singular vectors are computed (see :mod:`ndlowrank._subspace`).

    Returns
    -------
    TuckerTensor
        Orthonormal factors, in ``x``'s namespace, device and floating dtype.

    Examples
    --------
    >>> import numpy as np
    >>> import ndlowrank as nl
    >>> x = np.random.default_rng(0).standard_normal((6, 5, 4))
    >>> t = nl.hosvd(x, (6, 5, 4))
    >>> bool(np.allclose(t.to_dense(), x))
    True
    """
    if (native := native_routine(x, "hosvd")) is not None:
        return native(x, ranks, solver=solver)
    prepared = PreparedTensor(x)
    ranks = validate_ranks(ranks, prepared.y.shape)
    solver = _check_solver(solver)
    if solver == "randomized":
        raise ValueError('hosvd does not take solver="randomized"; use sthosvd(..., solver="randomized")')
    if prepared.is_zero:
        return _zero_result(prepared, ranks)
    xp, y = prepared.xp, prepared.y
    factors = [
        leading_subspace(unfold(y, n), rank=rank, solver=solver, xp=xp)[0] for n, rank in enumerate(ranks)
    ]
    core = multi_mode_product(y, factors, transpose=True)
    return prepared.finish(core, factors)


def sthosvd(
    x: Any,
    ranks: int | Sequence[int] | None = None,
    *,
    tol: float | None = None,
    order: Sequence[int] | None = None,
    solver: str = "auto",
    oversample: int = 10,
    power_iters: int = 2,
    seed: int | np.random.Generator | None = None,
) -> TuckerTensor:
    """Sequentially truncated HOSVD (Vannieuwenhoven, Vandebril & Meerbergen 2012).

    Modes are processed one after the other; each factor comes from the tensor already
    truncated in the earlier modes, which is both cheaper and usually more accurate than
    :func:`hosvd`.

    Parameters
    ----------
    x : array, shape (I_0, ..., I_{N-1})
    ranks : int or sequence of int, optional
        Fixed ranks. Give this or ``tol``.
    tol : float in (0, 1), optional
        Relative error bound. Each mode keeps the fewest singular vectors whose discarded
        energy stays under ``tol² ‖x‖² / N``, which **guarantees**
        ``‖x − t‖ ≤ tol · ‖x‖`` with every solver (the Gram matrix's rounding is checked
        against that energy, see :mod:`ndlowrank._subspace`). A ``tol`` below
        ``20 · eps`` of the working dtype (2.4e-6 for float32) cannot be guaranteed and
        gives a :class:`ToleranceWarning`.
    order : sequence of int, optional
        Order in which the modes are truncated; the natural order by default.
    solver : {"auto", "gram", "svd", "randomized"}, default "auto"
        How each mode's singular vectors are computed (see :mod:`ndlowrank._subspace`).
        ``"randomized"`` needs ``ranks``.
    oversample, power_iters : int
        Extra columns and power iterations of the randomized solver.
    seed : int or numpy.random.Generator, optional
        Seed of the randomized solver (the same seed gives the same result on every backend).

    Returns
    -------
    TuckerTensor

    Raises
    ------
    ValueError
        If both or neither of ``ranks`` and ``tol`` are given, ``tol`` is outside (0, 1),
        a rank is invalid, ``x`` holds NaN or Inf, or the core cannot be represented in
        ``x``'s dtype (finite values near the dtype's largest).
    TypeError
        For complex input and unsupported arrays (``numpy.matrix``, masked arrays,
        float128).

    Warns
    -----
    ToleranceWarning
        If ``tol`` is below what the working dtype can reach.

    Examples
    --------
    >>> import numpy as np
    >>> import ndlowrank as nl
    >>> rng = np.random.default_rng(0)
    >>> factors = [rng.random((20, 2)), rng.random((30, 3)), rng.random((10, 2))]
    >>> x = nl.tucker_to_tensor(rng.random((2, 3, 2)), factors)
    >>> t = nl.sthosvd(x, tol=1e-6)
    >>> t.ranks
    (2, 3, 2)
    >>> bool(np.linalg.norm(x - t.to_dense()) <= 1e-6 * np.linalg.norm(x))
    True
    """
    for option, value in (("oversample", oversample), ("power_iters", power_iters)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"{option} must be a non-negative int, got {value!r}")
    if (native := native_routine(x, "sthosvd")) is not None:
        options = {"oversample": int(oversample), "power_iters": int(power_iters), "seed": seed}
        return native(x, ranks, tol=tol, order=order, solver=solver, **options)
    prepared = PreparedTensor(x)
    shape = tuple(prepared.y.shape)
    fixed, tol = _ranks_or_tol(ranks, tol, shape)
    solver = _check_solver(solver)
    if solver == "randomized" and fixed is None:
        raise ValueError('solver="randomized" needs ranks=; it cannot choose ranks from tol=')
    modes = _check_order(order, len(shape))
    rng = make_rng(seed)
    xp = prepared.xp
    if tol is not None:
        warn_unreachable_tol(tol, prepared.y.dtype, xp)
    if prepared.is_zero:
        return _zero_result(prepared, fixed or (1,) * len(shape))
    budget = None if tol is None else tol**2 * prepared.squared_norm() / len(shape)
    core = prepared.y
    factors: list[Any] = [None] * len(shape)
    for n in modes:
        factors[n], _ = leading_subspace(
            unfold(core, n),
            rank=None if fixed is None else fixed[n],
            budget=budget,
            solver=solver,
            oversample=int(oversample),
            power_iters=int(power_iters),
            rng=rng,
            xp=xp,
        )
        core = mode_product(core, factors[n], n, transpose=True)
    return prepared.finish(core, factors)


def hooi(
    x: Any,
    ranks: int | Sequence[int],
    *,
    init: str | TuckerTensor = "sthosvd",
    max_iter: int = 50,
    tol: float = 1e-5,
    solver: str = "auto",
    callback: Callable[[int, float], Any] | None = None,
    verbose: bool = False,
) -> TuckerTensor:
    """Higher-order orthogonal iteration (De Lathauwer, De Moor & Vandewalle 2000).

    Alternately replaces each factor by the leading singular vectors of ``x`` projected
    on all the other factors. The returned decomposition is the best one seen, so its
    error never exceeds that of its initialisation.

    Parameters
    ----------
    x : array, shape (I_0, ..., I_{N-1})
    ranks : int or sequence of int
    init : {"sthosvd", "hosvd"}, TuckerTensor or sequence of factors, default "sthosvd"
        Start point; the factors of a :class:`TuckerTensor` of the right ranks, or a
        plain list of factors ``[U_0, ..., U_{N-1}]`` of shapes ``(I_n, r_n)`` (as
        TensorLy and Tensor Toolbox take them), are used as given (orthonormalised).
    max_iter : int, default 50
        Maximum number of sweeps over the modes.
    tol : float, default 1e-5
        Stop when a sweep improves the relative error by less than ``tol`` times its
        previous value.
    solver : {"auto", "gram", "svd"}, default "auto"
    callback : callable, optional
        Called as ``callback(iteration, relative_error)`` after each sweep.
    verbose : bool, default False
        Show a tqdm progress bar with the current relative error.

    Returns
    -------
    TuckerTensor

    Examples
    --------
    >>> import numpy as np
    >>> import ndlowrank as nl
    >>> x = np.random.default_rng(0).standard_normal((8, 7, 6))
    >>> start, t = nl.sthosvd(x, 3), nl.hooi(x, 3)
    >>> bool(np.linalg.norm(x - t.to_dense()) <= np.linalg.norm(x - start.to_dense()))
    True
    """
    max_iter, tol = check_iterations(max_iter, tol, callback)
    if (native := native_routine(x, "hooi")) is not None:
        options = {"callback": callback, "verbose": verbose}
        return native(x, ranks, init=init, max_iter=max_iter, tol=tol, solver=solver, **options)
    prepared = PreparedTensor(x)
    ranks = validate_ranks(ranks, prepared.y.shape)
    solver = _check_solver(solver)
    if solver == "randomized":
        raise ValueError('hooi does not take solver="randomized"; use "auto", "gram" or "svd"')
    if prepared.is_zero:
        return _zero_result(prepared, ranks)
    xp, y = prepared.xp, prepared.y
    factors = _hooi_start(prepared, ranks, init, solver)
    core = multi_mode_product(y, factors, transpose=True)
    norm2 = prepared.squared_norm()

    def relative_error(core: Any) -> float:
        # the core is small: its norm in float64 keeps the sweeps' progress above rounding noise
        captured = float(xp.linalg.vector_norm(xp.astype(core, xp.float64))) ** 2
        return math.sqrt(max(norm2 - captured, 0.0) / norm2)

    best_error, best = relative_error(core), (core, list(factors))
    error = best_error
    with tqdm(range(max_iter), desc="hooi", disable=not verbose, leave=False) as sweeps:
        for iteration in sweeps:
            for n in range(len(ranks)):
                projected = multi_mode_product(y, factors, skip=n, transpose=True)
                factors[n], _ = leading_subspace(unfold(projected, n), rank=ranks[n], solver=solver, xp=xp)
            core = mode_product(projected, factors[-1], len(ranks) - 1, transpose=True)
            previous, error = error, relative_error(core)
            sweeps.set_postfix(error=f"{error:.3e}")
            if callback is not None:
                callback(iteration, error)
            if error < best_error:
                best_error, best = error, (core, list(factors))
            if previous - error <= tol * previous:  # also stops at an exact (zero-error) fit
                break
    return prepared.finish(*best)


def _hooi_start(prepared: PreparedTensor, ranks: tuple[int, ...], init: Any, solver: str) -> list[Any]:
    xp, y = prepared.xp, prepared.y
    if isinstance(init, (list, tuple)):
        if len(init) != len(ranks):
            raise ValueError(f"init holds {len(init)} factors but x has {len(ranks)} modes")
        expected = list(zip(y.shape, ranks, strict=True))
        names = tuple(f"init[{n}]" for n in range(len(init)))
        get_namespace(y, *init, names=("x", *names))
        shapes = [tuple(getattr(f, "shape", ())) for f in init]
        if shapes != expected:
            raise ValueError(
                f"init's factors have shapes {shapes}; expected {expected} (I_n, r_n) for x and ranks"
            )
        init = TuckerTensor(xp.zeros(ranks, dtype=y.dtype, device=device_of(y)), init)
    if isinstance(init, TuckerTensor):
        if init.shape != tuple(y.shape) or init.ranks != ranks:
            raise ValueError(
                f"init has shape {init.shape} and ranks {init.ranks}; expected {tuple(y.shape)} and {ranks}"
            )
        get_namespace(y, init.core, names=("x", "init.core"))
        return [xp.astype(xp.linalg.qr(f)[0], y.dtype) for f in init.factors]
    starts = {"sthosvd": sthosvd, "hosvd": hosvd}
    if not isinstance(init, str) or init not in starts:
        raise ValueError(
            f"unknown init={init!r}; use one of {list(starts)}, a TuckerTensor or a list of factors"
        )
    start = starts[init](y, ranks, solver=solver)
    return list(start.factors)


def tucker(
    x: Any,
    ranks: int | Sequence[int] | float | str | None = None,
    *,
    tol: float | None = None,
    method: str = "sthosvd",
    **options: Any,
) -> TuckerTensor:
    """Tucker decomposition: one entry point for every method.

    Parameters
    ----------
    x : array
    ranks : int, sequence of int, float or "same", optional
        Fixed ranks; give this or ``tol``. A float or ``"same"`` is TensorLy's rule: ranks
        that store that fraction of ``x``'s numbers (:func:`ndlowrank.fraction_ranks`).
    tol : float in (0, 1), optional
        Relative error bound ``‖x − t‖ ≤ tol · ‖x‖``, guaranteed by every method that
        accepts it: ``"sthosvd"`` chooses the ranks; ``"hooi"`` starts from that
        ST-HOSVD and only improves on it. ``"hosvd"``, ``"randomized"`` and ``"sketch"`` need ``ranks``.
    method : {"sthosvd", "hosvd", "hooi", "randomized", "sketch"}, default "sthosvd"
        ``"randomized"`` is :func:`sthosvd` with ``solver="randomized"``; ``"sketch"`` is
        :func:`ndlowrank.tucker_sketch`, which reads ``x`` once.
    **options
        Passed to the method's function (``solver``, ``order``, ``max_iter``, ``seed``, ...).
        ``mask=`` (with ``method="hooi"``) fits only the observed entries:
        :func:`ndlowrank.masked_tucker`.

    Returns
    -------
    TuckerTensor

    Examples
    --------
    >>> import numpy as np
    >>> import ndlowrank as nl
    >>> x = np.random.default_rng(0).standard_normal((10, 10, 10))
    >>> nl.tucker(x, 4, method="hooi").ranks
    (4, 4, 4)
    """
    if method not in METHODS:
        raise ValueError(f"unknown method={method!r}; known methods: {list(METHODS)}")
    if isinstance(ranks, (float, str)):
        require_arrays(x=x)  # the rule reads x.shape
        if isinstance(ranks, str) and ranks != "same":
            raise TypeError(f"ranks must be an int, a sequence of ints, a float or 'same', got {ranks!r}")
        from .ranks import fraction_ranks  # imported here: ranks builds on this module

        ranks = fraction_ranks(x.shape, ranks)
    if "mask" in options:
        from .partial import masked_tucker  # imported here: partial builds on this module

        if ranks is None or tol is not None or method != "hooi":
            raise ValueError('mask= needs method="hooi" and ranks=, and no tol=')
        return masked_tucker(x, ranks, options.pop("mask"), **options)
    if method == "sthosvd":
        return sthosvd(x, ranks, tol=tol, **options)
    if method == "randomized":
        if ranks is None or tol is not None:
            raise ValueError('method="randomized" needs ranks= and no tol=; it cannot choose ranks from tol=')
        return sthosvd(x, ranks, solver="randomized", **options)
    if method == "sketch":
        from .sketch import tucker_sketch  # imported here: sketch builds on this module

        if ranks is None or tol is not None:
            raise ValueError('method="sketch" needs ranks= and no tol=; it cannot choose ranks from tol=')
        return tucker_sketch(x, ranks, **options)
    if tol is not None and ranks is not None:
        raise ValueError("give exactly one of ranks= (fixed ranks) or tol= (a relative error bound)")
    if method == "hosvd":
        if ranks is None:
            raise ValueError('method="hosvd" needs ranks=; use method="sthosvd" to choose ranks from tol=')
        return hosvd(x, ranks, **options)
    if ranks is None:
        start = sthosvd(x, tol=tol, solver=options.get("solver", "auto"))
        return hooi(x, start.ranks, init=start, **options)
    return hooi(x, ranks, **options)
