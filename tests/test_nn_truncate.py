"""truncate_adapters: shrink trained Tucker adapters by tol, ranks or budget, without forming ΔW.

Every check measures ΔW densely in float64 from the adapter's own core and factors with one
einsum (an independent reference), before and after the truncation.
"""

from __future__ import annotations

import copy
import math
import time

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from ndlowrank import nn as nlnn  # noqa: E402

F64 = torch.float64
F32 = torch.float32
OLD_RANKS = {"conv": (6, 5, 3, 3), "lin": (6, 6), "mix.w": (3, 6, 5)}


class Mix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(0.3 * torch.randn(3, 10, 6))


class Net(nn.Module):
    """A Conv2d, a Linear and a raw 3-D parameter, each to carry an adapter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.lin = nn.Linear(8, 10)
        self.mix = Mix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean((2, 3))
        return torch.einsum("bo,eoi->bei", self.lin(h), self.mix.w)


def base_net(dtype: torch.dtype = F64) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def _input(dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)


def adapted(base: nn.Module, *, init: str = "orthogonal", scale: float = 2.0) -> nn.Module:
    model = copy.deepcopy(base)
    nlnn.add_adapters(
        model,
        ["conv", "lin"],
        8,
        rank_pattern={"conv": OLD_RANKS["conv"], "lin": OLD_RANKS["lin"], "mix.w": OLD_RANKS["mix.w"]},
        target_parameters=["mix.w"],
        init=init,
        scale=scale,
        seed=0,
    )
    return model


@torch.no_grad()
def train(model: nn.Module, seed: int = 3) -> nn.Module:
    """Stands in for training: cores with a decaying spectrum, factors far from orthonormal."""
    gen = torch.Generator().manual_seed(seed)
    for _, adapter in nlnn.iter_adapters(model):
        delta = adapter.delta
        decay = torch.ones((), dtype=F64)
        for r in delta.ranks:
            decay = decay[..., None] * 0.55 ** torch.arange(r, dtype=F64)
        core = torch.randn(delta.ranks, generator=gen, dtype=F64) * decay
        delta.core.copy_(core.to(delta.core.dtype))
        for factor in delta.factors:
            noise = torch.randn(factor.shape, generator=gen, dtype=F64)
            factor.copy_((0.4 * factor.to(F64) + noise).to(factor.dtype))
    return model


def dense_delta(adapter) -> torch.Tensor:
    """``scale · core ×_n factors[n]`` in float64, by one einsum (independent of the library)."""
    delta = adapter.delta
    core = delta.core.detach().to(F64)
    letters, outs = "abcd"[: core.ndim], "ijkl"[: core.ndim]
    operands = ",".join(f"{o}{i}" for o, i in zip(outs, letters, strict=True))
    factors = [f.detach().to(F64) for f in delta.factors]
    return delta.scale * torch.einsum(f"{letters},{operands}->{outs}", core, *factors)


def deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: dense_delta(adapter) for name, adapter in nlnn.iter_adapters(model)}


def ranks_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: adapter.ranks for name, adapter in nlnn.iter_adapters(model)}


def adapter_params(model: nn.Module) -> int:
    return sum(adapter.delta.n_params for _, adapter in nlnn.iter_adapters(model))


def relative(new: torch.Tensor, old: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(new - old) / torch.linalg.vector_norm(old))


def snapshot(model: nn.Module) -> list[tuple[str, int, torch.Tensor]]:
    return [(n, id(p), p.detach().clone()) for n, p in model.named_parameters()]


def assert_unchanged(model: nn.Module, before: list[tuple[str, int, torch.Tensor]]) -> None:
    after = snapshot(model)
    assert [(n, i) for n, i, _ in after] == [(n, i) for n, i, _ in before]
    for (name, _, a), (_, _, b) in zip(after, before, strict=True):
        assert torch.equal(a, b), name


def check_reports(reports, old_deltas, old_ranks, model, *, slack: float) -> dict[str, float]:
    """Names, ranks and relative changes of the reports against what the model now holds."""
    new_deltas, new_ranks = deltas(model), ranks_of(model)
    assert [r.name for r in reports] == list(old_deltas) == list(new_deltas)
    changes = {}
    for report in reports:
        name = report.name
        assert report.old_ranks == old_ranks[name]
        assert report.new_ranks == new_ranks[name]
        assert all(n <= o for n, o in zip(report.new_ranks, report.old_ranks, strict=True)), report
        measured = relative(new_deltas[name], old_deltas[name])
        assert report.relative_change == pytest.approx(measured, rel=slack, abs=slack), name
        assert f"{name}: ranks {report.old_ranks} -> {report.new_ranks}" in str(report)
        changes[name] = measured
    return changes


# -- tol ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, slack", [(F64, 1e-9), (F32, 1e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("tol", [0.02, 0.2])
def test_tol_bounds_the_change_of_every_delta(tol, dtype, slack):
    model = train(adapted(base_net(dtype)))
    old_deltas, old_ranks = deltas(model), ranks_of(model)
    assert old_ranks == OLD_RANKS
    reports = nlnn.truncate_adapters(model, tol=tol)
    assert all(isinstance(r, nlnn.TruncationReport) for r in reports)
    changes = check_reports(reports, old_deltas, old_ranks, model, slack=slack)
    for name, change in changes.items():
        assert change <= tol * (1 + slack) + slack, name
    # the decaying spectra leave something to cut at either tolerance
    assert sum(map(sum, ranks_of(model).values())) < sum(map(sum, old_ranks.values()))
    for _, adapter in nlnn.iter_adapters(model):
        assert adapter.delta.core.dtype == dtype
        assert all(f.dtype == dtype for f in adapter.delta.factors)


def test_a_looser_tol_never_keeps_more():
    tight, loose = train(adapted(base_net())), train(adapted(base_net()))
    nlnn.truncate_adapters(tight, tol=0.01)
    nlnn.truncate_adapters(loose, tol=0.3)
    for name, ranks in ranks_of(loose).items():
        assert all(a <= b for a, b in zip(ranks, ranks_of(tight)[name], strict=True)), name


@pytest.mark.parametrize("tol", [0.05, 0.3])
def test_output_of_a_linear_layer_moves_no_more_than_tol_allows(tol):
    torch.manual_seed(0)
    model = nlnn.add_adapters(
        nn.Sequential(nn.Linear(12, 10).double()), ["0"], (8, 8), init="orthogonal", seed=0
    )
    train(model)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(4), dtype=F64)
    with torch.no_grad():
        before = model(x)
    norm = float(torch.linalg.vector_norm(dense_delta(model[0])))
    old = dense_delta(model[0])
    nlnn.truncate_adapters(model, tol=tol)
    with torch.no_grad():
        moved = float(torch.linalg.vector_norm(model(x) - before))
    error = float(torch.linalg.vector_norm(dense_delta(model[0]) - old))
    x_norm = float(torch.linalg.vector_norm(x))
    assert moved <= error * x_norm * (1 + 1e-9)
    assert moved <= tol * norm * x_norm * (1 + 1e-9)
    assert moved > 0


def test_output_of_a_conv_layer_moves_no_more_than_tol_allows():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1).double()
    model = nlnn.add_adapters(nn.Sequential(conv), ["0"], (6, 5, 3, 3), init="orthogonal", seed=0)
    train(model)
    x = torch.randn(2, 6, 7, 7, generator=torch.Generator().manual_seed(4), dtype=F64)
    with torch.no_grad():
        before = model(x)
    norm = float(torch.linalg.vector_norm(dense_delta(model[0])))
    nlnn.truncate_adapters(model, tol=0.1)
    with torch.no_grad():
        moved = float(torch.linalg.vector_norm(model(x) - before))
    # every input pixel enters at most 3·3 output pixels: ‖conv(x, E)‖ ≤ 3 ‖E‖ ‖x‖
    assert moved <= 0.1 * norm * 3 * float(torch.linalg.vector_norm(x)) * (1 + 1e-9)


# -- ranks --------------------------------------------------------------------------------------


def test_int_ranks_are_clipped_to_the_current_ranks():
    model = train(adapted(base_net()))
    old_deltas, old_ranks = deltas(model), ranks_of(model)
    reports = nlnn.truncate_adapters(model, ranks=4)
    check_reports(reports, old_deltas, old_ranks, model, slack=1e-9)
    assert ranks_of(model) == {name: tuple(min(4, r) for r in ranks) for name, ranks in old_ranks.items()}
    assert ranks_of(model) == {"conv": (4, 4, 3, 3), "lin": (4, 4), "mix.w": (3, 4, 4)}


def test_tuple_ranks_and_ranks_that_would_grow():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 10)).double()
    model = train(nlnn.add_adapters(copy.deepcopy(base), ["0", "2"], (6, 6), init="orthogonal", seed=0))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"ranks\[1\]=7 .*current ranks \(6, 6\)"):
        nlnn.truncate_adapters(model, ranks=(4, 7))
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"ranks=\(4, 3, 3\) has 3 entries"):
        nlnn.truncate_adapters(model, ranks=(4, 3, 3))
    assert_unchanged(model, before)
    old_deltas, old_ranks = deltas(model), ranks_of(model)
    reports = nlnn.truncate_adapters(model, ranks=(4, 3))
    check_reports(reports, old_deltas, old_ranks, model, slack=1e-9)
    assert ranks_of(model) == {"0": (4, 3), "2": (4, 3)}


def test_ranks_equal_to_the_current_ranks_change_nothing_but_the_basis():
    model = train(adapted(base_net()))
    x = _input()
    with torch.no_grad():
        before = model(x)
    old_deltas, old_ranks = deltas(model), ranks_of(model)
    reports = nlnn.truncate_adapters(model, ranks=100)
    changes = check_reports(reports, old_deltas, old_ranks, model, slack=1e-9)
    assert ranks_of(model) == old_ranks
    assert max(changes.values()) < 1e-12
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-12)


# -- budget -------------------------------------------------------------------------------------


def test_budget_is_respected_and_ranks_never_grow():
    model = train(adapted(base_net()))
    old_deltas, old_ranks = deltas(model), ranks_of(model)
    total = adapter_params(model)
    minimum = sum(1 + sum(adapter.weight.shape) for _, adapter in nlnn.iter_adapters(model))
    budget = (total + minimum) // 2
    reports = nlnn.truncate_adapters(model, budget=budget)
    check_reports(reports, old_deltas, old_ranks, model, slack=1e-9)
    assert minimum <= adapter_params(model) <= budget
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(
        p.numel() for _, a in nlnn.iter_adapters(model) for p in a.delta.trainable_parameters()
    )


def test_budget_above_the_current_size_keeps_every_rank():
    model = train(adapted(base_net()))
    old_ranks = ranks_of(model)
    nlnn.truncate_adapters(model, budget=10 * adapter_params(model))
    assert ranks_of(model) == old_ranks


def test_budget_at_the_minimum_gives_ranks_one():
    model = train(adapted(base_net()))
    minimum = sum(1 + sum(adapter.weight.shape) for _, adapter in nlnn.iter_adapters(model))
    nlnn.truncate_adapters(model, budget=minimum)
    assert all(set(r) == {1} for r in ranks_of(model).values())
    assert adapter_params(model) == minimum


def test_budget_below_the_minimum_is_refused_and_nothing_changes():
    model = train(adapted(base_net()))
    minimum = sum(1 + sum(adapter.weight.shape) for _, adapter in nlnn.iter_adapters(model))
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"budget={minimum - 1} is below {minimum}"):
        nlnn.truncate_adapters(model, budget=minimum - 1)
    assert_unchanged(model, before)


# -- saving, loading, merging -------------------------------------------------------------------


def test_a_truncated_model_saves_loads_and_merges(tmp_path):
    base, x = base_net(), _input()
    model = train(adapted(base))
    nlnn.truncate_adapters(model, tol=0.1)
    path = tmp_path / "truncated.safetensors"
    nlnn.save_adapters(model, path)
    fresh = nlnn.load_adapters(copy.deepcopy(base), path)
    assert ranks_of(fresh) == ranks_of(model)
    with torch.no_grad():
        y = model(x)
        assert torch.equal(fresh(x), y)
        nlnn.merge_adapters(fresh)
        torch.testing.assert_close(fresh(x), y, rtol=1e-10, atol=1e-12)
        nlnn.remove_adapters(fresh, merge=True)
        torch.testing.assert_close(fresh(x), y, rtol=1e-10, atol=1e-12)
    assert list(nlnn.iter_adapters(fresh)) == []


def test_a_truncated_model_trains_only_its_adapters():
    model = train(adapted(base_net()))
    nlnn.truncate_adapters(model, tol=0.1)
    ids = {id(p) for _, a in nlnn.iter_adapters(model) for p in a.delta.trainable_parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == ids
    base = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in ids}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(_input()).square().mean().backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if id(p) not in ids:
            assert torch.equal(p, base[name]), name


def test_merged_adapters_are_unmerged_truncated_and_merged_again():
    base, x = base_net(), _input()
    model = train(adapted(base))
    twin = copy.deepcopy(model)
    weights = {n: a.weight.detach().clone() for n, a in nlnn.iter_adapters(model)}
    nlnn.merge_adapters(model)
    reports = nlnn.truncate_adapters(model, tol=0.1)
    twin_reports = nlnn.truncate_adapters(twin, tol=0.1)
    assert [(r.name, r.new_ranks) for r in reports] == [(r.name, r.new_ranks) for r in twin_reports]
    for a, b in zip(reports, twin_reports, strict=True):
        assert a.relative_change == pytest.approx(b.relative_change, rel=1e-9, abs=1e-12)
    assert all(adapter.merged for _, adapter in nlnn.iter_adapters(model))
    with torch.no_grad():
        merged = model(x)
        torch.testing.assert_close(merged, twin(x), rtol=1e-10, atol=1e-12)
        nlnn.unmerge_adapters(model)
        torch.testing.assert_close(model(x), merged, rtol=1e-10, atol=1e-12)
    for name, adapter in nlnn.iter_adapters(model):  # the base weights are the old ones again
        torch.testing.assert_close(adapter.weight, weights[name], rtol=0, atol=1e-12)


# -- zero deltas, standalone deltas, bad requests -----------------------------------------------


@pytest.mark.parametrize(
    "request_, expected",
    [
        ({"tol": 0.1}, {"conv": (1, 1, 1, 1), "lin": (1, 1), "mix.w": (1, 1, 1)}),
        ({"ranks": 2}, {"conv": (2, 2, 2, 2), "lin": (2, 2), "mix.w": (2, 2, 2)}),
        ({"budget": 200}, {"conv": (1, 1, 1, 1), "lin": (1, 1), "mix.w": (1, 1, 1)}),
    ],
    ids=["tol", "ranks", "budget"],
)
@pytest.mark.parametrize("init", ["zero_core", "zero_factor"])
def test_a_zero_delta_truncates_without_nan(request_, expected, init):
    base, x = base_net(), _input()
    model = adapted(base, init=init)  # untrained: ΔW = 0
    with torch.no_grad():
        before = model(x)
    reports = nlnn.truncate_adapters(model, **request_)
    assert ranks_of(model) == expected
    assert all(r.relative_change == 0.0 for r in reports)
    for _, adapter in nlnn.iter_adapters(model):
        for p in adapter.delta.parameters():
            assert torch.isfinite(p).all()
        assert not dense_delta(adapter).any()
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_a_standalone_tucker_delta_is_truncated_too():
    delta = nlnn.TuckerDelta((9, 8, 7), (6, 6, 5), init="orthogonal", scale=0.5, dtype=F64, seed=0)
    holder = nn.ModuleDict({"delta": delta})

    class View:  # dense_delta reads .delta
        def __init__(self, d):
            self.delta = d

    with torch.no_grad():
        delta.core.normal_()
    old = dense_delta(View(delta))
    (report,) = nlnn.truncate_adapters(holder, tol=0.3)
    assert report.name == "delta" and report.old_ranks == (6, 6, 5)
    assert holder["delta"].ranks == report.new_ranks
    change = relative(dense_delta(View(holder["delta"])), old)
    assert change <= 0.3 and report.relative_change == pytest.approx(change, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    "request_, error, pattern",
    [
        ({}, ValueError, r"exactly one of tol=, ranks= or budget=, got none"),
        ({"tol": 0.1, "ranks": 2}, ValueError, r"exactly one .*\['tol', 'ranks'\]"),
        ({"tol": 0.1, "budget": 500}, ValueError, r"exactly one .*\['tol', 'budget'\]"),
        ({"ranks": 2, "budget": 500}, ValueError, r"exactly one"),
        ({"tol": 0.1, "ranks": 2, "budget": 500}, ValueError, r"exactly one"),
        ({"tol": 1.5}, ValueError, r"tol=1\.5 is outside \(0, 1\)"),
        ({"tol": 0.0}, ValueError, r"tol=0\.0 is outside"),
        ({"budget": 500.0}, TypeError, r"budget must be an int"),
        ({"budget": True}, TypeError, r"budget must be an int"),
        ({"ranks": 0}, ValueError, r"ranks\[0\]=0"),
    ],
)
def test_bad_requests_are_refused_and_nothing_changes(request_, error, pattern):
    model = train(adapted(base_net()))
    before = snapshot(model)
    with pytest.raises(error, match=pattern):
        nlnn.truncate_adapters(model, **request_)
    assert_unchanged(model, before)


def test_a_model_without_adapters_is_refused():
    with pytest.raises(ValueError, match="no Tucker adapters"):
        nlnn.truncate_adapters(base_net(), tol=0.1)


# -- performance sanity -------------------------------------------------------------------------


def test_fifty_conv_adapters_truncate_quickly():
    """50 adapters of ranks (32, 32, 3, 3) on (256, 256, 3, 3) kernels: target < 1 s, allowed 5 s here."""
    torch.manual_seed(0)
    with torch.no_grad():
        model = nn.Sequential(*(nn.Conv2d(256, 256, 3, bias=False) for _ in range(50)))
    nlnn.add_adapters(model, r"\d+", (32, 32, 3, 3), init="orthogonal", seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, adapter in nlnn.iter_adapters(model):
            adapter.delta.core.copy_(
                torch.randn(32, 32, 3, 3, generator=gen) * 0.9 ** torch.arange(32)[:, None, None, None]
            )
    start = time.perf_counter()
    reports = nlnn.truncate_adapters(model, tol=0.1)
    elapsed = time.perf_counter() - start
    assert len(reports) == 50
    assert all(r.relative_change <= 0.1 + 1e-6 for r in reports)
    assert all(math.prod(r.new_ranks) < math.prod(r.old_ranks) for r in reports)
    assert elapsed < 5.0, f"truncating 50 conv adapters took {elapsed:.2f} s"


def test_truncation_keeps_frozen_adapters_frozen():
    model = train(adapted(base_net()))
    model.requires_grad_(False)  # e.g. for inference
    nlnn.truncate_adapters(model, tol=0.1)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []
