"""Tied weights on plain torch models: a module registered twice, a parameter shared by two modules."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from ndlowrank import nn as nlnn  # noqa: E402

from _helpers import perturb_adapters  # noqa: E402


def _shared_module() -> nn.Module:
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    return nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(6, 2))


def _shared_parameter() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    model[2].weight = model[0].weight
    return model


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("build", "as_parameter"),
    [(_shared_module, False), (_shared_parameter, False), (_shared_parameter, True)],
)
def test_merge_is_refused_for_all_and_remove_unties(build, as_parameter):
    base = build()
    targets = {"target_parameters": ["0.weight"], "target_modules": ["4"]} if as_parameter else {}
    with pytest.warns(UserWarning, match=r"'0(\.weight)?': its weight is tied to \['2.weight'\]"):
        model = nlnn.add_adapters(
            copy.deepcopy(base), targets.get("target_modules", ["0", "4"]), ranks=3, seed=0,
            target_parameters=targets.get("target_parameters"),
        )  # fmt: skip
    perturb_adapters(model)
    with torch.no_grad():
        trained = model(X)
        assert not torch.allclose(trained, base(X))
        with pytest.raises(ValueError, match=r"tied to.*no adapter was merged"):
            nlnn.merge_adapters(model)
        assert not any(adapter.merged for _, adapter in nlnn.iter_adapters(model))  # '4' neither
        assert torch.equal(model(X), trained)

        restored = nlnn.remove_adapters(copy.deepcopy(model), merge=False)
        assert restored[0].weight is restored[2].weight  # still tied
        assert torch.equal(restored(X), base(X))

        plain = nlnn.remove_adapters(model, merge=True)
        assert plain[0].weight is not plain[2].weight
        assert torch.equal(plain[2].weight, base[2].weight)
        torch.testing.assert_close(plain(X), trained, rtol=1e-5, atol=1e-6)


def test_a_model_without_ties_neither_warns_nor_refuses(recwarn):
    torch.manual_seed(0)
    model = nlnn.add_adapters(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2)), ["0", "1"], ranks=2, seed=0)
    nlnn.merge_adapters(model)
    assert all(adapter.merged for _, adapter in nlnn.iter_adapters(model))
    assert not recwarn.list


def test_a_parameter_adapter_on_a_shared_module_changes_every_use_of_it_so_it_merges(recwarn):
    base = _shared_module()
    model = nlnn.add_adapters(
        copy.deepcopy(base), None, ranks=3, target_parameters=["0.weight"], init="principal"
    )
    perturb_adapters(model)
    with torch.no_grad():
        trained = model(X)
        reference = copy.deepcopy(base)
        reference[0].weight.copy_(model[0].weight)  # the parametrized weight, W - ΔW₀ + ΔW
        torch.testing.assert_close(trained, reference(X), rtol=1e-5, atol=1e-6)  # both uses see ΔW
        nlnn.merge_adapters(model)
        torch.testing.assert_close(model(X), trained, rtol=1e-5, atol=1e-6)
        plain = nlnn.remove_adapters(model, merge=True)
        assert plain[0] is plain[2]
        torch.testing.assert_close(plain(X), trained, rtol=1e-5, atol=1e-6)
    assert not recwarn.list
