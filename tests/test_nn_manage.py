"""disable_adapters / enable_adapters and set_adapter_scale: against the unadapted model and float64 einsum references."""

from __future__ import annotations

import copy
import os

import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from ndlowrank import nn as nlnn  # noqa: E402

from _helpers import einsum_tucker, perturb_adapters  # noqa: E402

F64 = torch.float64


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(2).transpose(1, 2)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.fc(h.mean(1))


def _base(dtype: torch.dtype = F64) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def _adapted(init: str, dtype: torch.dtype = F64) -> tuple[Net, Net]:
    base = _base(dtype)
    model = nlnn.add_adapters(
        copy.deepcopy(base), ["conv", "fc"], 2, init=init, target_parameters=["attn.in_proj_weight"], seed=0
    )
    perturb_adapters(model)
    return base, model


def _x(dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: a.weight.detach().clone() for name, a in nlnn.iter_adapters(model)}


@pytest.mark.parametrize("init", ["zero_core", "principal"])
@pytest.mark.parametrize("merged", [False, True])
def test_disabled_adapters_give_the_unadapted_models_output_and_come_back(init, merged):
    base, model = _adapted(init)
    x = _x()
    if merged:
        nlnn.merge_adapters(model)
    adapted, weights = model(x), _weights(model)
    assert not torch.allclose(adapted, base(x))
    with nlnn.disable_adapters(model) as disabled:
        assert len(disabled.switched) == 3
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-12)
    assert all(not a.disabled and a.merged == merged for _, a in nlnn.iter_adapters(model))
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-12)
    for name, weight in _weights(model).items():
        torch.testing.assert_close(weight, weights[name], rtol=0, atol=1e-12)
        if not merged:  # nothing was recomputed: the very same numbers
            assert torch.equal(weight, weights[name])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_disabling_a_merged_low_precision_model_keeps_its_weights_bit_for_bit(dtype):
    base, model = _adapted("principal", dtype)
    nlnn.merge_adapters(model)
    weights = _weights(model)
    with nlnn.disable_adapters(model):
        pass
    for name, weight in _weights(model).items():
        assert torch.equal(weight, weights[name]), name
    nlnn.unmerge_adapters(model)
    nlnn.remove_adapters(model, merge=False)
    for key, value in base.state_dict().items():  # the principal start comes off exactly as it went on
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-2)


def test_disable_without_with_enable_nesting_and_gradients():
    base, model = _adapted("zero_core")
    x = _x()
    adapted = model(x).detach()
    nlnn.disable_adapters(model)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-12)
    assert not model(x).requires_grad  # the adapters are not in the graph
    with nlnn.disable_adapters(model) as inner:  # already off: nothing to switch, stays off after
        assert inner.switched == []
    assert all(a.disabled for _, a in nlnn.iter_adapters(model))
    nlnn.enable_adapters(model)
    assert torch.equal(model(x), adapted)
    model(x).sum().backward()
    assert all(p.grad is not None for _, a in nlnn.iter_adapters(model) for p in a.delta.parameters())
    with pytest.raises(RuntimeError, match="boom"), nlnn.disable_adapters(model):
        raise RuntimeError("boom")
    assert not any(a.disabled for _, a in nlnn.iter_adapters(model))  # switched on again after an error


def test_a_disabled_adapter_refuses_merge_unmerge_and_load_but_saves_and_removes(tmp_path):
    base, model = _adapted("principal")
    x = _x()
    path = os.fspath(tmp_path / "a.safetensors")
    adapted = model(x).detach()
    with nlnn.disable_adapters(model):
        with pytest.raises(ValueError, match="disabled adapter; enable it first"):
            nlnn.merge_adapters(model)
        with pytest.raises(ValueError, match="disabled adapter; enable it first"):
            nlnn.unmerge_adapters(model)
        nlnn.save_adapters(model, path)
        with pytest.raises(ValueError, match=r"disabled; call ndlowrank\.nn\.enable_adapters"):
            nlnn.load_adapters(model, path)
    torch.testing.assert_close(nlnn.load_adapters(copy.deepcopy(base), path)(x), adapted, rtol=0, atol=1e-12)
    merged = copy.deepcopy(model)
    nlnn.disable_adapters(merged)
    torch.testing.assert_close(nlnn.remove_adapters(merged, merge=True)(x), adapted, rtol=0, atol=1e-12)
    nlnn.disable_adapters(model)
    torch.testing.assert_close(nlnn.remove_adapters(model, merge=False)(x), base(x), rtol=0, atol=1e-12)


def test_truncating_while_disabled_is_merged_again_with_the_new_delta():
    _, model = _adapted("zero_core")
    nlnn.merge_adapters(model)
    with nlnn.disable_adapters(model):
        nlnn.truncate_adapters(model, ranks=1)
    reference = copy.deepcopy(model)
    nlnn.unmerge_adapters(reference)
    torch.testing.assert_close(model(_x()), reference(_x()), rtol=0, atol=1e-12)


# -- set_adapter_scale --------------------------------------------------------------------------


def _reference_weight(adapter: nlnn.TuckerAdapter, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale · G ×₁ A₁ …`` in float64 numpy (einsum)."""
    core = adapter.delta.core.detach().double().numpy()
    factors = [f.detach().double().numpy() for f in adapter.delta.factors]
    return torch.from_numpy(weight.double().numpy() + scale * einsum_tucker(core, factors))


@settings(max_examples=15, deadline=None)
@given(scale=st.floats(-4, 4, allow_nan=False), merged=st.booleans())
def test_set_scale_computes_w_plus_scaled_delta_and_unmerges_to_w(scale, merged):
    base, model = _adapted("zero_core")
    adapter = model.fc
    if merged:
        nlnn.merge_adapters(model)
    nlnn.set_adapter_scale(model, scale)
    assert all(a.scale == scale for _, a in nlnn.iter_adapters(model))
    expected = _reference_weight(adapter, base.fc.weight.detach(), scale)
    x = torch.randn(5, 4, dtype=F64)
    torch.testing.assert_close(model.fc(x), x @ expected.T + base.fc.bias, rtol=0, atol=1e-12)
    nlnn.unmerge_adapters(model)
    torch.testing.assert_close(model.fc.weight, base.fc.weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_set_scale_while_merged_unmerges_bit_for_bit_in_low_precision(dtype):
    _, model = _adapted("zero_core", dtype)
    original = {name: w.clone() for name, w in _weights(model).items()}
    nlnn.merge_adapters(model)
    nlnn.set_adapter_scale(model, 3.0)
    fresh = copy.deepcopy(model)  # a model that was merged at scale 3 directly
    nlnn.unmerge_adapters(fresh)
    nlnn.merge_adapters(fresh)
    for name, weight in _weights(model).items():
        assert torch.equal(weight, _weights(fresh)[name]), name
    nlnn.unmerge_adapters(model)
    for name, weight in _weights(model).items():
        assert torch.equal(weight, original[name]), name


def test_set_scale_by_name_and_bad_input_change_nothing():
    base, model = _adapted("zero_core")
    nlnn.set_adapter_scale(model, 0.0, targets=["fc"])
    assert model.fc.scale == 0.0 and model.conv.scale == 1.0
    model.conv.scale = 3.0  # the property goes through set_scale too
    assert model.conv.delta.scale == 3.0
    with pytest.raises(ValueError, match="must be a finite number"):
        model.conv.scale = float("nan")
    model.conv.scale = 1.0
    nlnn.merge_adapters(model)
    with nlnn.disable_adapters(model):  # while disabled: merged again at the new scale after
        nlnn.set_adapter_scale(model, 0.5, targets=["conv"])
    assert model.conv.merged and model.conv.scale == 0.5
    expected = _reference_weight(model.conv, base.conv.weight.detach(), 0.5)
    torch.testing.assert_close(model.conv.weight, expected, rtol=0, atol=1e-12)
    nlnn.unmerge_adapters(model)
    for bad in (float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="must be a finite number"):
            nlnn.set_adapter_scale(model, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"targets \['nope'\] are not adapted in the model"):
        nlnn.set_adapter_scale(model, 2.0, targets=["nope"])
    assert model.fc.scale == 0.0 and model.conv.scale == 0.5


def test_set_scale_that_overflows_a_merged_weight_is_all_or_nothing():
    _, model = _adapted("zero_core", torch.float16)
    with torch.no_grad():
        model.fc.delta.core.mul_(1e3)  # only this adapter overflows float16 at a large scale
    nlnn.merge_adapters(model)
    weights = _weights(model)
    with pytest.raises(ValueError, match="'fc': merging would put NaN or Inf"):
        nlnn.set_adapter_scale(model, 2e3)
    assert all(a.scale == 1.0 for _, a in nlnn.iter_adapters(model))
    for name, weight in _weights(model).items():
        assert torch.equal(weight, weights[name]), name


def test_set_scale_rollback_puts_back_each_active_adapters_own_scale():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).half()
    model = nlnn.add_adapters(model, ["0", "1"], ranks=2, init="orthogonal", seed=0)
    model = nlnn.add_adapters(
        model, ["0", "1"], ranks=2, init="orthogonal", scale=0.5, adapter_name="b", seed=1
    )
    with torch.no_grad():
        for _, adapter in nlnn.iter_adapters(model):
            for name in adapter.adapter_names:
                adapter.delta_of(name).core.normal_()
        model[1].delta.core.mul_(1e3)  # only the second layer overflows float16 at a large scale
    nlnn.set_active_adapter(model, ["default", "b"])
    nlnn.merge_adapters(model)
    scales = {(k, n): a.delta_of(n).scale for k, a in nlnn.iter_adapters(model) for n in a.adapter_names}
    weights = [layer.base_layer.weight.clone() for layer in model]
    with pytest.raises(ValueError, match="'1': merging would put NaN or Inf"):
        nlnn.set_adapter_scale(model, 2e3)
    assert {
        (k, n): a.delta_of(n).scale for k, a in nlnn.iter_adapters(model) for n in a.adapter_names
    } == scales
    for layer, weight in zip(model, weights, strict=True):
        assert torch.equal(layer.base_layer.weight, weight)


def test_peft_set_scale_on_a_merged_layer_corrupts_the_weight_and_ours_does_not():
    """The PEFT behaviour the docs describe: its unmerge after set_scale subtracts the rescaled delta."""
    from _helpers import import_peer

    peft = import_peer("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4)).double()
    weight = base[0].weight.detach().clone()
    lora = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(target_modules=["0"], r=2, init_lora_weights=False)
    )
    layer = lora.base_model.model[0]
    layer.merge()
    layer.set_scale("default", 2.0)
    layer.unmerge()
    assert not torch.allclose(layer.base_layer.weight, weight)
    model = nlnn.add_adapters(copy.deepcopy(base), ["0"], 2, seed=0)
    perturb_adapters(model)
    nlnn.merge_adapters(model)
    nlnn.set_adapter_scale(model, 2.0)
    nlnn.unmerge_adapters(model)
    torch.testing.assert_close(model[0].weight, weight, rtol=0, atol=1e-12)


def test_peft_leaves_a_merged_model_unmerged_after_disable_adapter_and_ours_merges_it_again():
    """The PEFT behaviour the docs describe, beside ours on the same model."""
    from _helpers import import_peer

    peft = import_peer("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4)).double()
    x = torch.randn(3, 4, dtype=F64)
    lora = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(target_modules=["0"], r=2, init_lora_weights=False)
    )
    lora.merge_adapter()
    with lora.disable_adapter():
        torch.testing.assert_close(lora(x), base(x))
    assert not lora.base_model.model[0].merged  # PEFT: unmerged inside forward, left so
    model = nlnn.add_adapters(copy.deepcopy(base), ["0"], 2, seed=0)
    perturb_adapters(model)
    nlnn.merge_adapters(model)
    with nlnn.disable_adapters(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-12)
    assert model[0].merged


@settings(max_examples=12, deadline=None)
@given(
    init=st.sampled_from(["zero_core", "zero_factor", "orthogonal", "principal"]),
    merged=st.booleans(),
    groups=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_disabled_adapters_compute_the_unadapted_model_whatever_the_init_and_geometry(
    init, merged, groups, seed
):
    torch.manual_seed(seed)
    base = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=groups, padding_mode="reflect"), nn.Flatten(), nn.Linear(64, 3)
    ).double()
    x = torch.randn(2, 4, 4, 4, dtype=F64)
    model = nlnn.add_adapters(copy.deepcopy(base), [nn.Conv2d, nn.Linear], 2, init=init, seed=seed)
    perturb_adapters(model, seed=seed)
    if merged:
        nlnn.merge_adapters(model)
    adapted = model(x).detach()
    with nlnn.disable_adapters(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-12)
