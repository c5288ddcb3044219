"""Targeting as PEFT users write it ("all-linear", module types, exclude_modules), and read-through layer attributes."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from ndlowrank import nn as nlnn  # noqa: E402

from _helpers import import_peer, perturb_adapters  # noqa: E402


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv1d(4, 4, 1)) for _ in range(2)]
        )
        self.proj = nn.Linear(4, 6)
        self.classifier = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block[0](x)
            x = block[1](x.flatten(2)).reshape(x.shape)
        return self.classifier(self.proj(x.mean((2, 3))))


def _names(model: nn.Module) -> list[str]:
    return [name for name, _ in nlnn.iter_adapters(model)]


def test_module_types_select_every_instance_in_model_order():
    model = nlnn.add_adapters(Tower(), [nn.Conv2d], 2, seed=0)
    assert _names(model) == ["stem", "blocks.0.0", "blocks.1.0"]
    model = nlnn.add_adapters(Tower(), nn.Conv1d, 2, seed=0)  # one type alone
    assert _names(model) == ["blocks.0.1", "blocks.1.1"]
    mixed = nlnn.select_targets(Tower(), ["proj", nn.Conv1d, "blocks.0.1"])
    assert mixed == ["proj", "blocks.0.1", "blocks.1.1"]  # entry order, each module once


def test_all_linear_leaves_the_head_out():
    assert nlnn.select_targets(Tower(), "all-linear") == ["proj"]
    assert nlnn.select_targets(Tower(), "ALL-LINEAR") == ["proj"]  # as PEFT, case-insensitive
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert nlnn.select_targets(plain, "all-linear") == ["0", "2"]  # no head by name: every linear
    with pytest.raises(ValueError, match="no linear layer besides its head"):
        nlnn.select_targets(nn.Sequential(nn.Conv2d(1, 1, 1)), "all-linear")


def test_exclude_modules_by_name_regex_and_type():
    assert nlnn.select_targets(Tower(), [nn.Conv2d], exclude_modules=["stem"]) == ["blocks.0.0", "blocks.1.0"]
    assert nlnn.select_targets(Tower(), [nn.Conv2d, nn.Conv1d], exclude_modules=r"blocks\.1\..*") == [
        "stem",
        "blocks.0.0",
        "blocks.0.1",
    ]
    assert nlnn.select_targets(Tower(), r".*\d", exclude_modules=[nn.Sequential, nn.Conv1d]) == [
        "blocks.0.0",
        "blocks.1.0",
    ]
    model = nlnn.add_adapters(Tower(), [nn.Conv2d, nn.Linear], 2, exclude_modules=["classifier", "stem"])
    assert _names(model) == ["blocks.0.0", "blocks.1.0", "proj"]


def test_bad_targets_are_clear_errors_and_change_nothing():
    model = Tower()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="target module type Conv3d matches no module"):
        nlnn.add_adapters(model, [nn.Conv3d], 2)
    with pytest.raises(ValueError, match="excluded module 'nope' matches no module"):
        nlnn.add_adapters(model, [nn.Conv2d], 2, exclude_modules=["nope"])
    with pytest.raises(ValueError, match="excludes every module"):
        nlnn.add_adapters(model, ["stem"], 2, exclude_modules=[nn.Conv2d])
    with pytest.raises(TypeError, match=r"entries must be module names or nn.Module subclasses, got 3"):
        nlnn.add_adapters(model, ["stem", 3], 2)  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"module 'blocks\.0': cannot adapt a Sequential"):
        nlnn.add_adapters(model, [nn.Sequential], 2)
    with pytest.raises(ValueError, match="exclude_modules narrows target_modules"):
        nlnn.add_adapters(model, None, 2, target_parameters=["stem.weight"], exclude_modules=["stem"])
    assert _names(model) == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def _peft_targets(peft, peft_model: nn.Module) -> list[str]:
    """The module names PEFT put LoRA layers on, sorted."""
    return sorted(
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    )


@pytest.mark.parametrize(
    ("model_class", "config_class", "config", "count"),
    [
        (
            "LlamaForCausalLM",
            "LlamaConfig",
            {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1},
            2 * 7,
        ),
        # GPT-2's linears are transformers' Conv1D (weights stored transposed)
        ("GPT2LMHeadModel", "GPT2Config", {"vocab_size": 32, "n_positions": 16, "n_embd": 8, "n_layer": 2,
                                           "n_head": 2}, 2 * 4),
    ],
)  # fmt: skip
def test_all_linear_matches_peft_on_transformers_models(model_class, config_class, config, count):
    transformers = import_peer("transformers")
    peft = import_peer("peft")
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
    ours = nlnn.select_targets(model, "all-linear")
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear", r=2))
    assert sorted(ours) == _peft_targets(peft, peft_model)
    assert "lm_head" not in ours and len(ours) == count


def test_all_linear_leaves_a_sequence_classifier_out_where_peft_needs_a_task_type():
    transformers = import_peer("transformers")
    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    ours = nlnn.select_targets(model, "all-linear")
    assert "classifier" not in ours and "bert.pooler.dense" in ours and len(ours) == 6 + 1


# -- read-through attributes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "attributes"),
    [
        (nn.Linear(5, 3), ["in_features", "out_features", "bias"]),
        (nn.Linear(5, 3, bias=False), ["in_features", "out_features", "bias"]),
        (
            nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, dilation=(1, 2), groups=2, padding_mode="reflect"),
            [
                "in_channels",
                "out_channels",
                "kernel_size",
                "stride",
                "padding",
                "dilation",
                "groups",
                "padding_mode",
                "bias",
                "transposed",
                "output_padding",
            ],
        ),
        (
            nn.Conv1d(2, 4, 3, padding="same"),
            ["in_channels", "kernel_size", "padding", "_reversed_padding_repeated_twice"],
        ),
        (nn.Conv3d(2, 2, 1), ["in_channels", "out_channels", "kernel_size"]),
        (
            nn.Embedding(7, 4, padding_idx=1, max_norm=2.0),
            [
                "num_embeddings",
                "embedding_dim",
                "padding_idx",
                "max_norm",
                "norm_type",
                "scale_grad_by_freq",
                "sparse",
            ],
        ),
    ],
)
def test_an_adapted_layer_reads_the_wrapped_layers_attributes(layer, attributes):
    adapter = nlnn.TuckerAdapter(layer, 2, seed=0)
    for name in attributes:
        value, expected = getattr(adapter, name), getattr(layer, name)
        assert value is expected or value == expected, name
        assert hasattr(adapter, name)
    assert adapter.weight is layer.weight
    with pytest.raises(AttributeError, match=f"'{type(adapter).__name__}' object has no attribute 'nope'"):
        _ = adapter.nope
    assert not hasattr(adapter, "nope")
    # the adapter's own attributes come first, and setting stays on the adapter
    assert isinstance(adapter.dropout, nn.Module) and adapter.scale == 1.0
    adapter.note = "mine"
    assert adapter.note == "mine" and not hasattr(layer, "note")


def test_code_that_reads_layer_attributes_runs_on_the_adapted_model():
    model = nlnn.add_adapters(Tower(), [nn.Conv2d, nn.Linear], 2, seed=0)
    perturb_adapters(model)
    # what torchvision / transformers style code does: size a new layer from the old one's attributes
    head = model.classifier
    new_head = nn.Linear(head.in_features, head.out_features * 2, bias=head.bias is not None)
    assert tuple(new_head.weight.shape) == (6, 6)
    stem = model.stem
    clone = nn.Conv2d(stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding)
    assert tuple(clone.weight.shape) == tuple(stem.weight.shape)
    assert model.blocks[0][0].groups == 2
    for name in ("stem", "classifier"):  # attributes survive copying and pickling
        copied = copy.deepcopy(model.get_submodule(name))
        assert copied.bias is not None and torch.equal(copied.bias, model.get_submodule(name).bias)
