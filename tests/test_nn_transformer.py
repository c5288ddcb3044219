"""Linears that their parent reads by attribute (attention's out_proj, the encoder layer's fast path).

``nn.MultiheadAttention`` passes ``out_proj.weight`` to ``F.multi_head_attention_forward`` and
``nn.TransformerEncoderLayer``'s inference fast path passes ``linear1.weight``/``linear2.weight``
to a fused kernel, so ``add_adapters`` gives these targets parameter adapters. The references
here are copies of the base layers whose weights are replaced by ``W + ΔW`` computed by hand.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

from ndlowrank import nn as nlnn  # noqa: E402

D, HEADS, FFN = 16, 2, 32
ROUTED = ["0.linear1", "0.linear2", "0.self_attn.out_proj"]
SCALE = 0.5


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.TransformerEncoderLayer(D, HEADS, FFN, dropout=0.0, batch_first=True)).eval()


def _adapted(base: nn.Module, targets=ROUTED, **options) -> nn.Module:
    model = nlnn.add_adapters(copy.deepcopy(base), targets, ranks=(4, 4), scale=SCALE, seed=0, **options)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero delta: random cores (stands in for training)
        for _, adapter in nlnn.iter_adapters(model):
            adapter.delta.core.copy_(torch.randn(adapter.delta.core.shape, generator=gen))
    return model


def _delta_by_hand(adapter) -> torch.Tensor:
    """``scale · A₀ G A₁ᵀ`` from the adapter's core and factors."""
    core = adapter.delta.core.detach()
    a0, a1 = (f.detach() for f in adapter.delta.factors)
    return adapter.scale * torch.einsum("ab,ia,jb->ij", core, a0, a1)


def _reference(base: nn.Module, model: nn.Module) -> nn.Module:
    """A copy of the base model whose adapted weights are ``W + ΔW``, with no adapter inside."""
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for name, adapter in nlnn.iter_adapters(model):
            reference.get_parameter(name).add_(_delta_by_hand(adapter))
    return reference


def _x() -> torch.Tensor:
    return torch.randn(3, 5, D, generator=torch.Generator().manual_seed(2))


def _outputs(model: nn.Module, x: torch.Tensor, monkeypatch) -> dict[str, torch.Tensor]:
    """The model's output in train mode, in eval mode with grad, and on the fused fast path."""
    fused = torch._transformer_encoder_layer_fwd
    calls = []

    def counting(*args):
        calls.append(1)
        return fused(*args)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting)
    out = {"train": model.train()(x).detach()}
    out["eval"] = model.eval()(x).detach()  # the fast path too once merged: nothing needs a gradient
    before = len(calls)
    with torch.no_grad():
        out["fast path"] = model(x)
    assert len(calls) == before + 1, "the encoder layer's fused fast path was not taken"
    return out


def test_routed_targets_get_parameter_adapters_and_plain_linears_layer_adapters():
    base = nn.Sequential(
        nn.TransformerEncoderLayer(D, HEADS, FFN, dropout=0.0, batch_first=True),
        nn.TransformerDecoderLayer(D, HEADS, FFN, dropout=0.0, batch_first=True),
        nn.Linear(D, 4),
    )
    targets = ["linear1", "linear2", "out_proj", "2"]
    model = nlnn.add_adapters(base, targets, ranks=4, rank_pattern={"0.linear2": (2, 3)}, seed=0)
    kinds = {name: type(adapter).__name__ for name, adapter in nlnn.iter_adapters(model)}
    assert kinds == {
        "0.self_attn.out_proj.weight": "ParameterAdapter",
        "0.linear1.weight": "ParameterAdapter",
        "0.linear2.weight": "ParameterAdapter",
        # the decoder layer calls its linears, but its attention blocks read out_proj.weight
        "1.self_attn.out_proj.weight": "ParameterAdapter",
        "1.multihead_attn.out_proj.weight": "ParameterAdapter",
        "1.linear1": "LinearAdapter",
        "1.linear2": "LinearAdapter",
        "2": "LinearAdapter",
    }
    # rank_pattern applies by the module's name
    assert dict(nlnn.iter_adapters(model))["0.linear2.weight"].ranks == (2, 3)
    assert isinstance(model[0].linear1, nn.Linear) and parametrize.is_parametrized(model[0].linear1, "weight")


def test_encoder_layer_sees_the_delta_on_every_path(monkeypatch):
    base, x = _base(), _x()
    model = _adapted(base)
    expected = _reference(base, model).eval()(x).detach()
    with torch.no_grad():
        plain = base(x)
    outputs = _outputs(model, x, monkeypatch)
    for path, output in outputs.items():
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5, msg=path)
        assert not torch.allclose(output, plain, atol=1e-3), path


def test_out_proj_adapter_gets_the_gradient_through_multihead_attention():
    torch.manual_seed(0)
    base = nn.MultiheadAttention(D, HEADS, batch_first=True)
    model = nlnn.add_adapters(copy.deepcopy(base), ["out_proj"], ranks=(4, 3), scale=SCALE, seed=0)
    adapter = dict(nlnn.iter_adapters(model))["out_proj.weight"]
    with torch.no_grad():
        adapter.delta.core.normal_()
    reference = copy.deepcopy(base)
    with torch.no_grad():
        reference.out_proj.weight.add_(_delta_by_hand(adapter))
    x = _x()
    out, _ = model(x, x, x)
    expected, _ = reference(x, x, x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    # the chain rule by hand: dL/dG = scale · A₀ᵀ (dL/dW) A₁
    grad_w = reference.out_proj.weight.grad
    a0, a1 = (f.detach() for f in adapter.delta.factors)
    assert adapter.delta.core.grad is not None
    torch.testing.assert_close(adapter.delta.core.grad, SCALE * a0.T @ grad_w @ a1, atol=1e-5, rtol=1e-4)
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in adapter.delta.factors)
    assert model.out_proj.parametrizations.weight.original.grad is None  # the base weight is frozen


def test_only_the_routed_adapters_train():
    model = _adapted(_base())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"{module}.parametrizations.weight.0.delta.{part}"
        for module in ROUTED
        for part in ("core", "factors.0", "factors.1")
    }


def _raw_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The stored (unparametrized) weight of every routed linear."""
    return {
        name: model.get_submodule(name).parametrizations.weight.original.detach().clone() for name in ROUTED
    }


def test_merge_and_unmerge_keep_the_outputs_and_give_the_weights_back(monkeypatch):
    base, x = _base(), _x()
    model = _adapted(base)
    stored = _raw_weights(model)
    expected = _reference(base, model).eval()(x).detach()
    nlnn.merge_adapters(model)
    nlnn.merge_adapters(model)  # twice does not add twice
    reference = _reference(base, model)
    assert all(adapter.merged for _, adapter in nlnn.iter_adapters(model))
    for name, weight in _raw_weights(model).items():  # W + ΔW stored in the weight itself
        torch.testing.assert_close(weight, reference.get_parameter(f"{name}.weight"))
    for path, output in _outputs(model, x, monkeypatch).items():
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5, msg=path)
    nlnn.unmerge_adapters(model)
    for name, weight in _raw_weights(model).items():  # float32 is unmerged by subtraction
        torch.testing.assert_close(weight, stored[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(model.eval()(x), expected, atol=1e-5, rtol=1e-5)


def test_unmerge_restores_bfloat16_weights_bit_for_bit():
    model = _adapted(_base().to(torch.bfloat16))
    stored = _raw_weights(model)
    nlnn.unmerge_adapters(nlnn.merge_adapters(model))
    assert all(torch.equal(weight, stored[name]) for name, weight in _raw_weights(model).items())


@pytest.mark.parametrize("merge_first", [False, True])
def test_remove_gives_plain_linears_back(merge_first):
    base = _base()
    model = _adapted(base)
    reference = _reference(base, model)
    if merge_first:
        nlnn.merge_adapters(model)
    unmerged = nlnn.remove_adapters(copy.deepcopy(model), merge=False)
    merged = nlnn.remove_adapters(copy.deepcopy(model), merge=True)
    for plain in (unmerged, merged):
        assert list(plain.state_dict()) == list(base.state_dict())
        assert not list(nlnn.iter_adapters(plain))
        for name in ROUTED:
            assert type(plain.get_submodule(name)) is type(base.get_submodule(name))
            assert not parametrize.is_parametrized(plain.get_submodule(name))
    for name in ROUTED:
        key = f"{name}.weight"
        if merge_first:  # merged then subtracted again: equal to rounding
            torch.testing.assert_close(
                unmerged.get_parameter(key), base.get_parameter(key), atol=1e-6, rtol=0
            )
        else:
            assert torch.equal(unmerged.get_parameter(key), base.get_parameter(key))
        torch.testing.assert_close(merged.get_parameter(key), reference.get_parameter(key))


def test_save_and_load_into_a_fresh_model_reproduce_the_outputs(tmp_path, monkeypatch):
    base, x = _base(), _x()
    model = _adapted(base, init="principal")
    path = tmp_path / "adapters.safetensors"
    nlnn.save_adapters(model, path)
    fresh = nlnn.load_adapters(copy.deepcopy(base), path)
    assert {n: type(a) for n, a in nlnn.iter_adapters(fresh)} == {
        f"{name}.weight": nlnn.ParameterAdapter for name in ROUTED
    }
    saved, loaded = _outputs(model, x, monkeypatch), _outputs(fresh, x, monkeypatch)
    for path_name in saved:
        torch.testing.assert_close(loaded[path_name], saved[path_name], atol=0, rtol=0, msg=path_name)
    # and into a model built the same way (adapters already there)
    again = nlnn.load_adapters(
        nlnn.add_adapters(copy.deepcopy(base), ROUTED, ranks=(4, 4), init="principal", scale=SCALE), path
    )
    with torch.no_grad():
        torch.testing.assert_close(again(x), saved["fast path"], atol=1e-6, rtol=1e-6)


def test_truncated_routed_adapters_still_drive_the_fast_path(monkeypatch):
    base, x = _base(), _x()
    model = _adapted(base)
    reports = nlnn.truncate_adapters(model, ranks=2)
    assert sorted(r.name for r in reports) == sorted(f"{name}.weight" for name in ROUTED)
    assert all(adapter.ranks == (2, 2) for _, adapter in nlnn.iter_adapters(model))
    expected = _reference(base, model).eval()(x).detach()
    for path, output in _outputs(model, x, monkeypatch).items():
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5, msg=path)


def test_dropout_on_a_routed_target_is_refused_and_the_model_is_unchanged():
    base = _base()
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"'0\.linear1'.*dropout=0\.0"):
        nlnn.add_adapters(model, ROUTED, ranks=4, dropout=0.1)
    # a plain linear keeps its dropout
    nlnn.add_adapters(nn.Sequential(nn.Linear(D, 4)), ["0"], ranks=2, dropout=0.1)
    assert not list(nlnn.iter_adapters(model))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters(), strict=True))


def test_a_bad_rank_on_a_routed_target_leaves_the_model_unchanged():
    base = _base()
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"'0\.linear2\.weight'"):
        nlnn.add_adapters(model, ROUTED, ranks=4, init="principal", rank_pattern={"linear2": (64, 4)})
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters(), strict=True))
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.skipif(
    not hasattr(nn, "LinearCrossEntropyLoss"), reason="this torch has no LinearCrossEntropyLoss"
)
def test_linear_cross_entropy_loss_reads_its_linear_by_attribute():
    torch.manual_seed(0)
    base = nn.LinearCrossEntropyLoss(D, 5)
    model = nlnn.add_adapters(copy.deepcopy(base), ["linear"], ranks=2, seed=0)
    adapter = dict(nlnn.iter_adapters(model))["linear.weight"]
    with torch.no_grad():
        adapter.delta.core.normal_()
    reference = copy.deepcopy(base)
    with torch.no_grad():
        reference.linear.weight.add_(_delta_by_hand(adapter))
    x, y = torch.randn(6, D), torch.arange(6) % 5
    torch.testing.assert_close(model(x, y), reference(x, y))
    assert not torch.allclose(model(x, y), base(x, y))
