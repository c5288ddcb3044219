"""modules_to_save: modules trained in full beside the adapters, saved in and restored from the adapter file."""

from __future__ import annotations

import copy
import json
import os

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from ndlowrank import nn as nlnn  # noqa: E402

from _helpers import import_peer, perturb_adapters  # noqa: E402

F64 = torch.float64


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.proj = nn.Linear(4, 6)
        self.classifier = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv(x))).mean((2, 3))
        return self.classifier(torch.tanh(self.proj(h)))


def _base() -> Classifier:
    torch.manual_seed(0)
    return Classifier().to(F64)


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _finetune(model: nn.Module, steps: int = 3) -> None:
    """A few SGD steps in train mode: the adapters, the head and the norm (with its running statistics) move."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        model(_x(step)).pow(2).mean().backward()
        optimizer.step()


def _adapted() -> tuple[Classifier, nn.Module]:
    base = _base()
    model = nlnn.add_adapters(
        copy.deepcopy(base), ["conv", "proj"], 2, modules_to_save=["classifier", "norm"], seed=0
    )
    perturb_adapters(model)
    _finetune(model)
    return base, model


def test_a_trained_copy_runs_trains_and_keeps_the_original():
    base, model = _adapted()
    wrapper = model.classifier
    assert isinstance(wrapper, nlnn.TrainedCopy)
    assert [name for name, _ in nlnn.iter_trained_copies(model)] == ["norm", "classifier"]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "classifier.trained_module.weight" in trainable and "norm.trained_module.bias" in trainable
    assert "classifier.original_module.weight" not in trainable
    assert torch.equal(wrapper.original_module.weight, base.classifier.weight)  # the original is untouched
    assert not torch.equal(wrapper.trained_module.weight, base.classifier.weight)
    assert not torch.equal(model.norm.trained_module.running_mean, base.norm.running_mean)
    assert wrapper.out_features == 3 and model.norm.num_features == 4  # attributes read through


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_save_then_load_into_the_base_model_restores_the_trained_modules(tmp_path, mode):
    base, model = _adapted()
    path = os.fspath(tmp_path / "adapters.safetensors")
    nlnn.save_adapters(model, path)
    restored = nlnn.load_adapters(copy.deepcopy(base), path)
    assert isinstance(restored.classifier, nlnn.TrainedCopy) and isinstance(restored.norm, nlnn.TrainedCopy)
    getattr(model, mode)()
    getattr(restored, mode)()
    assert torch.equal(restored(_x(7)), model(_x(7)))
    # the trained copies' state is all there: running statistics and the batch counter too
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    header = json.loads(__import__("safetensors").safe_open(path, "pt").metadata()["ndlowrank"])
    entries = [entry for entry in header["targets"] if entry["kind"] == "module"]
    assert entries[1] == {
        "name": "classifier",
        "kind": "module",
        "layer": "Linear",
        "keys": ["weight", "bias"],
    }
    assert "num_batches_tracked" in entries[0]["keys"]


def test_loading_into_existing_copies_keeps_the_parameters(tmp_path):
    base, model = _adapted()
    path = os.fspath(tmp_path / "a.safetensors")
    nlnn.save_adapters(model, path)
    target = nlnn.add_adapters(
        copy.deepcopy(base), ["conv", "proj"], 2, modules_to_save=["classifier", "norm"]
    )
    weight = target.classifier.trained_module.weight
    nlnn.load_adapters(target, path)
    assert target.classifier.trained_module.weight is weight
    assert torch.equal(weight, model.classifier.trained_module.weight)


def test_disable_and_remove_give_the_original_or_the_trained_modules():
    base, model = _adapted()
    model.eval()
    base.eval()
    x = _x(9)
    tuned = model(x)
    with nlnn.disable_adapters(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-12)
    assert torch.equal(model(x), tuned)
    plain = nlnn.remove_adapters(copy.deepcopy(model), merge=True)
    assert list(plain.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(plain(x), tuned, rtol=0, atol=1e-12)
    original = nlnn.remove_adapters(model, merge=False)
    assert list(original.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(original(x), base(x), rtol=0, atol=1e-12)
    assert type(original.classifier) is nn.Linear


def test_a_module_is_adapted_or_trained_in_full_not_both():
    model = _base()
    state = copy.deepcopy(model.state_dict())
    for saved in (["proj"], ["classifier", nn.Linear]):
        with pytest.raises(
            ValueError, match=r"modules_to_save selects .* a module is either adapted or trained"
        ):
            nlnn.add_adapters(model, ["conv", "proj"], 2, modules_to_save=saved, init="principal")
    with pytest.raises(ValueError, match="modules_to_save module 'head' matches no module"):
        nlnn.add_adapters(model, ["conv"], 2, modules_to_save=["head"])
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    adapted = nlnn.add_adapters(model, ["conv"], 2, modules_to_save=["classifier"])
    assert nlnn.select_targets(adapted, "all-linear") == ["proj"]  # nothing inside the copy is a target


def test_a_load_that_does_not_fit_changes_nothing(tmp_path):
    base, model = _adapted()
    path = os.fspath(tmp_path / "a.safetensors")
    nlnn.save_adapters(model, path)
    other = copy.deepcopy(base)
    other.classifier = nn.Linear(6, 5).to(F64)  # another head size
    state = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"classifier\.weight has shape \(3, 6\), expected \(5, 6\)"):
        nlnn.load_adapters(other, path)
    assert nlnn.adapter_state_dict(other) == {} and list(other.state_dict()) == list(state)
    adapted_head = nlnn.add_adapters(copy.deepcopy(base), ["classifier"], 2, seed=0)
    with pytest.raises(ValueError, match="it overlaps the adapter 'classifier'"):
        nlnn.load_adapters(adapted_head, path, strict=False)
    assert type(adapted_head.conv) is nn.Conv2d  # nothing was built
    other.classifier = nn.Identity()
    with pytest.raises(ValueError, match="the model's module is a Identity, the file's a Linear"):
        nlnn.load_adapters(other, path)
    plain = nlnn.add_adapters(copy.deepcopy(base), ["conv", "proj"], 2, seed=0)
    nlnn.save_adapters(plain, path)  # a file without trained modules
    extra = nlnn.add_adapters(copy.deepcopy(base), ["conv", "proj"], 2, modules_to_save=["classifier"])
    with pytest.raises(
        ValueError, match=r"trains modules \['classifier'\] in full that the file does not hold"
    ):
        nlnn.load_adapters(extra, path)
    nlnn.load_adapters(extra, path, strict=False)
    assert torch.equal(extra.conv.delta.core, plain.conv.delta.core)


def test_a_file_without_modules_to_save_is_written_as_before(tmp_path):
    base = _base()
    model = nlnn.add_adapters(copy.deepcopy(base), ["conv", "proj"], 2, seed=0)
    path = os.fspath(tmp_path / "a.safetensors")
    nlnn.save_adapters(model, path)
    header = json.loads(__import__("safetensors").safe_open(path, "pt").metadata()["ndlowrank"])
    assert [entry["kind"] for entry in header["targets"]] == ["conv", "linear"]
    assert set(nlnn.adapter_state_dict(model)) == {
        f"{n}.{k}"
        for n in ("conv", "proj")
        for k in ("core", *(f"factors.{i}" for i in range(4 if n == "conv" else 2)))
    }


def test_the_trained_head_matches_peft_modules_to_save():
    """PEFT's ModulesToSaveWrapper trained the same way ends with the same head (same data, same optimizer)."""
    peft = import_peer("peft")
    base = _base()
    ours = nlnn.add_adapters(
        copy.deepcopy(base), ["proj"], 2, init="zero_factor", modules_to_save=["classifier"], seed=0
    )
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(target_modules=["proj"], r=2, modules_to_save=["classifier"])
    )
    for model in (ours, theirs):  # both adapters start at ΔW = 0, so the head's first step is the same
        _finetune(model, steps=1)
    ours_head = ours.classifier.trained_module.weight
    theirs_head = theirs.base_model.model.classifier.modules_to_save["default"].weight
    torch.testing.assert_close(ours_head, theirs_head, rtol=0, atol=1e-12)
    assert not torch.equal(ours_head, base.classifier.weight)


def test_saving_warns_about_trainable_parameters_the_file_does_not_hold(tmp_path):
    import warnings

    base = _base()
    path = os.fspath(tmp_path / "a.safetensors")
    model = nlnn.add_adapters(copy.deepcopy(base), ["conv", "proj"], 2, seed=0)
    model.classifier.weight.requires_grad_(True)  # unfrozen by hand: not saved
    with pytest.warns(
        UserWarning, match=r"trainable parameters classifier\.weight are not in the adapter file"
    ):
        nlnn.save_adapters(model, path)
    saved = nlnn.add_adapters(copy.deepcopy(base), ["conv", "proj"], 2, modules_to_save=["classifier"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nlnn.save_adapters(saved, path)


def test_a_further_named_adapter_shares_the_trained_copies():
    model = nlnn.add_adapters(_base(), ["conv"], 2, modules_to_save=["classifier"], seed=0)
    wrapper = model.classifier
    model = nlnn.add_adapters(model, ["proj"], 2, modules_to_save=["classifier", "norm"], adapter_name="b")
    assert model.classifier is wrapper and isinstance(model.norm, nlnn.TrainedCopy)
    assert [name for name, _ in nlnn.iter_trained_copies(model)] == ["norm", "classifier"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda e, t: e.update(keys="weight"),
            r"trained module 'classifier': keys must be a list of strings",
        ),
        (lambda e, t: e.update(layer=3), r"trained module 'classifier': layer must be a string"),
        (lambda e, t: t.pop("classifier.bias"), r"tensors \['classifier\.bias'\] are missing"),
        (lambda e, t: t.update(extra=torch.zeros(1)), r"unexpected tensors \['extra'\]"),
        (
            lambda e, t: (e.update(keys=["weight"]), t.pop("classifier.bias")),
            r"the model's module has state \['bias', 'weight'\]",
        ),
    ],
)
def test_a_bad_trained_module_entry_is_refused_and_changes_nothing(tmp_path, change, message):
    import safetensors
    import safetensors.torch

    base, model = _adapted()
    path = os.fspath(tmp_path / "a.safetensors")
    nlnn.save_adapters(model, path)
    with safetensors.safe_open(path, "pt") as file:
        metadata = file.metadata()
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    header = json.loads(metadata["ndlowrank"])
    entry = next(e for e in header["targets"] if e["name"] == "classifier")
    change(entry, tensors)
    metadata["ndlowrank"] = json.dumps(header)
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    target = copy.deepcopy(base)
    with pytest.raises(ValueError, match=message):
        nlnn.load_adapters(target, path)
    assert list(target.state_dict()) == list(base.state_dict())
