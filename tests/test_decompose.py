"""Tucker decompositions: hosvd, sthosvd, hooi, the randomized ST-HOSVD and the tucker() entry point.

Every property runs on each installed backend and is checked against independent float64
numpy references (``np.linalg.svd`` of the unfoldings, ``np.einsum``) or TensorLy.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import ndlowrank as nl
from ndlowrank._backend import backend_name, device_of, get_namespace, to_numpy
from ndlowrank._subspace import SOLVERS
from ndlowrank.decompose import METHODS

from _helpers import LETTERS, assert_close, einsum_tucker, normal, valid_multilinear

DTYPES = ["float32", "float64"]
# relative reconstruction error of an exact decomposition, by working dtype
EXACT = {"float32": 1e-5, "float64": 1e-12}
# sqrt-energy slack (times ‖x‖) of the independent ST-HOSVD check, by dtype: for the rank
# rule's ties, and (larger) for the energy a factor leaves out, since float32 factors from
# the Gram path are accurate to about eps·σ_1²/σ_r only
ENERGY_SLACK = {"float32": 1e-6, "float64": 1e-9}
RESIDUAL_SLACK = {"float32": 2e-5, "float64": 1e-9}

seeds = st.integers(0, 2**32 - 1)
tols = st.one_of(st.sampled_from([1e-5, 1e-4, 1e-3, 1e-2, 0.1, 0.5]), st.floats(1e-5, 0.99))

DECOMPOSE = {
    "hosvd": nl.hosvd,
    "sthosvd": nl.sthosvd,
    "hooi": nl.hooi,
    "randomized": functools.partial(nl.sthosvd, solver="randomized", seed=0),
}


# -- references and helpers -----------------------------------------------------------------


def np_unfold(x: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)


def np_mode_product(x: np.ndarray, matrix: np.ndarray, mode: int) -> np.ndarray:
    """``x ×_mode matrix`` with ``matrix`` of shape ``(J, I_mode)``, by einsum."""
    idx = LETTERS[: x.ndim]
    return np.einsum(f"{idx},z{idx[mode]}->{idx.replace(idx[mode], 'z')}", x, matrix)


def np_fix_signs(u: np.ndarray) -> np.ndarray:
    """Reference sign rule: the largest-magnitude entry of each column is positive."""
    picked = u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])]
    return u * np.where(picked < 0, -1.0, 1.0)


def squared_spectrum(y: np.ndarray) -> np.ndarray:
    """Squared singular values of a matrix, padded with zeros to its row count."""
    out = np.zeros(y.shape[0])
    s = np.linalg.svd(y, compute_uv=False)
    out[: s.size] = s**2
    return out


def tails_of(spectrum: np.ndarray) -> np.ndarray:
    """``tails[r]`` = energy discarded at rank ``r`` (``sum(spectrum[r:])``), for r = 0..len."""
    return np.append(np.cumsum(spectrum[::-1])[::-1], 0.0)


def low_rank(seed: int, shape, ranks, noise: float = 0.0) -> np.ndarray:
    """A tensor of multilinear ranks ``ranks`` (Gaussian core, orthonormal factors), plus relative noise."""
    rng = np.random.default_rng(seed)
    core = rng.standard_normal(tuple(ranks))
    factors = [np.linalg.qr(rng.standard_normal((i, r)))[0] for i, r in zip(shape, ranks, strict=True)]
    x = einsum_tucker(core, factors)
    if noise:
        e = rng.standard_normal(tuple(shape))
        x = x + noise * np.linalg.norm(x) / np.linalg.norm(e) * e
    return x


def well_conditioned(x: np.ndarray, ranks, ratio: float = 0.02) -> bool:
    """Each unfolding's ``r_n``-th singular value is at least ``ratio`` of its largest, so the
    leading subspaces stand clear of noise and rounding."""
    for n, r in enumerate(ranks):
        s = np.linalg.svd(np_unfold(x, n), compute_uv=False)
        if s[r - 1] < ratio * s[0]:
            return False
    return True


def simple_spectrum(seed: int, shape) -> tuple[np.ndarray, list[np.ndarray]]:
    """A tensor whose every unfolding has the distinct singular values ``2^(-k/2)``, k < min(shape).

    ``x = D ×_n Q_n`` with a superdiagonal core ``D`` and orthonormal ``Q_n``; the leading
    singular vectors of every mode are the columns of ``Q_n``, unique up to sign. Returns
    ``x`` and the sign-fixed ``Q_n``.
    """
    rng = np.random.default_rng(seed)
    size = min(shape)
    core = np.zeros((size,) * len(shape))
    diagonal = np.arange(size)
    core[(diagonal,) * len(shape)] = 2.0 ** (-0.5 * diagonal)
    qs = [np_fix_signs(np.linalg.qr(rng.standard_normal((i, size)))[0]) for i in shape]
    return einsum_tucker(core, qs), qs


def dense(t) -> np.ndarray:
    return to_numpy(t.to_dense()).astype(np.float64)


def factors_np(t) -> list[np.ndarray]:
    return [to_numpy(f).astype(np.float64) for f in t.factors]


def rel_error(x64: np.ndarray, t) -> float:
    return float(np.linalg.norm(x64 - dense(t)) / np.linalg.norm(x64))


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """The float64 values that ``x`` has once stored in ``dtype``."""
    return x.astype(dtype).astype(np.float64)


def assert_placed(t, backend, dtype) -> None:
    """Core and factors live on the backend and device under test, in ``dtype``."""
    for a in (t.core, *t.factors):
        assert backend_name(get_namespace(a)) == backend.name, type(a)
        if backend.device is not None:
            assert str(device_of(a)).startswith(str(backend.device)), device_of(a)
        assert a.dtype == dtype, (a.dtype, dtype)


def assert_orthonormal(t, atol: float) -> None:
    for n, u in enumerate(factors_np(t)):
        np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=atol, err_msg=f"mode {n}")


def assert_signs(t, rtol: float = 1e-6) -> None:
    """The largest-magnitude entry of each column is positive (up to a near-tie)."""
    for n, u in enumerate(factors_np(t)):
        largest, most_negative = u.max(axis=0), -u.min(axis=0)
        assert np.all(largest >= most_negative * (1 - rtol)), (n, u)


def check_sequential(x64: np.ndarray, t, order, dtype: str, tol: float | None = None) -> None:
    """Independent float64 check of an ST-HOSVD, mode by mode in ``order``.

    The current tensor is projected with ``t``'s own factors (so repeated singular values,
    whose vectors are not unique, are followed). For each mode the factor must capture the
    leading energy of the current unfolding (Eckart–Young, from ``np.linalg.svd``). With
    ``tol``, the rank must be the fewest whose discarded energy (the tail) is at most
    ``tol² ‖x‖² / N``; a difference is allowed only at a tie.
    """
    norm = float(np.linalg.norm(x64))
    slack = ENERGY_SLACK[dtype] * norm
    current, factors = x64, factors_np(t)
    for n in order:
        u, r = factors[n], t.ranks[n]
        y = np_unfold(current, n)
        tails = np.sqrt(tails_of(squared_spectrum(y)))
        residual = np.linalg.norm(y - u @ (u.T @ y))
        assert residual <= tails[r] + RESIDUAL_SLACK[dtype] * norm, (n, r, residual, tails[r])
        if tol is not None:
            root_budget = math.sqrt(tol**2 * norm**2 / x64.ndim)
            assert tails[r] <= root_budget * (1 + 1e-6) + slack, (n, r, tails[r], root_budget)
            assert r == 1 or tails[r - 1] >= root_budget * (1 - 1e-6) - slack, (n, r, tails, root_budget)
        current = np_mode_product(current, u.T, n)


def assert_within_tol(x64: np.ndarray, t, tol: float, dtype: str) -> None:
    """``‖x − t‖ ≤ tol ‖x‖`` in float64, with a relative slack of 1e-6 and float32's representation error."""
    norm = np.linalg.norm(x64)
    representation = 1e-6 * norm if dtype == "float32" else 0.0
    error = np.linalg.norm(x64 - dense(t))
    assert error <= tol * norm * (1 + 1e-6) + representation, (error / norm, tol)


def tensor_of_kind(kind: str, seed: int, shape, data) -> np.ndarray:
    if kind == "flat":
        return normal(seed, *shape)
    if kind == "decaying":
        x = normal(seed, *shape)
        for n, size in enumerate(shape):
            decay = data.draw(st.floats(1.0, 8.0), label=f"decay[{n}]")
            scale = np.logspace(0, -decay, size).reshape([size if k == n else 1 for k in range(len(shape))])
            x = x * scale
        return x
    ranks = valid_multilinear([data.draw(st.integers(1, i), label="rank") for i in shape])
    return low_rank(seed, shape, ranks, noise=1e-7 if kind == "low_rank_noise" else 0.0)


# -- strategies ----------------------------------------------------------------------------


@st.composite
def shapes(draw, min_ndim: int = 2, max_ndim: int = 4, min_size: int = 1, max_size: int = 7):
    return tuple(draw(st.lists(st.integers(min_size, max_size), min_size=min_ndim, max_size=max_ndim)))


@st.composite
def rank_cases(draw, min_size: int = 1):
    """A shape (2 to 4 modes, sizes 1 to 7), ranks with 1 <= r_n <= I_n, and a seed."""
    shape = draw(shapes(min_size=min_size))
    ranks = tuple(draw(st.integers(1, i)) for i in shape)
    return shape, ranks, draw(seeds)


@st.composite
def low_rank_cases(draw):
    """A shape with sizes >= 2, valid multilinear ranks, and a seed."""
    shape = draw(shapes(min_size=2))
    ranks = valid_multilinear([draw(st.integers(1, i)) for i in shape])
    return shape, ranks, draw(seeds)


# -- full ranks: exact, orthonormal, all-orthogonal -----------------------------------------


@pytest.mark.parametrize("method", list(DECOMPOSE))
@settings(max_examples=12)
@given(shape=shapes(), seed=seeds, dtype=st.sampled_from(DTYPES))
def test_full_ranks_reconstruct_exactly(backend, method, shape, seed, dtype):
    x = rounded(normal(seed, *shape), dtype)
    t = DECOMPOSE[method](backend.asarray(x, dtype), shape)
    assert t.shape == shape
    assert t.ranks == shape
    assert_placed(t, backend, getattr(backend.xp, dtype))
    assert rel_error(x, t) <= EXACT[dtype]
    assert_orthonormal(t, atol=10 * EXACT[dtype])


@pytest.mark.parametrize("method", list(DECOMPOSE))
@settings(max_examples=12)
@given(case=rank_cases(), dtype=st.sampled_from(DTYPES))
def test_truncated_factors_are_orthonormal_with_deterministic_signs(backend, method, case, dtype):
    shape, ranks, seed = case
    x = rounded(normal(seed, *shape), dtype)
    t = DECOMPOSE[method](backend.asarray(x, dtype), ranks)
    assert t.ranks == ranks
    assert_placed(t, backend, getattr(backend.xp, dtype))
    assert_orthonormal(t, atol=10 * EXACT[dtype])
    assert_signs(t)
    # the core is the projection of x on the factors
    projected = x
    for n, u in enumerate(factors_np(t)):
        projected = np_mode_product(projected, u.T, n)
    scale = np.linalg.norm(x)
    assert_close(t.core, projected, rtol=0, atol=20 * EXACT[dtype] * scale)


@given(shape=shapes(), seed=seeds)
def test_hosvd_core_at_full_ranks_is_all_orthogonal(backend, shape, seed):
    """``unfold(G, n) unfold(G, n)ᵀ`` is diagonal, holding the squared singular values of ``unfold(x, n)``."""
    x = normal(seed, *shape)
    core = to_numpy(nl.hosvd(backend.asarray(x), shape).core)
    atol = 1e-10 * float(np.sum(x**2))
    for n in range(len(shape)):
        g = np_unfold(core, n)
        gram = g @ g.T
        expected = squared_spectrum(np_unfold(x, n))
        np.testing.assert_allclose(gram, np.diag(expected), atol=atol, err_msg=f"mode {n}")
        assert np.all(np.diff(np.diag(gram)) <= atol), (n, np.diag(gram))


@given(case=rank_cases())
def test_hosvd_factors_are_the_leading_singular_vectors_of_each_unfolding(backend, case):
    """Each HOSVD factor captures the leading energy of the full tensor's unfolding (Eckart–Young)."""
    shape, ranks, seed = case
    x = normal(seed, *shape)
    t = nl.hosvd(backend.asarray(x), ranks)
    for n, (u, r) in enumerate(zip(factors_np(t), ranks, strict=True)):
        y = np_unfold(x, n)
        captured = np.sum((u.T @ y) ** 2)
        np.testing.assert_allclose(captured, squared_spectrum(y)[:r].sum(), rtol=1e-10, err_msg=f"mode {n}")


# -- the tolerance guarantee -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "decaying", "low_rank", "low_rank_noise"])
@settings(max_examples=20)
@given(shape=shapes(), seed=seeds, tol=tols, dtype=st.sampled_from(DTYPES), data=st.data())
def test_sthosvd_tol_guarantee_and_fewest_ranks(backend, kind, shape, seed, tol, dtype, data):
    x = rounded(tensor_of_kind(kind, seed, shape, data), dtype)
    t = nl.sthosvd(backend.asarray(x, dtype), tol=tol)
    assert_placed(t, backend, getattr(backend.xp, dtype))
    assert_within_tol(x, t, tol, dtype)
    check_sequential(x, t, range(len(shape)), dtype, tol)


@given(case=low_rank_cases())
def test_sthosvd_tol_finds_the_ranks_of_an_exactly_low_rank_tensor(backend, case):
    shape, ranks, seed = case
    x = low_rank(seed, shape, ranks)
    t = nl.sthosvd(backend.asarray(x), tol=1e-6)
    assert t.ranks == ranks
    assert rel_error(x, t) <= 1e-10


@settings(max_examples=20)
@given(shape=shapes(), seed=seeds, tol=tols, dtype=st.sampled_from(DTYPES), data=st.data())
def test_tol_guarantee_holds_for_any_order(backend, shape, seed, tol, dtype, data):
    order = data.draw(st.permutations(range(len(shape))), label="order")
    x = rounded(tensor_of_kind("decaying", seed, shape, data), dtype)
    t = nl.sthosvd(backend.asarray(x, dtype), tol=tol, order=order)
    assert_within_tol(x, t, tol, dtype)
    check_sequential(x, t, order, dtype, tol)


@given(case=rank_cases(), data=st.data())
def test_order_changes_only_the_processing_order(backend, case, data):
    """With fixed ranks each factor is the leading subspace of the tensor truncated in the
    modes processed before it, in the given order; full ranks are exact in any order."""
    shape, ranks, seed = case
    order = data.draw(st.permutations(range(len(shape))), label="order")
    x = normal(seed, *shape)
    bx = backend.asarray(x)
    assert rel_error(x, nl.sthosvd(bx, shape, order=order)) <= EXACT["float64"]
    t = nl.sthosvd(bx, ranks, order=order)
    assert t.ranks == ranks
    assert_placed(t, backend, backend.xp.float64)
    check_sequential(x, t, order, "float64")
    natural = nl.sthosvd(bx, ranks, order=range(len(shape)))
    assert_close(nl.sthosvd(bx, ranks).to_dense(), natural.to_dense(), rtol=0)
    check_sequential(x, natural, range(len(shape)), "float64")


@pytest.mark.parametrize("order", [[0, 0, 1], [0, 1], [0, 1, 3], [1, 2, 3], [0, 1, 2, 2], [-1, 0, 1]])
def test_order_that_is_not_a_permutation_is_a_value_error(backend, order):
    x = backend.asarray(normal(0, 3, 4, 5))
    with pytest.raises(ValueError, match="order"):
        nl.sthosvd(x, 2, order=order)
    with pytest.raises(ValueError, match="order"):
        nl.sthosvd(x, tol=0.1, order=order)


# -- hooi --------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["sthosvd", "hosvd"])
@settings(max_examples=10)
@given(case=rank_cases(), dtype=st.sampled_from(DTYPES))
def test_hooi_error_never_exceeds_its_initialisation(backend, init, case, dtype):
    shape, ranks, seed = case
    x = rounded(normal(seed, *shape), dtype)
    bx = backend.asarray(x, dtype)
    start = DECOMPOSE[init](bx, ranks)
    t = nl.hooi(bx, ranks, init=init)
    assert t.ranks == ranks
    assert_placed(t, backend, getattr(backend.xp, dtype))
    slack = 10 * EXACT[dtype]
    assert rel_error(x, t) <= rel_error(x, start) + slack
    if init == "sthosvd":
        assert rel_error(x, nl.hooi(bx, ranks)) <= rel_error(x, start) + slack


@settings(max_examples=12)
@given(case=rank_cases())
def test_hooi_callback_gets_each_sweep_and_the_result_is_the_best_seen(backend, case):
    shape, ranks, seed = case
    x = normal(seed, *shape)
    bx = backend.asarray(x)
    calls = []
    t = nl.hooi(bx, ranks, callback=lambda i, e: calls.append((i, e)), max_iter=8, tol=0.0)
    iterations = [i for i, _ in calls]
    errors = np.array([e for _, e in calls])
    assert 1 <= len(calls) <= 8
    assert iterations == list(range(len(calls)))
    assert all(isinstance(i, int) and isinstance(e, float) for i, e in calls)
    assert np.all((errors >= 0) & (errors <= 1 + 1e-12))
    # HOOI is monotone in exact arithmetic: each sweep captures at least as much energy
    # (compared in squared errors, where rounding is of the order of eps)
    assert np.all(np.diff(errors**2) <= 1e-12), errors
    initial = rel_error(x, nl.sthosvd(bx, ranks))
    assert rel_error(x, t) ** 2 == pytest.approx(min(initial, errors.min()) ** 2, abs=1e-12)


def test_hooi_max_iter_zero_returns_its_initialisation(backend):
    x = backend.asarray(normal(0, 4, 5, 6))
    calls = []
    t = nl.hooi(x, (2, 3, 2), max_iter=0, callback=lambda *a: calls.append(a))
    start = nl.sthosvd(x, (2, 3, 2))
    assert calls == []
    assert_close(t.core, start.core, backend=backend, rtol=1e-12)
    for a, b in zip(t.factors, start.factors, strict=True):
        assert_close(a, b, rtol=1e-12)


def test_hooi_stops_when_the_decomposition_is_exact(backend):
    """Regression: a relative error of 0.0 never improved by ``tol * 0``, so all sweeps ran."""
    x = np.zeros((4, 4, 4))
    x[(np.arange(4),) * 3] = 1.0  # the identity tensor, exactly rank (4, 4, 4)
    calls = []
    t = nl.hooi(backend.asarray(x), 4, callback=lambda i, e: calls.append(e))
    assert rel_error(x, t) <= 1e-12
    assert len(calls) <= 3, f"{len(calls)} sweeps, errors {calls[:3]}..."


def test_hooi_verbose_shows_a_progress_bar_on_stderr(backend, capsys):
    x = backend.asarray(normal(0, 4, 5, 6))
    quiet = nl.hooi(x, 2)
    assert capsys.readouterr().err == ""
    loud = nl.hooi(x, 2, verbose=True)
    assert "hooi" in capsys.readouterr().err
    assert_close(loud.to_dense(), quiet.to_dense(), backend=backend, rtol=0)


@settings(max_examples=12)
@given(case=rank_cases())
def test_hooi_accepts_a_tucker_tensor_as_init(backend, case):
    shape, ranks, seed = case
    x = normal(seed, *shape)
    bx = backend.asarray(x)
    # a start with non-orthonormal factors: hooi orthonormalises them (same column spaces)
    raw = [normal(seed + 1 + n, i, r) for n, (i, r) in enumerate(zip(shape, ranks, strict=True))]
    init = nl.TuckerTensor(backend.asarray(normal(seed, *ranks)), [backend.asarray(f) for f in raw])
    qs = [np.linalg.qr(f)[0] for f in raw]
    projected = x
    for n, q in enumerate(qs):
        projected = np_mode_product(projected, q.T, n)
    start_error = np.linalg.norm(x - einsum_tucker(projected, qs)) / np.linalg.norm(x)
    t = nl.hooi(bx, ranks, init=init)
    assert t.ranks == ranks
    assert_placed(t, backend, backend.xp.float64)
    assert_orthonormal(t, atol=1e-10)
    assert rel_error(x, t) <= start_error + 1e-10
    t0 = nl.hooi(bx, ranks, init=init, max_iter=0)
    assert rel_error(x, t0) == pytest.approx(start_error, abs=1e-10)


def test_hooi_init_of_the_wrong_ranks_or_shape_is_a_value_error(backend):
    x = backend.asarray(normal(0, 4, 5, 6))
    start = nl.sthosvd(x, (2, 2, 2))
    with pytest.raises(ValueError, match=r"ranks.*\(2, 2, 2\).*\(2, 2, 3\)"):
        nl.hooi(x, (2, 2, 3), init=start)
    other = nl.sthosvd(backend.asarray(normal(0, 4, 5, 7)), (2, 2, 2))
    with pytest.raises(ValueError, match=r"shape"):
        nl.hooi(x, (2, 2, 2), init=other)
    with pytest.raises(ValueError, match=r"init.*sthosvd.*hosvd"):
        nl.hooi(x, 2, init="random")


@pytest.mark.parametrize(
    "options, match",
    [
        ({"max_iter": -1}, "max_iter"),
        ({"max_iter": 2.5}, "max_iter"),
        ({"max_iter": True}, "max_iter"),
        ({"tol": -1.0}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"solver": "randomized"}, "randomized"),
    ],
)
def test_hooi_bad_options_are_value_errors(backend, options, match):
    with pytest.raises(ValueError, match=match):
        nl.hooi(backend.asarray(normal(0, 3, 4, 5)), 2, **options)


# -- the tucker() entry point -----------------------------------------------------------------


@pytest.mark.parametrize("method", list(DECOMPOSE))
def test_tucker_dispatches_to_each_method(backend, method):
    x = backend.asarray(normal(0, 4, 5, 6))
    options = {"seed": 0} if method == "randomized" else {}
    t = nl.tucker(x, (2, 3, 2), method=method, **options)
    direct = DECOMPOSE[method](x, (2, 3, 2))
    assert_close(t.to_dense(), direct.to_dense(), backend=backend, rtol=0)
    assert t.ranks == (2, 3, 2)


def test_tucker_defaults_to_sthosvd(backend):
    x = backend.asarray(normal(0, 4, 5, 6))
    assert_close(nl.tucker(x, 2).to_dense(), nl.sthosvd(x, 2).to_dense(), rtol=0)
    assert nl.tucker(x, tol=0.5).ranks == nl.sthosvd(x, tol=0.5).ranks


@settings(max_examples=15)
@given(shape=shapes(), seed=seeds, tol=tols, data=st.data())
def test_tucker_hooi_with_tol_keeps_the_guarantee(backend, shape, seed, tol, data):
    x = tensor_of_kind("decaying", seed, shape, data)
    bx = backend.asarray(x)
    start = nl.sthosvd(bx, tol=tol)
    t = nl.tucker(bx, tol=tol, method="hooi")
    assert t.ranks == start.ranks
    norm = np.linalg.norm(x)
    assert np.linalg.norm(x - dense(t)) <= tol * norm * (1 + 1e-6)
    assert rel_error(x, t) <= rel_error(x, start) + 1e-10


# -- TensorLy ----------------------------------------------------------------------------------


@settings(max_examples=15)
@given(case=low_rank_cases())
def test_hosvd_and_hooi_errors_match_tensorly(case):
    tl_decomposition = pytest.importorskip("tensorly.decomposition")
    import tensorly as tl

    shape, ranks, seed = case
    x = low_rank(seed, shape, ranks, noise=0.05)
    norm = np.linalg.norm(x)

    def tl_error(**options) -> float:
        cp = tl_decomposition.tucker(tl.tensor(x), list(ranks), **options)
        return float(np.linalg.norm(x - tl.to_numpy(tl.tucker_to_tensor(cp))) / norm)

    hosvd_error = tl_error(n_iter_max=0, init="svd")
    assert rel_error(x, nl.hosvd(x, ranks)) == pytest.approx(hosvd_error, rel=1e-3, abs=1e-12)
    assert rel_error(x, nl.hooi(x, ranks)) <= tl_error() * (1 + 1e-3) + 1e-12


# -- backends agree ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(DECOMPOSE))
@settings(max_examples=15)
@given(case=low_rank_cases(), dtype=st.sampled_from(DTYPES))
def test_backends_agree_on_reconstruction_and_projectors(backend, method, case, dtype):
    shape, ranks, seed = case
    assume(well_conditioned(low_rank(seed, shape, ranks), ranks))
    x = rounded(low_rank(seed, shape, ranks, noise=1e-3), dtype)
    reference = DECOMPOSE[method](x.astype(dtype), ranks)
    t = DECOMPOSE[method](backend.asarray(x, dtype), ranks)
    assert_placed(t, backend, getattr(backend.xp, dtype))
    atol = 1e-3 if dtype == "float32" else 1e-9
    if method == "hooi":
        # hooi keeps its best iterate, a choice between errors that agree only to rounding;
        # near the optimum the iterates still differ by O(noise²) = 1e-6
        atol = max(atol, 1e-6)
    scale = np.linalg.norm(x)
    assert_close(t.to_dense(), dense(reference), rtol=0, atol=atol * scale)
    for n, (u, v) in enumerate(zip(factors_np(t), factors_np(reference), strict=True)):
        np.testing.assert_allclose(u @ u.T, v @ v.T, atol=atol, err_msg=f"mode {n}")


@pytest.mark.parametrize("method", list(DECOMPOSE))
@settings(max_examples=15)
@given(shape=shapes(min_size=2), seed=seeds, dtype=st.sampled_from(DTYPES), data=st.data())
def test_factors_are_the_same_on_every_backend_when_the_spectrum_is_simple(
    backend, method, shape, seed, dtype, data
):
    """Distinct singular values and the sign rule make the factors unique: every backend gives
    the sign-fixed leading singular vectors, computed here independently."""
    x, qs = simple_spectrum(seed, shape)
    rank = data.draw(st.integers(1, min(shape)), label="rank")
    t = DECOMPOSE[method](backend.asarray(x, dtype), rank)
    atol = 1e-4 if dtype == "float32" else 1e-10
    for u, q in zip(t.factors, qs, strict=True):
        assert_close(u, q[:, :rank], backend=backend, dtype=getattr(backend.xp, dtype), rtol=0, atol=atol)
    numpy_result = DECOMPOSE[method](x.astype(dtype), rank)
    assert_close(t.core, numpy_result.core, rtol=0, atol=atol)


# -- solvers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["hosvd", "sthosvd", "hooi"])
@settings(max_examples=12)
@given(shape=shapes(min_size=2), seed=seeds, dtype=st.sampled_from(DTYPES), data=st.data())
def test_gram_svd_and_auto_solvers_agree(backend, method, shape, seed, dtype, data):
    x, _ = simple_spectrum(seed, shape)
    ranks = tuple(data.draw(st.integers(1, i), label="rank") for i in shape)
    bx = backend.asarray(x, dtype)
    results = {s: DECOMPOSE[method](bx, ranks, solver=s) for s in ("auto", "gram", "svd")}
    atol = 1e-4 if dtype == "float32" else 1e-10
    for solver, t in results.items():
        assert_placed(t, backend, getattr(backend.xp, dtype))
        assert rel_error(dense(results["svd"]), t) <= atol, solver


@given(shape=shapes(), seed=seeds, dtype=st.sampled_from(DTYPES), data=st.data())
def test_solvers_agree_on_the_tol_ranks(backend, shape, seed, dtype, data):
    """On a well-separated spectrum every solver chooses the same ranks for a tolerance."""
    x, _ = simple_spectrum(seed, shape)
    tol = data.draw(st.sampled_from([0.05, 0.2, 0.4, 0.6]), label="tol")
    bx = backend.asarray(x, dtype)
    ranks = {s: nl.sthosvd(bx, tol=tol, solver=s).ranks for s in ("auto", "gram", "svd")}
    assert len(set(ranks.values())) == 1, ranks


@settings(max_examples=15)
@given(case=low_rank_cases(), dtype=st.sampled_from(DTYPES))
def test_randomized_is_reproducible_and_the_same_on_every_backend(backend, case, dtype):
    shape, ranks, seed = case
    assume(well_conditioned(low_rank(seed, shape, ranks), ranks))
    x = rounded(low_rank(seed, shape, ranks, noise=1e-3), dtype)
    bx = backend.asarray(x, dtype)
    first = nl.sthosvd(bx, ranks, solver="randomized", seed=seed)
    again = nl.sthosvd(bx, ranks, solver="randomized", seed=seed)
    assert_close(again.to_dense(), first.to_dense(), backend=backend, rtol=0)
    generator = nl.sthosvd(bx, ranks, solver="randomized", seed=np.random.default_rng(seed))
    assert_close(generator.to_dense(), first.to_dense(), rtol=0)
    via_tucker = nl.tucker(bx, ranks, method="randomized", seed=seed)
    assert_close(via_tucker.to_dense(), first.to_dense(), rtol=0)
    on_numpy = nl.sthosvd(x.astype(dtype), ranks, solver="randomized", seed=seed)
    atol = 1e-3 if dtype == "float32" else 1e-9
    assert_close(first.to_dense(), dense(on_numpy), rtol=0, atol=atol * np.linalg.norm(x))
    for n, (u, v) in enumerate(zip(factors_np(first), factors_np(on_numpy), strict=True)):
        np.testing.assert_allclose(u @ u.T, v @ v.T, atol=atol, err_msg=f"mode {n}")


@given(case=low_rank_cases(), oversample=st.integers(0, 5), power_iters=st.integers(0, 3))
def test_randomized_is_exact_on_an_exactly_low_rank_tensor(backend, case, oversample, power_iters):
    shape, ranks, seed = case
    x = low_rank(seed, shape, ranks)
    t = nl.sthosvd(
        backend.asarray(x),
        ranks,
        solver="randomized",
        seed=seed,
        oversample=oversample,
        power_iters=power_iters,
    )
    assert t.ranks == ranks
    assert_placed(t, backend, backend.xp.float64)
    assert rel_error(x, t) <= 1e-8
    assert_orthonormal(t, atol=1e-10)
    assert_signs(t)


# -- precision ------------------------------------------------------------------------------------


def _half_cases():
    cases = [pytest.param("numpy", "float16", id="numpy-float16")]
    cases += [pytest.param("torch", d, id=f"torch-{d}") for d in ("float16", "bfloat16")]
    return cases


@pytest.mark.parametrize("method", list(DECOMPOSE))
@pytest.mark.parametrize("library, dtype", _half_cases())
def test_half_precision_is_computed_in_float32_and_returned_in_the_input_dtype(method, library, dtype):
    x = normal(0, 5, 4, 6)
    if library == "torch":
        torch = pytest.importorskip("torch")
        half = torch.from_numpy(x).to(getattr(torch, dtype))
        single = half.to(torch.float32)
    else:
        half = x.astype(dtype)
        single = half.astype(np.float32)
    t = DECOMPOSE[method](half, (3, 2, 4))
    reference = DECOMPOSE[method](single, (3, 2, 4))
    for a in (t.core, *t.factors):
        assert a.dtype == half.dtype
    # the same float32 computation, rounded once to the half dtype (8 or 11 significant bits)
    assert rel_error(dense(reference), t) <= (2e-2 if dtype == "bfloat16" else 3e-3)
    truncated = nl.sthosvd(half, tol=0.3)
    assert truncated.dtype == half.dtype
    assert truncated.ranks == nl.sthosvd(single, tol=0.3).ranks
    x_half = to_numpy(half).astype(np.float64)
    assert np.linalg.norm(x_half - dense(truncated)) <= (0.3 + 2e-2) * np.linalg.norm(x_half)


INTEGER_RESULT = {"numpy": "float64", "torch": "float32", "array_api_strict": "float64"}


@pytest.mark.parametrize("method", list(DECOMPOSE))
def test_integer_input_is_promoted_to_the_default_float(backend, method):
    x = np.random.default_rng(0).integers(-5, 6, (4, 3, 5))
    bx = backend.xp.asarray(x, device=backend.device)
    assert backend.xp.isdtype(bx.dtype, "integral")
    t = DECOMPOSE[method](bx, (4, 3, 5))
    expected = getattr(backend.xp, INTEGER_RESULT.get(backend.name, "float64"))
    assert_placed(t, backend, expected)
    assert rel_error(x.astype(np.float64), t) <= 1e-5
    assert nl.sthosvd(bx, tol=0.5).dtype == expected


@pytest.mark.parametrize("dtype", DTYPES)
def test_float_inputs_keep_their_dtype(backend, dtype):
    x = backend.asarray(normal(0, 4, 3, 5), dtype)
    for t in (nl.hosvd(x, 2), nl.sthosvd(x, tol=0.5), nl.hooi(x, 2), nl.tucker(x, 2, method="randomized")):
        assert_placed(t, backend, getattr(backend.xp, dtype))


@pytest.mark.parametrize(
    "call",
    [
        lambda x: nl.hosvd(x, 2),
        lambda x: nl.sthosvd(x, 2),
        lambda x: nl.sthosvd(x, tol=0.1),
        lambda x: nl.hooi(x, 2),
        lambda x: nl.tucker(x, 2, method="randomized"),
        lambda x: nl.select_ranks(x, energy=0.9),
    ],
    ids=["hosvd", "sthosvd", "sthosvd-tol", "hooi", "randomized", "select_ranks"],
)
def test_complex_input_is_a_type_error(backend, call):
    x = normal(0, 3, 4, 5) + 1j * normal(1, 3, 4, 5)
    with pytest.raises(TypeError, match="complex"):
        call(backend.xp.asarray(x, device=backend.device))


# -- edge cases -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(DECOMPOSE))
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_tensor(backend, method, dtype):
    x = backend.asarray(np.zeros((3, 4, 2)), dtype)
    t = DECOMPOSE[method](x, (2, 3, 1))
    assert t.ranks == (2, 3, 1)
    assert_placed(t, backend, getattr(backend.xp, dtype))
    assert np.all(dense(t) == 0)
    assert all(np.isfinite(f).all() for f in factors_np(t))
    assert_orthonormal(t, atol=0)
    by_tol = nl.sthosvd(x, tol=0.1)
    assert by_tol.ranks == (1, 1, 1)
    assert_placed(by_tol, backend, getattr(backend.xp, dtype))
    assert np.all(dense(by_tol) == 0)
    assert nl.tucker(x, tol=0.1, method="hooi").ranks == (1, 1, 1)


@settings(max_examples=12)
@given(shape=shapes(), seed=seeds, data=st.data())
def test_modes_of_size_one(backend, shape, seed, data):
    where = data.draw(st.lists(st.integers(0, len(shape) - 1), min_size=1), label="size-one modes")
    shape = tuple(1 if n in where else i for n, i in enumerate(shape))
    x = normal(seed, *shape)
    bx = backend.asarray(x)
    for method in DECOMPOSE:
        assert rel_error(x, DECOMPOSE[method](bx, shape)) <= EXACT["float64"], method
        ranks = tuple(data.draw(st.integers(1, i), label="rank") for i in shape)
        truncated = DECOMPOSE[method](bx, ranks)
        assert truncated.ranks == ranks
        assert_orthonormal(truncated, atol=1e-10)
        for n in where:
            assert_close(truncated.factors[n], np.ones((1, 1)), backend=backend, rtol=0, atol=1e-12)
    t = nl.sthosvd(bx, tol=0.2)
    assert all(t.ranks[n] == 1 for n in where)
    assert np.linalg.norm(x - dense(t)) <= 0.2 * np.linalg.norm(x) * (1 + 1e-6)


@pytest.mark.parametrize("method", list(DECOMPOSE))
@settings(max_examples=12)
@given(case=low_rank_cases())
def test_exactly_low_rank_tensors_are_recovered(backend, method, case):
    shape, ranks, seed = case
    x = low_rank(seed, shape, ranks)
    t = DECOMPOSE[method](backend.asarray(x), ranks)
    assert rel_error(x, t) <= 1e-9
    assert_orthonormal(t, atol=1e-10)


def _identity_tensor(size: int, ndim: int) -> np.ndarray:
    x = np.zeros((size,) * ndim)
    x[(np.arange(size),) * ndim] = 1.0
    return x


def _orthogonal_tensor(seed: int, shape, terms: int) -> np.ndarray:
    """Sum of ``terms`` equal-weight outer products of orthonormal vectors: every nonzero
    singular value of every unfolding equals 1."""
    rng = np.random.default_rng(seed)
    qs = [np.linalg.qr(rng.standard_normal((i, terms)))[0] for i in shape]
    return einsum_tucker(_identity_tensor(terms, len(shape)), qs)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=10)
@given(
    ndim=st.integers(2, 4),
    size=st.integers(1, 4),
    seed=seeds,
    tol=tols,
    structure=st.sampled_from(["identity", "orthogonal"]),
)
def test_repeated_singular_values(backend, dtype, ndim, size, seed, tol, structure):
    if structure == "identity":
        x = _identity_tensor(size, ndim)
    else:
        x = _orthogonal_tensor(seed, tuple(size + k for k in range(ndim)), size)
    x = rounded(x, dtype)
    bx = backend.asarray(x, dtype)
    shape = x.shape
    for method in DECOMPOSE:
        full = DECOMPOSE[method](bx, shape)
        assert rel_error(x, full) <= EXACT[dtype], method
        truncated = DECOMPOSE[method](bx, max(1, size - 1))
        assert np.all(np.isfinite(dense(truncated))), method
        assert_orthonormal(truncated, atol=10 * EXACT[dtype])
        assert_signs(truncated)
    t = nl.sthosvd(bx, tol=tol)
    assert_within_tol(x, t, tol, dtype)
    check_sequential(x, t, range(ndim), dtype, tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-30, 1e30])
@settings(max_examples=6)
@given(case=rank_cases(), tol=st.sampled_from([1e-3, 0.05, 0.3]))
def test_extreme_scales_neither_underflow_nor_overflow(backend, dtype, scale, case, tol):
    shape, ranks, seed = case
    base = normal(seed, *shape)
    scaled = (base * scale).astype(dtype)
    x = scaled.astype(np.float64) / scale  # what the decomposition sees, back at scale 1
    bx = backend.asarray(scaled, dtype)
    unscaled = backend.asarray(x, dtype)
    for method in DECOMPOSE:
        t = DECOMPOSE[method](bx, ranks)
        assert_placed(t, backend, getattr(backend.xp, dtype))
        d = dense(t)
        assert np.all(np.isfinite(d)), method
        error = np.linalg.norm(x - d / scale) / np.linalg.norm(x)
        expected = rel_error(x, DECOMPOSE[method](unscaled, ranks))
        assert error == pytest.approx(expected, abs=1e-4 if dtype == "float32" else 1e-8), method
    t = nl.sthosvd(bx, tol=tol)
    d = dense(t) / scale
    assert np.all(np.isfinite(d))
    norm = np.linalg.norm(x)
    representation = 1e-6 * norm if dtype == "float32" else 0.0
    assert np.linalg.norm(x - d) <= tol * norm * (1 + 1e-6) + representation
    assert t.ranks == nl.sthosvd(unscaled, tol=tol).ranks


@settings(max_examples=10)
@given(size=st.integers(1, 8), seed=seeds)
def test_one_dimensional_input(backend, size, seed):
    x = normal(seed, size)
    bx = backend.asarray(x)
    for method in DECOMPOSE:
        for rank in (1, size):
            t = DECOMPOSE[method](bx, rank)
            assert t.ranks == (rank,)
            assert rel_error(x, t) <= EXACT["float64"]
            assert_orthonormal(t, atol=1e-12)
            assert_signs(t)
    t = nl.sthosvd(bx, tol=0.01)
    assert t.ranks == (1,)
    assert_close(t.factors[0][:, 0], np_fix_signs((x / np.linalg.norm(x))[:, None])[:, 0], rtol=0, atol=1e-12)


ALL_CALLS = {
    "hosvd": lambda x: nl.hosvd(x, 1),
    "sthosvd": lambda x: nl.sthosvd(x, 1),
    "sthosvd-tol": lambda x: nl.sthosvd(x, tol=0.1),
    "hooi": lambda x: nl.hooi(x, 1),
    "randomized": lambda x: nl.tucker(x, 1, method="randomized"),
    "tucker-tol": lambda x: nl.tucker(x, tol=0.1),
    "select_ranks-tol": lambda x: nl.select_ranks(x, tol=0.1),
    "select_ranks-energy": lambda x: nl.select_ranks(x, energy=0.9),
    "select_ranks-budget": lambda x: nl.select_ranks(x, budget=100),
}


@pytest.mark.parametrize("call", list(ALL_CALLS))
def test_zero_dimensional_input_is_a_value_error(backend, call):
    with pytest.raises(ValueError, match="0-D"):
        ALL_CALLS[call](backend.asarray(np.float64(1.5)))


@pytest.mark.parametrize("call", list(ALL_CALLS))
def test_a_mode_of_size_zero_is_a_value_error(backend, call):
    with pytest.raises(ValueError, match=r"\(3, 0, 2\)"):
        ALL_CALLS[call](backend.asarray(np.zeros((3, 0, 2))))


# -- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("call", list(ALL_CALLS))
def test_nan_or_inf_is_a_value_error(backend, call, bad, dtype):
    x = normal(0, 3, 4, 2)
    x[1, 2, 0] = bad
    with pytest.raises(ValueError, match="NaN"):
        ALL_CALLS[call](backend.asarray(x, dtype))


@pytest.mark.parametrize("tol", [0, 0.0, 1, 1.0, -0.1, 1.5, float("nan"), float("inf"), "a", True, None])
def test_bad_tol_is_an_error_naming_tol(backend, tol):
    x = backend.asarray(normal(0, 3, 4, 5))
    calls = [
        lambda: nl.sthosvd(x, tol=tol),
        lambda: nl.tucker(x, tol=tol),
        lambda: nl.tucker(x, tol=tol, method="hooi"),
        lambda: nl.select_ranks(x, tol=tol),
    ]
    if tol is None:  # then neither ranks nor tol is given
        for call in calls[:3]:
            with pytest.raises(ValueError, match=r"ranks=.*tol="):
                call()
        return
    expected = TypeError if isinstance(tol, (str, bool)) else ValueError
    for call in calls:
        with pytest.raises(expected, match="tol"):
            call()


@pytest.mark.parametrize("tol", [1e-3, np.float32(0.25), np.float64(0.5), 0.999])
def test_tol_accepts_python_and_numpy_floats(backend, tol):
    x = normal(0, 3, 4, 5)
    t = nl.sthosvd(backend.asarray(x), tol=tol)
    assert np.linalg.norm(x - dense(t)) <= float(tol) * np.linalg.norm(x) * (1 + 1e-6)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(
    "ranks, error, match",
    [
        ((2, 5, 2), ValueError, r"ranks\[1\]=5.*mode 1.*size 4"),
        ((2, 0, 2), ValueError, r"ranks\[1\]=0.*mode 1.*size 4"),
        ((2, 2, -1), ValueError, r"ranks\[2\]=-1.*mode 2.*size 5"),
        (6, ValueError, r"mode 0.*size 3"),
        ((2, 2), ValueError, r"2 entries.*3 modes"),
        ((2, 2, 2, 2), ValueError, r"4 entries.*3 modes"),
        ((2, 2.0, 2), TypeError, r"ranks\[1\]"),
        ("2", TypeError, "ranks"),
    ],
)
def test_bad_ranks_name_the_mode_rank_and_size(backend, method, ranks, error, match):
    x = backend.asarray(normal(0, 3, 4, 5))
    with pytest.raises(error, match=match):
        nl.tucker(x, ranks, method=method)
    if method in DECOMPOSE:
        with pytest.raises(error, match=match):
            DECOMPOSE[method](x, ranks)


def test_unknown_method_lists_the_methods(backend):
    x = backend.asarray(normal(0, 3, 4, 5))
    every = "".join(rf"(?=.*{m})" for m in METHODS)
    with pytest.raises(ValueError, match=rf"(?s)method.*'cp'{every}"):
        nl.tucker(x, 2, method="cp")


@pytest.mark.parametrize(
    "call",
    [
        lambda x, s: nl.hosvd(x, 2, solver=s),
        lambda x, s: nl.sthosvd(x, 2, solver=s),
        lambda x, s: nl.sthosvd(x, tol=0.1, solver=s),
        lambda x, s: nl.hooi(x, 2, solver=s),
        lambda x, s: nl.tucker(x, 2, solver=s),
        lambda x, s: nl.tucker(x, 2, method="hosvd", solver=s),
        lambda x, s: nl.tucker(x, tol=0.1, method="hooi", solver=s),
    ],
)
def test_unknown_solver_lists_the_solvers(backend, call):
    x = backend.asarray(normal(0, 3, 4, 5))
    every = "".join(rf"(?=.*{s})" for s in SOLVERS)
    with pytest.raises(ValueError, match=rf"(?s)solver.*'qr'{every}"):
        call(x, "qr")


def test_randomized_solver_needs_ranks(backend):
    x = backend.asarray(normal(0, 3, 4, 5))
    with pytest.raises(ValueError, match=r"randomized.*ranks"):
        nl.sthosvd(x, tol=0.1, solver="randomized")
    with pytest.raises(ValueError, match=r"randomized.*ranks"):
        nl.tucker(x, tol=0.1, method="randomized")


@pytest.mark.parametrize("method", list(METHODS))
def test_exactly_one_of_ranks_and_tol(backend, method):
    x = backend.asarray(normal(0, 3, 4, 5))
    with pytest.raises(ValueError, match="ranks"):
        nl.tucker(x, 2, tol=0.1, method=method)
    with pytest.raises(ValueError, match="ranks"):
        nl.tucker(x, method=method)
    if method == "sthosvd":
        with pytest.raises(ValueError, match=r"ranks=.*tol="):
            nl.sthosvd(x, 2, tol=0.1)
        with pytest.raises(ValueError, match=r"ranks=.*tol="):
            nl.sthosvd(x)


def test_hosvd_refuses_the_randomized_solver_clearly(backend):
    """Regression: it was accepted and then failed an internal assert (no random generator)."""
    x = backend.asarray(normal(0, 6, 5, 7))
    with pytest.raises(ValueError, match=r"hosvd.*randomized.*sthosvd"):
        nl.hosvd(x, (2, 3, 2), solver="randomized")
    with pytest.raises(ValueError, match=r"hosvd.*randomized"):
        nl.tucker(x, (2, 3, 2), method="hosvd", solver="randomized")


def test_mixing_backends_in_hooi_init_is_a_type_error():
    torch = pytest.importorskip("torch")
    x = normal(0, 3, 4, 5)
    start = nl.sthosvd(torch.from_numpy(x), 2)
    with pytest.raises(TypeError, match=r"(?s)(?=.*numpy)(?=.*torch)"):
        nl.hooi(x, 2, init=start)


def test_non_arrays_are_a_type_error():
    with pytest.raises(TypeError, match="list"):
        nl.hosvd([[1.0, 2.0], [3.0, 4.0]], 1)
    with pytest.raises(TypeError, match="list"):
        nl.sthosvd([[1.0, 2.0], [3.0, 4.0]], tol=0.1)
