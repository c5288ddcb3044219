"""``FusedTuckerLinear``: the linear adapters' factorized path as one autograd node.

The node's output and every gradient are checked against an independent reference: the
plain torch expression ``x Wᵀ + b + scale · x (U G Vᵀ)ᵀ`` differentiated by autograd in
float64. The adapters must use the node only when calling the base layer would do nothing
more than its product (no hooks, no replaced or overridden ``forward``, no active dropout),
give the same numbers either way, and follow autocast as the layer itself does.
"""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from ndlowrank import nn as nlnn  # noqa: E402
from ndlowrank.nn import layers  # noqa: E402
from ndlowrank.nn._linear import FusedTuckerLinear  # noqa: E402

F64 = torch.float64


def _reference(x, weight, bias, u, core, v, scale, weight_transposed, core_transposed):
    """The layer as plain torch operations, with ``ΔW`` (out × in) formed by one einsum."""
    w = weight.T if weight_transposed else weight
    g = core.T if core_transposed else core
    delta = torch.einsum("oa,ab,ib->oi", u, g, v)
    y = x @ (w + scale * delta).T
    return y if bias is None else y + bias


@st.composite
def linear_cases(draw):
    inp, out = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    r_out, r_in = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    lead = tuple(draw(st.lists(st.integers(0, 3), min_size=0, max_size=3)))
    return {
        "inp": inp,
        "out": out,
        "r_out": r_out,
        "r_in": r_in,
        "lead": lead,
        "bias": draw(st.booleans()),
        "weight_transposed": draw(st.booleans()),
        "core_transposed": draw(st.booleans()),
        "scale": draw(st.sampled_from([1.0, -0.5, 3.0])),
        "trainable_base": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])

    def randn(*shape, grad=True):
        return torch.randn(shape, generator=gen, dtype=F64).requires_grad_(grad)

    inp, out = case["inp"], case["out"]
    weight = randn(*((inp, out) if case["weight_transposed"] else (out, inp)), grad=case["trainable_base"])
    bias = randn(out, grad=case["trainable_base"]) if case["bias"] else None
    core_shape = (case["r_in"], case["r_out"]) if case["core_transposed"] else (case["r_out"], case["r_in"])
    return [
        randn(*case["lead"], inp),
        weight,
        bias,
        randn(out, case["r_out"]),
        randn(*core_shape),
        randn(inp, case["r_in"]),
        case["scale"],
        case["weight_transposed"],
        case["core_transposed"],
    ]


@given(case=linear_cases())
@settings(max_examples=60, deadline=None)
def test_output_and_every_gradient_equal_the_reference(case):
    args = _inputs(case)
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    out = FusedTuckerLinear.apply(*args)
    expected = _reference(*args)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    grads = torch.autograd.grad((out * upstream).sum(), tensors, allow_unused=True)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), tensors, allow_unused=True)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weight_transposed", [False, True])
@pytest.mark.parametrize("core_transposed", [False, True])
def test_gradcheck(weight_transposed, core_transposed):
    case = {
        "inp": 4,
        "out": 3,
        "r_out": 2,
        "r_in": 3,
        "lead": (2, 2),
        "bias": True,
        "weight_transposed": weight_transposed,
        "core_transposed": core_transposed,
        "scale": -0.5,
        "trainable_base": True,
        "seed": 0,
    }
    args = _inputs(case)
    tensors = args[:6]

    def call(*tensors):
        return FusedTuckerLinear.apply(*tensors, *args[6:])

    assert torch.autograd.gradcheck(call, tensors)


@given(
    kernel_dims=st.integers(1, 3),
    trainable=st.lists(st.booleans(), min_size=6, max_size=6),
    bias=st.booleans(),
    scale=st.sampled_from([1.0, -0.5]),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=40, deadline=None)
def test_a_pointwise_convs_weight_core_and_spatial_factors_match_the_reference(
    kernel_dims, trainable, bias, scale, seed
):
    # an SE block's conv: weight (out, in, 1, …), core (r_out, r_in, 1, …), one 1 × 1 factor per kernel mode
    gen = torch.Generator().manual_seed(seed)
    ones = (1,) * kernel_dims

    def randn(*shape, grad=True):
        return torch.randn(shape, generator=gen, dtype=F64).requires_grad_(grad)

    x, weight, u, core, v = randn(5, 4), randn(3, 4, *ones), randn(3, 2), randn(2, 3, *ones), randn(4, 3)
    b = randn(3) if bias else None
    spatial = [randn(1, 1) for _ in range(kernel_dims)]
    inputs = [x, weight, b, u, core, v, *spatial]
    for tensor, grad in zip(
        [t for t in inputs if t is not None], trainable + [True] * kernel_dims, strict=False
    ):
        tensor.requires_grad_(grad)
    tensors = [t for t in inputs if t is not None and t.requires_grad]
    out = FusedTuckerLinear.apply(x, weight, b, u, core, v, scale, False, False, *spatial)
    folded = core.reshape(2, 3) * functools.reduce(torch.mul, spatial)
    expected = _reference(x, weight.reshape(3, 4), b, u, folded, v, scale, False, False)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    if not tensors:
        return
    upstream = torch.randn(expected.shape, generator=gen, dtype=F64)
    grads = torch.autograd.grad((out * upstream).sum(), tensors, allow_unused=True)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), tensors, allow_unused=True)
    for got, want, tensor in zip(grads, expected_grads, tensors, strict=True):
        assert got.shape == tensor.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_only_the_needed_gradients_are_computed():
    args = _inputs(
        {
            "inp": 3,
            "out": 2,
            "r_out": 2,
            "r_in": 2,
            "lead": (4,),
            "bias": True,
            "weight_transposed": False,
            "core_transposed": False,
            "scale": 1.0,
            "trainable_base": False,
            "seed": 3,
        }
    )
    args[0].requires_grad_(False)  # the model's first layer: no input gradient
    out = FusedTuckerLinear.apply(*args)
    out.sum().backward()
    assert args[0].grad is None and args[1].grad is None and args[2].grad is None
    assert all(t.grad is not None for t in args[3:6])


# -- when the adapters use the node -----------------------------------------------------------


@pytest.fixture(autouse=True)
def _node_at_any_size(monkeypatch):
    """The layers here are tiny; the node's size rule (``_LINEAR_NODE_ACTIVATIONS``) has its own test."""
    monkeypatch.setattr(layers, "_LINEAR_NODE_ACTIVATIONS", -1)


def _assert_gradients_match(out, expected, params):
    """The gradients of ``⟨out, U⟩`` and ``⟨expected, U⟩`` for one random ``U`` agree, for every tensor in ``params``."""
    upstream = torch.randn(out.shape, dtype=F64)
    got = torch.autograd.grad((out * upstream).sum(), params)
    want = torch.autograd.grad((expected * upstream).sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def _linear_adapter(transposed: bool):
    if not transposed:
        return _adapter(path="factorized")
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    return _adapter(pytorch_utils.Conv1D(4, 5).to(F64), path="factorized")


@pytest.mark.parametrize("transposed", [False, True])
def test_below_the_size_rule_plain_autograd_gives_the_same_numbers(monkeypatch, transposed):
    monkeypatch.setattr(layers, "_LINEAR_NODE_ACTIVATIONS", 3 * 9)  # 5 inputs and 4 outputs: 9 per token
    adapter = _linear_adapter(transposed)
    for tokens, node in [(3, False), (4, True)]:
        x = torch.randn(tokens, 5, dtype=F64, requires_grad=True)
        name, out = _node(adapter, x)
        assert (name == "FusedTuckerLinearBackward") == node
        weight = adapter.base_layer.weight + adapter.delta_weight()
        expected = x @ (weight if transposed else weight.T) + adapter.base_layer.bias
        torch.testing.assert_close(out, expected)
        _assert_gradients_match(out, expected, [x, *adapter.delta.parameters()])


def _adapter(layer=None, **options):
    torch.manual_seed(0)
    adapter = nlnn.TuckerAdapter(layer or nn.Linear(5, 4).to(F64), 2, init="orthogonal", seed=0, **options)
    with torch.no_grad():
        for p in adapter.delta.parameters():
            p.add_(torch.randn_like(p))  # a nonzero ΔW, so a wrong branch shows
    return adapter.requires_grad_(True)


def _node(adapter, x):
    """The name of the output's autograd node and the output, with ``ΔW`` applied by the reference."""
    out = adapter(x)
    return type(out.grad_fn).__name__, out


def _expected(adapter, x):
    layer = adapter.base_layer
    return torch.nn.functional.linear(x, layer.weight + adapter.delta_weight(), layer.bias)


def test_a_plain_linear_layer_runs_as_one_node():
    adapter = _adapter(path="factorized")
    x = torch.randn(3, 2, 5, dtype=F64)
    name, out = _node(adapter, x)
    assert name == "FusedTuckerLinearBackward"
    torch.testing.assert_close(out, _expected(adapter, x))


def test_a_subclass_keeping_linears_forward_runs_as_one_node():
    # what nn.MultiheadAttention's out_proj is: a subclass that does not change forward
    adapter = _adapter(nn.modules.linear.NonDynamicallyQuantizableLinear(5, 4).to(F64), path="factorized")
    assert _node(adapter, torch.randn(2, 5, dtype=F64))[0] == "FusedTuckerLinearBackward"


class _DoubledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def _hook_forward(layer):
    layer.register_forward_hook(lambda module, args, out: out * 2)


def _hook_pre_forward(layer):
    layer.register_forward_pre_hook(lambda module, args: (args[0] * 2,))


def _replace_forward(layer):  # what accelerate's add_hook_to_module does
    original = layer.forward
    layer.forward = functools.partial(lambda x: original(x) * 2)


@pytest.mark.parametrize(
    "change", [_hook_forward, _hook_pre_forward, _replace_forward], ids=lambda f: f.__name__
)
def test_a_layer_whose_call_does_more_is_called(change):
    layer = nn.Linear(5, 4).to(F64)
    change(layer)
    adapter = _adapter(layer, path="factorized")
    x = torch.randn(3, 5, dtype=F64)
    name, out = _node(adapter, x)
    assert name != "FusedTuckerLinearBackward"
    branch = torch.nn.functional.linear(x, adapter.delta_weight())
    torch.testing.assert_close(out, layer(x) + branch)  # the layer's own call, then the branch


def test_a_subclass_with_its_own_forward_is_called():
    layer = _DoubledLinear(5, 4).to(F64)
    adapter = _adapter(layer, path="factorized")
    x = torch.randn(3, 5, dtype=F64)
    name, out = _node(adapter, x)
    assert name != "FusedTuckerLinearBackward"
    torch.testing.assert_close(out, layer(x) + torch.nn.functional.linear(x, adapter.delta_weight()))


def test_active_dropout_takes_the_unfused_branch_and_eval_the_node():
    adapter = _adapter(path="factorized", dropout=0.5)
    x = torch.randn(3, 5, dtype=F64)
    assert _node(adapter.train(), x)[0] != "FusedTuckerLinearBackward"
    name, out = _node(adapter.eval(), x)
    assert name == "FusedTuckerLinearBackward"
    torch.testing.assert_close(out, _expected(adapter, x))


def test_under_autocast_the_node_runs_in_autocasts_dtype_like_the_layer():
    adapter = _adapter(nn.Linear(5, 4), path="factorized")
    x = torch.randn(3, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        name, out = _node(adapter, x)
        plain = adapter.base_layer(x)
    assert name == "FusedTuckerLinearBackward" and out.dtype == plain.dtype == torch.bfloat16
    expected = _expected(adapter, x)
    # bfloat16 keeps 8 bits: a few roundings of the products, relative to the output's size
    torch.testing.assert_close(
        out.float(), expected, rtol=0, atol=0.03 * float(expected.detach().abs().max())
    )
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter.delta.parameters())


def test_autocast_leaves_float64_alone():
    adapter = _adapter(path="factorized")
    x = torch.randn(3, 5, dtype=F64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        name, out = _node(adapter, x)
    assert name == "FusedTuckerLinearBackward" and out.dtype == F64
    torch.testing.assert_close(out, _expected(adapter, x))


def test_transformers_conv1d_runs_as_one_node_with_the_reference_numbers():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    layer = pytorch_utils.Conv1D(4, 5).to(F64)  # nf=4 outputs, nx=5 inputs: weight (5, 4)
    adapter = _adapter(layer, path="factorized", scale=-0.5)
    x = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    name, out = _node(adapter, x)
    assert name == "FusedTuckerLinearBackward"
    expected = x @ (layer.weight + adapter.delta_weight()) + layer.bias
    torch.testing.assert_close(out, expected)
    _assert_gradients_match(out, expected, [x, *adapter.delta.parameters()])


def test_a_forward_pre_hook_gives_plain_autograd_for_higher_order_gradients():
    # the documented way to differentiate an adapter's gradients again
    adapter = _adapter(path="factorized")
    adapter.base_layer.register_forward_pre_hook(lambda module, args: None)
    x = torch.randn(3, 5, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(adapter(x).square().sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.square().sum(), x)
    layer = adapter.base_layer
    weight = layer.weight + adapter.delta_weight()  # y = x Wᵀ + b; ∂/∂x of Σy² is 2 (x Wᵀ + b) W

    def first(inp):
        return 2 * (inp @ weight.T + layer.bias) @ weight

    expected = torch.autograd.grad(first(x).square().sum(), x)[0]
    torch.testing.assert_close(second, expected)
