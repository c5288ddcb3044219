"""save_adapters / load_adapters / adapter_state_dict: round trips, atomic writes, bad files."""

from __future__ import annotations

import copy
import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
from torch import nn  # noqa: E402

import ndlowrank  # noqa: E402
from ndlowrank import nn as nlnn  # noqa: E402
from ndlowrank.nn import io as nlio  # noqa: E402

INITS = ["zero_core", "zero_factor", "orthogonal", "principal"]
TARGETS = ["emb", "conv1", "conv2", "head.proj"]


class Net(nn.Module):
    """Embedding -> Conv1d -> grouped Conv2d -> Linear (nested), a model with every layer kind."""

    def __init__(self, out: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.ModuleDict({"proj": nn.Linear(8, out)})

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(self.emb(tokens).transpose(1, 2)))
        h = self.conv2(h.unsqueeze(-1)).squeeze(-1)
        return self.head["proj"](h.transpose(1, 2))


class AttentionNet(nn.Module):
    """A parameter adapter target (``attn.in_proj_weight``) next to a layer target."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(x, x, x, need_weights=False)[0])


TOKENS = torch.tensor([[0, 3, 7, 19, 2, 5, 0], [1, 1, 4, 8, 12, 16, 0]])
SEQUENCE = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))


def plain(cls: type[nn.Module] = Net, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return cls(**kwargs).eval()


@torch.no_grad()
def train(model: nn.Module, seed: int) -> nn.Module:
    """Stand in for training: move every trainable adapter tensor away from its init."""
    generator = torch.Generator().manual_seed(seed)
    for _, adapter in nlnn.iter_adapters(model):
        for parameter in adapter.delta.trainable_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.add_(0.1 * noise.to(parameter.dtype))
    return model


def adapted(base: nn.Module, init: str = "zero_core", *, ranks=3, seed: int = 1, **options) -> nn.Module:
    options.setdefault("dropout", 0.1)
    model = nlnn.add_adapters(copy.deepcopy(base), TARGETS, ranks, init=init, scale=2.0, seed=seed, **options)
    return train(model, seed).eval()


def adapted_attention(base: nn.Module, init: str = "zero_core", *, seed: int = 1) -> nn.Module:
    model = nlnn.add_adapters(
        copy.deepcopy(base), ["out"], 2, init=init, seed=seed, target_parameters=["attn.in_proj_weight"]
    )
    return train(model, seed).eval()


def assert_same_state(got: nn.Module, want: nn.Module) -> None:
    got_state, want_state = got.state_dict(), want.state_dict()
    assert list(got_state) == list(want_state)
    for key, value in want_state.items():
        assert got_state[key].dtype == value.dtype, key
        assert torch.equal(got_state[key], value), key


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {key: value.detach().clone() for key, value in model.state_dict().items()},
        "modules": [(name, type(module), id(module)) for name, module in model.named_modules()],
        "parameters": [(name, id(p), p.requires_grad) for name, p in model.named_parameters()],
        "training": [module.training for module in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["parameters"] == before["parameters"]
    assert after["training"] == before["training"]
    assert list(after["state"]) == list(before["state"])
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def header(path) -> dict:
    with safetensors.safe_open(os.fspath(path), framework="pt") as file:
        return json.loads(file.metadata()["ndlowrank"])


def rewrite(path, out, *, edit_header=None, edit_tensors=None):
    """Copy an adapter file with its JSON header and/or tensors changed."""
    with safetensors.safe_open(os.fspath(path), framework="pt") as file:
        metadata = file.metadata()
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    if edit_header is not None:
        config = json.loads(metadata["ndlowrank"])
        edit_header(config)
        metadata["ndlowrank"] = json.dumps(config)
    if edit_tensors is not None:
        edit_tensors(tensors)
    safetensors.torch.save_file(tensors, os.fspath(out), metadata=metadata)
    return out


# -- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("init", INITS)
def test_load_builds_adapters_on_a_plain_model(tmp_path, init):
    base = plain()
    model = adapted(base, init)
    path = tmp_path / "adapters.safetensors"
    nlnn.save_adapters(model, path)

    fresh = copy.deepcopy(base)
    assert nlnn.load_adapters(fresh, path) is fresh
    assert torch.equal(fresh(TOKENS), model(TOKENS))
    assert_same_state(fresh, model)  # base weights (principal residuals), buffers and adapters
    assert [(n, type(m), m.training) for n, m in fresh.named_modules()] == [
        (n, type(m), m.training) for n, m in model.named_modules()
    ]
    assert [a.config() for _, a in nlnn.iter_adapters(fresh)] == [
        a.config() for _, a in nlnn.iter_adapters(model)
    ]
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("init", INITS)
def test_load_into_existing_adapters_keeps_parameter_identity(tmp_path, init):
    base = plain()
    model = adapted(base, init)
    path = tmp_path / "adapters.safetensors"
    nlnn.save_adapters(model, str(path))

    target = adapted(base, init, seed=2)
    assert not torch.equal(target(TOKENS), model(TOKENS))
    modules = [id(m) for m in target.modules()]
    parameters = [id(p) for p in target.parameters()]
    optimizer = torch.optim.SGD([p for p in target.parameters() if p.requires_grad], lr=0.1)
    nlnn.load_adapters(target, path)
    assert [id(m) for m in target.modules()] == modules
    assert [id(p) for p in target.parameters()] == parameters
    assert all(any(p is q for q in target.parameters()) for p in optimizer.param_groups[0]["params"])
    assert torch.equal(target(TOKENS), model(TOKENS))
    assert_same_state(target, model)


@pytest.mark.parametrize("init", ["zero_core", "principal"])
def test_parameter_adapters_round_trip(tmp_path, init):
    base = plain(AttentionNet)
    model = adapted_attention(base, init)
    path = tmp_path / "attention.safetensors"
    nlnn.save_adapters(model, path)
    assert {a["name"]: a["kind"] for a in header(path)["targets"]} == {
        "out": "linear",
        "attn.in_proj_weight": "parameter",
    }

    fresh = copy.deepcopy(base)
    nlnn.load_adapters(fresh, path)
    assert torch.equal(fresh(SEQUENCE), model(SEQUENCE))
    assert_same_state(fresh, model)

    existing = adapted_attention(base, init, seed=2)
    parameters = [id(p) for p in existing.parameters()]
    nlnn.load_adapters(existing, path)
    assert [id(p) for p in existing.parameters()] == parameters
    assert torch.equal(existing(SEQUENCE), model(SEQUENCE))


def test_truncated_principal_adapters_round_trip(tmp_path):
    base = plain()
    model = adapted(base, "principal", ranks=4)
    nlnn.truncate_adapters(model, ranks=2)
    path = tmp_path / "truncated.safetensors"
    nlnn.save_adapters(model, path)
    entry = header(path)["targets"][0]
    assert entry["ranks"] == [2, 2] and entry["principal_ranks"] == [4, 4]

    fresh = copy.deepcopy(base)
    nlnn.load_adapters(fresh, path)
    assert torch.equal(fresh(TOKENS), model(TOKENS))
    assert_same_state(fresh, model)


def test_existing_principal_adapter_is_moved_to_the_files_start(tmp_path):
    base = plain()
    model = adapted(base, "principal")
    path = tmp_path / "adapters.safetensors"
    nlnn.save_adapters(model, path)

    target = adapted(base, "principal", seed=2)
    with torch.no_grad():  # as if its ST-HOSVD had come out differently
        for _, adapter in nlnn.iter_adapters(target):
            adapter.weight.add_(adapter._principal_start())
            adapter.principal_core.mul_(0.5)
            adapter.weight.sub_(adapter._principal_start())
    nlnn.load_adapters(target, path)
    torch.testing.assert_close(target(TOKENS), model(TOKENS), rtol=1e-5, atol=1e-5)
    for (_, got), (_, want) in zip(nlnn.iter_adapters(target), nlnn.iter_adapters(model), strict=True):
        assert torch.equal(got.principal_core, want.principal_core)
        torch.testing.assert_close(got.weight, want.weight, rtol=1e-5, atol=1e-6)


def test_float64_file_is_cast_into_float32_adapters(tmp_path):
    base = plain()
    model = adapted(base, dtype=torch.float64)
    path = tmp_path / "float64.safetensors"
    nlnn.save_adapters(model, path)
    assert {t.dtype for t in nlnn.adapter_state_dict(model).values()} == {torch.float64}

    target = adapted(base, seed=2)  # float32 adapters
    nlnn.load_adapters(target, path)
    saved = nlnn.adapter_state_dict(model)
    for key, value in nlnn.adapter_state_dict(target).items():
        assert value.dtype == torch.float32
        assert torch.equal(value, saved[key].to(torch.float32)), key

    fresh = copy.deepcopy(base)  # a new adapter takes the file's dtype: exact
    nlnn.load_adapters(fresh, path)
    assert_same_state(fresh, model)


def test_non_strict_ignores_extra_tensors_and_other_adapters(tmp_path):
    base = plain()
    model = adapted(base)
    path = rewrite(
        _save(model, tmp_path),
        tmp_path / "extra.safetensors",
        edit_tensors=lambda t: t.update({"junk": torch.zeros(2)}),
    )
    target = adapted(base, seed=2)
    nlnn.load_adapters(target, path, strict=False)
    assert torch.equal(target(TOKENS), model(TOKENS))

    small = nlnn.add_adapters(copy.deepcopy(base), ["conv1"], 3, init="zero_core", scale=2.0, dropout=0.1)
    only_conv1 = _save(train(small, 3), tmp_path, "conv1.safetensors")
    with pytest.raises(ValueError, match="strict=False"):
        nlnn.load_adapters(target, only_conv1)
    nlnn.load_adapters(target, only_conv1, strict=False)
    assert torch.equal(target.conv1.delta.core, small.conv1.delta.core)
    assert torch.equal(target.emb.delta.core, model.emb.delta.core)


# -- the file -----------------------------------------------------------------------------


def _save(model: nn.Module, directory, name: str = "good.safetensors"):
    path = directory / name
    nlnn.save_adapters(model, path)
    return path


def test_file_holds_the_config_and_the_tensors(tmp_path):
    model = adapted(plain(), "principal")
    path = _save(model, tmp_path)
    with safetensors.safe_open(os.fspath(path), framework="pt") as file:
        metadata = file.metadata()
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    assert metadata["format"] == "pt"
    config = json.loads(metadata["ndlowrank"])
    assert config["format"] == "tucker-adapters"
    assert config["format_version"] == 1
    assert config["ndlowrank_version"] == ndlowrank.__version__
    want = [
        {
            "name": name,
            **adapter.config(),
            "principal_ranks": list(adapter.ranks),
        }
        for name, adapter in nlnn.iter_adapters(model)
    ]
    assert config["targets"] == want
    assert [a["name"] for a in want] == TARGETS
    assert want[2]["layer"] == "Conv2d" and want[2]["weight_shape"] == [8, 4, 3, 3]

    state = nlnn.adapter_state_dict(model)
    assert sorted(state) == sorted(tensors)
    assert {"head.proj.core", "head.proj.factors.1", "conv2.factors.3", "emb.principal_factor_1"} <= set(
        state
    )
    for key, value in state.items():
        assert not value.requires_grad and value.is_contiguous()
        assert torch.equal(tensors[key], value), key


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_saved_file_has_the_mode_of_a_new_file(tmp_path):
    (tmp_path / "plain").touch()
    path = _save(adapted(plain()), tmp_path)
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode


@pytest.mark.parametrize("broken", ["save_file", "replace"])
def test_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, broken):
    base = plain()
    path = _save(adapted(base), tmp_path)
    good = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(b"partial")
        raise OSError("disk full")

    def fail_replace(src, dst):
        raise OSError("rename failed")

    if broken == "save_file":
        monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    else:
        monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OSError, match=r"disk full|rename failed"):
        nlnn.save_adapters(adapted(base, seed=5), path)
    with pytest.raises(OSError, match=r"disk full|rename failed"):
        nlnn.save_adapters(adapted(base, seed=5), tmp_path / "new.safetensors")
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == [path.name]


def test_save_refuses_bad_targets(tmp_path):
    with pytest.raises(ValueError, match="no adapters"):
        nlnn.save_adapters(plain(), tmp_path / "none.safetensors")
    model = adapted(plain())
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        nlnn.save_adapters(model, tmp_path)
    missing = tmp_path / "missing" / "a.safetensors"
    with pytest.raises(FileNotFoundError, match="missing"):
        nlnn.save_adapters(model, missing)
    with pytest.raises(TypeError, match="path"):
        nlnn.save_adapters(model, 3)
    assert os.listdir(tmp_path) == []


# -- bad files leave the model as it was ---------------------------------------------------


def _bad_file(kind: str, tmp_path) -> tuple[object, type[Exception], str]:
    """``(path, exception, message pattern)`` of one kind of bad file (for a ``Net``)."""
    base = plain()
    good = _save(adapted(base, "principal"), tmp_path)
    bad = tmp_path / "bad.safetensors"
    if kind == "missing file":
        return tmp_path / "nope.safetensors", FileNotFoundError, "nope"
    if kind == "directory":
        return tmp_path, IsADirectoryError, "directory"
    if kind == "truncated":
        data = good.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        return bad, ValueError, "bad.safetensors.*not a readable safetensors"
    if kind == "garbage":
        bad.write_bytes(b"\x13garbage" * 64)
        return bad, ValueError, "not a readable safetensors"
    if kind == "empty":
        bad.write_bytes(b"")
        return bad, ValueError, "not a readable safetensors"
    if kind == "no metadata":
        safetensors.torch.save_file({"emb.core": torch.zeros(3, 3)}, os.fspath(bad))
        return bad, ValueError, "not an ndlowrank adapter file"
    if kind == "other metadata":
        safetensors.torch.save_file({"x": torch.zeros(3)}, os.fspath(bad), metadata={"format": "pt"})
        return bad, ValueError, "not an ndlowrank adapter file"
    if kind == "bad json":
        safetensors.torch.save_file({"x": torch.zeros(3)}, os.fspath(bad), metadata={"ndlowrank": "{oops"})
        return bad, ValueError, "not valid JSON"
    if kind == "factors file":  # what `ndlowrank decompose` writes under the same metadata key
        metadata = {"ndlowrank": json.dumps({"format": "tucker-factors", "format_version": 1, "tensors": {}})}
        safetensors.torch.save_file({"w.core": torch.zeros(2, 2)}, os.fspath(bad), metadata=metadata)
        return bad, ValueError, "'tucker-factors' data, not adapters"
    if kind == "future format":
        return rewrite(good, bad, edit_header=lambda h: h.update(format_version=2)), ValueError, "newer"
    if kind == "wrong model":
        other = nlnn.add_adapters(nn.Sequential(nn.Linear(8, 5)), ["0"], 2)
        return _save(other, tmp_path, "other.safetensors"), ValueError, "adapter '0'.*no module"
    if kind == "wrong weight shape":
        wide = adapted(plain(out=6), "principal")
        return _save(wide, tmp_path, "wide.safetensors"), ValueError, "head.proj.*shape"
    if kind == "wrong layer type":

        def edit(h):
            h["targets"][1]["layer"] = "Conv2d"

        return rewrite(good, bad, edit_header=edit), ValueError, "conv1.*Conv1d"
    if kind == "bad ranks in config":

        def edit(h):
            h["targets"][3]["ranks"] = [3, 9]

        return rewrite(good, bad, edit_header=edit), ValueError, r"ranks\[1\]=9 exceeds dimension 8"
    if kind == "tensor shape":

        def edit(t):
            t["conv2.factors.1"] = torch.zeros(8, 3)

        return rewrite(good, bad, edit_tensors=edit), ValueError, r"conv2.factors.1 has shape \(8, 3\)"
    if kind == "principal tensor shape":

        def edit(t):
            t["emb.principal_core"] = torch.zeros(3, 2)

        return rewrite(good, bad, edit_tensors=edit), ValueError, "emb.principal_core has shape"
    if kind == "missing tensor":
        return rewrite(good, bad, edit_tensors=lambda t: t.pop("head.proj.factors.0")), ValueError, "missing"
    if kind == "extra tensor":

        def edit(t):
            t["head.proj.lora_A"] = torch.zeros(2, 2)

        return rewrite(good, bad, edit_tensors=edit), ValueError, "unexpected tensors.*lora_A"
    if kind == "integer tensor":

        def edit(t):
            t["conv1.core"] = torch.zeros(3, 3, 3, dtype=torch.int64)

        return rewrite(good, bad, edit_tensors=edit), ValueError, "not floating point"
    raise AssertionError(kind)


BAD_FILES = [
    "missing file",
    "directory",
    "truncated",
    "garbage",
    "empty",
    "no metadata",
    "other metadata",
    "bad json",
    "factors file",
    "future format",
    "wrong model",
    "wrong weight shape",
    "wrong layer type",
    "bad ranks in config",
    "tensor shape",
    "principal tensor shape",
    "missing tensor",
    "extra tensor",
    "integer tensor",
]


@pytest.mark.parametrize("with_adapters", [False, True], ids=["plain", "adapted"])
@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_file_raises_and_leaves_the_model_unchanged(tmp_path, kind, with_adapters):
    path, error, pattern = _bad_file(kind, tmp_path)
    model = adapted(plain(), "principal", seed=7) if with_adapters else plain()
    before = snapshot(model)
    with pytest.raises(error, match=pattern):
        nlnn.load_adapters(model, path)
    assert_unchanged(model, before)


def _mismatch(kind: str, tmp_path) -> tuple[nn.Module, object, str]:
    """``(model with adapters, file, message pattern)`` where the adapters do not fit the file."""
    base = plain()
    file = _save(adapted(base, "principal"), tmp_path)
    if kind == "ranks":
        return adapted(base, "principal", ranks=2), file, "ranks"
    if kind == "scale":
        model = nlnn.add_adapters(copy.deepcopy(base), TARGETS, 3, init="principal", dropout=0.1)
        return model, file, "scale"
    if kind == "init":
        return adapted(base, "zero_core"), file, "principal"
    if kind == "merged":
        return nlnn.merge_adapters(adapted(base, "principal")), file, "merged"
    if kind == "partly missing":

        class Bigger(Net):
            def __init__(self) -> None:
                super().__init__()
                self.extra = nn.Linear(8, 8)

        bigger = nlnn.add_adapters(plain(Bigger), [*TARGETS, "extra"], 3, init="principal", scale=2.0)
        return adapted(base, "principal"), _save(bigger, tmp_path, "bigger.safetensors"), "'extra'"
    if kind == "adapters not in file":
        small = nlnn.add_adapters(copy.deepcopy(base), ["conv1"], 3, init="principal", scale=2.0)
        return adapted(base, "principal"), _save(small, tmp_path, "small.safetensors"), "strict=False"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["ranks", "scale", "init", "merged", "partly missing", "adapters not in file"]
)
def test_existing_adapters_that_do_not_fit_are_refused(tmp_path, kind):
    model, path, pattern = _mismatch(kind, tmp_path)
    before = snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        nlnn.load_adapters(model, path)
    assert_unchanged(model, before)


# -- a failure after validation is undone ---------------------------------------------------


def _fail_on_call(monkeypatch, name: str, call: int) -> None:
    """Make the ``call``-th call of ``nlio.<name>`` raise, after doing its work."""
    original = getattr(nlio, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        result = original(*args, **kwargs)
        if len(calls) == call:
            raise RuntimeError("injected failure")
        return result

    monkeypatch.setattr(nlio, name, failing)


@pytest.mark.parametrize(
    ("with_adapters", "name", "call"),
    [
        (False, "_build", 3),
        (False, "_copy_trained", 4),
        (False, "mark_only_adapters_trainable", 1),
        (True, "_load_existing", 3),
        (True, "_copy_trained", 4),
    ],
)
def test_failure_while_loading_restores_the_model(tmp_path, monkeypatch, with_adapters, name, call):
    base = plain()
    path = _save(adapted(base, "principal"), tmp_path)
    model = copy.deepcopy(base)
    if with_adapters:
        model = adapted(base, "principal", seed=2)
        with torch.no_grad():  # a start other than the file's, so the base weights are moved too
            for _, adapter in nlnn.iter_adapters(model):
                adapter.weight.add_(adapter._principal_start())
                adapter.principal_core.mul_(0.5)
                adapter.weight.sub_(adapter._principal_start())
    before = snapshot(model)
    _fail_on_call(monkeypatch, name, call)
    with pytest.raises(RuntimeError, match="injected"):
        nlnn.load_adapters(model, path)
    assert_unchanged(model, before)


def test_failure_while_loading_parameter_adapters_restores_the_model(tmp_path, monkeypatch):
    base = plain(AttentionNet)
    path = _save(adapted_attention(base, "principal"), tmp_path)
    model = copy.deepcopy(base)
    before = snapshot(model)
    _fail_on_call(monkeypatch, "mark_only_adapters_trainable", 1)
    with pytest.raises(RuntimeError, match="injected"):
        nlnn.load_adapters(model, path)
    assert_unchanged(model, before)
    assert type(model.attn) is nn.MultiheadAttention
    assert torch.equal(model(SEQUENCE), base(SEQUENCE))


def test_the_one_safetensors_reader_names_the_file_and_lets_the_check_refuse_before_reading(tmp_path):
    from safetensors.torch import save_file

    from ndlowrank.nn._file_format import read_safetensors

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(2)}, str(path), metadata={"k": "v"})
    tensors, metadata = read_safetensors(str(path))
    assert metadata == {"k": "v"} and torch.equal(tensors["a"], torch.ones(2))

    seen = []

    def refuse(metadata):
        seen.append(metadata)
        raise ValueError("not ours")

    with pytest.raises(ValueError, match=r"^not ours$"):  # the check's own error, not wrapped
        read_safetensors(str(path), check=refuse)
    assert seen == [{"k": "v"}]
    with pytest.raises(IsADirectoryError):
        read_safetensors(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        read_safetensors(str(tmp_path / "missing.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="the bad file is not a readable safetensors file"):
        read_safetensors(str(tmp_path / "bad.safetensors"), where="the bad file")
