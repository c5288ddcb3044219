"""Export to and import from PEFT, kohya and LyCORIS files, checked against the real peer loaders.

Tolerances: outputs agree to 1e-5 relative in float32 and 1e-10 in float64 (the factors are
exact; what differs is the order of the floating-point sums in each library).
"""

from __future__ import annotations

import copy
import os

import _real_models
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ndlowrank import nn as nlnn
from ndlowrank.nn.formats._compress import small_forms, truncate_forms
from ndlowrank.nn.formats._layer import from_host, orthonormal_form, truncate_form

from _helpers import einsum_tucker, import_peer

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float64]


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, tol: dict | None = None) -> None:
    scale = float(expected.abs().max()) or 1.0
    err = float((actual - expected).abs().max()) / scale
    assert err <= (tol or TOL)[dtype], err


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero Tucker cores (stand in for training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, host in nlnn.iter_adapters(model):
            host.delta.core.copy_(
                torch.randn(host.delta.core.shape, generator=gen, dtype=host.delta.core.dtype)
            )
    return model


def reference_delta(host) -> np.ndarray:
    """``ΔW`` from the float64 core and factors by one einsum (independent of ndlowrank's products)."""
    core = host.delta.core.detach().double().numpy()
    factors = [f.detach().double().numpy() for f in host.delta.factors]
    return host.delta.scale * einsum_tucker(core, factors)


def layer_delta(layer) -> np.ndarray:
    """``ΔW`` of a LoRA / LoCon-Tucker layer by einsum."""
    up = layer.up.double().numpy()
    if layer.mid is None:
        down = layer.down.double().numpy()
        return layer.scale * np.tensordot(up, down, axes=(1, 0))
    mid, down = layer.mid.double().numpy(), layer.down.double().numpy()
    return layer.scale * np.einsum("ab...,oa,bi->oi...", mid, up, down)


# -- the maths -------------------------------------------------------------------------------------

LAYERS = {
    "linear": lambda g: nn.Linear(6, 5),
    "conv1d": lambda g: nn.Conv1d(4, 6, 3, groups=g),
    "conv2d": lambda g: nn.Conv2d(4, 6, (3, 2), dilation=2, groups=g),
    "conv3d": lambda g: nn.Conv3d(2 * g, 2 * g, (2, 1, 3), groups=g),
    "embedding": lambda g: nn.Embedding(7, 5),
}


@given(
    kind=st.sampled_from(sorted(LAYERS)),
    groups=st.sampled_from([1, 2]),
    rank=st.integers(1, 4),
    scale=st.floats(0.1, 3.0),
    tucker=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_exported_factors_reproduce_delta(kind, groups, rank, scale, tucker, seed):
    torch.manual_seed(seed)
    model = nlnn.add_adapters(
        nn.Sequential(LAYERS[kind](groups)), ["0"], ranks=rank, init="orthogonal", scale=scale, seed=seed
    )
    model = randomize(model, seed).double()
    host = model[0]
    layer = from_host("0", host, tucker=tucker and host.kind == "conv")
    assert layer.shape == tuple(host.weight.shape)
    np.testing.assert_allclose(layer_delta(layer), reference_delta(host), rtol=1e-10, atol=1e-12)
    if layer.mid is not None:
        r = max(host.ranks[:2])
        assert layer.mid.shape[:2] == (r, r) and layer.up.shape[1] == r and layer.down.shape[0] == r
    else:
        assert layer.rank == host.ranks[0]


@given(
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    rank=st.integers(1, 4),
    tol=st.sampled_from([1e-1, 1e-2, 1e-8]),
    seed=st.integers(0, 1000),
)
def test_recompress_meets_tol_without_dense(shape, rank, tol, seed):
    """A LoRA ``up ×₀ down`` with an identity in every other mode, re-compressed: ``‖ΔW_new − ΔW‖ ≤ tol ‖ΔW‖``."""
    rng = np.random.default_rng(seed)
    up = torch.from_numpy(rng.standard_normal((shape[0], rank)))
    down = torch.from_numpy(rng.standard_normal((rank, *shape[1:])))
    small, qs = orthonormal_form(down, [up, *([None] * (len(shape) - 1))])
    core, factors, error = truncate_form(small, qs, tol=tol, ranks=None)
    dense = np.tensordot(up.numpy(), down.numpy(), axes=(1, 0))
    rebuilt = einsum_tucker(core.numpy(), [f.numpy() for f in factors])
    actual = np.linalg.norm(rebuilt - dense) / np.linalg.norm(dense)
    assert actual <= tol * (1 + 1e-9) + 1e-12
    assert abs(actual - error) <= 1e-7  # the reported error comes from norms: exact to about 1e-8
    assert core.shape[0] <= rank


@settings(deadline=None)
@given(
    shape=st.lists(st.integers(1, 7), min_size=2, max_size=4),
    rank=st.integers(1, 5),
    count=st.integers(1, 4),
    tol=st.sampled_from([0.5, 1e-1, 1e-2, 1e-6, 1e-12, None]),
    fixed=st.lists(st.integers(1, 8), min_size=4, max_size=4),
    zero=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_batched_recompress_meets_tol_per_layer(shape, rank, count, tol, fixed, zero, seed):
    """Several LoRAs of one shape re-compressed in one batch: each meets its own bound, or its ranks."""
    rng = np.random.default_rng(seed)
    ups = [rng.standard_normal((shape[0], rank)) for _ in range(count)]
    # decaying spectra in every mode, so that tol truncates somewhere
    downs = [
        rng.standard_normal((rank, *shape[1:])) * np.exp(-np.arange(shape[-1]) / (1 + i))
        for i in range(count)
    ]
    if zero:
        downs[-1] = np.zeros_like(downs[-1])
    forms = [
        (torch.from_numpy(down), [torch.from_numpy(up), *([None] * (len(shape) - 1))])
        for up, down in zip(ups, downs, strict=True)
    ]
    ranks = fixed[: len(shape)] if tol is None else None
    results = truncate_forms(small_forms(forms), tol=tol, ranks=[ranks] * count)
    for up, down, (core, factors, error) in zip(ups, downs, results, strict=True):
        dense = np.tensordot(up, down, axes=(1, 0))
        rebuilt = einsum_tucker(core.numpy(), [f.numpy() for f in factors])
        norm = np.linalg.norm(dense)
        actual = np.linalg.norm(rebuilt - dense) / norm if norm else np.linalg.norm(rebuilt)
        assert abs(actual - error) <= 1e-7
        for f in factors:  # orthonormal columns: the error from norms is the true error
            np.testing.assert_allclose(f.numpy().T @ f.numpy(), np.eye(f.shape[1]), atol=1e-8)
        if tol is not None:
            assert actual <= tol * (1 + 1e-9) + 1e-12
        else:
            small = (min(rank, shape[0]), *shape[1:])
            assert core.shape == tuple(min(r, n) for r, n in zip(ranks, small, strict=True))


# -- PEFT ------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.c3 = nn.Conv3d(6, 4, (1, 3, 3), padding="same")
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens).transpose(1, 2)  # (B, 4, L)
        x = torch.relu(self.c1(x))  # (B, 6, L)
        side = int(x.shape[-1] ** 0.5)
        x = torch.relu(self.c2(x.reshape(*x.shape[:2], side, side)))
        x = self.c3(x.unsqueeze(2)).mean(dim=(2, 3, 4))
        return self.head(x)


def conv_setup(dtype: torch.dtype) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    base = ConvNet().to(dtype)
    model = nlnn.add_adapters(
        copy.deepcopy(base), ["emb", "c1", "c2", "c3", "head"], ranks=3, scale=0.5, seed=0
    )
    model = randomize(model)
    tokens = torch.randint(0, 10, (2, 16))
    return base, model, tokens


@pytest.mark.parametrize("dtype", DTYPES)
def test_peft_from_pretrained_conv_net(tmp_path, dtype):
    peft = import_peer("peft")
    base, model, tokens = conv_setup(dtype)
    nlnn.export_adapters(model, tmp_path / "lora", format="peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora"))
    with torch.no_grad():
        close(loaded(tokens), model(tokens), dtype)
    # and back: the PEFT directory imported into ndlowrank
    fresh = copy.deepcopy(base)
    reports = nlnn.import_adapters(fresh, tmp_path / "lora")
    assert {r.name for r in reports} == {"emb", "c1", "c2", "c3", "head"}
    with torch.no_grad():
        close(fresh(tokens), model(tokens), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_peft_from_pretrained_transformer(tmp_path, dtype):
    transformers = import_peer("transformers")
    peft = import_peer("peft")
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).to(dtype).eval()
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
    model = randomize(nlnn.add_adapters(copy.deepcopy(base), targets, ranks=4, scale=2.0, seed=0)).eval()
    nlnn.export_adapters(model, tmp_path / "lora", format="peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora")).eval()
    ids = torch.randint(0, 32, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
        close(loaded(ids).logits, expected, dtype)
    fresh = copy.deepcopy(base)
    nlnn.import_adapters(fresh, tmp_path / "lora")
    with torch.no_grad():
        close(fresh(ids).logits, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_import_what_peft_saved(tmp_path, dtype):
    """A LoRA trained (here: randomized) and saved by PEFT gives PEFT's outputs once imported."""
    peft = import_peer("peft")
    torch.manual_seed(1)
    base = ConvNet().to(dtype)
    config = peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=["emb", "c1", "c2", "c3", "head"],
        rank_pattern={"c2": 2}, alpha_pattern={"head": 3},
    )  # fmt: skip
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_()
    peft_model.save_pretrained(str(tmp_path / "saved"))
    tokens = torch.randint(0, 10, (2, 16))
    fresh = copy.deepcopy(base)
    reports = nlnn.import_adapters(fresh, tmp_path / "saved")
    assert dict((r.name, r.new_ranks[0]) for r in reports)["c2"] == 2
    with torch.no_grad():
        close(fresh(tokens), peft_model(tokens), dtype)


# -- GPT-2's Conv1D --------------------------------------------------------------------------------


# two transformer blocks (layer norms, softmax) amplify float32 rounding a little beyond TOL
GPT2_TOL = {torch.float32: 5e-5, torch.float64: 1e-10}


def gpt2_setup(dtype):
    real = _real_models.gpt2()
    base = real.model.to(dtype)
    model = nlnn.add_adapters(copy.deepcopy(base), real.target_modules, ranks=3, scale=0.7, seed=0)
    assert isinstance(model.transformer.h[0].attn.c_attn, nlnn.TransposedLinearAdapter)
    return real, base, randomize(model).eval()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpt2_conv1d_adapters_through_peft(tmp_path, dtype):
    """Conv1D adapters (weight (in, out)) exported to PEFT run in PeftModel as in ndlowrank, and come back."""
    peft = import_peer("peft")
    real, base, model = gpt2_setup(dtype)
    with torch.no_grad():
        expected = real(model)
        assert float((expected - real(base)).abs().max()) > 1e-3  # the adapters change the output
    nlnn.export_adapters(model, tmp_path / "lora", format="peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora")).eval()
    assert loaded.base_model.model.transformer.h[0].mlp.c_fc.fan_in_fan_out
    with torch.no_grad():
        close(real(loaded), expected, dtype, GPT2_TOL)
    for fmt, path in (("peft", tmp_path / "lora"), ("diffusers", tmp_path / "d.safetensors")):
        if fmt == "diffusers":
            nlnn.export_adapters(model, path, format="diffusers", prefix="")
        fresh = copy.deepcopy(base)
        reports = nlnn.import_adapters(fresh, path)
        assert {r.new_ranks for r in reports} == {(3, 3)}  # the Tucker ranks come back exactly
        assert isinstance(fresh.transformer.h[1].mlp.c_proj, nlnn.TransposedLinearAdapter)
        with torch.no_grad():
            close(real(fresh), expected, dtype, GPT2_TOL)
    # the file and the model combined: half of each is the model's delta again, in the (in, out) layout
    mixed = copy.deepcopy(base)
    nlnn.combine_adapters(mixed, [model, tmp_path / "lora"], [0.5, 0.5])
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"):
        ours, theirs = mixed.get_submodule(name), model.get_submodule(name)
        close(ours.delta_weight().detach(), theirs.delta_weight().detach(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_import_a_gpt2_lora_peft_saved(tmp_path, dtype):
    """A GPT-2 LoRA saved by PEFT (fan_in_fan_out=True on Conv1D) gives PEFT's outputs once imported."""
    peft = import_peer("peft")
    real = _real_models.gpt2()
    base = real.model.to(dtype)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True,
        rank_pattern={"c_fc": 2},
    )  # fmt: skip
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.3)
    peft_model.save_pretrained(str(tmp_path / "saved"))
    fresh = copy.deepcopy(base)
    reports = nlnn.import_adapters(fresh, tmp_path / "saved")
    assert len(reports) == 8 and dict((r.name, r.new_ranks) for r in reports)["transformer.h.0.mlp.c_fc"] == (
        2,
        2,
    )
    with torch.no_grad():
        expected = real(peft_model)
        assert float((expected - real(base)).abs().max()) > 1e-3
        close(real(fresh), expected, dtype, GPT2_TOL)


@pytest.mark.parametrize("format", ["kohya", "lycoris"])
def test_gpt2_conv1d_refused_where_loaders_do_not_transpose(tmp_path, format):
    _, _, model = gpt2_setup(torch.float32)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn.*Conv1D.*format='peft'"):
        nlnn.export_adapters(model, tmp_path / "x.safetensors", format=format)
    assert not (tmp_path / "x.safetensors").exists()


# -- LyCORIS ---------------------------------------------------------------------------------------


class GeometryNet(nn.Module):
    """Convs LyCORIS runs in every geometry (grouped, dilated, strided), and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, padding=2, dilation=2)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, groups=4)
        self.c3 = nn.Conv1d(8, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c2(torch.relu(self.c1(x)))
        x = self.c3(x.flatten(2)).mean(-1)
        return self.head(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lycoris_create_from_weights(tmp_path, dtype):
    lycoris = import_peer("lycoris")
    torch.manual_seed(2)
    base = GeometryNet().to(dtype)
    model = nlnn.add_adapters(
        copy.deepcopy(base),
        ["c1", "c2", "c3", "head"],
        ranks=2,
        rank_pattern={"c1": (5, 3, 3, 2)},
        scale=0.3,
        seed=0,
    )
    model = randomize(model)
    path = str(tmp_path / "locon.safetensors")
    nlnn.export_adapters(model, path, format="lycoris")
    target = copy.deepcopy(base)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # LyCORIS builds its modules in the default dtype, then copies the file in
    try:
        network, _ = lycoris.create_lycoris_from_weights(1.0, path, target)
    finally:
        torch.set_default_dtype(default)
    assert len(network.loras) == 4
    network.apply_to()
    x = torch.randn(2, 4, 9, 9, dtype=dtype)
    with torch.no_grad():
        close(target(x), model(x), dtype)
    fresh = copy.deepcopy(base)
    nlnn.import_adapters(fresh, path)
    assert fresh.c1.ranks == (5, 3, 3, 2)  # the LoCon-Tucker file gives the Tucker ranks back
    with torch.no_grad():
        close(fresh(x), model(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_import_what_lycoris_saved(tmp_path, dtype):
    lycoris = import_peer("lycoris")
    torch.manual_seed(3)
    base = GeometryNet().to(dtype)
    target = copy.deepcopy(base)
    network = lycoris.create_lycoris(target, 1.0, linear_dim=4, linear_alpha=2, algo="lora", use_tucker=True)
    network.apply_to()
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "lora_" in name:
                p.normal_()
    network = network.to(dtype)
    path = str(tmp_path / "trained.safetensors")
    network.save_weights(path, dtype, None)
    x = torch.randn(2, 4, 9, 9, dtype=dtype)
    fresh = copy.deepcopy(base)
    nlnn.import_adapters(fresh, path)
    with torch.no_grad():
        close(fresh(x), target(x), dtype)


# -- diffusers -------------------------------------------------------------------------------------


def tiny_unet(dtype: torch.dtype):
    diffusers = import_peer("diffusers")
    torch.manual_seed(4)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2, attention_head_dim=2,
    )  # fmt: skip
    return diffusers, unet.to(dtype).eval()


UNET_TARGETS = ["conv1", "conv2", "to_q", "to_v", "proj_in", "conv_in"]


def lora_layers(model: nn.Module) -> int:
    """How many layers of ``model`` run a PEFT LoRA."""
    return sum(
        1 for m in model.modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and len(m.lora_A)
    )


def unet_inputs(dtype):
    gen = torch.Generator().manual_seed(5)
    sample = torch.randn(1, 4, 8, 8, generator=gen, dtype=dtype)
    hidden = torch.randn(1, 3, 8, generator=gen, dtype=dtype)
    return sample, hidden


@pytest.mark.parametrize("dtype", DTYPES)
def test_diffusers_unet_loads_peft_kohya_and_diffusers_files(tmp_path, dtype):
    diffusers, base = tiny_unet(dtype)
    safetensors_torch = import_peer("safetensors.torch")
    model = randomize(nlnn.add_adapters(copy.deepcopy(base), UNET_TARGETS, ranks=3, scale=0.1, seed=0)).eval()
    sample, hidden = unet_inputs(dtype)
    with torch.no_grad():
        expected = model(sample, 1, hidden).sample
        assert float((expected - base(sample, 1, hidden).sample).abs().max()) > 1e-2  # the adapters matter
    # PEFT keys, as diffusers' own PEFT state dicts (no base_model.model. prefix)
    nlnn.export_adapters(model, tmp_path / "peft", format="peft")
    state = safetensors_torch.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    unet = copy.deepcopy(base)
    unet.load_lora_adapter({k.removeprefix("base_model.model."): v for k, v in state.items()}, prefix=None)
    count = len(list(nlnn.iter_adapters(model)))
    assert lora_layers(unet) == count
    with torch.no_grad():
        close(unet(sample, 1, hidden).sample, expected, dtype)
    # kohya keys and diffusers' own (unet.<path>.lora_A.weight), through the pipeline's loader without a pipeline
    for fmt in ("kohya", "diffusers"):
        path = str(tmp_path / f"{fmt}.safetensors")
        nlnn.export_adapters(model, path, format=fmt)
        state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(path)
        unet = copy.deepcopy(base)
        diffusers.StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet)
        assert lora_layers(unet) == count
        with torch.no_grad():
            close(unet(sample, 1, hidden).sample, expected, dtype)
        fresh = copy.deepcopy(base)
        nlnn.import_adapters(fresh, path)
        with torch.no_grad():
            close(fresh(sample, 1, hidden).sample, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_import_what_diffusers_saved(tmp_path, dtype):
    """A UNet LoRA saved by diffusers' save_lora_weights (alpha in its metadata) gives diffusers' outputs."""
    diffusers, base = tiny_unet(dtype)
    peft = import_peer("peft")
    unet = copy.deepcopy(base)
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "conv1", "proj_in"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.3)
    state = peft.get_peft_model_state_dict(unet)
    metadata = {"r": 4, "lora_alpha": 2, "peft_type": "LORA"}
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=state, unet_lora_adapter_metadata=metadata
    )
    sample, hidden = unet_inputs(dtype)
    fresh = copy.deepcopy(base)
    nlnn.import_adapters(fresh, tmp_path / "pytorch_lora_weights.safetensors")
    with torch.no_grad():
        close(fresh(sample, 1, hidden).sample, unet(sample, 1, hidden).sample, dtype)


# -- what a format cannot carry, and bad files -----------------------------------------------------


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_refuses_grouped_and_dilated_convs_by_name(tmp_path, fmt):
    model = randomize(nlnn.add_adapters(GeometryNet(), ["c1", "c2"], ranks=2, seed=0))
    target = tmp_path / ("out" if fmt == "peft" else "out.safetensors")
    with pytest.raises(ValueError, match="'c1' has dilation=\\(2, 2\\)"):
        nlnn.export_adapters(model, target, format=fmt)
    assert not target.exists()


def test_refuses_padding_modes_parameters_embeddings_and_unknown_format(tmp_path):
    model = nlnn.add_adapters(
        nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")), ["0"], ranks=2
    )
    with pytest.raises(ValueError, match="'0' has padding_mode='reflect'"):
        nlnn.export_adapters(model, tmp_path / "x.safetensors", format="lycoris")
    attention = nlnn.add_adapters(
        nn.Sequential(nn.MultiheadAttention(4, 2)), None, 2, target_parameters=["in_proj_weight"]
    )
    with pytest.raises(ValueError, match=r"parameter adapter on '0\.in_proj_weight'"):
        nlnn.export_adapters(attention, tmp_path / "y.safetensors", format="kohya")
    with pytest.raises(ValueError, match="unknown format='comfyui'"):
        nlnn.export_adapters(model, tmp_path / "p", format="comfyui")
    with pytest.raises(ValueError, match="embedding"):
        nlnn.export_adapters(
            nlnn.add_adapters(nn.Sequential(nn.Embedding(5, 3)), ["0"], 2),
            tmp_path / "e.safetensors",
            format="kohya",
        )
    broken = nlnn.add_adapters(nn.Sequential(nn.Linear(3, 3)), ["0"], 2)
    with torch.no_grad():
        broken[0].delta.core.fill_(float("inf"))
    with pytest.raises(ValueError, match="'0': its adapter holds NaN or Inf"):
        nlnn.export_adapters(broken, tmp_path / "b.safetensors", format="kohya")
    assert list(tmp_path.iterdir()) == []


def _untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert list(nlnn.iter_adapters(model)) == []
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a safetensors file at all", "not a readable safetensors file"),
        ({"lycoris_c1.hada_w1_a": torch.ones(2, 2)}, "LoHa, LoKr"),
        ({"lora_unet_nowhere.lora_down.weight": torch.ones(2, 4), "lora_unet_nowhere.lora_up.weight": torch.ones(3, 2)}, "names no layer"),
        ({"lora_unet_head.lora_down.weight": torch.ones(2, 5), "lora_unet_head.lora_up.weight": torch.ones(3, 2)}, "weight shape \\(3, 6\\)"),
        ({"lora_unet_head.lora_down.weight": torch.ones(2, 6)}, "lacks lora_down or lora_up"),
        ({"lora_unet_head.lora_down.weight": torch.full((2, 6), float("nan")), "lora_unet_head.lora_up.weight": torch.ones(3, 2)}, "NaN or Inf"),
    ],
)  # fmt: skip
def test_bad_files_leave_the_model_untouched(tmp_path, content, message):
    safetensors_torch = import_peer("safetensors.torch")
    path = tmp_path / "bad.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        safetensors_torch.save_file(content, str(path))
    model = GeometryNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        nlnn.import_adapters(model, path)
    _untouched(model, before)


def test_bad_peft_directories(tmp_path):
    model = GeometryNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        nlnn.import_adapters(model, tmp_path, format="peft")
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LOHA"}')
    with pytest.raises(ValueError, match="PEFT LOHA adapter"):
        nlnn.import_adapters(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "use_dora": true}')
    with pytest.raises(ValueError, match="use_dora=True is not a weight delta"):
        nlnn.import_adapters(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a readable JSON"):
        nlnn.import_adapters(model, tmp_path)
    with pytest.raises(FileNotFoundError):
        nlnn.import_adapters(model, tmp_path / "missing.safetensors")
    _untouched(model, before)


def test_import_refuses_a_layer_that_has_an_adapter(tmp_path):
    model = randomize(nlnn.add_adapters(GeometryNet(), ["head"], ranks=2, seed=0))
    nlnn.export_adapters(model, tmp_path / "a.safetensors", format="kohya")
    with pytest.raises(ValueError, match="'head' already has an adapter"):
        nlnn.import_adapters(model, tmp_path / "a.safetensors")


# -- import ranks and combining --------------------------------------------------------------------


def test_import_with_tol_and_ranks_resizes_a_lora(tmp_path):
    torch.manual_seed(6)
    base = nn.Sequential(nn.Conv2d(8, 16, 3))
    model = randomize(
        nlnn.add_adapters(copy.deepcopy(base), ["0"], ranks=(8, 8, 3, 3), init="orthogonal", seed=0)
    )
    path = tmp_path / "big.safetensors"
    nlnn.export_adapters(model, path, format="kohya")
    exact = model[0].delta_weight().detach().double()
    for tol in (0.3, 0.05):
        fresh = copy.deepcopy(base)
        (report,) = nlnn.import_adapters(fresh, path, tol=tol)
        err = float(
            torch.linalg.vector_norm(fresh[0].delta_weight().detach().double() - exact)
            / torch.linalg.vector_norm(exact)
        )
        assert err <= tol + 1e-6 and abs(err - report.relative_change) < 1e-5
    fresh = copy.deepcopy(base)
    nlnn.import_adapters(fresh, path, ranks=(2, 3, 2, 2))
    assert fresh[0].ranks == (2, 3, 2, 2)
    fresh = copy.deepcopy(base)
    nlnn.import_adapters(fresh, path, budget=600)
    assert 16 + 8 + 3 + 3 + 1 < fresh[0].delta.n_params <= 600
    with pytest.raises(ValueError, match="at most one of tol=, ranks= or budget="):
        nlnn.import_adapters(copy.deepcopy(base), path, tol=0.1, budget=600)
    with pytest.raises(ValueError, match="budget=10 is below"):
        nlnn.import_adapters(copy.deepcopy(base), path, budget=10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_models_and_files(tmp_path, dtype):
    torch.manual_seed(7)
    base = GeometryNet().to(dtype)
    a = randomize(nlnn.add_adapters(copy.deepcopy(base), ["c1", "head"], ranks=2, seed=0), 1)
    b = randomize(nlnn.add_adapters(copy.deepcopy(base), ["c1", "c2"], ranks=3, seed=1), 2)
    path = tmp_path / "b.safetensors"
    nlnn.export_adapters(b, path, format="lycoris")
    combined = copy.deepcopy(base)
    reports = nlnn.combine_adapters(combined, [a, path], [0.7, -0.2])
    assert {r.name for r in reports} == {"c1", "c2", "head"}
    for name in ("c1", "c2", "head"):
        expected = torch.zeros_like(base.get_submodule(name).weight)
        for w, m in ((0.7, a), (-0.2, b)):
            layer = m.get_submodule(name)
            if isinstance(layer, nlnn.TuckerAdapter):
                expected = expected + w * layer.delta_weight().detach()
        close(combined.get_submodule(name).delta_weight().detach(), expected, dtype)
    assert combined.c1.ranks[:2] == (5, 4)  # rank 2 + 3 out, 2 + (3 padded to LoCon's 3) in
    saved = tmp_path / "a.safetensors"  # an ndlowrank file is a source too
    nlnn.save_adapters(a, saved)
    from_file = copy.deepcopy(base)
    nlnn.combine_adapters(from_file, [saved, path], [0.7, -0.2])
    close(from_file.c1.delta_weight().detach(), combined.c1.delta_weight().detach(), dtype)
    with pytest.raises(ValueError, match="ndlowrank adapter file; load it with"):
        nlnn.import_adapters(copy.deepcopy(base), saved)
    budgeted = copy.deepcopy(base)
    nlnn.combine_adapters(budgeted, [a, path], [0.7, -0.2], budget=900)
    assert sum(host.delta.n_params for _, host in nlnn.iter_adapters(budgeted)) <= 900
    with pytest.raises(ValueError, match="one weight per source"):
        nlnn.combine_adapters(combined, [a, b], [1.0])


def test_convert_between_formats_and_resize(tmp_path, capsys):
    from ndlowrank.cli import main

    torch.manual_seed(8)
    base = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 4))
    model = randomize(nlnn.add_adapters(copy.deepcopy(base), ["0", "2"], ranks=6, init="orthogonal", seed=0))
    nlnn.export_adapters(model, tmp_path / "peft", format="peft")
    kohya_file, lycoris_file = tmp_path / "k.safetensors", tmp_path / "l.safetensors"
    assert main(["convert", str(tmp_path / "peft"), str(kohya_file), "--to", "kohya"]) == 0
    with pytest.raises(SystemExit):  # a kohya source keeps its key stems
        main(["convert", str(kohya_file), str(lycoris_file), "--to", "lycoris", "--prefix", "x"])
    nlnn.convert_adapters(kohya_file, lycoris_file, format="lycoris")
    x = torch.randn(2, 8, 6, 6)
    for path in (kohya_file, lycoris_file):
        fresh = copy.deepcopy(base)
        nlnn.import_adapters(fresh, path)
        with torch.no_grad():
            close(fresh(x), model(x), torch.float32)
    small = tmp_path / "small.safetensors"
    assert main(["convert", str(kohya_file), str(small), "--to", "kohya", "--budget", "5000"]) == 0
    fresh = copy.deepcopy(base)
    nlnn.import_adapters(fresh, small)  # the file holds the budget's Tucker forms exactly
    assert sum(host.delta.n_params for _, host in nlnn.iter_adapters(fresh)) <= 5000
    reports = nlnn.convert_adapters(kohya_file, small, format="kohya", ranks=2)
    assert [r.new_ranks for r in reports] == [(2, 2, 2, 2), (2, 2)]
    exact = model[0].delta_weight().detach()
    fresh = copy.deepcopy(base)
    nlnn.import_adapters(fresh, small)
    err = float(
        torch.linalg.vector_norm(fresh[0].delta_weight().detach() - exact) / torch.linalg.vector_norm(exact)
    )
    assert abs(err - reports[0].relative_change) < 1e-4
    diffusers_file = tmp_path / "d.safetensors"
    assert main(["convert", str(tmp_path / "peft"), str(diffusers_file), "--to", "diffusers"]) == 0
    assert main(["convert", str(diffusers_file), str(tmp_path / "back"), "--to", "peft", "--tol", "0.5"]) == 0
    fresh = copy.deepcopy(base)
    nlnn.import_adapters(fresh, tmp_path / "back")
    assert fresh[0].ranks[0] <= 6
    with pytest.raises(SystemExit) as stop:
        main(["convert", str(kohya_file), str(tmp_path / "p2"), "--to", "peft"])
    assert stop.value.code == 2
    assert "module paths peft needs" in capsys.readouterr().err
    assert not (tmp_path / "p2").exists()


def test_import_onto_a_linear_its_parent_reads_by_attribute(tmp_path):
    """An encoder layer reads ``linear1.weight`` directly: the import puts a parameter adapter there."""
    safetensors_torch = import_peer("safetensors.torch")
    torch.manual_seed(9)
    base = nn.Sequential(nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0)).eval()
    up, down = torch.randn(12, 3), torch.randn(3, 8)
    path = tmp_path / "lora.safetensors"
    safetensors_torch.save_file(
        {"lora_unet_0_linear1.lora_up.weight": up, "lora_unet_0_linear1.lora_down.weight": down}, str(path)
    )
    expected = copy.deepcopy(base)
    with torch.no_grad():
        expected[0].linear1.weight += up @ down
    fresh = copy.deepcopy(base)
    nlnn.import_adapters(fresh, path)
    assert [name for name, _ in nlnn.iter_adapters(fresh)] == ["0.linear1.weight"]
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        close(fresh(x), expected(x), torch.float32)
    with pytest.raises(ValueError, match="already has an adapter"):
        nlnn.import_adapters(fresh, path)


CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@settings(max_examples=12)  # each example runs three real loaders
@given(
    dims=st.integers(1, 3),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.sampled_from([0, 1, "same"]),
    dilation=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
    rank=st.integers(1, 4),
    seed=st.integers(0, 100),
)
def test_every_conv_geometry_through_the_real_loaders(
    dims, kernel, stride, padding, dilation, groups, rank, seed
):
    """Each format's loader reproduces the adapted conv, or the export refuses it by name and writes nothing."""
    import tempfile

    peft = import_peer("peft")
    lycoris = import_peer("lycoris")
    if padding == "same":
        stride = 1  # torch allows padding="same" only with stride 1
    torch.manual_seed(seed)
    conv = CONVS[dims](4, 6, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)
    base = nn.Sequential(conv)
    model = randomize(
        nlnn.add_adapters(copy.deepcopy(base), ["0"], ranks=rank, init="orthogonal", seed=seed), seed
    )
    x = torch.randn(2, 4, *([7] * dims))
    with torch.no_grad():
        expected = model(x)
    plain = groups == 1 and dilation == 1
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("peft", "kohya", "lycoris"):
            target = os.path.join(tmp, fmt if fmt == "peft" else f"{fmt}.safetensors")
            if fmt != "lycoris" and not plain:
                with pytest.raises(ValueError, match="layer '0' has"):
                    nlnn.export_adapters(model, target, format=fmt)
                assert not os.path.exists(target)
                continue
            nlnn.export_adapters(model, target, format=fmt)
            loaded = copy.deepcopy(base)
            if fmt == "peft":
                loaded = peft.PeftModel.from_pretrained(loaded, target)
            elif fmt == "lycoris":
                network, _ = lycoris.create_lycoris_from_weights(1.0, target, loaded)
                network.apply_to()
            else:  # kohya: diffusers' path is covered on the UNet; here the file through import_adapters
                nlnn.import_adapters(loaded, target)
            with torch.no_grad():
                close(loaded(x), expected, torch.float32)


@pytest.mark.parametrize("fmt", ["peft", "kohya", "lycoris"])
def test_principal_adapters_export_the_change_from_the_original_weight(tmp_path, fmt):
    """With init="principal" the base holds W − start; the file carries ΔW − start, for the original model."""
    peft = import_peer("peft")
    lycoris = import_peer("lycoris")
    torch.manual_seed(10)
    base = nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.Flatten(), nn.Linear(150, 3)
    )
    model = nlnn.add_adapters(copy.deepcopy(base), ["0", "2", "4"], ranks=2, init="principal", seed=0)
    with torch.no_grad():  # stands in for training
        for _, host in nlnn.iter_adapters(model):
            host.delta.core.add_(0.1 * torch.randn_like(host.delta.core))
    target = str(tmp_path / ("p" if fmt == "peft" else "l.safetensors"))
    nlnn.export_adapters(model, target, format=fmt)
    loaded = copy.deepcopy(base)  # the original weights
    if fmt == "peft":
        loaded = peft.PeftModel.from_pretrained(loaded, target)
    elif fmt == "lycoris":
        network, _ = lycoris.create_lycoris_from_weights(1.0, target, loaded)
        network.apply_to()
    else:
        nlnn.import_adapters(loaded, target)
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        close(loaded(x), model(x), torch.float32)


def test_strict_false_leaves_out_layers_the_model_lacks(tmp_path):
    """A Stable Diffusion file holds text-encoder layers too; the UNet alone takes its own with strict=False."""
    safetensors_torch = import_peer("safetensors.torch")
    model = randomize(nlnn.add_adapters(GeometryNet(), ["head"], ranks=2, seed=0))
    path = tmp_path / "sd.safetensors"
    nlnn.export_adapters(model, path, format="kohya")
    state = safetensors_torch.load_file(str(path))
    state["lora_te_text_model_fc.lora_down.weight"] = torch.ones(2, 4)
    state["lora_te_text_model_fc.lora_up.weight"] = torch.ones(4, 2)
    safetensors_torch.save_file(state, str(path))
    fresh = GeometryNet()
    fresh.load_state_dict(model.state_dict(), strict=False)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match="'lora_te_text_model_fc' names no layer"):
        nlnn.import_adapters(fresh, path)
    _untouched(fresh, before)
    with pytest.warns(UserWarning, match="1 layers name no layer of the model.*lora_te_text_model_fc"):
        reports = nlnn.import_adapters(fresh, path, strict=False)
    assert [r.name for r in reports] == ["head"]


@given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    terms=st.integers(1, 3),
    identity=st.integers(0, 15),
    seed=st.integers(0, 1000),
)
def test_block_sum_is_the_weighted_sum(shape, terms, identity, seed):
    """``Σ wᵢ Gᵢ ×ₙ Fᵢₙ`` as one block-diagonal Tucker form (some factors identities), against an einsum."""
    from ndlowrank.nn.formats._layer import block_sum

    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    parts, expected = [], np.zeros(shape)
    for _ in range(terms):
        ranks = [int(rng.integers(1, 4)) for _ in shape]
        factors = []
        for n, size in enumerate(shape):
            if identity >> n & 1:  # the same modes are identities in every term
                factors.append(None)
                ranks[n] = size
            else:
                factors.append(torch.from_numpy(rng.standard_normal((size, ranks[n]))))
        core = torch.from_numpy(rng.standard_normal(ranks))
        weight = float(rng.normal())
        parts.append((weight, core, factors))
        dense = [np.eye(size) if f is None else f.numpy() for f, size in zip(factors, shape, strict=True)]
        expected += weight * einsum_tucker(core.numpy(), dense)
    core, factors = block_sum(parts, shape)
    dense = [np.eye(size) if f is None else f.numpy() for f, size in zip(factors, shape, strict=True)]
    np.testing.assert_allclose(einsum_tucker(core.numpy(), dense), expected, rtol=1e-10, atol=1e-10)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_parameter_adapters_become_peft_target_parameters(tmp_path, dtype):
    """A 2-D parameter adapter (an attention's in_proj_weight) loads in PEFT as a target_parameters LoRA."""
    peft = import_peer("peft")
    torch.manual_seed(11)
    base = Attention().to(dtype).eval()
    model = nlnn.add_adapters(
        copy.deepcopy(base), ["head"], ranks=2, target_parameters=["attn.in_proj_weight"],
        rank_pattern={"attn.in_proj_weight": 3}, scale=0.5, seed=0,
    )  # fmt: skip
    model = randomize(model).eval()
    nlnn.export_adapters(model, tmp_path / "p", format="peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "p")).eval()
    x = torch.randn(2, 5, 8, dtype=dtype)
    with torch.no_grad():
        close(loaded(x), model(x), dtype)
    experts = nn.Module()
    experts.weight = nn.Parameter(torch.randn(4, 3, 5))  # stacked experts: no exact PEFT form here
    stacked = nlnn.add_adapters(
        nn.ModuleDict({"experts": experts}), None, 2, target_parameters=["experts.weight"]
    )
    with pytest.raises(ValueError, match=r"parameter 'experts\.weight' has shape \(4, 3, 5\)"):
        nlnn.export_adapters(stacked, tmp_path / "q", format="peft")
    assert not (tmp_path / "q").exists()
    # and back: PEFT's target_parameters LoRA imported as a parameter adapter
    fresh = copy.deepcopy(base)
    reports = nlnn.import_adapters(fresh, tmp_path / "p")
    assert {r.name for r in reports} == {"head", "attn.in_proj_weight"}
    with torch.no_grad():
        close(fresh(x), model(x), dtype)


def test_import_a_target_parameters_lora_peft_saved(tmp_path):
    peft = import_peer("peft")
    torch.manual_seed(12)
    base = Attention().eval()
    config = peft.LoraConfig(
        r=2, lora_alpha=3, target_modules=["head"], target_parameters=["attn.in_proj_weight"]
    )
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_()
    peft_model.save_pretrained(str(tmp_path))
    fresh = copy.deepcopy(base)
    nlnn.import_adapters(fresh, tmp_path)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        close(fresh(x), peft_model(x), torch.float32)


def test_export_a_named_adapter(tmp_path):
    peft = import_peer("peft")
    torch.manual_seed(13)
    base = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    model = nlnn.add_adapters(copy.deepcopy(base), ["0", "2"], ranks=2, seed=0)
    model = nlnn.add_adapters(model, ["2"], ranks=3, adapter_name="small", seed=1)
    with torch.no_grad():
        for _, host in nlnn.iter_adapters(model):
            for name in host.adapter_names:
                host.delta_of(name).core.normal_()
    nlnn.export_adapters(model, tmp_path / "small", format="peft", adapter_name="small")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "small"))
    nlnn.set_active_adapter(model, "small")
    x = torch.randn(4, 6)
    with torch.no_grad():
        close(loaded(x), model(x), torch.float32)
    nlnn.set_active_adapter(model, ["default", "small"])
    with pytest.raises(ValueError, match="several adapters run"):
        nlnn.export_adapters(model, tmp_path / "both", format="peft")
    assert not (tmp_path / "both").exists()
