"""torch.compile of adapted models: one graph, no warnings, the eager outputs and gradients.

The adapters' forward calls torch directly (no array-API namespace lookups), so Dynamo
traces it without graph breaks and without its warnings about wrapped functions. The cheap
``aot_eager`` backend traces forward and backward as inductor would, without compiling code.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import _real_models  # noqa: E402
from torch import nn  # noqa: E402

import ndlowrank as nl  # noqa: E402
from ndlowrank import nn as nlnn  # noqa: E402
from ndlowrank.nn.delta import mode_products  # noqa: E402

from _helpers import einsum_tucker  # noqa: E402


@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    data=st.data(),
)
def test_mode_products_equal_multi_mode_product_bit_for_bit_and_an_einsum(shape, data):
    ranks = [data.draw(st.integers(1, size)) for size in shape]
    modes = data.draw(st.permutations(range(len(shape))))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    core = torch.randn(ranks, generator=gen, dtype=torch.float64)
    factors = [
        torch.randn(size, rank, generator=gen, dtype=torch.float64)
        for size, rank in zip(shape, ranks, strict=True)
    ]
    matrices = [factors[m] for m in modes]
    actual = mode_products(core, matrices, modes)
    assert torch.equal(actual, nl.multi_mode_product(core, matrices, modes))
    expected = einsum_tucker(core.numpy(), [f.numpy() for f in factors])
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-12, atol=1e-12)


class _EveryKind(nn.Module):
    """An embedding, a convolution, linears and an attention block: every kind of adapter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.embed(ids).transpose(1, 2)).transpose(1, 2)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(h)


def _adapted(path: str) -> nn.Module:
    torch.manual_seed(0)
    model = nlnn.add_adapters(_EveryKind(), ["embed", "conv", "attn", "head"], ranks=2, seed=0, path=path)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero delta, so that every factor gets a gradient
        for _, adapter in nlnn.iter_adapters(model):
            adapter.delta.core.normal_(generator=gen)
    return model


def _outputs_and_grads(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(ids)
    out.square().sum().backward()
    return [out.detach(), *(p.grad for p in model.parameters() if p.requires_grad)]


def _one_graph_as_eager(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs and gradients of ``model`` compiled as one graph, checked against eager; no warnings."""
    expected = _outputs_and_grads(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break is an error
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = _outputs_and_grads(compiled, x)
    assert [str(w.message) for w in caught] == []
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    return actual


@pytest.mark.parametrize("path", ["materialize", "factorized"])
def test_compile_traces_one_graph_without_warnings_and_matches_eager(path):
    ids = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(2))
    actual = _one_graph_as_eager(_adapted(path), ids)
    assert len(actual) == 1 + 3 + 4 + 3 + 3 + 3  # the output, then core and factors


def test_compiled_gpt2_with_conv1d_adapters_matches_eager():
    real = _real_models.gpt2()
    model = nlnn.add_adapters(copy.deepcopy(real.model), ["c_attn", "c_fc"], ranks=4, seed=0)
    with torch.no_grad():
        for _, adapter in nlnn.iter_adapters(model):
            adapter.delta.core.normal_(generator=torch.Generator().manual_seed(1))
        expected = real(model)
        torch._dynamo.reset()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            actual = real(torch.compile(model, backend="eager"))
    assert not [w for w in caught if "ndlowrank" in str(w.filename) or "array_api" in str(w.message)]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    # the Conv1D adapter alone compiles to one graph, on both paths
    adapter = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(2))
    for path in ("materialize", "factorized"):
        adapter.path = path
        expected_x = _outputs_and_grads(adapter, x)
        torch._dynamo.reset()
        actual_x = _outputs_and_grads(torch.compile(adapter, backend="aot_eager", fullgraph=True), x)
        for a, e in zip(actual_x, expected_x, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["materialize", "factorized"])
def test_pointwise_convs_with_factors_held_at_one_compile_to_one_graph(path):
    # eager calls leave the held 1 × 1 factors out after checking their version counters,
    # which a compiled graph cannot read: there the factors are used, with the same numbers
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, 1), nn.ReLU(), nn.Conv2d(6, 5, 1))
    model = nlnn.add_adapters(net, ["0", "2"], 2, init="orthogonal", seed=0, path=path)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    actual = _one_graph_as_eager(model, x)
    # the output, then each adapter's core, A0 and A1 (the 1 × 1 factors held)
    assert len(actual) == 1 + 2 * 3
