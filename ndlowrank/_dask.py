"""Tucker decompositions of dask arrays: reductions over chunks, small problems in memory.

:func:`ndlowrank.sthosvd`, :func:`ndlowrank.hosvd`, :func:`ndlowrank.hooi`,
:func:`ndlowrank.select_ranks` and :func:`ndlowrank.tucker_sketch` hand a dask array to
this module (through the dispatch table of :mod:`ndlowrank._backend`). The array is never
gathered: every quantity read from it is a reduction over its chunks, evaluated by
whatever dask scheduler is active (threads, or a ``dask.distributed`` client):

- the Gram matrix ``x₍ₙ₎ x₍ₙ₎ᵀ`` of a mode-n unfolding is a sum of one float64 term per
  chunk (``I_n × I_n``, small), once the chunks are re-split to span mode n;
- a randomized sketch ``x₍ₙ₎ Ω`` uses a Khatri-Rao structured ``Ω`` (one small Gaussian
  matrix per other mode), so the test matrix is never formed: each chunk adds its term;
- projections on factors are sums of per-chunk products, left lazy until a reduction
  needs them.

Every sum adds four terms at a time, so a pass holds a few chunks, never the tensor.

The eigenproblems (``I_n × I_n``) and everything of the core's size run in numpy. The
results are in-memory numpy arrays. Each ``dask.compute`` reads every chunk of ``x`` once
("a pass"); the NaN/Inf check and ``‖x‖²`` ride along with the first pass. Passes over
``x`` per call, for an ``N``-mode tensor:

==========================  ==============================================
``hosvd``                   ``N + 1``
``sthosvd``                 ``N + 1``
``sthosvd`` randomized      ``N · (2 + power_iters) + 1``
``hooi``                    ``N`` (start) ``+ N`` per sweep ``+ 1``
``select_ranks``            ``N`` (``energy``, ``budget``); ``N + 1`` (``tol``)
``tucker_sketch``           1
==========================  ==============================================

plus one more pass when the largest entry is beyond ``2**±200`` (float64 input only), where
squares would overflow or underflow float64: the tensor is then rescaled by a power of two.
The Gram matrices are formed in float64 whatever the input dtype, so the ``"auto"`` and
``"gram"`` solvers resolve singular values down to about ``1e-8`` of the largest; the
``"svd"`` solver, which needs whole unfoldings in memory, is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import array_api_compat
import array_api_compat.numpy as npx
import dask
import dask.array as da
import numpy as np
from tqdm.auto import tqdm

from ._backend import compute_dtype, eigh
from ._subspace import _fix_signs, rank_for_budget
from ._validation import make_rng, validate_ranks
from .decompose import _check_order, _check_solver, _ranks_or_tol
from .tenalg import multi_mode_product
from .tucker import TuckerTensor

__all__ = ["hooi", "hosvd", "mode_spectra", "sketches", "sthosvd"]

# float64 squares of entries up to 2**±200 neither overflow nor underflow
_SAFE_EXPONENT = 200
# terms summed at once in a reduction tree
_FAN_IN = 4


@dataclass
class _Prepared:
    """A dask tensor checked in its first pass: working array, exact scale, ``‖y‖²``."""

    y: Any
    scale: float
    squared_norm: float
    out_dtype: np.dtype

    @property
    def is_zero(self) -> bool:
        return self.squared_norm == 0.0

    def finish(self, core: np.ndarray, factors: Sequence[np.ndarray]) -> TuckerTensor:
        """numpy core and factors in the output dtype, the rescaling undone."""
        core = np.asarray(core, dtype=np.float64)
        largest = float(np.abs(core).max()) * self.scale if core.size else 0.0
        if not largest <= float(np.finfo(self.out_dtype).max):
            raise ValueError(
                f"the Tucker core of x cannot be represented in {self.out_dtype}: its entries reach about ‖x‖, "
                f"beyond the dtype's largest value {np.finfo(self.out_dtype).max:.3g}"
            )
        core = core * self.scale
        return TuckerTensor(core.astype(self.out_dtype), [f.astype(self.out_dtype) for f in factors])

    def zero(self, ranks: Sequence[int]) -> TuckerTensor:
        """Exact decomposition of a zero tensor: zero core, first columns of the identity."""
        factors = [np.eye(size, rank) for size, rank in zip(self.y.shape, ranks, strict=True)]
        return self.finish(np.zeros(tuple(ranks)), factors)


def _prepare(x: Any, first: Callable[[Any], Any] | None = None, *, name: str = "x") -> tuple[_Prepared, Any]:
    """Check ``x`` and evaluate ``first(y)`` in one pass; rescale (one more pass) if needed."""
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one mode, got a 0-D array")
    if math.prod(x.shape) == 0:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: every mode must have size >= 1")
    xp = array_api_compat.array_namespace(x)
    work = np.dtype(compute_dtype(xp, x, name=name))
    y = x if x.dtype == work else x.astype(work)

    def evaluate(y: Any) -> tuple[float, float, float, Any]:
        squares = _sum_terms(y, _squares, (), ())
        # max and min propagate NaN, so they find non-finite entries and the largest magnitude
        high, low, norm2, value = dask.compute(da.max(y), da.min(y), squares, first(y) if first else None)
        return float(high), float(low), float(norm2), value

    high, low, norm2, value = evaluate(y)
    peak = max(high, -low)
    if not math.isfinite(peak):
        raise ValueError(f"{name} contains NaN or Inf; decompositions need finite values")
    scale = 1.0
    if peak > 0 and not _in_safe_range(peak, work, math.prod(x.shape)):
        exponent = round(math.log2(peak))
        scale = 2.0**exponent
        # ldexp is exact and, unlike dividing by 2**exponent, needs no scale the working dtype can hold
        y = y.map_blocks(np.ldexp, -exponent, dtype=y.dtype)
        _, _, norm2, value = evaluate(y)
    out_dtype = np.dtype(x.dtype) if np.issubdtype(x.dtype, np.floating) else work
    return _Prepared(y, scale, norm2, out_dtype), value


def _in_safe_range(peak: float, work: np.dtype, size: int) -> bool:
    """Whether entries up to ``peak`` need no rescaling in the working dtype ``work``.

    The float64 Gram terms square the entries (safe within ``2**±200``), and the projections,
    computed in ``work``, hold entries up to ``‖y‖ <= √size · peak``: with float32 input near
    its largest value they would overflow to inf (and lose their low bits near its smallest).
    """
    exponent = math.log2(peak)
    headroom = 0.5 * math.log2(size) + 8  # bits above the peak that a projection may reach
    finfo = np.finfo(work)
    return (
        abs(exponent) <= _SAFE_EXPONENT
        and exponent + headroom < math.log2(float(finfo.max))
        and exponent - headroom > math.log2(float(finfo.tiny))
    )


def _squares(chunk: np.ndarray, block_info: Any = None) -> np.ndarray:
    """A chunk's sum of squares in float64; an overflow gives inf, which the caller rescales."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.sum(np.square(chunk, dtype=np.float64)).reshape((1,) * chunk.ndim)


def _whole_mode(t: Any, mode: int) -> Any:
    """``t`` rechunked so that each chunk spans all of ``mode``.

    Then a chunk's own Gram matrix is a term of the whole one. The new chunks are no larger
    than the old ones, nor smaller than twice a term (``I_mode²`` float64 numbers), so the
    terms never outweigh the data they summarise.
    """
    if t.numblocks[mode] == 1:
        return t
    largest = math.prod(max(c) for c in t.chunks) * t.dtype.itemsize
    limit = max(largest, 2 * t.shape[mode] ** 2 * 8)
    chunks = {k: (-1 if k == mode else "auto") for k in range(t.ndim)}
    return t.rechunk(chunks, block_size_limit=limit)


def _sum_terms(t: Any, term: Callable[..., np.ndarray], keep: Sequence[int], tail: tuple[int, ...]) -> Any:
    """Lazy sum of one small array per chunk of ``t``, summed over the blocks of all modes but ``keep``.

    ``term(chunk, block_info)`` returns an array of shape ``(1 or chunk size per mode) + tail``,
    the chunk size on the modes in ``keep``. The sum is a tree of fan-in 4, so a few terms are
    held at a time.
    """
    blocks = [t.chunks[k] if k in keep else (1,) * t.numblocks[k] for k in range(t.ndim)]
    new_axes = list(range(t.ndim, t.ndim + len(tail)))
    terms = t.map_blocks(term, chunks=(*blocks, *((s,) for s in tail)), new_axis=new_axes, dtype=t.dtype)
    summed = tuple(k for k in range(t.ndim) if k not in keep)
    return terms.sum(axis=summed, split_every=_FAN_IN)


def _gram(t: Any, mode: int) -> Any:
    """Lazy float64 Gram matrix of the mode-``mode`` unfolding: one term per chunk, summed."""
    whole = _whole_mode(t, mode)
    size = t.shape[mode]

    def term(chunk: np.ndarray, block_info: Any = None) -> np.ndarray:
        rows = np.moveaxis(chunk, mode, 0).reshape(size, -1)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught and rescaled
            return (rows @ rows.T).reshape((1,) * t.ndim + (size, size))

    return _sum_terms(whole.astype(np.float64), term, (), (size, size))


def _project(t: Any, factor: np.ndarray, mode: int) -> Any:
    """Lazy ``t ×_mode factorᵀ`` for an in-memory ``factor`` of shape ``(I_mode, r)``.

    Each chunk's term is its product with the rows of ``factor`` it meets; the terms are
    summed over the blocks of ``mode``.
    """
    factor = factor.astype(t.dtype)

    def term(chunk: np.ndarray, block_info: Any = None) -> np.ndarray:
        rows = factor[slice(*block_info[0]["array-location"][mode])]
        return np.expand_dims(np.tensordot(chunk, rows, axes=([mode], [0])), mode)

    others = [k for k in range(t.ndim) if k != mode]
    return da.moveaxis(_sum_terms(t, term, others, (factor.shape[1],)), -1, mode)


def _leading(
    gram: np.ndarray, *, rank: int | None, budget: float | None, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Top eigenvectors of an in-memory Gram matrix (signs fixed) and its eigenvalues, decreasing."""
    values, vectors = eigh(npx, np.asarray(gram, dtype=np.float64), top=rank)
    values, vectors = np.clip(values[::-1], 0.0, None), vectors[:, ::-1]
    if rank is None:
        assert budget is not None
        rank = rank_for_budget(values, budget)
    return _fix_signs(np.ascontiguousarray(vectors[:, :rank]), xp=npx).astype(dtype), values


def _khatri_rao_sketch(t: Any, mode: int, omegas: Sequence[np.ndarray]) -> Any:
    """Lazy ``t₍ₘₒ𝒹ₑ₎ Ω``, ``Ω`` the Khatri-Rao product of ``omegas`` (one per other mode, in order).

    Each chunk contributes its own term, with the rows of ``omegas`` it meets; the terms
    are summed over the other modes' blocks. ``Ω`` is never formed.
    """
    letters = "abcdefghijklmnopqrstuvwxy"
    if t.ndim > len(letters):
        raise ValueError(f"the dask randomized sketch supports up to {len(letters)} modes, got {t.ndim}")
    index = letters[: t.ndim]
    others = [k for k in range(t.ndim) if k != mode]
    spec = f"{index}," + ",".join(f"{index[k]}z" for k in others) + f"->{index[mode]}z"
    width = omegas[0].shape[1]

    def term(chunk: np.ndarray, block_info: Any = None) -> np.ndarray:
        location = block_info[0]["array-location"]
        rows = [o[slice(*location[k])].astype(chunk.dtype) for k, o in zip(others, omegas, strict=True)]
        out = np.einsum(spec, chunk, *rows, optimize=True)
        return out.reshape([chunk.shape[mode] if k == mode else 1 for k in range(t.ndim)] + [width])

    return _sum_terms(t, term, (mode,), (width,))


def _core_sketch(t: Any, phis: Sequence[np.ndarray]) -> Any:
    """Lazy ``t ×ₙ Φ_nᵀ`` over every mode: a sum of one small term per chunk."""
    sizes = tuple(int(p.shape[1]) for p in phis)

    def term(chunk: np.ndarray, block_info: Any = None) -> np.ndarray:
        location = block_info[0]["array-location"]
        rows = [p[slice(*span)].astype(chunk.dtype) for p, span in zip(phis, location, strict=True)]
        return np.asarray(multi_mode_product(chunk, rows, transpose=True)).reshape((1,) * t.ndim + sizes)

    return _sum_terms(t, term, (), sizes)


def sketches(
    x: Any, omegas: Sequence[Sequence[np.ndarray]], phis: Sequence[np.ndarray]
) -> tuple[_Prepared, list[np.ndarray], np.ndarray]:
    """Every factor sketch and the core sketch of :func:`ndlowrank.tucker_sketch`, in one pass."""

    def lazy(y: Any) -> tuple[list[Any], Any]:
        return [_khatri_rao_sketch(y, n, omegas[n]) for n in range(y.ndim)], _core_sketch(y, phis)

    prepared, (factor_sketches, core) = _prepare(x, lazy)
    return prepared, [np.asarray(v) for v in factor_sketches], np.asarray(core)


def _power_step(t: Any, mode: int, basis: np.ndarray) -> Any:
    """Lazy ``t₍ₘₒ𝒹ₑ₎ t₍ₘₒ𝒹ₑ₎ᵀ basis`` (one pass over ``t``)."""
    others = list(range(t.ndim - 1))
    spread = da.tensordot(t, da.from_array(basis.astype(t.dtype)), axes=([mode], [0]))
    return da.tensordot(t, spread, axes=([k for k in range(t.ndim) if k != mode], others))


def _randomized_factor(
    t: Any, mode: int, rank: int, sketch: np.ndarray, *, power_iters: int, dtype: np.dtype
) -> np.ndarray:
    """Range finder from ``sketch``, power iterations, then a Rayleigh-Ritz step, one pass each."""
    basis = np.linalg.qr(np.asarray(sketch, dtype=np.float64))[0]
    for _ in range(power_iters):
        basis = np.linalg.qr(np.asarray(_power_step(t, mode, basis).compute(), dtype=np.float64))[0]
    # basisᵀ t t ᵀ basis is the Gram matrix of the projected unfolding: its eigenvectors rotate the basis
    small = basis.T @ np.asarray(_power_step(t, mode, basis).compute(), dtype=np.float64)
    rotation, _ = _leading((small + small.T) / 2, rank=rank, budget=None, dtype=np.dtype(np.float64))
    return _fix_signs(basis @ rotation, xp=npx).astype(dtype)


def _dask_solver(solver: Any, *, method: str) -> str:
    solver = _check_solver(solver)
    if solver == "svd":
        raise ValueError(
            'solver="svd" is not available for dask arrays: it needs whole unfoldings in memory. '
            'Use solver="auto" (a Gram matrix reduced over chunks, in float64), or x.compute() '
            "for a tensor that fits in memory"
        )
    if solver == "randomized" and method != "sthosvd":
        raise ValueError(f'{method} does not take solver="randomized"; use sthosvd(..., solver="randomized")')
    return solver


def _mode_statistic(t: Any, mode: int, solver: str, rank: int | None, options: _Sketching) -> Any:
    """What a mode's factor is computed from: a lazy Gram matrix, or a randomized sketch."""
    if solver != "randomized":
        return _gram(t, mode)
    assert rank is not None
    width = min(rank + options.oversample, t.shape[mode], math.prod(t.shape) // t.shape[mode])
    omegas = [options.rng.standard_normal((size, width)) for k, size in enumerate(t.shape) if k != mode]
    return _khatri_rao_sketch(t, mode, omegas)


@dataclass
class _Sketching:
    """Options of the randomized solver."""

    oversample: int
    power_iters: int
    rng: np.random.Generator


def _sthosvd_factors(
    prepared: _Prepared,
    first: Any,
    modes: Sequence[int],
    *,
    fixed: tuple[int, ...] | None,
    budget: float | None,
    solver: str,
    options: _Sketching,
) -> tuple[list[np.ndarray], Any]:
    """ST-HOSVD's factors (one pass per mode; the first mode's statistic is given) and the lazy core."""
    dtype = np.dtype(prepared.y.dtype)
    core, factors = prepared.y, [np.empty(0)] * len(modes)
    for i, n in enumerate(modes):
        rank = None if fixed is None else fixed[n]
        if i > 0:
            first = _mode_statistic(core, n, solver, rank, options).compute()
        if solver == "randomized":
            assert rank is not None
            factors[n] = _randomized_factor(
                core, n, rank, first, power_iters=options.power_iters, dtype=dtype
            )
        else:
            factors[n], _ = _leading(first, rank=rank, budget=budget, dtype=dtype)
        core = _project(core, factors[n], n)
    return factors, core


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
    """:func:`ndlowrank.sthosvd` of a dask array (see the module docstring).

    ``oversample`` and ``power_iters`` are checked by :func:`ndlowrank.sthosvd`.
    """
    shape = tuple(int(s) for s in x.shape)
    fixed, tol = _ranks_or_tol(ranks, tol, shape)
    solver = _dask_solver(solver, method="sthosvd")
    if solver == "randomized" and fixed is None:
        raise ValueError('solver="randomized" needs ranks=; it cannot choose ranks from tol=')
    modes = _check_order(order, len(shape))
    options = _Sketching(oversample, power_iters, make_rng(seed))
    first_rank = None if fixed is None else fixed[modes[0]]
    prepared, first = _prepare(x, lambda y: _mode_statistic(y, modes[0], solver, first_rank, options))
    if prepared.is_zero:
        return prepared.zero(fixed or (1,) * len(shape))
    budget = None if tol is None else tol**2 * prepared.squared_norm / len(shape)
    factors, core = _sthosvd_factors(
        prepared, first, modes, fixed=fixed, budget=budget, solver=solver, options=options
    )
    return prepared.finish(core.compute(), factors)


def _all_grams(x: Any) -> tuple[_Prepared, list[np.ndarray]]:
    """Every mode's Gram matrix of the full tensor, one pass each (the first with the checks).

    One pass could feed them all, but it would hold each chunk until every mode's group of
    chunks had used it: up to the whole tensor.
    """
    prepared, first = _prepare(x, lambda y: _gram(y, 0))
    if prepared.is_zero:
        return prepared, []
    return prepared, [first, *(_gram(prepared.y, n).compute() for n in range(1, x.ndim))]


def hosvd(x: Any, ranks: int | Sequence[int], *, solver: str = "auto") -> TuckerTensor:
    """:func:`ndlowrank.hosvd` of a dask array: one pass per mode's Gram matrix, one for the core."""
    ranks = validate_ranks(ranks, tuple(x.shape))
    _dask_solver(solver, method="hosvd")
    prepared, grams = _all_grams(x)
    if prepared.is_zero:
        return prepared.zero(ranks)
    dtype = np.dtype(prepared.y.dtype)
    factors = [_leading(g, rank=r, budget=None, dtype=dtype)[0] for g, r in zip(grams, ranks, strict=True)]
    return prepared.finish(_project_all(prepared.y, factors).compute(), factors)


def _project_all(t: Any, factors: Sequence[np.ndarray], *, skip: int | None = None) -> Any:
    """Lazy ``t ×_k factors[k]ᵀ`` over every mode but ``skip``, the largest reductions first."""
    order = sorted(range(t.ndim), key=lambda k: factors[k].shape[1] / factors[k].shape[0])
    for k in order:
        if k != skip:
            t = _project(t, factors[k], k)
    return t


def _start_factors(x: Any, ranks: tuple[int, ...], init: Any) -> list[np.ndarray] | None:
    """Orthonormalised numpy factors of a given start point, or ``None`` for a named one."""
    if isinstance(init, str):
        if init not in ("sthosvd", "hosvd"):
            raise ValueError(f"unknown init={init!r}; use one of ['sthosvd', 'hosvd'] or a TuckerTensor")
        return None
    given = list(init.factors) if isinstance(init, TuckerTensor) else list(init)
    shapes = [tuple(int(s) for s in f.shape) for f in given]
    expected = [(int(i), r) for i, r in zip(x.shape, ranks, strict=True)]
    if shapes != expected:
        raise ValueError(f"init has factors of shapes {shapes}; expected {expected} (shape, rank per mode)")
    return [np.linalg.qr(np.asarray(f, dtype=np.float64))[0] for f in given]


def hooi(
    x: Any,
    ranks: int | Sequence[int],
    *,
    init: Any = "sthosvd",
    max_iter: int = 50,
    tol: float = 1e-5,
    solver: str = "auto",
    callback: Callable[[int, float], Any] | None = None,
    verbose: bool = False,
) -> TuckerTensor:
    """:func:`ndlowrank.hooi` of a dask array: one pass per mode and sweep, one for the core.

    ``max_iter``, ``tol`` and ``callback`` are checked by :func:`ndlowrank.hooi`.
    """
    ranks = validate_ranks(ranks, tuple(x.shape))
    _dask_solver(solver, method="hooi")
    factors = _start_factors(x, ranks, init)
    if factors is not None:
        start = factors
        prepared, first = _prepare(x, lambda y: _gram(_project_all(y, start, skip=0), 0))
    elif init == "hosvd":
        prepared, first = _all_grams(x)
    else:
        prepared, first = _prepare(x, lambda y: _gram(y, 0))
    if prepared.is_zero:
        return prepared.zero(ranks)
    dtype = np.dtype(prepared.y.dtype)
    y, norm2 = prepared.y, prepared.squared_norm
    if init == "hosvd" and factors is None:
        factors = [
            _leading(g, rank=r, budget=None, dtype=dtype)[0] for g, r in zip(first, ranks, strict=True)
        ]
        first = None
    elif factors is None:
        options = _Sketching(0, 0, np.random.default_rng(0))
        factors, _ = _sthosvd_factors(
            prepared, first, range(len(ranks)), fixed=ranks, budget=None, solver="gram", options=options
        )
        first = None
    factors = [f.astype(dtype) for f in factors]

    def relative_error(captured: float) -> float:
        return math.sqrt(max(norm2 - captured, 0.0) / norm2)

    best_error, best, error = math.inf, list(factors), math.inf
    with tqdm(range(max_iter), desc="hooi", disable=not verbose, leave=False) as sweeps:
        for iteration in sweeps:
            for n in range(len(ranks)):
                gram = first if first is not None else _gram(_project_all(y, factors, skip=n), n).compute()
                first = None
                if iteration == 0 and n == 0:
                    # the start's captured energy ‖core‖² is tr(Uᵀ G U) with the start's factor
                    old = factors[0].astype(np.float64)
                    best_error = error = relative_error(float(np.sum(old * (gram @ old))))
                factors[n], values = _leading(gram, rank=ranks[n], budget=None, dtype=dtype)
            previous, error = error, relative_error(float(np.sum(values[: ranks[-1]])))
            sweeps.set_postfix(error=f"{error:.3e}")
            if callback is not None:
                callback(iteration, error)
            if error < best_error:
                best_error, best = error, list(factors)
            if previous - error <= tol * previous:
                break
    return prepared.finish(_project_all(y, best).compute(), best)


def mode_spectra(x: Any) -> list[np.ndarray]:
    """Squared singular values of every unfolding of a dask array (one pass per mode), decreasing."""
    prepared, grams = _all_grams(x)
    if prepared.is_zero:
        return [np.zeros(size) for size in x.shape]
    spectra = []
    for gram in grams:
        values = np.clip(np.linalg.eigvalsh(np.asarray(gram, dtype=np.float64))[::-1], 0.0, None)
        spectra.append(values * prepared.scale**2)
    return spectra
