"""Parameter adapters: ``add_adapters(model, None, ranks, target_parameters=[...])`` and ``ParameterAdapter``.

Three kinds of N-D parameter that are not a Linear/Conv/Embedding weight: an attention block's
``in_proj_weight``, a 5-D kernel used through ``F.conv3d`` in custom code and a stacked 3-D
expert weight used with ``torch.bmm``. Plus ``TuckerDelta`` used directly as a parametrization.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

from ndlowrank import nn as nlnn  # noqa: E402

from _helpers import perturb_adapters  # noqa: E402

F64 = torch.float64
INITS = ["zero_core", "zero_factor", "orthogonal", "principal"]


# -- the models ---------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.head(y)


class Kernel5D(nn.Module):
    """Custom code with a raw 5-D kernel (registered before its bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(0.2 * torch.randn(6, 4, 3, 3, 3))
        self.bias = nn.Parameter(0.1 * torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, self.kernel, self.bias, padding=1)


class Experts(nn.Module):
    """Stacked expert weights ``(experts, out, in)`` applied with ``torch.bmm`` (a 1-D bias after them)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.randn(3, 6))
        self.w_up = nn.Parameter(0.3 * torch.randn(3, 8, 6))
        self.bias = nn.Parameter(0.1 * torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (experts, tokens, in)
        gates = torch.softmax(self.gate, dim=0)[:, None, :]
        return torch.bmm(x * gates, self.w_up.transpose(1, 2)) + self.bias


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    target: str
    ranks: tuple[int, ...]
    input_shape: tuple[int, ...]
    owner_type: type

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().to(F64)

    def input(self) -> torch.Tensor:
        return torch.randn(self.input_shape, generator=torch.Generator().manual_seed(5), dtype=F64)

    def owner(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.target.rpartition(".")[0])

    @property
    def attribute(self) -> str:
        return self.target.rpartition(".")[2]


CASES = [
    Case("mha", Attention, "attn.in_proj_weight", (5, 4), (2, 5, 16), nn.MultiheadAttention),
    Case(
        "conv3d",
        lambda: nn.Sequential(OrderedDict(block=Kernel5D())),
        "block.kernel",
        (3, 3, 2, 2, 2),
        (2, 4, 4, 4, 4),
        Kernel5D,
    ),
    Case("bmm", lambda: nn.Sequential(OrderedDict(moe=Experts())), "moe.w_up", (2, 4, 3), (3, 5, 6), Experts),
]
CASE_IDS = [case.name for case in CASES]


def _adapt(case: Case, model: nn.Module, init: str = "zero_core", **options) -> nn.Module:
    return nlnn.add_adapters(
        model, None, case.ranks, target_parameters=[case.target], init=init, seed=0, **options
    )


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {key: value.detach().clone() for key, value in model.state_dict().items()},
        "parameters": [(name, id(p), p.requires_grad) for name, p in model.named_parameters()],
        "modules": [(name, type(module)) for name, module in model.named_modules()],
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["parameters"] == before["parameters"]
    assert list(after["state"]) == list(before["state"])
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


# -- function at init ---------------------------------------------------------------------------


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_output_unchanged_at_init(case, init):
    model, x = case.model(), case.input()
    with torch.no_grad():
        reference = model(x)
    _adapt(case, model, init)
    adapters = dict(nlnn.iter_adapters(model))
    assert list(adapters) == [case.target]
    adapter = adapters[case.target]
    assert isinstance(adapter, nlnn.ParameterAdapter)
    assert adapter.ranks == case.ranks and adapter.init == init
    assert parametrize.is_parametrized(case.owner(model), case.attribute)
    with torch.no_grad():
        out = model(x)
    # (not bit for bit: nn.MultiheadAttention takes another kernel once its weight is a parametrization)
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    effective = getattr(case.owner(model), case.attribute)
    if init == "principal":  # the base weight holds the residual W - ΔW₀; W + ΔW is the old weight
        assert not torch.allclose(adapter.weight, effective)
    else:
        assert torch.equal(adapter.weight, effective)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_only_adapter_parameters_train(case):
    model = _adapt(case, case.model(), "zero_core")
    x = case.input()
    adapter = dict(nlnn.iter_adapters(model))[case.target]
    adapter_ids = {id(p) for p in adapter.delta.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == adapter_ids
    base = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in adapter_ids}
    start = [p.detach().clone() for p in adapter.delta.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # zero_core: the core moves first, then the factors
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if id(p) not in adapter_ids:
            assert torch.equal(p, base[name]), name
            assert p.grad is None, name
    for before, after in zip(start, adapter.delta.parameters(), strict=True):
        assert not torch.equal(before, after)


# -- merge, unmerge, remove ---------------------------------------------------------------------


@pytest.mark.parametrize("init", ["zero_core", "principal"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_merge_unmerge_and_remove_with_merge(case, init):
    model, x = case.model(), case.input()
    owner = case.owner(model)
    original = owner._parameters[case.attribute]
    order, keys = list(owner._parameters), list(model.state_dict())
    _adapt(case, model, init)
    perturb_adapters(model)
    adapter = dict(nlnn.iter_adapters(model))[case.target]
    assert adapter.weight is original
    with torch.no_grad():
        y = model(x)
        stored = original.detach().clone()
        nlnn.merge_adapters(model)
        assert adapter.merged
        torch.testing.assert_close(model(x), y, rtol=1e-10, atol=1e-10)
        nlnn.merge_adapters(model)  # merging twice does not add twice
        torch.testing.assert_close(model(x), y, rtol=1e-10, atol=1e-10)
        nlnn.unmerge_adapters(model)
        assert not adapter.merged
        torch.testing.assert_close(original, stored, rtol=0, atol=1e-12)
        torch.testing.assert_close(model(x), y, rtol=1e-10, atol=1e-10)
        nlnn.merge_adapters(model)
    nlnn.remove_adapters(model, merge=True)
    assert list(nlnn.iter_adapters(model)) == []
    assert type(owner) is case.owner_type
    assert not parametrize.is_parametrized(owner)
    assert owner._parameters[case.attribute] is original
    assert list(owner._parameters) == order
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("init", ["zero_core", "principal"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_remove_without_merge_gives_back_the_original(case, init, merged):
    model, x = case.model(), case.input()
    owner = case.owner(model)
    original = owner._parameters[case.attribute]
    values, order, keys = original.detach().clone(), list(owner._parameters), list(model.state_dict())
    with torch.no_grad():
        reference = model(x)
    _adapt(case, model, init)
    perturb_adapters(model)
    if merged:
        nlnn.merge_adapters(model)
    nlnn.remove_adapters(model, merge=False)
    assert owner._parameters[case.attribute] is original
    assert type(owner) is case.owner_type
    assert list(owner._parameters) == order
    assert list(model.state_dict()) == keys
    if init == "principal" or merged:
        torch.testing.assert_close(original.detach(), values, rtol=0, atol=1e-12)
    else:
        assert torch.equal(original, values)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=1e-10, atol=1e-10)


# -- save and load ------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["zero_core", "principal"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_save_load_round_trip_into_a_fresh_model(case, init, tmp_path):
    base, x = case.model(), case.input()
    model = _adapt(case, copy.deepcopy(base), init)
    perturb_adapters(model)
    path = tmp_path / "adapters.safetensors"
    nlnn.save_adapters(model, path)
    fresh = nlnn.load_adapters(copy.deepcopy(base), path)
    assert [n for n, _ in nlnn.iter_adapters(fresh)] == [case.target]
    loaded = dict(nlnn.iter_adapters(fresh))[case.target]
    assert isinstance(loaded, nlnn.ParameterAdapter)
    assert loaded.ranks == case.ranks and loaded.init == init
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# -- parametrized and wrapped adapters agree ----------------------------------------------------


@pytest.mark.parametrize("path", ["materialize", "factorized"])
@pytest.mark.parametrize(
    "layer, ranks, input_shape",
    [
        (lambda: nn.Linear(7, 5), (3, 4), (4, 7)),
        (lambda: nn.Conv2d(4, 6, 3, padding=1), (3, 2, 2, 3), (2, 4, 5, 5)),
    ],
    ids=["linear", "conv2d"],
)
def test_parameter_adapter_matches_layer_adapter(layer, ranks, input_shape, path):
    torch.manual_seed(0)
    base = layer().to(F64)
    wrapped = nlnn.TuckerAdapter(copy.deepcopy(base), ranks, scale=2.0, path=path, seed=0)
    holder = nn.Sequential(OrderedDict(layer=copy.deepcopy(base)))
    nlnn.add_adapters(holder, None, ranks, scale=2.0, target_parameters=["layer.weight"], seed=1)
    parametrized = dict(nlnn.iter_adapters(holder))["layer.weight"]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for a, b in zip(wrapped.delta.parameters(), parametrized.delta.parameters(), strict=True):
            value = torch.randn(a.shape, generator=gen, dtype=F64)
            a.copy_(value)
            b.copy_(value)
        x = torch.randn(input_shape, generator=gen, dtype=F64)
        torch.testing.assert_close(
            parametrized.delta_weight(), wrapped.delta_weight(), rtol=1e-12, atol=1e-12
        )
        torch.testing.assert_close(holder(x), wrapped(x), rtol=1e-10, atol=1e-10)
        assert not torch.allclose(holder(x), base(x))


# -- deepcopy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_removing_adapters_from_a_deepcopy_leaves_the_original_working(case):
    model, x = case.model(), case.input()
    with torch.no_grad():
        reference = model(x)
    _adapt(case, model)
    perturb_adapters(model)
    with torch.no_grad():
        y = model(x)
    clone = copy.deepcopy(model)
    nlnn.remove_adapters(clone, merge=True)
    assert type(case.owner(clone)) is case.owner_type
    with torch.no_grad():
        torch.testing.assert_close(clone(x), y, rtol=1e-10, atol=1e-10)
        assert torch.equal(model(x), y)  # the original still has its parametrization
    assert [n for n, _ in nlnn.iter_adapters(model)] == [case.target]
    assert (
        getattr(case.owner(model), case.attribute).shape
        == case.owner(clone)._parameters[case.attribute].shape
    )
    nlnn.remove_adapters(model, merge=False)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=1e-10, atol=1e-10)


# -- bad input ----------------------------------------------------------------------------------


class Everything(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = Attention()
        self.block = Kernel5D()
        self.moe = Experts()


@pytest.mark.parametrize(
    "targets, ranks, error, pattern",
    [
        (["block.nope"], 2, ValueError, r"'block\.nope' matches no parameter"),
        (["attention.attn.in_proj_weight", "missing"], 2, ValueError, r"'missing' matches no parameter"),
        (["moe.bias"], 2, ValueError, r"'moe\.bias' has shape \(8,\).*at least 2 modes"),
        (["block.kernel", "block.bias"], 2, ValueError, r"'block\.bias' has shape \(6,\)"),
        (["moe.w_up"], (2, 9, 3), ValueError, r"'moe\.w_up'.*ranks\[1\]=9 .*mode 1 of size 8"),
        (
            ["attention.attn.in_proj_weight", "moe.w_up"],
            (4, 7),
            ValueError,
            r"'moe\.w_up'.*2 entries",
        ),
        (["block.kernel"], (7, 2, 2, 2, 2), ValueError, r"'block\.kernel'.*ranks\[0\]=7 .*mode 0 of size 6"),
        ("moe.w_up", 2, TypeError, r"target_parameters must be a list"),
    ],
)
@pytest.mark.parametrize("init", ["zero_core", "principal"])
def test_bad_targets_name_the_parameter_and_leave_the_model_unchanged(targets, ranks, error, pattern, init):
    torch.manual_seed(0)
    model = Everything().to(F64)
    before = _snapshot(model)
    with pytest.raises(error, match=pattern):
        nlnn.add_adapters(model, None, ranks, target_parameters=targets, init=init, seed=0)
    _assert_unchanged(model, before)


def test_no_targets_at_all_is_refused():
    model = Everything()
    with pytest.raises(ValueError, match="target_parameters="):
        nlnn.add_adapters(model, None, 2, target_parameters=[])


def test_parameter_adapter_refuses_a_one_dimensional_parameter():
    with pytest.raises(ValueError, match=r"at least 2 modes, got shape \(5,\)"):
        nlnn.ParameterAdapter(nn.Parameter(torch.ones(5)), 2)


# -- TuckerDelta as a parametrization -----------------------------------------------------------


def _randomize(delta: nlnn.TuckerDelta, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _einsum_delta(core: torch.Tensor, factors: list[torch.Tensor], scale: float) -> torch.Tensor:
    letters, outs = "abcde"[: core.ndim], "ijklm"[: core.ndim]
    operands = ",".join(f"{o}{i}" for o, i in zip(outs, letters, strict=True))
    return scale * torch.einsum(f"{letters},{operands}->{outs}", core, *factors)


def test_tucker_delta_registered_as_a_parametrization_gives_w_plus_delta():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5).to(F64)
    w0 = layer.weight.detach().clone()
    delta = nlnn.TuckerDelta((5, 6), (2, 3), init="orthogonal", scale=1.5, dtype=F64, seed=0)
    _randomize(delta, 1)
    parametrize.register_parametrization(layer, "weight", delta)
    expected = w0 + _einsum_delta(delta.core.detach(), [f.detach() for f in delta.factors], 1.5)
    torch.testing.assert_close(layer.weight, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(layer.parametrizations.weight.original, w0)

    # gradients of a loss through the layer, against a hand-written einsum reference
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2), dtype=F64)
    layer(x).square().sum().backward()
    core = delta.core.detach().clone().requires_grad_(True)
    factors = [f.detach().clone().requires_grad_(True) for f in delta.factors]
    w = w0.clone().requires_grad_(True)
    F.linear(x, w + _einsum_delta(core, factors, 1.5), layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(delta.core.grad, core.grad, rtol=1e-10, atol=1e-12)
    for got, want in zip(delta.factors, factors, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.parametrizations.weight.original.grad, w.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "shape, ranks", [((5, 4), (2, 3)), ((5, 4, 3), (3, 2, 2)), ((5, 4, 3, 2), (3, 2, 2, 1))]
)
def test_tucker_delta_forward_gradients_match_einsum(shape, ranks):
    delta = nlnn.TuckerDelta(shape, ranks, scale=0.7, dtype=F64, seed=0)
    _randomize(delta, 4)
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    (delta() * weights).sum().backward()
    core = delta.core.detach().clone().requires_grad_(True)
    factors = [f.detach().clone().requires_grad_(True) for f in delta.factors]
    dense = _einsum_delta(core, factors, 0.7)
    torch.testing.assert_close(delta().detach(), dense.detach(), rtol=1e-12, atol=1e-12)
    (dense * weights).sum().backward()
    torch.testing.assert_close(delta.core.grad, core.grad, rtol=1e-10, atol=1e-12)
    for got, want in zip(delta.factors, factors, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)


def test_tucker_delta_refuses_a_weight_of_another_shape():
    delta = nlnn.TuckerDelta((5, 4), 2, seed=0)
    with pytest.raises(ValueError, match=r"weight has shape \(4, 5\) but this delta has shape \(5, 4\)"):
        delta(torch.zeros(4, 5))


# -- two parameters of one module ---------------------------------------------------------------


@pytest.mark.parametrize("merge", [False, True])
def test_two_parameters_of_one_module(merge):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(moe=Experts())).to(F64)
    owner, x = model.moe, CASES[2].input()
    originals = {name: owner._parameters[name] for name in ("gate", "w_up")}
    values = {name: p.detach().clone() for name, p in originals.items()}
    with torch.no_grad():
        reference = model(x)
    nlnn.add_adapters(model, None, 2, target_parameters=["moe.gate", "moe.w_up"], init="principal", seed=0)
    assert [n for n, _ in nlnn.iter_adapters(model)] == ["moe.gate", "moe.w_up"]
    perturb_adapters(model)
    with torch.no_grad():
        y = model(x)
    nlnn.remove_adapters(model, merge=merge)
    assert type(owner) is Experts and not parametrize.is_parametrized(owner)
    for name, p in originals.items():
        assert owner._parameters[name] is p
        if not merge:
            torch.testing.assert_close(p.detach(), values[name], rtol=0, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference if not merge else y, rtol=1e-10, atol=1e-10)


def test_two_parameters_of_one_module_keep_their_order():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(moe=Experts())).to(F64)
    keys = list(model.state_dict())
    nlnn.add_adapters(model, None, 2, target_parameters=["moe.gate", "moe.w_up"], seed=0)
    nlnn.remove_adapters(model, merge=False)
    assert list(model.moe._parameters) == ["gate", "w_up", "bias"]
    assert list(model.state_dict()) == keys


def test_a_parameter_of_a_targeted_module_is_refused_up_front():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(8, 6), out=nn.Linear(6, 2))).to(F64)
    before = _snapshot(model)
    with pytest.raises(ValueError) as info:
        nlnn.add_adapters(model, ["fc"], 2, target_parameters=["fc.weight"], seed=0)
    _assert_unchanged(model, before)
    assert "fc.weight" in str(info.value)
