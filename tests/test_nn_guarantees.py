"""Model operations are all or nothing, a weight takes one adapter, meta models refuse loads, one scale rule.

Every failing call must leave the model exactly as it was: the same module types, the same
adapters with the same values, every weight bit for bit.
"""

from __future__ import annotations

import copy
import math

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import ndlowrank as nl  # noqa: E402
from ndlowrank import nn as nlnn  # noqa: E402


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 6),
        nn.Linear(6, 5),
    )


def _adapted(*, principal: bool = False) -> nn.Module:
    """Layer adapters on 0 and 2, a parameter adapter on 4.weight and a layer adapter on 5, all trained."""
    init = "principal" if principal else "zero_core"
    model = nlnn.add_adapters(_net(), ["0", "2", "5"], 2, init=init, seed=0, target_parameters=["4.weight"])
    with torch.no_grad():
        for _, adapter in nlnn.iter_adapters(model):
            adapter.delta.core.normal_()
    return model


def _state(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor]]:
    """Module types by name and every tensor (parameters and buffers, adapters' included), cloned."""
    types = [(name, type(m).__name__) for name, m in model.named_modules()]
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    return types, tensors


def _assert_unchanged(model: nn.Module, before) -> None:
    types, tensors = _state(model)
    assert types == before[0]
    assert tensors.keys() == before[1].keys()
    for key, value in tensors.items():
        assert torch.equal(value, before[1][key]) or (value.isnan() == before[1][key].isnan()).all(), key


def _poison(model: nn.Module, name: str, where: str = "core") -> None:
    adapter = dict(nlnn.iter_adapters(model))[name]
    with torch.no_grad():
        tensor = adapter.delta.core if where == "core" else adapter.delta.factors[0]
        tensor.view(-1)[0] = math.nan if where != "inf" else math.inf


# -- class 2: remove and truncate are all or nothing -------------------------------------------


@pytest.mark.parametrize("poisoned", ["5", "4.weight", "2"])
@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("merged", [False, True])
def test_remove_adapters_with_a_diverged_delta_changes_nothing(poisoned, merge, merged, tmp_path):
    model = _adapted(principal=not merge)
    if merged:
        nlnn.merge_adapters(model)
    _poison(model, poisoned)
    if merge == merged:
        # restoring an unmerged weight, or keeping a weight merged before the delta diverged,
        # does not need the delta: it works, and every weight is finite
        nlnn.remove_adapters(model, merge=merge)
        assert not list(nlnn.iter_adapters(model))
        assert all(torch.isfinite(p).all() for p in model.parameters())
        return
    before = _state(model)
    with pytest.raises(ValueError, match=rf"'{poisoned}': .*NaN or Inf.*; no adapter was removed"):
        nlnn.remove_adapters(model, merge=merge)
    _assert_unchanged(model, before)
    assert len(list(nlnn.iter_adapters(model))) == 4


@pytest.mark.parametrize("request_", [{"ranks": 1}, {"tol": 0.5}, {"budget": 400}])
@pytest.mark.parametrize("poisoned", ["5", "4.weight"])
@pytest.mark.parametrize("where", ["core", "factor", "inf"])
def test_truncate_adapters_with_a_diverged_delta_changes_nothing(request_, poisoned, where):
    model = _adapted()
    _poison(model, poisoned, where)
    before = _state(model)
    ranks = [adapter.ranks for _, adapter in nlnn.iter_adapters(model)]
    with pytest.raises(
        ValueError, match=rf"'{poisoned}': its core or factors hold NaN or Inf; no adapter was truncated"
    ):
        nlnn.truncate_adapters(model, **request_)
    _assert_unchanged(model, before)
    assert [adapter.ranks for _, adapter in nlnn.iter_adapters(model)] == ranks


def test_truncate_that_would_overflow_a_merged_weight_changes_nothing():
    model = nlnn.add_adapters(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6)), ["0", "1"], 3, seed=0)
    with torch.no_grad():
        for _, adapter in nlnn.iter_adapters(model):
            adapter.delta.core.normal_()
        model[1].delta.core.mul_(3e37)  # finite, and merged finite, but its truncation rounds above float32
    nlnn.merge_adapters(model)
    before = _state(model)
    try:
        nlnn.truncate_adapters(model, ranks=2)
    except ValueError as exc:
        assert "'1'" in str(exc) and "no adapter was truncated" in str(exc)
        _assert_unchanged(model, before)
    else:  # the truncation happened to stay finite: then every merged weight must be finite
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_merge_is_still_all_or_nothing():
    model = _adapted()
    _poison(model, "5")
    before = _state(model)
    with pytest.raises(ValueError, match=r"'5': .*no adapter was merged"):
        nlnn.merge_adapters(model)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("poisoned", ["5", "4.weight"])
def test_unmerge_after_the_delta_diverged_changes_nothing(poisoned):
    model = _adapted()
    nlnn.merge_adapters(model)
    _poison(model, poisoned)
    before = _state(model)
    with pytest.raises(
        ValueError, match=rf"'{poisoned}': unmerging would put NaN or Inf.*; no adapter was unmerged"
    ):
        nlnn.unmerge_adapters(model)
    _assert_unchanged(model, before)
    assert all(adapter.merged for _, adapter in nlnn.iter_adapters(model))


def test_prepare_all_names_the_item_and_keeps_the_type():
    def prepare(value: int) -> int:
        if value < 0:
            raise TypeError("negative")
        return 2 * value

    assert nlnn.model.prepare_all([("a", 1), ("b", 2)], prepare, verb="doubled") == [2, 4]
    with pytest.raises(TypeError, match="'b': negative; no adapter was doubled"):
        nlnn.model.prepare_all([("a", 1), ("b", -2)], prepare, verb="doubled")


# -- class 5: one adapter per weight, across calls -----------------------------------------------


SECOND_CALLS = {
    "module after parameter": (dict(target_parameters=["0.weight"]), dict(target_modules=["0"])),
    "parameter after module": (dict(target_modules=["0"]), dict(target_parameters=["0.weight"])),
    "module after module": (dict(target_modules=["0"]), dict(target_modules=["0"])),
    "parameter after parameter": (dict(target_parameters=["4.weight"]), dict(target_parameters=["4.weight"])),
    "regex after parameter": (dict(target_parameters=["0.weight"]), dict(target_modules=r"\d")),
    "regex after module": (dict(target_modules=["5"]), dict(target_modules=r"5")),
    "suffix after module": (dict(target_modules=["2"]), dict(target_parameters=["2.bias"])),
    "adapter's own core": (dict(target_modules=["2"]), dict(target_parameters=["2.delta.core"])),
    "adapter's own factor": (dict(target_modules=["5"]), dict(target_parameters=["delta.factors.0"])),
}


@pytest.mark.parametrize("case", list(SECOND_CALLS))
def test_second_adapter_on_an_adapted_weight_is_refused_and_says_why(case, tmp_path):
    first, second = SECOND_CALLS[case]
    model = _net()
    nlnn.add_adapters(
        model, first.get("target_modules"), 2, seed=0, target_parameters=first.get("target_parameters")
    )
    before = _state(model)
    with pytest.raises(ValueError, match="already has an adapter") as info:
        nlnn.add_adapters(
            model, second.get("target_modules"), 2, seed=1, target_parameters=second.get("target_parameters")
        )
    assert "matches no" not in str(info.value)
    _assert_unchanged(model, before)
    nlnn.save_adapters(model, tmp_path / "a.safetensors")  # what is saved still loads
    restored = nlnn.load_adapters(_net(), tmp_path / "a.safetensors")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(restored(x), model(x))


def test_attention_out_proj_takes_one_adapter_across_calls():
    layer = nn.TransformerEncoderLayer(8, 2, 16)
    nlnn.add_adapters(layer, ["out_proj"], 2, seed=0)
    with pytest.raises(ValueError, match="already has an adapter"):
        nlnn.add_adapters(layer, ["out_proj"], 2, seed=0)
    with pytest.raises(ValueError, match="already has an adapter"):
        nlnn.add_adapters(layer, None, 2, target_parameters=["self_attn.out_proj.weight"])


@pytest.mark.parametrize(
    "targets, error, pattern",
    [
        (dict(target_modules=[0]), TypeError, r"target_modules entries must be .*, got 0 \(int\)"),
        (dict(target_modules=["0", None]), TypeError, r"target_modules entries must be .*, got None"),
        (dict(target_modules=None, target_parameters=[b"0.weight"]), TypeError, r"target_parameters\[0\]"),
    ],
)
def test_target_names_must_be_strings(targets, error, pattern):
    model = _net()
    with pytest.raises(error, match=pattern):
        nlnn.add_adapters(model, targets.pop("target_modules"), 2, **targets)


# -- class 4: no load into a model without values --------------------------------------------------


@pytest.mark.parametrize("adapted", [False, True])
def test_load_into_a_meta_model_is_refused(adapted, tmp_path):
    nlnn.save_adapters(_adapted(), tmp_path / "a.safetensors")
    with torch.device("meta"):
        model = _net()
        if adapted:
            nlnn.add_adapters(model, ["0", "2", "5"], 2, seed=0, target_parameters=["4.weight"])
    types = [(name, type(m).__name__) for name, m in model.named_modules()]
    with pytest.raises(ValueError, match="meta device"):
        nlnn.load_adapters(model, tmp_path / "a.safetensors")
    assert [(name, type(m).__name__) for name, m in model.named_modules()] == types
    if adapted:
        with pytest.raises(ValueError, match="meta device"):
            nlnn.save_adapters(model, tmp_path / "b.safetensors")
        assert not (tmp_path / "b.safetensors").exists()


def test_load_after_materialising_works(tmp_path):
    source = _adapted()
    nlnn.save_adapters(source, tmp_path / "a.safetensors")
    with torch.device("meta"):
        model = _net()
    model.to_empty(device="cpu")
    model.load_state_dict(_net().state_dict())
    nlnn.load_adapters(model, tmp_path / "a.safetensors")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), source(x))


# -- class 7: one scale rule -----------------------------------------------------------------------


BAD_SCALES = [
    (1e300, ValueError, "too large"),
    (-2e6, ValueError, "too large"),
    (math.inf, ValueError, "finite"),
    (math.nan, ValueError, "finite"),
    (10**400, ValueError, "finite"),
    ("2", TypeError, "real number"),
    (True, TypeError, "real number"),
]


@pytest.mark.parametrize("scale, error, pattern", BAD_SCALES)
@pytest.mark.parametrize(
    "where", ["tucker_delta", "TuckerDelta", "add_adapters", "TuckerAdapter", "nn.TuckerDelta"]
)
def test_scale_is_checked_by_one_rule_everywhere(scale, error, pattern, where):
    builders = {
        "tucker_delta": lambda: nl.tucker_delta((4, 3), 2, scale=scale),
        "TuckerDelta": lambda: nl.TuckerDelta(
            torch.ones(2, 2), [torch.ones(4, 2), torch.ones(3, 2)], scale=scale
        ),
        "add_adapters": lambda: nlnn.add_adapters(_net(), ["0"], 2, scale=scale),
        "TuckerAdapter": lambda: nlnn.TuckerAdapter(nn.Linear(4, 3), 2, scale=scale),
        "nn.TuckerDelta": lambda: nlnn.TuckerDelta((4, 3), 2, scale=scale),
    }
    with pytest.raises(error, match=pattern):
        builders[where]()


@pytest.mark.parametrize("scale", [0.0, 1e-9, -1e-300])
def test_principal_needs_a_scale_it_can_divide_by_everywhere(scale):
    pattern = r"init='principal' divides the core by scale, so it needs \|scale\| >= 1e-06"
    with pytest.raises(ValueError, match=pattern):
        nl.tucker_delta((4, 3), 2, init="principal", weight=torch.ones(4, 3), scale=scale)
    model = _net()
    before = _state(model)
    with pytest.raises(ValueError, match=pattern):
        nlnn.add_adapters(model, ["0", "2"], 2, init="principal", scale=scale)
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match=pattern):
        nlnn.TuckerAdapter(nn.Linear(4, 3), 2, init="principal", scale=scale)


@pytest.mark.parametrize("init", ["zero_core", "zero_factor", "orthogonal"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_largest_accepted_scale_gives_finite_deltas(init, dtype):
    d = nl.tucker_delta((6, 5, 4), 3, init=init, scale=-1e6, dtype=dtype, seed=0)
    assert bool(torch.isfinite(torch.as_tensor(d.to_dense())).all())
    model = nlnn.add_adapters(copy.deepcopy(_net()), ["0", "5"], 2, init=init, scale=1e6, seed=0)
    assert torch.isfinite(model(torch.randn(1, 3, 8, 8))).all()


@pytest.mark.parametrize("seed", [True, "x", 1.5, -1])
def test_bad_seeds_are_named(seed):
    with pytest.raises(ValueError, match="seed must be"):
        nlnn.add_adapters(_net(), ["0"], 2, seed=seed)
    with pytest.raises(ValueError, match="seed must be"):
        nl.sthosvd(torch.ones(4, 3, dtype=torch.float64), 2, solver="randomized", seed=seed)
    with pytest.raises(ValueError, match="seed must be"):
        nl.tucker_delta((4, 3), 2, seed=seed)


@pytest.mark.parametrize(
    "call",
    [
        lambda: nlnn.add_adapters(None, ["0"], 2),
        lambda: nlnn.merge_adapters({}),
        lambda: nlnn.unmerge_adapters(None),
        lambda: nlnn.remove_adapters(None),
        lambda: nlnn.truncate_adapters(None, ranks=1),
        lambda: nlnn.save_adapters(None, "x.safetensors"),
        lambda: list(nlnn.iter_adapters("model")),
    ],
)
def test_a_model_that_is_not_a_module_is_named(call):
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        call()


@pytest.mark.parametrize(
    "options, error, pattern",
    [
        (dict(target_modules="("), ValueError, r"target_modules='\(' is not a valid regular expression"),
        (dict(rank_pattern={"(": 1}), ValueError, r"rank_pattern key '\(' is not a valid regular expression"),
        (dict(rank_pattern=[1]), TypeError, "rank_pattern must be a mapping"),
        (dict(rank_pattern={3: 1}), TypeError, "rank_pattern keys must be regex strings"),
    ],
)
def test_bad_patterns_are_named(options, error, pattern):
    model = _net()
    before = _state(model)
    with pytest.raises(error, match=pattern):
        nlnn.add_adapters(model, options.pop("target_modules", ["0"]), 2, **options)
    _assert_unchanged(model, before)


def test_nan_adapters_are_neither_saved_nor_loaded(tmp_path):
    model = _adapted()
    _poison(model, "4.weight")
    with pytest.raises(ValueError, match=r"adapters \['4.weight'\] hold NaN or Inf"):
        nlnn.save_adapters(model, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    nlnn.save_adapters(_adapted(), tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(tmp_path / "a.safetensors")
    tensors["5.factors.1"][0, 0] = math.inf
    save_file(tensors, tmp_path / "b.safetensors", metadata=metadata)
    fresh = _net()
    before = _state(fresh)
    with pytest.raises(ValueError, match=r"tensors \['5.factors.1'\] hold NaN or Inf"):
        nlnn.load_adapters(fresh, tmp_path / "b.safetensors")
    _assert_unchanged(fresh, before)


@pytest.mark.parametrize(
    "targets", [dict(target_modules=["0"]), dict(target_modules=None, target_parameters=["4.weight"])]
)
def test_principal_init_on_a_meta_weight_is_refused(targets):
    with torch.device("meta"):
        model = _net()
    with pytest.raises(
        ValueError, match="init='principal' decomposes the weight, which is on the meta device"
    ):
        nlnn.add_adapters(model, targets.pop("target_modules"), 2, init="principal", **targets)
    assert not list(nlnn.iter_adapters(model))


def test_a_second_name_is_welcome_the_same_name_is_refused():
    model = nlnn.add_adapters(_net(), ["0"], 2, seed=0, target_parameters=["4.weight"])
    nlnn.add_adapters(model, ["0"], 2, seed=1, adapter_name="b", target_parameters=["4.weight"])
    assert model[0].adapter_names == ["default", "b"]
    for targets in (dict(target_modules=["0"]), dict(target_modules=None, target_parameters=["4.weight"])):
        before = _state(model)
        with pytest.raises(ValueError, match="already has an adapter named 'b'"):
            nlnn.add_adapters(model, targets.pop("target_modules"), 2, adapter_name="b", **targets)
        _assert_unchanged(model, before)


@pytest.mark.parametrize("format_", ["peft", "kohya"])
def test_a_failed_export_is_an_oserror_and_leaves_nothing(format_, tmp_path, monkeypatch):
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise RuntimeError("I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    model = nlnn.add_adapters(nn.Sequential(nn.Linear(6, 5)), ["0"], 2, seed=0)
    target = tmp_path / ("peft" if format_ == "peft" else "lora.safetensors")
    with pytest.raises(OSError, match="No space left on device") as info:
        nlnn.export_adapters(model, target, format=format_)
    assert info.value.errno == 28
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == [] or all(p.name == "adapter_config.json" for p in leftovers)
