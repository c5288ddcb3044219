"""add_adapters / merge_adapters / unmerge_adapters / remove_adapters on whole models."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from ndlowrank import nn as nlnn  # noqa: E402

from _helpers import perturb_adapters  # noqa: E402

F64 = torch.float64
CONVS = ["stem", "block.conv1", "block.conv2"]
TARGETS = [*CONVS, "head"]


class Net(nn.Module):
    """A small conv net: a stem, a depthwise-separable block, a linear head and a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"),
                act=nn.ReLU(),
                conv2=nn.Conv2d(8, 8, 1),
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 5)
        self.norm = nn.LayerNorm(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(torch.relu(self.stem(x)))
        return self.norm(self.head(self.pool(x).flatten(1)))


def make_net(dtype: torch.dtype = F64, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


def _input(dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)


def _adapters(model: nn.Module) -> dict[str, nlnn.TuckerAdapter]:
    return dict(nlnn.iter_adapters(model))


def _adapter_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".delta." in n}


def _same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


# -- selecting targets --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "targets, expected",
    [
        (["stem", "block.conv1"], ["stem", "block.conv1"]),  # exact names
        (["conv2", "head"], ["block.conv2", "head"]),  # dotted suffixes
        (r"block\.conv\d", ["block.conv1", "block.conv2"]),  # a regex, matched in full
        (r"stem|head", ["stem", "head"]),
        (["conv1", "block.conv1"], ["block.conv1"]),  # selected twice, wrapped once
    ],
)
def test_targets_by_name_suffix_and_regex(targets, expected):
    model = nlnn.add_adapters(make_net(), targets, 2, seed=0)
    assert sorted(_adapters(model)) == sorted(expected)
    for name in expected:
        assert isinstance(model.get_submodule(name), nlnn.TuckerAdapter)


def test_a_suffix_matches_whole_name_parts_only():
    with pytest.raises(ValueError, match=r"target module 'onv1' matches no module"):
        nlnn.add_adapters(make_net(), ["onv1"], 2)
    with pytest.raises(ValueError, match=r"target_modules='conv1' \(a regex\) matches no module"):
        nlnn.add_adapters(make_net(), "conv1", 2)  # a regex must match the full name


@pytest.mark.parametrize("targets", [["stem", "nope"], "nothing_here", [], None])
def test_a_target_that_matches_nothing_is_a_value_error_and_leaves_the_model_unchanged(targets):
    model = make_net()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as info:
        nlnn.add_adapters(model, targets, 2, init="principal")
    if targets:
        assert (targets[-1] if isinstance(targets, list) else targets) in str(info.value)
    assert not _adapters(model)
    assert _same_state(model, state)
    assert all(p.requires_grad for p in model.parameters())


def test_an_unsupported_module_type_is_a_type_error():
    model = make_net()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(
        TypeError, match=r"module 'norm': cannot adapt a LayerNorm; supported layers: Linear, Conv1d, "
    ):
        nlnn.add_adapters(model, ["stem", "norm"], 2, init="principal")
    assert not _adapters(model)
    assert _same_state(model, state)


def test_int_ranks_are_clipped_per_mode():
    model = nlnn.add_adapters(make_net(), TARGETS, 8, seed=0)
    ranks = {name: a.ranks for name, a in _adapters(model).items()}
    assert ranks == {
        "stem": (8, 3, 3, 3),
        "block.conv1": (8, 1, 3, 3),  # depthwise (C, 1, 3, 3)
        "block.conv2": (8, 8, 1, 1),
        "head": (5, 8),
    }


@pytest.mark.parametrize("init", ["zero_core", "principal"])
def test_tuple_ranks_are_strict_and_the_error_names_module_mode_rank_and_size(init):
    model = make_net()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"'block\.conv1': ranks\[1\]=3 .*mode 1 of size 1"):
        nlnn.add_adapters(model, CONVS, (4, 3, 3, 3), init=init)
    assert not _adapters(model)
    assert all(type(model.get_submodule(n)) is nn.Conv2d for n in CONVS)
    if init == "zero_core":
        assert _same_state(model, state)
    else:  # ranks are checked before any principal init changes a weight
        assert _same_state(model, state)


def test_failed_add_adapters_after_a_principal_init_leaves_the_weights_bit_identical():
    model = make_net()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"'block\.conv1'"):
        nlnn.add_adapters(model, CONVS, (4, 3, 3, 3), init="principal")
    assert torch.equal(model.stem.weight, state["stem.weight"])


def test_rank_pattern_overrides_ranks_for_matching_layers():
    model = nlnn.add_adapters(
        make_net(),
        TARGETS,
        2,
        rank_pattern={"conv2": 4, r"block\.conv\d": (3, 1, 2, 2), "stem": (2, 3, 1, 1)},
        seed=0,
    )
    ranks = {name: a.ranks for name, a in _adapters(model).items()}
    assert ranks == {
        "stem": (2, 3, 1, 1),
        "block.conv1": (3, 1, 2, 2),  # the regex key
        "block.conv2": (4, 4, 1, 1),  # "conv2" matches a dotted suffix and comes first
        "head": (2, 2),  # no key: the default
    }


def test_rank_pattern_ranks_are_validated_with_the_module_name():
    with pytest.raises(ValueError, match=r"'head': ranks\[1\]=9 .*mode 1 of size 8"):
        nlnn.add_adapters(make_net(), TARGETS, 2, rank_pattern={"head": (2, 9)})


def test_only_adapter_parameters_are_trainable():
    model = nlnn.add_adapters(make_net(), TARGETS, 2, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    held = {
        "block.conv2.delta.factors.2",
        "block.conv2.delta.factors.3",
    }  # the 1×1 kernel's factors, held at 1
    expected = {n for n, _ in model.named_parameters() if ".delta." in n} - held
    assert trainable == expected
    assert len(expected) == 3 * 5 + 3 - 2  # three convs (core + 4 factors) and the head (core + 2)
    nlnn.mark_only_adapters_trainable(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


def test_add_adapters_twice_never_nests_adapters():
    model = nlnn.add_adapters(make_net(), ["stem", "head"], 2, seed=0)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="already has an adapter"):  # the same targets again
        nlnn.add_adapters(model, ["stem", "head"], 2, seed=0)
    assert _same_state(model, state)
    nlnn.add_adapters(model, r".*conv\d|stem|head", 2, seed=0)  # only the new layers are wrapped
    assert sorted(_adapters(model)) == sorted(TARGETS)
    for name, adapter in _adapters(model).items():
        assert not isinstance(adapter.base_layer, nlnn.TuckerAdapter), name
        assert not any(isinstance(m, nlnn.TuckerAdapter) for m in adapter.base_layer.modules())
    for name in ("stem", "head"):  # the first adapters were kept as they were
        prefix = f"{name}."
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items() if k.startswith(prefix))


def test_seed_makes_add_adapters_reproducible():
    first = nlnn.add_adapters(make_net(), TARGETS, 3, init="orthogonal", seed=0)
    second = nlnn.add_adapters(make_net(), TARGETS, 3, init="orthogonal", seed=0)
    other = nlnn.add_adapters(make_net(), TARGETS, 3, init="orthogonal", seed=1)
    a, b, c = _adapter_params(first), _adapter_params(second), _adapter_params(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].any())
    # every layer draws its own stream: equal shapes, different numbers
    assert not torch.equal(a["block.conv2.delta.factors.0"], a["block.conv1.delta.factors.0"])


def test_torch_manual_seed_controls_seed_none():
    def build(seed: int) -> dict[str, torch.Tensor]:
        model = make_net()
        torch.manual_seed(seed)
        return _adapter_params(nlnn.add_adapters(model, TARGETS, 3, init="zero_factor"))

    a, b, c = build(5), build(5), build(6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].any())


@pytest.mark.parametrize("init", ["zero_core", "zero_factor", "orthogonal", "principal"])
def test_add_adapters_leaves_the_output_unchanged(init):
    model, x = make_net(), _input()
    with torch.no_grad():
        expected = model(x)
        nlnn.add_adapters(model, TARGETS, 3, init=init, seed=0)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-10 if init == "principal" else 1e-12)


def test_options_reach_every_adapter():
    model = nlnn.add_adapters(make_net(), TARGETS, 2, scale=4.0, dropout=0.1, path="factorized", seed=0)
    for adapter in _adapters(model).values():
        assert (adapter.scale, adapter.dropout_p, adapter.path) == (4.0, 0.1, "factorized")
    with pytest.raises(ValueError, match=r"'stem': unknown path='fast'"):
        nlnn.add_adapters(make_net(), TARGETS, 2, path="fast")


# -- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["auto", "materialize", "factorized"])
def test_sgd_trains_only_the_adapters_and_lowers_the_loss(path):
    model = nlnn.add_adapters(make_net(), TARGETS, 3, path=path, seed=0)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = _adapter_params(model)
    x = _input()
    target = torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if name in base:
            assert p.grad is None, name
            assert torch.equal(p, base[name]), name  # frozen and bit-identical
    changed = {n for n, v in _adapter_params(model).items() if not torch.equal(v, start[n])}
    assert {n.split(".delta.")[0] for n in changed} == set(TARGETS)  # every adapter learned something


# -- merge, unmerge, remove ---------------------------------------------------------------------


def _adapted(init: str = "orthogonal", dtype: torch.dtype = F64) -> tuple[Net, Net]:
    original = make_net(dtype)
    model = nlnn.add_adapters(copy.deepcopy(original), TARGETS, 3, init=init, seed=0)
    perturb_adapters(model)
    return original, model


@pytest.mark.parametrize("init", ["orthogonal", "principal"])
def test_merge_twice_and_unmerge(init):
    _, model = _adapted(init)
    x = _input()
    weights = {n: a.weight.detach().clone() for n, a in _adapters(model).items()}
    with torch.no_grad():
        unmerged = model(x)
        assert nlnn.merge_adapters(model) is model
        assert all(a.merged for a in _adapters(model).values())
        merged_weights = {n: a.weight.detach().clone() for n, a in _adapters(model).items()}
        torch.testing.assert_close(model(x), unmerged, rtol=1e-10, atol=1e-12)
        nlnn.merge_adapters(model)
        for name, adapter in _adapters(model).items():
            assert torch.equal(adapter.weight, merged_weights[name])
        assert nlnn.unmerge_adapters(model) is model
        for name, adapter in _adapters(model).items():
            assert not adapter.merged
            torch.testing.assert_close(adapter.weight, weights[name], rtol=0, atol=1e-12)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-12, atol=1e-12)


def test_unmerge_restores_a_bfloat16_model_bit_for_bit():
    _, model = _adapted(dtype=torch.bfloat16)
    weights = {n: a.weight.detach().clone() for n, a in _adapters(model).items()}
    nlnn.merge_adapters(model)
    assert any(not torch.equal(a.weight, weights[n]) for n, a in _adapters(model).items())
    nlnn.unmerge_adapters(model)
    for name, adapter in _adapters(model).items():
        assert torch.equal(adapter.weight, weights[name]), name


@pytest.mark.parametrize("init", ["orthogonal", "principal"])
@pytest.mark.parametrize("merged_first", [False, True])
def test_remove_adapters_with_merge_keeps_the_fine_tuned_function(init, merged_first):
    original, model = _adapted(init)
    x = _input()
    with torch.no_grad():
        expected = model(x)
        if merged_first:
            nlnn.merge_adapters(model)
        plain = nlnn.remove_adapters(model, merge=True)
        assert plain is model
        assert not _adapters(plain)
        assert [type(m) for m in plain.modules()] == [type(m) for m in original.modules()]
        assert list(plain.state_dict()) == list(original.state_dict())
        torch.testing.assert_close(plain(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("init", ["orthogonal", "principal"])
@pytest.mark.parametrize("merged_first", [False, True])
def test_remove_adapters_without_merge_gives_back_the_original_weights(init, merged_first):
    original, model = _adapted(init)
    x = _input()
    if merged_first:
        nlnn.merge_adapters(model)
    plain = nlnn.remove_adapters(model, merge=False)
    assert [type(m) for m in plain.modules()] == [type(m) for m in original.modules()]
    state, expected = plain.state_dict(), original.state_dict()
    assert list(state) == list(expected)
    for key in expected:
        torch.testing.assert_close(state[key], expected[key], rtol=0, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), original(x), rtol=1e-10, atol=1e-12)


def test_merge_with_a_non_finite_delta_is_refused_per_layer():
    _, model = _adapted()
    with torch.no_grad():
        model.head.delta.core.fill_(float("inf"))
    head_weight = model.head.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        nlnn.merge_adapters(model)
    assert not model.head.merged
    assert torch.equal(model.head.weight, head_weight)
    with pytest.raises(ValueError, match="NaN or Inf"):
        nlnn.remove_adapters(model, merge=True)
    assert torch.equal(model.head.base_layer.weight, head_weight)


def test_merge_adapters_with_a_non_finite_delta_changes_no_layer():
    _, model = _adapted()
    with torch.no_grad():
        model.head.delta.core.fill_(float("inf"))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="NaN or Inf"):
        nlnn.merge_adapters(model)
    assert not any(a.merged for a in _adapters(model).values())
    assert _same_state(model, state)


# -- dtypes and devices -------------------------------------------------------------------------


def test_bfloat16_model_trains_with_float32_adapters():
    model = nlnn.add_adapters(make_net(torch.bfloat16), TARGETS, 2, init="orthogonal", seed=0)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".delta." in n)
    perturb_adapters(model)
    out = model(_input(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad
    )
    matched = nlnn.add_adapters(make_net(torch.bfloat16), TARGETS, 2, dtype=torch.bfloat16, seed=0)
    assert all(p.dtype == torch.bfloat16 for p in matched.parameters())
    assert matched(_input(torch.bfloat16)).dtype == torch.bfloat16


def test_model_to_float64_moves_everything():
    model = nlnn.add_adapters(make_net(torch.float32), TARGETS, 2, init="principal")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = _input(torch.float32)
    with torch.no_grad():
        expected = model(x).double()
    model = model.to(F64)
    state = model.state_dict()
    assert all(t.dtype == F64 for k, t in state.items() if not k.endswith("_extra_state"))  # the merged flags
    with torch.no_grad():
        out = model(x.double())
    assert out.dtype == F64
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    nlnn.remove_adapters(model, merge=False)
    torch.testing.assert_close(
        model.stem.weight, make_net(torch.float32).stem.weight.double(), rtol=0, atol=1e-6
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", ["materialize", "factorized"])
def test_adapters_built_on_cuda_match_cpu(path):
    cpu = nlnn.add_adapters(make_net(), TARGETS, 3, init="orthogonal", path=path, seed=0)
    gpu = nlnn.add_adapters(make_net().cuda(), TARGETS, 3, init="orthogonal", path=path, seed=0)
    assert all(t.is_cuda for t in gpu.state_dict().values())
    for key, value in cpu.state_dict().items():  # the same seed gives the same numbers on cuda
        torch.testing.assert_close(gpu.state_dict()[key].cpu(), value, rtol=0, atol=0)
    perturb_adapters(cpu)
    gpu.load_state_dict(cpu.state_dict())
    x = _input()
    out_cpu, out_gpu = cpu(x), gpu(x.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-9, atol=1e-10)
    out_cpu.square().sum().backward()
    out_gpu.square().sum().backward()
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        if p_cpu.requires_grad:
            torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-9, atol=1e-10, msg=name)
