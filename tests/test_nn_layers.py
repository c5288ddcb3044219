"""TuckerAdapter on every layer geometry, both forward paths, inits, costs, dtypes; the TuckerDelta module.

Every adapter output and gradient is checked against an independent reference: the base
layer run by ``torch.func.functional_call`` with its weight replaced by ``W + ΔW``, where
``ΔW`` is one ``torch.einsum`` of ``scale · core`` and the factors.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

import ndlowrank as nl  # noqa: E402
from ndlowrank import nn as nlnn  # noqa: E402
from ndlowrank.nn.layers import _COMPOSITE_STEP_OVERHEAD, _FUNCTION_STEP_OVERHEAD, _PLAIN_DISCOUNT  # noqa: E402

F64 = torch.float64
INITS = ("zero_core", "zero_factor", "orthogonal", "principal")
RANDOM_INITS = INITS[:3]
PATHS = ("materialize", "factorized")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# torch's own note on padding="same" with an even kernel
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


# -- geometries ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """A layer builder and the shape of its input."""

    name: str
    build: Any
    input_shape: tuple[int, ...]

    def make(self, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(seed)
        layer = self.build().to(F64)
        if isinstance(layer, nn.Embedding):
            count = math.prod(self.input_shape)
            # every row once or more, repeats (for scale_grad_by_freq), the padding row included
            order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
            x = (order % layer.num_embeddings).reshape(self.input_shape)
        else:
            x = torch.randn(self.input_shape, dtype=F64)
        return layer, x


def _g(name: str, build: Any, input_shape: tuple[int, ...]) -> Geometry:
    return Geometry(name, build, input_shape)


LINEAR = [
    _g("linear", lambda: nn.Linear(5, 4), (3, 5)),
    _g("linear-nobias", lambda: nn.Linear(5, 4, bias=False), (3, 5)),
    _g("linear-3d-input", lambda: nn.Linear(5, 4), (2, 3, 5)),
]
CONV = [
    _g("conv1d-stride-pad", lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (2, 3, 9)),
    _g("conv1d-same-even-dilated", lambda: nn.Conv1d(3, 4, 4, padding="same", dilation=2), (2, 3, 9)),
    _g("conv1d-reflect", lambda: nn.Conv1d(3, 4, 3, padding=2, padding_mode="reflect"), (2, 3, 7)),
    _g("conv1d-valid-nobias", lambda: nn.Conv1d(3, 4, 2, padding="valid", bias=False), (2, 3, 6)),
    _g(
        "conv2d-tuple-pad-dilation",
        lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        (2, 3, 7, 6),
    ),
    _g("conv2d-same-odd", lambda: nn.Conv2d(3, 4, 3, padding="same"), (2, 3, 5, 5)),
    _g("conv2d-same-even", lambda: nn.Conv2d(3, 4, (4, 2), padding="same"), (2, 3, 6, 5)),
    _g("conv2d-valid", lambda: nn.Conv2d(3, 4, 3, padding="valid"), (2, 3, 5, 6)),
    _g("conv2d-nobias", lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False), (2, 3, 5, 5)),
    _g("conv2d-depthwise", lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (2, 4, 5, 5)),
    _g("conv2d-depthwise-multiplier", lambda: nn.Conv2d(3, 6, 3, groups=3, stride=2), (2, 3, 7, 7)),
    _g("conv2d-groups-in-out-multipliers", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 4)),
    _g(
        "conv2d-reflect-groups-stride",
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect"),
        (2, 4, 7, 6),
    ),
    _g(
        "conv2d-replicate-tuple-pad",
        lambda: nn.Conv2d(3, 4, 3, padding=(2, 1), padding_mode="replicate"),
        (2, 3, 5, 5),
    ),
    _g(
        "conv2d-circular-dilation",
        lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2, padding_mode="circular"),
        (2, 3, 6, 6),
    ),
    _g(
        "conv2d-same-even-circular",
        lambda: nn.Conv2d(3, 4, 2, padding="same", padding_mode="circular"),
        (2, 3, 5, 5),
    ),
    _g(
        "conv2d-same-even-reflect",
        lambda: nn.Conv2d(3, 4, 4, padding="same", padding_mode="reflect"),
        (2, 3, 6, 6),
    ),
    _g(
        "conv3d-stride-tuple-pad",
        lambda: nn.Conv3d(2, 3, (3, 2, 2), stride=(1, 2, 1), padding=(1, 0, 1)),
        (2, 2, 4, 5, 4),
    ),
    _g(
        "conv3d-groups-replicate",
        lambda: nn.Conv3d(4, 4, 3, padding=1, groups=2, padding_mode="replicate"),
        (1, 4, 3, 4, 3),
    ),
    _g("conv3d-same-even", lambda: nn.Conv3d(2, 3, 2, padding="same", bias=False), (2, 2, 3, 3, 3)),
    # 1×…×1 kernels without padding run as matrix products (ConvGeometry.pointwise)
    _g("conv1d-pointwise", lambda: nn.Conv1d(3, 4, 1), (2, 3, 5)),
    _g("conv2d-pointwise-stride-groups", lambda: nn.Conv2d(4, 6, 1, stride=(2, 3), groups=2), (2, 4, 5, 7)),
    _g("conv2d-pointwise-one-pixel", lambda: nn.Conv2d(5, 3, 1), (3, 5, 1, 1)),
    _g("conv3d-pointwise-stride", lambda: nn.Conv3d(3, 2, 1, stride=2, bias=False), (1, 3, 3, 4, 3)),
    _g("conv2d-pointwise-padded", lambda: nn.Conv2d(3, 4, 1, padding=1), (2, 3, 4, 4)),
]
UNBATCHED = [
    _g("conv1d-unbatched-reflect", lambda: nn.Conv1d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 6)),
    _g("conv2d-unbatched", lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 5, 5)),
]
EMBEDDING = [
    _g("embedding", lambda: nn.Embedding(7, 5), (2, 6)),
    _g("embedding-padding-idx", lambda: nn.Embedding(7, 5, padding_idx=2), (2, 6)),
    _g("embedding-max-norm", lambda: nn.Embedding(7, 5, max_norm=1.0), (2, 6)),
    _g("embedding-scale-grad-by-freq", lambda: nn.Embedding(7, 5, scale_grad_by_freq=True), (3, 6)),
]
GEOMETRIES = LINEAR + CONV + UNBATCHED + EMBEDDING


def _ids(geometries: list[Geometry]) -> list[pytest.param]:
    return [pytest.param(g, id=g.name) for g in geometries]


def _named(*names: str) -> list[pytest.param]:
    by_name = {g.name: g for g in GEOMETRIES}
    return _ids([by_name[name] for name in names])


def _paths(geometry: Geometry) -> tuple[str, ...]:
    return (
        ("materialize",) if geometry.name in ("embedding-max-norm", "embedding-scale-grad-by-freq") else PATHS
    )


# -- the independent reference ------------------------------------------------------------------


def einsum_delta(delta: nlnn.TuckerDelta) -> torch.Tensor:
    """``scale · core ×_0 A_0 … ×_{N-1} A_{N-1}`` in one einsum (differentiable)."""
    ndim = delta.core.ndim
    core_idx = "abcdefg"[:ndim]
    out_idx = "nopqrst"[:ndim]
    operands = ",".join(o + i for o, i in zip(out_idx, core_idx, strict=True))
    return delta.scale * torch.einsum(f"{core_idx},{operands}->{out_idx}", delta.core, *delta.factors)


def reference_forward(adapter: nlnn.TuckerAdapter, x: torch.Tensor) -> torch.Tensor:
    """The base layer itself, run with weight ``W + ΔW`` (its own padding, groups, options)."""
    base = adapter.base_layer
    params = dict(base.named_parameters())
    params["weight"] = params["weight"] + einsum_delta(adapter.delta).to(params["weight"].dtype)
    return functional_call(base, params, (x,))


@torch.no_grad()
def perturb(adapter: nlnn.TuckerAdapter, seed: int = 1, std: float = 0.5) -> None:
    """Random adapter parameters (keeping an embedding's padding row of ΔW at zero, as training does)."""
    gen = torch.Generator().manual_seed(seed)
    for p in adapter.delta.parameters():
        p.copy_(std * torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype))
    padding_idx = getattr(adapter.base_layer, "padding_idx", None)
    if padding_idx is not None:
        adapter.delta.factors[0][padding_idx].zero_()


def _outputs_and_grads(forward, adapter: nlnn.TuckerAdapter, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output and the gradients of a fixed random projection of it w.r.t. x and every parameter."""
    adapter.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    out = forward(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    weights = weights.to(device=out.device, dtype=out.dtype)
    (out * weights).sum().backward()
    results = {"out": out.detach()}
    if x.is_floating_point():
        results["grad x"] = x.grad
    for name, p in adapter.named_parameters():
        results[f"grad {name}"] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
    adapter.zero_grad(set_to_none=True)
    return results


def _assert_all_close(actual: dict, expected: dict, **tol: float) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], msg=lambda m, key=key: f"{key}: {m}", **tol)


# -- dispatch -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, cls, kind",
    [
        (nn.Linear(3, 2), nlnn.LinearAdapter, "linear"),
        (nn.Conv1d(2, 2, 3), nlnn.ConvAdapter, "conv"),
        (nn.Conv2d(2, 2, 3), nlnn.ConvAdapter, "conv"),
        (nn.Conv3d(2, 2, 3), nlnn.ConvAdapter, "conv"),
        (nn.Embedding(4, 3), nlnn.EmbeddingAdapter, "embedding"),
    ],
    ids=["linear", "conv1d", "conv2d", "conv3d", "embedding"],
)
def test_tucker_adapter_dispatches_on_the_layer_type(layer, cls, kind):
    adapter = nlnn.TuckerAdapter(layer, 2, seed=0)
    assert type(adapter) is cls and isinstance(adapter, nlnn.TuckerAdapter)
    assert adapter.kind == kind
    assert adapter.base_layer is layer
    assert adapter.delta.shape == tuple(layer.weight.shape)
    assert adapter.config()["layer"] == type(layer).__name__
    assert type(layer) in nlnn.supported_layers()


def test_int_ranks_are_clipped_and_tuples_are_strict():
    depthwise = nn.Conv2d(4, 4, 3, groups=4)
    assert nlnn.TuckerAdapter(depthwise, 8, seed=0).ranks == (4, 1, 3, 3)
    with pytest.raises(ValueError, match=r"ranks\[1\]=2 .*mode 1 of size 1"):
        nlnn.TuckerAdapter(depthwise, (2, 2, 3, 3))
    with pytest.raises(ValueError, match=r"has 2 entries .*4 modes"):
        nlnn.TuckerAdapter(depthwise, (2, 2))


# -- every init leaves the output unchanged -----------------------------------------------------


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("geometry", _ids(GEOMETRIES))
def test_every_init_leaves_the_output_unchanged(geometry, init):
    layer, x = geometry.make()
    original = copy.deepcopy(layer)
    adapter = nlnn.TuckerAdapter(layer, 2, init=init, seed=3)
    if init != "principal":
        assert not adapter.delta_weight().any()  # exactly zero
    else:  # the base weight now holds the residual
        assert not torch.equal(adapter.weight, original.weight)
    atol = 1e-10 if init == "principal" else 1e-12
    with torch.no_grad():
        expected = original(x)
        for path in _paths(geometry):
            adapter.path = path
            torch.testing.assert_close(adapter(x), expected, rtol=0, atol=atol)


def test_principal_init_keeps_a_nonzero_padding_row():
    torch.manual_seed(0)
    layer = nn.Embedding(7, 5, padding_idx=2).to(F64)
    with torch.no_grad():
        layer.weight[2] = torch.randn(5, dtype=F64)  # e.g. a pretrained table with a used padding row
    original = copy.deepcopy(layer)
    adapter = nlnn.TuckerAdapter(layer, 2, init="principal")
    x = torch.tensor([0, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), original(x), rtol=0, atol=1e-10)


# -- both paths against the reference -----------------------------------------------------------


def _geometry_path_params() -> list[pytest.param]:
    params = []
    for g in GEOMETRIES:
        for path in _paths(g):
            params.append(pytest.param(g, path, id=f"{g.name}-{path}"))
    return params


@pytest.mark.parametrize("geometry, path", _geometry_path_params())
def test_path_matches_the_reference_in_output_and_gradients(geometry, path):
    """Forward and every gradient (input, adapter parameters, base weight and bias) equal the reference.

    Both paths are compared with the same reference, so they agree with each other too.
    """
    layer, x = geometry.make()
    wanted = (3, 2, *([2] * (layer.weight.ndim - 2)))
    ranks = tuple(min(r, s) for r, s in zip(wanted, layer.weight.shape, strict=True))  # a strict tuple
    adapter = nlnn.TuckerAdapter(layer, ranks, init="orthogonal", seed=0)
    perturb(adapter)
    adapter.path = path
    assert adapter.chosen_path(x) == path
    actual = _outputs_and_grads(adapter, adapter, x)
    expected = _outputs_and_grads(lambda v: reference_forward(adapter, v), adapter, x)
    _assert_all_close(actual, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("geometry", _ids(UNBATCHED))
def test_unbatched_conv_forward_agrees_on_both_paths(geometry):
    layer, x = geometry.make()
    adapter = nlnn.TuckerAdapter(layer, 2, init="orthogonal", seed=0)
    perturb(adapter)
    with torch.no_grad():
        expected = reference_forward(adapter, x)
        for path in PATHS:
            adapter.path = path
            torch.testing.assert_close(adapter(x), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "geometry",
    _named(
        "conv1d-same-even-dilated",
        "conv2d-groups-in-out-multipliers",
        "conv2d-replicate-tuple-pad",
        "embedding",
        "embedding-padding-idx",
    ),
)
def test_auto_path_matches_the_reference(geometry):
    layer, x = geometry.make()
    adapter = nlnn.TuckerAdapter(layer, 2, init="zero_factor", seed=0)
    perturb(adapter, seed=4)
    actual = _outputs_and_grads(adapter, adapter, x)
    expected = _outputs_and_grads(lambda v: reference_forward(adapter, v), adapter, x)
    _assert_all_close(actual, expected, rtol=1e-9, atol=1e-11)


@st.composite
def conv_geometries(draw: Any) -> tuple[nn.Module, torch.Tensor]:
    """A random ``nn.Conv1d/2d/3d`` (kernel, stride, padding, dilation, groups, padding mode) and an input."""
    dims = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    per_group_in, per_group_out = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pointwise = draw(st.booleans())  # a 1×…×1 kernel without padding, the matrix-product case
    kernel = (
        (1,) * dims if pointwise else tuple(draw(st.lists(st.integers(1, 3), min_size=dims, max_size=dims)))
    )
    stride = tuple(draw(st.lists(st.integers(1, 3), min_size=dims, max_size=dims)))
    dilation = tuple(draw(st.lists(st.integers(1, 2), min_size=dims, max_size=dims)))
    padding = (
        (0,) * dims if pointwise else tuple(draw(st.lists(st.integers(0, 2), min_size=dims, max_size=dims)))
    )
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    if mode == "reflect":  # reflect needs more input than padding
        padding = tuple(min(p, 1) for p in padding)
    spatial = [
        draw(st.integers(max(dilation[d] * (kernel[d] - 1) + 1 - 2 * padding[d], 2), 5)) for d in range(dims)
    ]
    layer = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](
        groups * per_group_in,
        groups * per_group_out,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=mode,
    ).to(F64)
    x = torch.randn((draw(st.integers(1, 2)), groups * per_group_in, *spatial), dtype=F64)
    return layer, x


@given(
    case=conv_geometries(),
    path=st.sampled_from(PATHS),
    scale=st.sampled_from([1.0, -0.5, 2.0]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_conv_paths_equal_the_reference_on_random_geometries(case, path, scale, seed):
    """Every conv geometry (pointwise ones run as matrix products), output and every gradient."""
    layer, x = case
    adapter = nlnn.TuckerAdapter(layer, 2, init="orthogonal", scale=scale, seed=seed, path=path)
    perturb(adapter, seed=seed)
    actual = _outputs_and_grads(adapter, adapter, x)
    expected = _outputs_and_grads(lambda v: reference_forward(adapter, v), adapter, x)
    _assert_all_close(actual, expected, rtol=1e-9, atol=1e-11)


# -- gradcheck ----------------------------------------------------------------------------------


def _gradcheck(adapter: nlnn.TuckerAdapter, x: torch.Tensor, names: list[str]) -> None:
    params = dict(adapter.named_parameters())
    inputs = [x.detach().clone().requires_grad_(x.is_floating_point())]
    inputs += [params[n].detach().clone().requires_grad_() for n in names]

    def fn(inp, *values):
        return functional_call(adapter, {**params, **dict(zip(names, values, strict=True))}, (inp,))

    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-6)


DELTA_NAMES = ["delta.core", "delta.factors.0", "delta.factors.1"]


@pytest.mark.parametrize("path", PATHS)
def test_gradcheck_conv(path):
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2, padding_mode="reflect").to(F64)
    adapter = nlnn.TuckerAdapter(layer, (2, 2, 2, 3), init="orthogonal", seed=0, path=path)
    perturb(adapter)
    names = [*DELTA_NAMES, "delta.factors.2", "delta.factors.3", "base_layer.weight", "base_layer.bias"]
    _gradcheck(adapter, torch.randn(2, 4, 5, 5, dtype=F64), names)


@pytest.mark.parametrize("path", PATHS)
def test_gradcheck_linear(path):
    torch.manual_seed(0)
    adapter = nlnn.TuckerAdapter(nn.Linear(4, 3).to(F64), 2, init="orthogonal", seed=0, path=path)
    perturb(adapter)
    _gradcheck(adapter, torch.randn(2, 3, 4, dtype=F64), [*DELTA_NAMES, "base_layer.weight"])


@pytest.mark.parametrize("path", PATHS)
def test_gradcheck_embedding(path):
    torch.manual_seed(0)
    adapter = nlnn.TuckerAdapter(nn.Embedding(5, 3).to(F64), 2, init="orthogonal", seed=0, path=path)
    perturb(adapter)
    _gradcheck(adapter, torch.tensor([[0, 1, 4], [4, 2, 1]]), DELTA_NAMES)


# -- embedding options --------------------------------------------------------------------------


def test_embedding_padding_row_starts_at_zero_and_gets_no_gradient():
    layer = nn.Embedding(6, 4, padding_idx=1).to(F64)
    for path in PATHS:
        adapter = nlnn.TuckerAdapter(copy.deepcopy(layer), 2, init="orthogonal", seed=0, path=path)
        assert not adapter.delta.factors[0][1].any()
        with torch.no_grad():
            adapter.delta.core.normal_()
        adapter(torch.tensor([[1, 0, 1, 3], [5, 1, 2, 2]])).square().sum().backward()
        assert not adapter.delta.factors[0].grad[1].any()
        assert adapter.delta.factors[0].grad.any()
        assert not adapter.delta_weight()[1].any()


def test_embedding_max_norm_renormalises_w_plus_delta_on_the_materialize_path():
    layer = nn.Embedding(6, 4, max_norm=0.5).to(F64)
    adapter = nlnn.TuckerAdapter(layer, 2, seed=0)
    perturb(adapter)
    x = torch.tensor([0, 3, 5, 3])
    assert adapter.chosen_path(x) == "materialize"
    out = adapter(x)
    assert torch.all(out.norm(dim=-1) <= 0.5 + 1e-12)
    adapter.path = "factorized"
    with pytest.raises(ValueError, match="max_norm"):
        adapter(x)


# -- path costs and the auto rule ---------------------------------------------------------------


def test_linear_path_costs_are_the_documented_formulas():
    adapter = nlnn.TuckerAdapter(nn.Linear(64, 32), (4, 3), seed=0)
    out, inp, r0, r1 = 32, 64, 4, 3
    tokens = 2 * 5  # input (2, 5, 64)
    build = out * inp * r0 + inp * r0 * r1  # A0 (G A1ᵀ)
    branch = inp * r0 * r1 + tokens * (inp * r0 + r0 * out)  # G A1ᵀ, then x (G A1ᵀ)ᵀ, then A0ᵀ
    assert adapter.path_costs((2, 5, 64), training=False) == (float(build), float(branch))
    assert adapter.path_costs((2, 5, 64), training=True) == (
        float(3 * build + tokens * out * inp),
        float(3 * branch),
    )
    assert (build, branch) == (8960, 768 + 10 * 384)


def test_conv_path_costs_are_the_documented_formulas():
    layer = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2)
    adapter = nlnn.TuckerAdapter(layer, (4, 3, 3, 3), seed=0)
    # out=12, in/groups=4, kernel=9, r0=4, r1=3, groups=2; input (2, 8, 10, 9)
    # the output is ((10 + 2 - 3) // 2 + 1) × ((9 + 2 - 3) // 2 + 1) = 5 × 5
    batch, in_pixels, out_pixels = 2, 10 * 9, 5 * 5
    build = 12 * 4 * 9 * 4 + 4 * 4 * 9 * 3
    branch = batch * (in_pixels * 4 * 2 * 3 + out_pixels * 2 * 4 * 3 * 9 + out_pixels * 12 * 4)
    assert (build, branch) == (2160, 17520)
    assert adapter.path_costs((2, 8, 10, 9), training=False) == (2160.0, 17520.0)
    core = batch * out_pixels * 2 * 4 * 3 * 9  # the spatial core's convolution, run once more by materialize
    weight_gradient = batch * out_pixels * 12 * 4 * 9
    fixed = _FUNCTION_STEP_OVERHEAD
    plain, fused = (3 * 2160.0 + weight_gradient) / _PLAIN_DISCOUNT, 3 * 2160.0 + 2 * 17520.0 + core + fixed
    assert adapter._materialize_costs((2, 8, 10, 9)) == (plain, fused)
    assert adapter.path_costs((2, 8, 10, 9), training=True) == (min(plain, fused), 3 * 17520.0 + fixed)
    # an unbatched input counts as a batch of one
    assert adapter.path_costs((8, 10, 9), training=False) == (2160.0, 17520.0 / 2)


def test_pointwise_conv_path_costs_are_the_documented_formulas():
    adapter = nlnn.TuckerAdapter(nn.Conv2d(8, 6, 1, stride=2), (4, 3, 1, 1), seed=0)
    # out=6, in=8, r0=4, r1=3; input (2, 8, 6, 5) gives 3 × 3 output pixels, the only ones read
    batch, pixels = 2, 3 * 3
    build = 6 * 8 * 4 + 4 * 8 * 3
    branch = batch * pixels * (8 * 4 + 6 * 4) + 8 * 4 * 3  # x (A1 Gᵀ), then A0; A1 Gᵀ once
    projections = batch * pixels * (8 * 3 + 6 * 4)
    core = batch * pixels * 4 * 3
    assert (build, branch, projections, core) == (288, 1104, 864, 216)
    assert adapter.path_costs((2, 8, 6, 5), training=False) == (288.0, 1104.0)
    fixed = _FUNCTION_STEP_OVERHEAD
    plain = (3 * 288.0 + batch * pixels * 6 * 8) / _PLAIN_DISCOUNT
    assert adapter._materialize_costs((2, 8, 6, 5)) == (plain, 3 * 288.0 + 2 * 864.0 + 3 * 216.0 + fixed)
    # 2 · 9 tokens × (8 + 6) channels: few activations, so the factorized path is the composite form
    assert adapter._composes((2, 8, 6, 5))
    assert adapter.path_costs((2, 8, 6, 5), training=True) == (plain, 3 * 1104.0 + _COMPOSITE_STEP_OVERHEAD)
    assert not adapter._composes((3000, 8, 6, 5))  # 378K elements: the node
    big_branch = 3000 * pixels * (8 * 4 + 6 * 4) + 8 * 4 * 3
    assert adapter.path_costs((3000, 8, 6, 5), training=True)[1] == 3.0 * big_branch + fixed


def test_embedding_path_costs_are_the_documented_formulas():
    adapter = nlnn.TuckerAdapter(nn.Embedding(100, 16), (4, 2), seed=0)
    lookups = 3 * 7
    build = 100 * 16 * 4 + 100 * 16
    branch = lookups * (4 * 2 + 2 * 16) + 4 * 2 * 16
    assert adapter.path_costs((3, 7), training=False) == (float(build), float(branch))
    assert adapter.path_costs((3, 7), training=True) == (3.0 * build, 3.0 * branch)


def test_auto_picks_materialize_for_a_big_batch_conv():
    adapter = nlnn.TuckerAdapter(nn.Conv2d(64, 64, 3, padding=1), (16, 16, 3, 3), seed=0)
    x = torch.empty(8, 64, 32, 32)
    materialize, factorized = adapter.path_costs(tuple(x.shape), training=True)
    assert materialize < factorized
    assert adapter.chosen_path(x) == "materialize"  # training: the adapter parameters need gradients
    with torch.no_grad():
        assert adapter.chosen_path(x) == "materialize"


def test_auto_picks_factorized_for_a_linear_layer_in_training_with_few_ranks():
    adapter = nlnn.TuckerAdapter(nn.Linear(64, 64), 2, seed=0)
    x = torch.empty(8, 64)
    materialize, factorized = adapter.path_costs(tuple(x.shape), training=True)
    assert factorized < materialize
    assert adapter.chosen_path(x) == "factorized"


def test_auto_follows_the_input_shape_the_mode_and_a_truncation_call_after_call():
    """The remembered choice of ``auto`` is always the one the cost rule gives now."""
    adapter = nlnn.TuckerAdapter(nn.Linear(64, 64), (8, 8), seed=0)
    model = nn.Sequential(adapter)

    def expected(x: torch.Tensor) -> str:
        training = torch.is_grad_enabled()
        materialize, factorized = adapter.path_costs(tuple(x.shape), training=training)
        return "materialize" if materialize < factorized else "factorized"

    few, many = torch.empty(1, 64), torch.empty(1000, 64)
    seen = set()
    for _ in range(2):  # the second round is answered from what the first remembered
        for x in (few, many, few):
            for grad in (True, False):
                with torch.set_grad_enabled(grad):
                    seen.add(adapter.chosen_path(x))
                    assert adapter.chosen_path(x) == expected(x)
    assert seen == {"materialize", "factorized"}
    # without gradients a linear layer materializes from 64·64 / (64 + 64) = 32 tokens on, at any rank
    below, above = torch.empty(31, 64), torch.empty(33, 64)
    with torch.no_grad():
        assert adapter.chosen_path(below) == expected(below) == "factorized"
        assert adapter.chosen_path(above) == expected(above) == "materialize"
    nlnn.truncate_adapters(model, ranks=1)  # new ranks: the choice is estimated again
    with torch.no_grad():
        assert adapter.ranks == (1, 1)
        assert adapter.chosen_path(below) == expected(below) == "factorized"
        assert ((31, 64), False, (1, 1)) in adapter._auto_paths
    for size in range(1, 200):  # inputs of ever new shapes do not grow the memory without bound
        adapter.chosen_path(torch.empty(size, 64))
    assert len(adapter._auto_paths) <= 64


def test_auto_picks_factorized_whenever_dropout_is_on_in_training():
    adapter = nlnn.TuckerAdapter(nn.Conv2d(64, 64, 3, padding=1), (16, 16, 3, 3), dropout=0.1, seed=0)
    x = torch.empty(8, 64, 32, 32)
    adapter.train()
    assert adapter.chosen_path(x) == "factorized"
    with torch.no_grad():
        assert adapter.chosen_path(x) == "factorized"
    adapter.eval()  # dropout is off: back to the cost rule
    assert adapter.chosen_path(x) == "materialize"


def test_dropout_is_applied_on_the_branch_in_training_only():
    torch.manual_seed(0)
    adapter = nlnn.TuckerAdapter(nn.Linear(8, 6).to(F64), 3, dropout=0.5, init="orthogonal", seed=0)
    perturb(adapter)
    x = torch.randn(4, 8, dtype=F64)
    first, second = adapter(x), adapter(x)
    assert not torch.equal(first, second)
    adapter.eval()
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), reference_forward(adapter, x), rtol=1e-12, atol=1e-12)


# -- bad options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"path": "fused"}, r"unknown path='fused'; known paths: \['auto', 'materialize', 'factorized'\]"),
        (
            {"init": "kaiming"},
            r"unknown init='kaiming'; known inits: .*'orthogonal'.*'principal'.*'zero_core'",
        ),
        ({"dropout": -0.1}, r"dropout=-0\.1 must be a probability in \[0, 1\)"),
        ({"dropout": 1.0}, r"dropout=1\.0 must be a probability"),
        ({"dropout": "0.1"}, r"dropout='0\.1' must be a probability"),
        ({"path": "materialize", "dropout": 0.1}, r"path='materialize' cannot apply dropout"),
    ],
)
def test_bad_options_are_value_errors(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        nlnn.TuckerAdapter(nn.Linear(4, 3), 2, **options)


def test_unsupported_layer_is_a_type_error_naming_the_supported_ones():
    with pytest.raises(TypeError, match=r"cannot adapt a LayerNorm; supported layers: Linear, Conv1d"):
        nlnn.TuckerAdapter(nn.LayerNorm(4), 2)


# -- merge / unmerge on one adapter -------------------------------------------------------------


@pytest.mark.parametrize(
    "geometry",
    _named(
        "linear",
        "conv2d-tuple-pad-dilation",
        "conv2d-groups-in-out-multipliers",
        "conv2d-reflect-groups-stride",
        "embedding-padding-idx",
    ),
)
def test_merge_unmerge_roundtrip_float64(geometry):
    layer, x = geometry.make()
    adapter = nlnn.TuckerAdapter(layer, 2, init="orthogonal", seed=0)
    perturb(adapter)
    weight = adapter.weight.detach().clone()
    param = adapter.weight
    with torch.no_grad():
        unmerged = adapter(x)
        adapter.merge()
        assert adapter.merged and adapter.weight is param  # in place
        once = adapter.weight.clone()
        torch.testing.assert_close(adapter(x), unmerged, rtol=1e-10, atol=1e-12)
        adapter.merge()  # merging twice does not add twice
        assert torch.equal(adapter.weight, once)
        adapter.unmerge()
        assert not adapter.merged
        torch.testing.assert_close(adapter.weight, weight, rtol=0, atol=1e-12)
        adapter.unmerge()  # a no-op
        torch.testing.assert_close(adapter.weight, weight, rtol=0, atol=1e-12)
        torch.testing.assert_close(adapter(x), unmerged, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_unmerge_of_a_low_precision_weight_restores_it_bit_for_bit(dtype):
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, groups=2).to(dtype)
    adapter = nlnn.TuckerAdapter(layer, 2, init="orthogonal", seed=0)
    perturb(adapter)
    weight = adapter.weight.detach().clone()
    adapter.merge()
    assert not torch.equal(adapter.weight, weight)
    adapter.unmerge()
    assert torch.equal(adapter.weight, weight)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_merge_of_a_non_finite_delta_is_refused_and_changes_nothing(value):
    adapter = nlnn.TuckerAdapter(nn.Linear(4, 3).to(F64), 2, init="orthogonal", seed=0)
    with torch.no_grad():
        adapter.delta.core.fill_(value)
    weight = adapter.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        adapter.merge()
    assert not adapter.merged
    assert torch.equal(adapter.weight, weight)
    with pytest.raises(ValueError, match="NaN or Inf"):
        adapter.merged_base()
    assert not adapter.merged
    assert torch.equal(adapter.weight, weight)


# -- dtypes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "geometry", _named("linear-3d-input", "conv2d-reflect-groups-stride", "embedding-padding-idx")
)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("param_dtype", [None, torch.bfloat16])
def test_bfloat16_base_layer(geometry, path, param_dtype):
    layer, x = geometry.make()
    reference_layer = copy.deepcopy(layer)
    layer = layer.to(torch.bfloat16)
    x = x.to(torch.bfloat16) if x.is_floating_point() else x
    adapter = nlnn.TuckerAdapter(layer, 2, init="orthogonal", seed=0, path=path, dtype=param_dtype)
    expected_dtype = param_dtype or torch.float32
    assert all(p.dtype == expected_dtype for p in adapter.delta.parameters())
    perturb(adapter, std=0.3)
    out = adapter(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    for p in adapter.delta.parameters():
        assert p.grad is not None and p.grad.dtype == expected_dtype and torch.isfinite(p.grad).all()
    # against the float64 layer with the same (bfloat16-rounded) weight and delta
    reference = nlnn.TuckerAdapter(reference_layer, 2, seed=0, dtype=F64)
    with torch.no_grad():
        reference.base_layer.weight.copy_(layer.weight.double())
        for mine, theirs in zip(reference.delta.parameters(), adapter.delta.parameters(), strict=True):
            mine.copy_(theirs.double())
        expected = reference_forward(reference, x.double() if x.is_floating_point() else x)
    torch.testing.assert_close(out.double(), expected, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_adapter_parameters_follow_a_full_precision_layer(dtype):
    adapter = nlnn.TuckerAdapter(nn.Conv1d(3, 4, 3).to(dtype), 2, seed=0)
    assert all(p.dtype == dtype for p in adapter.delta.parameters())
    assert adapter.config()["dtype"] == str(dtype).removeprefix("torch.")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize(
    "geometry",
    _named(
        "linear-3d-input", "conv2d-reflect-groups-stride", "conv3d-stride-tuple-pad", "embedding-padding-idx"
    ),
)
def test_cuda_adapter_matches_cpu(geometry):
    layer, x = geometry.make()
    cpu = nlnn.TuckerAdapter(copy.deepcopy(layer), 2, init="orthogonal", seed=0)
    perturb(cpu)
    gpu = nlnn.TuckerAdapter(layer.cuda(), 2, init="orthogonal", seed=0)
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    gpu.load_state_dict(cpu.state_dict())
    for path in PATHS:
        cpu.path = gpu.path = path
        expected = _outputs_and_grads(cpu, cpu, x)
        actual = _outputs_and_grads(gpu, gpu, x.cuda())
        _assert_all_close({k: v.cpu() for k, v in actual.items()}, expected, rtol=1e-9, atol=1e-10)


# -- the TuckerDelta module ---------------------------------------------------------------------


@st.composite
def delta_cases(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4)))
    ranks = tuple(draw(st.integers(1, i)) for i in shape)
    return shape, ranks, draw(st.integers(0, 2**32 - 1))


def _random_delta(shape, ranks, seed, scale=1.0) -> nlnn.TuckerDelta:
    delta = nlnn.TuckerDelta(shape, ranks, init="orthogonal", scale=scale, dtype=F64, seed=seed)
    gen = torch.Generator().manual_seed(seed % 2**31)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=F64))
    return delta


@given(case=delta_cases(), scale=st.sampled_from([1.0, -0.5, 4.0]))
def test_delta_forward_and_gradients_equal_an_einsum(case, scale):
    shape, ranks, seed = case
    delta = _random_delta(shape, ranks, seed, scale)
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    out = delta()
    expected = einsum_delta(delta)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    params = list(delta.parameters())
    grads = torch.autograd.grad((out * upstream).sum(), params)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), params)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_delta_forward_with_a_weight_adds_it():
    delta = _random_delta((4, 3, 2), (2, 2, 2), 0)
    weight = torch.randn(4, 3, 2, dtype=F64)
    torch.testing.assert_close(delta(weight), weight + delta(), rtol=0, atol=0)
    with pytest.raises(
        ValueError, match=r"weight has shape \(3, 4, 2\) but this delta has shape \(4, 3, 2\)"
    ):
        delta(torch.zeros(3, 4, 2))


def test_delta_as_a_parametrization():
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, padding=1).to(F64)
    weight = layer.weight.detach().clone()
    delta = _random_delta((4, 3, 3, 3), (2, 2, 3, 2), 5)
    parametrize.register_parametrization(layer, "weight", delta)
    assert parametrize.is_parametrized(layer, "weight")
    torch.testing.assert_close(layer.weight, weight + einsum_delta(delta), rtol=1e-12, atol=1e-12)
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    layer(x).square().sum().backward()
    assert delta.core.grad is not None and all(f.grad is not None for f in delta.factors)
    merged = (weight + einsum_delta(delta)).detach()
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    assert not parametrize.is_parametrized(layer)
    assert isinstance(layer.weight, nn.Parameter)
    torch.testing.assert_close(layer.weight.detach(), merged, rtol=1e-12, atol=1e-12)


def test_delta_from_tucker_to_tucker_roundtrip():
    delta = _random_delta((5, 4, 3), (3, 2, 2), 1, scale=2.5)
    tucker = delta.to_tucker()
    assert isinstance(tucker, nl.TuckerDelta)
    assert tucker.core is delta.core and all(
        a is b for a, b in zip(tucker.factors, delta.factors, strict=True)
    )
    assert tucker.scale == 2.5
    torch.testing.assert_close(tucker.to_dense(), delta(), rtol=1e-12, atol=1e-12)
    rebuilt = nlnn.TuckerDelta.from_tucker(tucker)
    assert rebuilt.scale == 2.5 and rebuilt.shape == delta.shape and rebuilt.ranks == delta.ranks
    assert rebuilt.core is not delta.core  # copied into new parameters
    assert all(isinstance(p, nn.Parameter) for p in rebuilt.parameters())
    torch.testing.assert_close(rebuilt(), delta(), rtol=0, atol=0)
    plain = nlnn.TuckerDelta.from_tucker(
        nl.TuckerTensor(delta.core.detach(), [f.detach() for f in delta.factors])
    )
    assert plain.scale == 1.0
    torch.testing.assert_close(plain(), delta() / 2.5, rtol=1e-12, atol=1e-12)
    assert nlnn.TuckerDelta.from_tucker(tucker, scale=3.0).scale == 3.0


def test_delta_from_tucker_refuses_other_input():
    with pytest.raises(TypeError, match="TuckerTensor"):
        nlnn.TuckerDelta.from_tucker((torch.zeros(1, 1), [torch.ones(2, 1)] * 2))
    with pytest.raises(TypeError, match="torch tensors"):
        nlnn.TuckerDelta.from_tucker(nl.TuckerTensor(np.zeros((1, 1)), [np.ones((2, 1))] * 2))


@pytest.mark.parametrize("init", RANDOM_INITS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_delta_same_seed_gives_the_numbers_of_tucker_delta(init, dtype):
    module = nlnn.TuckerDelta((6, 5, 3), (3, 2, 2), init=init, scale=2.0, dtype=dtype, seed=11)
    array = nl.tucker_delta((6, 5, 3), (3, 2, 2), init=init, scale=2.0, backend="torch", dtype=dtype, seed=11)
    for mine, theirs in zip([module.core, *module.factors], [array.core, *array.factors], strict=True):
        assert mine.dtype == dtype
        assert torch.equal(mine.detach(), theirs)
    assert module.scale == 2.0


def test_delta_without_a_seed_follows_torch_manual_seed():
    torch.manual_seed(3)
    first = nlnn.TuckerDelta((5, 4), 2, init="orthogonal")
    torch.manual_seed(3)
    second = nlnn.TuckerDelta((5, 4), 2, init="orthogonal")
    third = nlnn.TuckerDelta((5, 4), 2, init="orthogonal")
    assert torch.equal(first.factors[0], second.factors[0])
    assert not torch.equal(second.factors[0], third.factors[0])


def test_delta_repr_shows_shape_ranks_and_n_params():
    delta = nlnn.TuckerDelta((16, 8, 3, 3), (4, 4, 3, 3), seed=0)
    assert delta.n_params == 4 * 4 * 3 * 3 + 16 * 4 + 8 * 4 + 3 * 3 + 3 * 3 == 258
    text = repr(delta)
    assert "shape=(16, 8, 3, 3)" in text and "ranks=(4, 4, 3, 3)" in text and "n_params=258" in text
    assert delta.extra_repr() in text
