"""Several named adapters on one model: against float64 einsum references and PEFT's LoRA with the same deltas."""

from __future__ import annotations

import copy
import os

import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from ndlowrank import nn as nlnn  # noqa: E402

from _helpers import einsum_tucker, import_peer, perturb_adapters  # noqa: E402

F64 = torch.float64


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(self.conv(x).mean((2, 3)))))


def _base() -> Net:
    torch.manual_seed(0)
    return Net().to(F64)


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)


def _two(base: Net) -> nn.Module:
    """``default`` on conv, fc1, fc2 and ``b`` (other ranks and scale) on fc1, fc2; both trained."""
    model = nlnn.add_adapters(copy.deepcopy(base), ["conv", "fc1", "fc2"], 2, seed=0)
    perturb_adapters(model, seed=2)
    model = nlnn.add_adapters(
        model, ["fc1", "fc2"], 1, scale=0.5, init="orthogonal", adapter_name="b", seed=1
    )
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            for p in model.get_submodule(name).delta_of("b").parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=F64))
    return model


def _delta(host: nlnn.TuckerAdapter, name: str) -> torch.Tensor:
    """``scale · G ×₁ A₁ …`` of the adapter ``name`` in float64 numpy."""
    delta = host.delta_of(name)
    core = delta.core.detach().double().numpy()
    factors = [f.detach().double().numpy() for f in delta.factors]
    return torch.from_numpy(delta.scale * einsum_tucker(core, factors))


def _reference(base: Net, model: nn.Module, chosen: dict[str, list[str]]) -> Net:
    """The base model with ``W + Σ ΔW`` of the adapters ``chosen[layer]`` put in by hand."""
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for layer, names in chosen.items():
            for name in names:
                reference.get_submodule(layer).weight.add_(_delta(model.get_submodule(layer), name))
    return reference


def test_the_active_adapter_runs_and_host_delta_is_its_delta():
    base = _base()
    model = _two(base)
    x = _x()
    assert nlnn.adapter_names(model) == ["default", "b"] and nlnn.active_adapters(model) == ["default"]
    assert [name for name, _ in nlnn.iter_adapters(model)] == ["conv", "fc1", "fc2"]
    all_default = {"conv": ["default"], "fc1": ["default"], "fc2": ["default"]}
    torch.testing.assert_close(model(x), _reference(base, model, all_default)(x), rtol=0, atol=1e-12)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "fc1.delta.core" in trainable and "fc1.named_deltas.b.core" not in trainable  # what runs trains
    nlnn.set_active_adapter(model, "b")
    assert model.fc1.delta is model.fc1.delta_of("b") and model.fc1.ranks == (1, 1) and model.fc1.scale == 0.5
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "fc1.delta.core" not in trainable and "fc1.named_deltas.b.core" in trainable
    assert model.conv.active_adapter is None  # no "b" there: the base weight alone
    torch.testing.assert_close(
        model(x), _reference(base, model, {"fc1": ["b"], "fc2": ["b"]})(x), rtol=0, atol=1e-12
    )
    # the first adapter keeps its place in the state_dict; the others are under named_deltas
    keys = [k for k in model.state_dict() if k.startswith("fc1.")]
    assert "fc1.delta.core" in keys and "fc1.named_deltas.b.core" in keys


def test_merging_and_switching_keep_the_weights_right():
    base = _base()
    model = _two(base)
    x = _x()
    nlnn.set_active_adapter(model, "b")
    expected = model(x).detach()
    nlnn.merge_adapters(model)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    nlnn.set_active_adapter(model, "default")  # unmerges "b" first
    assert not model.fc1.merged
    torch.testing.assert_close(model.fc1.weight, base.fc1.weight, rtol=0, atol=1e-12)
    with nlnn.disable_adapters(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-12)


def test_remove_adapters_merges_the_chosen_ones_summed():
    base = _base()
    model = _two(base)
    chosen = {"conv": ["default"], "fc1": ["default", "b"], "fc2": ["default", "b"]}
    reference = _reference(base, model, chosen)
    merged = nlnn.remove_adapters(copy.deepcopy(model), adapter_names=["default", "b"])
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value, rtol=0, atol=1e-12)
    only_b = nlnn.remove_adapters(copy.deepcopy(model), adapter_names=["b"])
    torch.testing.assert_close(only_b(_x()), _reference(base, model, {"fc1": ["b"], "fc2": ["b"]})(_x()))
    with pytest.raises(ValueError, match=r"adapter_names \['c'\] are not adapters"):
        nlnn.remove_adapters(model, adapter_names=["c"])
    with pytest.raises(ValueError, match="pass merge=True"):
        nlnn.remove_adapters(model, merge=False, adapter_names=["b"])


def test_delete_adapter():
    base = _base()
    model = _two(base)
    x = _x()
    b_output = nlnn.set_active_adapter(copy.deepcopy(model), "b")(x)
    nlnn.delete_adapter(model, "default")
    assert nlnn.adapter_names(model) == ["b"] and nlnn.active_adapters(model) == []
    assert type(model.conv) is nn.Conv2d and torch.equal(model.conv.weight, base.conv.weight)  # unwrapped
    assert "fc1.delta.core" in model.state_dict() and not any("named_deltas" in k for k in model.state_dict())
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-12)  # nothing active
    nlnn.set_active_adapter(model, "b")
    torch.testing.assert_close(model(x), b_output, rtol=0, atol=1e-12)
    nlnn.delete_adapter(model, "b")
    assert list(model.state_dict()) == list(base.state_dict())
    with pytest.raises(ValueError, match=r"no adapter named 'b'; its adapters: \[\]"):
        nlnn.delete_adapter(model, "b")


def test_save_and_load_by_name(tmp_path):
    base = _base()
    model = _two(base)
    x = _x()
    path = os.fspath(tmp_path / "b.safetensors")
    nlnn.save_adapters(model, path, adapter_name="b")
    assert set(nlnn.adapter_state_dict(model, adapter_name="b")) == {
        f"{layer}.{key}" for layer in ("fc1", "fc2") for key in ("core", "factors.0", "factors.1")
    }
    assert model.fc1.active_adapter == "default"  # saving changed nothing
    b_output = nlnn.set_active_adapter(copy.deepcopy(model), "b")(x)
    # into the plain base model: an adapter of that name, active
    alone = nlnn.load_adapters(copy.deepcopy(base), path, adapter_name="b")
    assert nlnn.adapter_names(alone) == ["b"]
    torch.testing.assert_close(alone(x), b_output, rtol=0, atol=1e-12)
    # into a model with another adapter: beside it, inactive until chosen
    other = nlnn.add_adapters(copy.deepcopy(base), ["conv", "fc1", "fc2"], 2, seed=0)
    nlnn.load_adapters(other, path, adapter_name="b")
    assert nlnn.adapter_names(other) == ["default", "b"] and nlnn.active_adapters(other) == ["default"]
    torch.testing.assert_close(nlnn.set_active_adapter(other, "b")(x), b_output, rtol=0, atol=1e-12)
    # into existing adapters of that name: copied in place
    weight = other.fc1.delta_of("b").core
    nlnn.load_adapters(other, path, adapter_name="b")
    assert other.fc1.delta_of("b").core is weight
    # the file is an ordinary adapter file: it loads without a name too
    torch.testing.assert_close(nlnn.load_adapters(copy.deepcopy(base), path)(x), b_output, rtol=0, atol=1e-12)


def test_a_failed_named_load_changes_nothing(tmp_path):
    base = _base()
    path = os.fspath(tmp_path / "a.safetensors")
    nlnn.save_adapters(_two(base), path, adapter_name="b")
    model = nlnn.add_adapters(copy.deepcopy(base), ["fc1"], 2, seed=0)
    model.fc2 = nn.Linear(6, 5).to(F64)  # the file's fc2 adapter does not fit
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="fc2"):
        nlnn.load_adapters(model, path, adapter_name="b")
    assert nlnn.adapter_names(model) == ["default"] and list(model.state_dict()) == list(state)


def test_bad_names_and_principal_are_refused_before_anything_changes():
    base = _base()
    model = nlnn.add_adapters(copy.deepcopy(base), ["fc1"], 2, init="principal", seed=0)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="'fc1': cannot add adapter 'b': a 'principal' adapter"):
        nlnn.add_adapters(model, ["fc1", "fc2"], 2, adapter_name="b")
    with pytest.raises(ValueError, match="'fc1': init='principal' changes the base weight"):
        nlnn.add_adapters(model, ["fc1"], 2, adapter_name="c", init="principal")
    for bad in ("a.b", "", 3):
        with pytest.raises(ValueError, match="must be a non-empty string without dots"):
            nlnn.add_adapters(model, ["fc2"], 2, adapter_name=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"no adapter named 'zz'; its adapters: \['default'\]"):
        nlnn.set_active_adapter(model, "zz")
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        nlnn.save_adapters(model, "unused.safetensors", adapter_name="zz")
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_a_layer_can_take_a_second_adapter_by_type_and_on_a_parameter():
    attention = nn.MultiheadAttention(8, 2, batch_first=True).double()
    model = nlnn.add_adapters(attention, None, 2, target_parameters=["in_proj_weight"], seed=0)
    model = nlnn.add_adapters(model, None, 1, target_parameters=["in_proj_weight"], adapter_name="b", seed=0)
    (name, host), *_ = nlnn.iter_adapters(model)
    assert name == "in_proj_weight" and host.adapter_names == ["default", "b"]
    net = nlnn.add_adapters(_base(), [nn.Linear], 2, seed=0)
    net = nlnn.add_adapters(net, [nn.Linear], 1, adapter_name="b", seed=0)
    assert net.fc1.adapter_names == ["default", "b"] and nlnn.select_targets(
        net, "all-linear", adapter_name="c"
    ) == [
        "fc1",
        "fc2",
    ]


def _lora_and_ours(b_layers: list[str]) -> tuple[nn.Module, nn.Module]:
    """PEFT LoRA adapters "default" (r=2, α=4, on 0 and 2) and "b" (r=1, α=3, on ``b_layers``), and the
    same deltas here: ``ΔW = s·A₀ G A₁ᵀ`` with ``A₀ = B``, ``A₁ = Aᵀ``, ``G = I``, ``s = α/r``."""
    peft = import_peer("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    specs = (("default", ["0", "2"], 2, 4), ("b", b_layers, 1, 3))
    lora = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(target_modules=specs[0][1], r=2, lora_alpha=4, init_lora_weights=False),
    )
    lora.add_adapter(
        "b", peft.LoraConfig(target_modules=b_layers, r=1, lora_alpha=3, init_lora_weights=False)
    )
    ours = copy.deepcopy(base)
    for name, layers, rank, alpha in specs:
        ours = nlnn.add_adapters(ours, layers, rank, scale=alpha / rank, adapter_name=name, seed=0)
        with torch.no_grad():
            for layer in layers:
                peft_layer = lora.base_model.model.get_submodule(layer)
                delta = ours.get_submodule(layer).delta_of(name)
                delta.factors[0].copy_(peft_layer.lora_B[name].weight)
                delta.factors[1].copy_(peft_layer.lora_A[name].weight.T)
                delta.core.copy_(torch.eye(rank, dtype=F64))
    return lora, ours


def test_switching_and_merging_chosen_adapters_matches_peft_lora():
    """The same LoRA deltas in PEFT (two named adapters) and here (ΔW = s·A₀ G A₁ᵀ with G = I)."""
    lora, ours = _lora_and_ours(["0", "2"])
    x = torch.randn(3, 6, dtype=F64)
    for name in ("default", "b"):
        lora.set_adapter(name)
        nlnn.set_active_adapter(ours, name)
        torch.testing.assert_close(ours(x), lora(x), rtol=0, atol=1e-12)
    merged_lora = lora.merge_and_unload(adapter_names=["default", "b"])
    merged_ours = nlnn.remove_adapters(ours, adapter_names=["default", "b"])
    for key, value in merged_lora.state_dict().items():
        torch.testing.assert_close(merged_ours.state_dict()[key], value, rtol=0, atol=1e-12)


# -- add_weighted_adapter -------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(
    w=st.lists(st.floats(-2, 2, allow_nan=False), min_size=2, max_size=2),
    ranks=st.lists(st.integers(1, 3), min_size=2, max_size=2),
)
def test_a_weighted_adapter_is_the_weighted_sum_of_deltas_exactly(w, ranks):
    base = _base()
    model = nlnn.add_adapters(copy.deepcopy(base), ["conv", "fc1"], ranks[0], init="orthogonal", seed=0)
    model = nlnn.add_adapters(model, ["conv", "fc2"], ranks[1], init="orthogonal", adapter_name="b", seed=1)
    perturb_adapters(model, seed=4)
    nlnn.set_active_adapter(model, "b")
    perturb_adapters(model, seed=5)
    nlnn.set_adapter_scale(model, 0.7, targets=["conv"])
    nlnn.add_weighted_adapter(model, ["default", "b"], w, "mix")
    chosen = {"conv": ["default", "b"], "fc1": ["default"], "fc2": ["b"]}
    weight = dict(zip(["default", "b"], w, strict=True))
    for layer, names in chosen.items():
        host = model.get_submodule(layer)
        expected = sum(weight[name] * _delta(host, name) for name in names)
        torch.testing.assert_close(_delta(host, "mix"), expected, rtol=0, atol=1e-12)
        assert all(r <= s for r, s in zip(host.delta_of("mix").ranks, host.weight.shape, strict=True))
    assert model.conv.active_adapter == "b"  # the new adapter is not active


def test_add_weighted_adapter_refuses_bad_input_and_changes_nothing():
    model = _two(_base())
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="one weight per adapter"):
        nlnn.add_weighted_adapter(model, ["default", "b"], [1.0], "mix")
    with pytest.raises(ValueError, match="more than once"):
        nlnn.add_weighted_adapter(model, ["b", "b"], [1.0, 1.0], "mix")
    with pytest.raises(ValueError, match="must be finite"):
        nlnn.add_weighted_adapter(model, ["b"], [float("nan")], "mix")
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        nlnn.add_weighted_adapter(model, ["c"], [1.0], "mix")
    with pytest.raises(ValueError, match="an adapter named 'b' is already here"):
        nlnn.add_weighted_adapter(model, ["default"], [1.0], "b")
    assert list(model.state_dict()) == list(state)


def test_add_weighted_adapter_matches_peft_cat():
    lora, ours = _lora_and_ours(["0", "2"])
    lora.add_weighted_adapter(["default", "b"], [0.6, -1.5], "mix", combination_type="cat")
    nlnn.add_weighted_adapter(ours, ["default", "b"], [0.6, -1.5], "mix")
    lora.set_adapter("mix")
    nlnn.set_active_adapter(ours, "mix")
    x = torch.randn(3, 6, dtype=F64)
    torch.testing.assert_close(ours(x), lora(x), rtol=0, atol=1e-12)


# -- several active adapters ----------------------------------------------------------------------


def test_several_active_adapters_run_summed_and_merge_exactly():
    base = _base()
    model = _two(base)
    nlnn.add_adapters(model, ["conv"], 2, adapter_name="b", seed=5)
    with torch.no_grad():
        model.conv.delta_of("b").core.normal_(generator=torch.Generator().manual_seed(6))
    x = _x()
    nlnn.set_active_adapter(model, ["default", "b"])
    assert nlnn.active_adapters(model) == ["default", "b"] and model.fc1.delta is model.fc1.delta_of(
        "default"
    )
    both = {"conv": ["default", "b"], "fc1": ["default", "b"], "fc2": ["default", "b"]}
    expected = _reference(base, model, both)(x)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    weights = {name: host.weight.detach().clone() for name, host in nlnn.iter_adapters(model)}
    nlnn.merge_adapters(model)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    nlnn.set_adapter_scale(model, 2.0)  # both deltas of each layer, kept right while merged
    assert model.fc1.delta_of("b").scale == model.fc1.delta_of("default").scale == 2.0
    nlnn.unmerge_adapters(model)
    for name, host in nlnn.iter_adapters(model):
        assert torch.equal(host.weight, weights[name]), name  # a summed merge keeps the weight to restore
    nlnn.merge_adapters(model)
    nlnn.truncate_adapters(model, ranks=1)  # every delta, each unmerged around its truncation
    merged_output = model(x)
    nlnn.unmerge_adapters(model)
    torch.testing.assert_close(merged_output, model(x), rtol=0, atol=1e-12)
    nlnn.delete_adapter(model, "default")
    assert nlnn.active_adapters(model) == ["b"]


def test_several_active_adapters_on_a_reflect_padded_conv_and_an_embedding():
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect").double()
    embedding = nn.Embedding(6, 4, padding_idx=0).double()
    for layer, x in ((conv, torch.randn(2, 2, 5, 5, dtype=F64)), (embedding, torch.tensor([[0, 3, 5]]))):
        model = nlnn.add_adapters(nn.Sequential(copy.deepcopy(layer)), ["0"], 2, seed=0)
        model = nlnn.add_adapters(model, ["0"], 1, adapter_name="b", seed=1)
        perturb_adapters(model)
        with torch.no_grad():
            model[0].delta_of("b").core.add_(1.0)
        nlnn.set_active_adapter(model, ["b", "default"])
        reference = copy.deepcopy(layer)
        with torch.no_grad():
            reference.weight.add_(_delta(model[0], "default") + _delta(model[0], "b"))
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-12)


def test_several_active_adapters_with_dropout_are_refused_before_anything_changes():
    model = nlnn.add_adapters(_base(), ["fc1", "fc2"], 2, dropout=0.1, seed=0)
    model = nlnn.add_adapters(model, ["fc2"], 1, adapter_name="b", dropout=0.1, seed=0)
    nlnn.set_active_adapter(model, "b")
    with pytest.raises(ValueError, match=r"cannot apply dropout=0\.1"):
        nlnn.set_active_adapter(model, ["default", "b"])
    assert model.fc1.active_adapters == () and model.fc2.active_adapters == ("b",)
    with pytest.raises(ValueError, match="each once"):
        nlnn.set_active_adapter(model, ["b", "b"])


def test_several_active_adapters_match_peft():
    lora, ours = _lora_and_ours(["2"])
    lora.base_model.set_adapter(["default", "b"])
    nlnn.set_active_adapter(ours, ["default", "b"])
    x = torch.randn(3, 6, dtype=F64)
    torch.testing.assert_close(ours(x), lora(x), rtol=0, atol=1e-12)


def test_a_named_adapter_added_to_more_layers_runs_where_that_name_runs(tmp_path):
    base = _base()
    model = nlnn.add_adapters(copy.deepcopy(base), ["fc1"], 2, adapter_name="b", seed=0)
    model = nlnn.add_adapters(model, ["conv"], 2, seed=0)  # "default" does not run yet
    assert model.conv.active_adapters == () and model.fc1.active_adapters == ("b",)
    model = nlnn.add_adapters(model, ["fc2", "conv"], 1, adapter_name="b", seed=0)  # "b" runs: so do these
    assert model.fc2.active_adapters == ("b",) and model.conv.active_adapters == ("b",)
    path = os.fspath(tmp_path / "b.safetensors")
    nlnn.save_adapters(model, path, adapter_name="b")
    other = nlnn.add_adapters(copy.deepcopy(base), ["fc1"], 2, seed=0)
    nlnn.load_adapters(other, path, adapter_name="b")  # "b" does not run there
    assert nlnn.active_adapters(other) == ["default"]
    inactive = nlnn.add_adapters(copy.deepcopy(base), ["fc1"], 2, adapter_name="b", seed=0)
    nlnn.set_active_adapter(nlnn.add_adapters(inactive, ["fc2"], 2, seed=0), "default")
    nlnn.load_adapters(inactive, path, adapter_name="b", strict=False)  # the file's "b" is not made to run
    assert inactive.fc1.active_adapters == () and inactive.conv.active_adapters == ()


def test_host_delta_follows_every_change_of_the_active_adapter():
    import pickle

    model = _two(_base())
    host = model.fc1
    assert host.delta is host.delta_of("default")
    nlnn.set_active_adapter(model, "b")
    assert host.delta is host.delta_of("b")
    for copied in (copy.deepcopy(host), pickle.loads(pickle.dumps(host))):
        assert copied.delta is copied.delta_of("b") and copied.delta is not host.delta
    replacement = nlnn.TuckerDelta((6, 4), 1, seed=0)
    nlnn.set_active_adapter(model, "default")
    host.delta = replacement  # assigning the first adapter's delta, as a load may
    assert host.delta is replacement and host.delta_of("default") is replacement
    nlnn.delete_adapter(model, "default")
    assert host.adapter_names == ["b"] and host.active_adapter is None
    nlnn.set_active_adapter(model, "b")
    assert host.delta is host.delta_of("b") and dict(host.named_children())["delta"] is host.delta


def test_saving_without_a_name_saves_what_runs(tmp_path):
    base = _base()
    model = _two(base)
    nlnn.set_active_adapter(model, "b")  # conv holds only "default", which does not run
    assert set(nlnn.adapter_state_dict(model)) == set(nlnn.adapter_state_dict(model, adapter_name="b"))
    nlnn.set_active_adapter(model, ["default", "b"])
    with pytest.raises(ValueError, match=r"several adapters run on \['fc1', 'fc2'\]; name the one"):
        nlnn.save_adapters(model, os.fspath(tmp_path / "a.safetensors"))
    nlnn.save_adapters(model, os.fspath(tmp_path / "a.safetensors"), adapter_name="default")
