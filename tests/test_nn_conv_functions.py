"""The conv adapter's autograd functions and paths against an independent float64 reference.

The reference is plain torch autograd through the base layer's own ``_conv_forward`` (its
padding modes included) with ``W + ΔW``, ``ΔW`` built by one einsum of the core and every
factor. Every path of :class:`ConvAdapter` (plain-autograd materialize,
:class:`FusedTuckerConv`, :class:`FactorizedTuckerConv`, the composite fallback) must give
its output and the gradients of the input, the factors, the core and, where they are
trainable, the base weight and bias.
"""

from __future__ import annotations

import copy
import string
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from ndlowrank import nn as nlnn  # noqa: E402
from ndlowrank.nn._conv import FactorizedTuckerConv, FusedTuckerConv  # noqa: E402
from ndlowrank.nn.layers import COMPOSITE, LINEAR_NODE, PLAIN_MERGE  # noqa: E402

F64 = torch.float64
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FUNCTIONS = {"fused": FusedTuckerConv, "factorized": FactorizedTuckerConv}


def reference_delta(adapter: nlnn.ConvAdapter) -> torch.Tensor:
    """``scale · core ×_0 A0 ×_1 A1 ×_2 K_2 …`` as one einsum."""
    delta = adapter.delta
    letters = string.ascii_lowercase
    n = delta.core.ndim
    core_idx, out_idx = letters[:n], letters[n : 2 * n]
    spec = ",".join([core_idx, *(out_idx[i] + core_idx[i] for i in range(n))]) + "->" + out_idx
    return delta.scale * torch.einsum(spec, delta.core, *delta.factors)


def reference(adapter: nlnn.ConvAdapter, x: torch.Tensor) -> torch.Tensor:
    layer = adapter.base_layer
    return layer._conv_forward(x, layer.weight + reference_delta(adapter), layer.bias)


def trainable(adapter: nlnn.ConvAdapter) -> list[torch.Tensor]:
    return [p for p in adapter.parameters() if p.requires_grad]


def outputs_and_grads(
    call, adapter: nlnn.ConvAdapter, x: torch.Tensor, probe: torch.Tensor
) -> list[torch.Tensor]:
    """The output and the gradients of ``⟨out, probe⟩`` for the input and every trainable parameter."""
    x = x.detach().requires_grad_(True)
    params = trainable(adapter)
    out = call(x)
    grads = torch.autograd.grad((out * probe).sum(), [x, *params], allow_unused=True)
    return [
        out.detach(),
        *(torch.zeros_like(p) if g is None else g for p, g in zip([x, *params], grads, strict=True)),
    ]


def assert_all_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


@st.composite
def conv_cases(draw):
    """A conv layer of any geometry, an adapter on it with random parameters, and an input."""
    dims = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    in_ch, out_ch = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 3)) for _ in range(dims)]
    stride = [draw(st.integers(1, 2)) for _ in range(dims)]
    dilation = [draw(st.integers(1, 2)) for _ in range(dims)]
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    if draw(st.booleans()) and all(s == 1 for s in stride):
        padding: object = "same"
    else:
        padding = [draw(st.integers(0, 2)) for _ in range(dims)]
    if draw(st.booleans()):  # pointwise: a 1×…×1 kernel without padding
        kernel, padding, mode = [1] * dims, [0] * dims, "zeros"
    layer = CONVS[dims](
        in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
        bias=draw(st.booleans()), padding_mode=mode,
    ).to(F64)  # fmt: skip
    sizes = [draw(st.integers(max(3, (k - 1) * d + 1), 6)) for k, d in zip(kernel, dilation, strict=True)]
    if mode in ("reflect", "circular") and padding != "same":  # reflect needs padding < size
        padding_values = padding if isinstance(padding, list) else [0] * dims
        sizes = [max(s, p + 1) for s, p in zip(sizes, padding_values, strict=True)]
    ranks = [draw(st.integers(1, size)) for size in layer.weight.shape]
    seed = draw(st.integers(0, 2**16))
    adapter = nlnn.TuckerAdapter(
        layer, ranks, init="orthogonal", seed=seed, scale=draw(st.sampled_from([1.0, 0.5]))
    )
    gen = torch.Generator().manual_seed(seed)
    # every parameter random, or only the trainable ones (square spatial factors stay held at the identity)
    params = adapter.delta.parameters() if draw(st.booleans()) else adapter.delta.trainable_parameters()
    with torch.no_grad():
        for p in params:
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=F64))
    layer.weight.requires_grad_(draw(st.booleans()))
    if layer.bias is not None:
        layer.bias.requires_grad_(draw(st.booleans()))
    batch = draw(st.sampled_from([None, 1, 2]))  # None: an unbatched input
    shape = ([] if batch is None else [batch]) + [in_ch, *sizes]
    x = torch.randn(shape, generator=gen, dtype=F64)
    return adapter, x


def force_form(adapter, x, plain):
    """Make ``adapter`` take plain autograd (or else a function) on a batched input ``x``'s shape, whatever the costs.

    Plain autograd on the factorized path is the base plus the branch's two 1×…×1 convolutions
    of an ungrouped pointwise conv (``ConvAdapter._composes``); other geometries have the function only.
    """
    adapter._fix_forms(x.shape, {PLAIN_MERGE: plain, LINEAR_NODE: not plain, COMPOSITE: plain})


@given(case=conv_cases(), seed=st.integers(0, 2**16))
def test_every_path_matches_the_einsum_reference_and_its_gradients(case, seed):
    adapter, x = case
    with torch.no_grad():
        probe = torch.randn(
            reference(adapter, x).shape, generator=torch.Generator().manual_seed(seed), dtype=F64
        )
    expected = outputs_and_grads(lambda inp: reference(adapter, inp), adapter, x, probe)
    for path in ("factorized", "materialize"):
        adapter.path = path
        # plain autograd and through a function, whichever the cost rules pick
        for plain in (True, False):
            force_form(adapter, x if x.ndim == adapter.geometry.dims + 2 else x[None], plain)
            assert_all_close(outputs_and_grads(adapter, adapter, x, probe), expected)


@given(case=conv_cases())
def test_the_functions_match_the_reference_on_batched_prepared_input(case):
    adapter, x = case
    if x.ndim == adapter.geometry.dims + 1:
        x = x.unsqueeze(0)
    with torch.no_grad():
        probe = torch.randn(
            reference(adapter, x).shape, generator=torch.Generator().manual_seed(0), dtype=F64
        )
    expected = outputs_and_grads(lambda inp: reference(adapter, inp), adapter, x, probe)
    layer, delta = adapter.base_layer, adapter.delta
    for function in FUNCTIONS.values():

        def call(inp, function=function):
            return function.apply(
                adapter.geometry.prepare(inp), layer.weight, layer.bias, *delta.factors[:2], delta.core,
                adapter.geometry, delta.scale, *delta.factors[2:],
            )  # fmt: skip

        assert_all_close(outputs_and_grads(call, adapter, x, probe), expected)


def _function_inputs(
    layer: nn.Module, ranks: tuple[int, ...], x: torch.Tensor
) -> tuple[nlnn.ConvAdapter, list]:
    adapter = nlnn.TuckerAdapter(layer.to(F64), ranks, init="orthogonal", seed=0)
    gen = torch.Generator().manual_seed(3)
    delta = adapter.delta
    tensors = [x, layer.weight, layer.bias, *delta.factors[:2], delta.core, *delta.factors[2:]]
    tensors = [(0.5 * torch.randn(t.shape, generator=gen, dtype=F64)).requires_grad_(True) for t in tensors]
    return adapter, tensors


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize(
    ("layer", "ranks", "shape"),
    [
        (
            nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2),
            (3, 2, 2, 2),
            (2, 4, 5, 6),
        ),
        (nn.Conv1d(4, 3, 1, stride=2), (2, 3, 1), (2, 4, 5)),  # pointwise, strided
        (nn.Conv3d(2, 2, 2), (2, 2, 1, 2, 2), (1, 2, 3, 3, 3)),
    ],
)
def test_gradcheck_of_the_functions_in_float64(name, layer, ranks, shape):
    adapter, tensors = _function_inputs(layer, ranks, torch.empty(shape))
    geometry, scale = adapter.geometry, 0.7

    def fn(x, weight, bias, a0, a1, core, *spatial):
        return FUNCTIONS[name].apply(x, weight, bias, a0, a1, core, geometry, scale, *spatial)

    assert torch.autograd.gradcheck(fn, tuple(tensors), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_the_functions_trace_into_one_graph_and_match_eager(name):
    adapter, tensors = _function_inputs(
        nn.Conv2d(4, 4, 3, padding=1, groups=2), (2, 2, 3, 2), torch.empty(2, 4, 5, 5)
    )
    geometry = adapter.geometry

    def fn(x, weight, bias, a0, a1, core, *spatial):
        out = FUNCTIONS[name].apply(x, weight, bias, a0, a1, core, geometry, 0.5, *spatial)
        return out.square().sum()

    def results(f):
        loss = f(*tensors)
        return [loss.detach(), *torch.autograd.grad(loss, tensors)]

    expected = results(fn)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)  # a graph break is an error
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = results(compiled)
    assert [str(w.message) for w in caught] == []
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e)


# -- where the base layer's own call must run -----------------------------------------------------


def _adapter(path: str) -> nlnn.ConvAdapter:
    layer = nn.Conv2d(4, 4, 3, padding=1)
    adapter = nlnn.TuckerAdapter(layer, 2, seed=0, path=path)
    layer.requires_grad_(False)
    with torch.no_grad():
        adapter.delta.core.normal_(generator=torch.Generator().manual_seed(1))
    return adapter


@pytest.mark.parametrize("path", ["materialize", "factorized"])
def test_hooks_and_a_replaced_forward_of_the_base_layer_run(path):
    adapter = _adapter(path)
    x = torch.randn(2, 4, 5, 5)
    expected = adapter(x)
    calls = []
    handle = adapter.base_layer.register_forward_hook(lambda module, args, out: calls.append("hook"))
    torch.testing.assert_close(adapter(x), expected)
    assert calls == ["hook"]
    handle.remove()
    base_forward = adapter.base_layer.forward
    adapter.base_layer.forward = lambda inp: (
        calls.append("forward") or base_forward(inp)
    )  # as accelerate does
    torch.testing.assert_close(adapter(x), expected)
    assert calls == ["hook", "forward"]


@pytest.mark.parametrize("path", ["auto", "materialize", "factorized"])
def test_autocast_runs_the_layer_in_low_precision_and_gives_float32_gradients(path):
    """Under autocast the base layer's own call runs (no fused backward that would mix dtypes)."""
    adapter = _adapter(path)
    composite = copy.deepcopy(adapter)
    composite.dropout_p = 1e-9  # a dropout that drops nothing, but takes the composite route
    composite.dropout = nn.Dropout(0.0)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    results = []
    for model in (adapter, composite):
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        grads = [p.grad for p in model.delta.parameters()]
        assert all(g.dtype == torch.float32 for g in grads)
        results.append([out, x.grad.clone(), *grads])
    for a, e in zip(*results, strict=True):
        torch.testing.assert_close(a, e)


def test_active_dropout_reaches_the_branch_only():
    adapter = _adapter("factorized")
    adapter.dropout_p, adapter.dropout = 1.0, nn.Dropout(1.0)  # everything dropped: the base layer alone
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(adapter(x), adapter.base_layer(x))


@pytest.mark.parametrize("path", ["materialize", "factorized"])
@pytest.mark.parametrize("kernel", [1, 3])
def test_a_channels_last_input_gives_the_reference_output_and_gradients(path, kernel):
    layer = nn.Conv2d(4, 6, kernel, padding=kernel // 2).to(F64)
    adapter = nlnn.TuckerAdapter(layer, 2, init="orthogonal", seed=0, path=path)
    with torch.no_grad():
        adapter.delta.core.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 4, 5, 5, dtype=F64).to(memory_format=torch.channels_last)
    probe = torch.randn(2, 6, 5, 5, dtype=F64)
    expected = outputs_and_grads(lambda inp: reference(adapter, inp), adapter, x, probe)
    for function in FUNCTIONS.values():

        def call(inp, function=function):
            delta = adapter.delta
            return function.apply(
                inp, layer.weight, layer.bias, *delta.factors[:2], delta.core, adapter.geometry, delta.scale,
                *delta.factors[2:],
            )  # fmt: skip

        assert_all_close(outputs_and_grads(call, adapter, x, probe), expected)
    assert_all_close(outputs_and_grads(adapter, adapter, x, probe), expected)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("stride, groups, bias", [(1, 1, True), (2, 1, False), (1, 2, True)])
def test_a_pointwise_conv_on_a_one_pixel_map_matches_the_reference_on_every_path(dims, stride, groups, bias):
    # an SE block's convolutions: the ungrouped ones run as a linear layer (plain autograd or
    # FusedTuckerLinear with the 1 × 1 spatial factors), without a convolution call
    torch.manual_seed(0)
    layer = CONVS[dims](4, 6, 1, stride=stride, groups=groups, bias=bias).to(F64)
    adapter = nlnn.TuckerAdapter(layer, 2, init="orthogonal", seed=0)
    with torch.no_grad():
        for p in adapter.delta.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(3, 4, *[1] * dims, dtype=F64)
    probe = torch.randn(3, 6, *[1] * dims, dtype=F64)
    expected = outputs_and_grads(lambda inp: reference(adapter, inp), adapter, x, probe)
    for path in ("factorized", "materialize"):
        adapter.path = path
        for plain in (True, False):
            force_form(adapter, x, plain)
            assert_all_close(outputs_and_grads(adapter, adapter, x, probe), expected)


# -- square spatial factors (full spatial ranks; a 1×…×1 kernel's always), held at the identity --


def _held_adapter(dims: int = 2, *, kernel: int = 1, bias: bool = True) -> nlnn.ConvAdapter:
    """An adapter of rank 3 (full spatial ranks), default init, whose trainable parameters are random."""
    torch.manual_seed(0)
    layer = CONVS[dims](5, 6, kernel, padding=kernel // 2, bias=bias).to(F64)
    adapter = nlnn.TuckerAdapter(layer, 3, seed=0)
    with torch.no_grad():
        for p in adapter.delta.trainable_parameters():
            p.add_(torch.randn_like(p))
    return adapter


def _held(adapter: nlnn.ConvAdapter) -> list[torch.Tensor]:
    return [adapter.delta.factors[n] for n in adapter.delta.fixed_modes]


def _is_identity(k: torch.Tensor) -> bool:
    return torch.equal(k, torch.eye(k.shape[0], dtype=k.dtype))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("kernel", [1, 3])
def test_square_spatial_factors_are_held_at_the_identity_out_of_training(dims, kernel):
    adapter = _held_adapter(dims, kernel=kernel)
    held = _held(adapter)
    assert adapter.ranks == (3, 3, *[kernel] * dims)
    assert adapter.delta.fixed_modes == tuple(range(2, dims + 2))
    assert all(k.shape == (kernel, kernel) and _is_identity(k) and not k.requires_grad for k in held)
    assert len(adapter._parts()) == 3  # the calls leave them out
    adapter.delta.requires_grad_(True)  # what set_active_adapters does: they stay frozen
    assert not any(k.requires_grad for k in held) and adapter.delta.core.requires_grad
    assert all(p.requires_grad for p in adapter.delta.trainable_parameters())


@pytest.mark.parametrize("init", ["orthogonal", "principal"])
def test_with_other_inits_only_one_by_one_factors_are_held(init):
    # the quality study measured held 3×3 factors worse with these inits (see ndlowrank.nn.layers.held_spatial_modes)
    conv = nlnn.TuckerAdapter(nn.Conv2d(5, 6, 3), 3, init=init, seed=0)
    assert conv.delta.fixed_modes == () and len(conv._parts()) == 5
    assert all(k.requires_grad for k in conv.delta.factors)
    pointwise = nlnn.TuckerAdapter(nn.Conv2d(5, 6, 1), 3, init=init, seed=0)
    assert pointwise.delta.fixed_modes == (2, 3) and len(pointwise._parts()) == 3
    second = nlnn.TuckerAdapter(nn.Conv2d(5, 6, 3), 3, seed=0)  # zero_core: held
    second.add_adapter("other", 3, init="orthogonal", seed=1)  # a named adapter follows its own init
    assert second.delta.fixed_modes == (2, 3) and second.delta_of("other").fixed_modes == ()


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("truncated", [False, True])
def test_a_principal_adapter_loads_with_the_factors_its_init_holds(tmp_path, kernel, truncated):
    # the file is rebuilt from the principal start: the loaded adapter holds what the saved one held
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(5, 6, kernel)).to(F64)
    model = nlnn.add_adapters(copy.deepcopy(base), ["0"], 3, init="principal")
    if truncated:
        nlnn.truncate_adapters(model, ranks=(2, 2, kernel, kernel))
    with torch.no_grad():
        for p in model[0].delta.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    held = (2, 3) if kernel == 1 else ()
    assert model[0].delta.fixed_modes == held
    nlnn.save_adapters(model, tmp_path / "principal.safetensors")
    loaded = nlnn.load_adapters(copy.deepcopy(base), tmp_path / "principal.safetensors")
    assert loaded[0].delta.fixed_modes == held
    grads = [[p.requires_grad for p in m[0].delta.parameters()] for m in (loaded, model)]
    assert grads[0] == grads[1]
    x = torch.randn(2, 5, 4, 4, dtype=F64)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-10, atol=1e-12)


def test_released_factors_train_again_with_the_same_delta():
    adapter = _held_adapter(kernel=3)
    before = adapter.delta_weight().detach().clone()
    adapter.delta.release_modes([2, 3, 0])  # mode 0 is not held: skipped
    assert adapter.delta.fixed_modes == () and all(k.requires_grad for k in adapter.delta.factors)
    assert len(adapter._parts()) == 5
    torch.testing.assert_close(adapter.delta_weight(), before)
    x, probe = torch.randn(3, 5, 4, 4, dtype=F64), torch.randn(3, 6, 4, 4, dtype=F64)
    expected = outputs_and_grads(lambda inp: reference(adapter, inp), adapter, x, probe)
    assert_all_close(outputs_and_grads(adapter, adapter, x, probe), expected)


def test_spatial_factors_that_compress_their_mode_train():
    adapter = nlnn.TuckerAdapter(nn.Conv2d(5, 6, 3), (3, 3, 2, 3), seed=0)
    assert adapter.delta.fixed_modes == (3,)  # the 3 × 2 factor trains, the 3 × 3 one is held
    assert [p.shape for p in adapter.delta.trainable_parameters()] == [(3, 3, 2, 3), (6, 3), (5, 3), (3, 2)]
    assert len(adapter._parts()) == 5  # a call needs every spatial factor then


@given(seed=st.integers(0, 2**16))
def test_holding_square_factors_keeps_the_delta(seed):
    gen = torch.Generator().manual_seed(seed)
    delta = nlnn.TuckerDelta((4, 3, 3, 1, 2), (2, 3, 3, 1, 2), seed=0).double()
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    before = delta().detach().clone()
    delta.fix_square_modes([0, 1, 2, 3, 4])  # mode 0: a 4 × 2 factor, left alone
    assert delta.fixed_modes == (1, 2, 3, 4)
    assert all(_is_identity(delta.factors[n]) for n in delta.fixed_modes)
    torch.testing.assert_close(delta(), before, rtol=1e-10, atol=1e-12)
    assert [p.shape for p in delta.trainable_parameters()] == [delta.core.shape, (4, 2)]
    delta.fix_square_modes([2])  # again: nothing changes
    torch.testing.assert_close(delta(), before, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", ["factorized", "materialize"])
@pytest.mark.parametrize("plain", [True, False])
@pytest.mark.parametrize("kernel, spatial", [(1, (4, 4)), (1, (1, 1)), (3, (4, 4)), (3, (1, 1))])
def test_with_the_factors_held_every_form_matches_the_reference(path, plain, kernel, spatial):
    # a 1×1 map: an SE block's (a pointwise conv), or a 3×3 kernel reading only its centre
    adapter = _held_adapter(kernel=kernel)
    adapter.path = path
    x = torch.randn(3, 5, *spatial, dtype=F64)
    probe = torch.randn(3, 6, *spatial, dtype=F64)
    force_form(adapter, x, plain)
    expected = outputs_and_grads(lambda inp: reference(adapter, inp), adapter, x, probe)
    assert_all_close(outputs_and_grads(adapter, adapter, x, probe), expected)
    assert len(adapter._parts()) == 3


@pytest.mark.parametrize("kernel", [1, 3])
def test_a_held_factor_made_trainable_or_changed_is_used_as_it_is(kernel):
    adapter = _held_adapter(kernel=kernel)
    x, probe = torch.randn(3, 5, 4, 4, dtype=F64), torch.randn(3, 6, 4, 4, dtype=F64)
    k = _held(adapter)[0]
    k.requires_grad_(True)  # trained again, by the user's choice: it gets its gradient
    assert len(adapter._parts()) == 5
    expected = outputs_and_grads(lambda inp: reference(adapter, inp), adapter, x, probe)
    got = outputs_and_grads(adapter, adapter, x, probe)
    assert_all_close(got, expected)
    k.requires_grad_(False)
    with torch.no_grad():
        k.mul_(-2.0)  # changed in place (a loaded file, an edit): its version moves
    assert len(adapter._parts()) == 5
    torch.testing.assert_close(adapter(x), reference(adapter, x))
    with torch.no_grad():
        k.copy_(torch.eye(kernel))
    assert len(adapter._parts()) == 3


@pytest.mark.parametrize("kernel", [1, 3])
def test_a_saved_adapter_loads_with_its_factors_held(tmp_path, kernel):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(5, 6, kernel)).to(F64)
    model = nlnn.add_adapters(copy.deepcopy(base), ["0"], 3, seed=0)
    with torch.no_grad():
        for p in model[0].delta.trainable_parameters():
            p.add_(torch.randn_like(p))
    nlnn.save_adapters(model, tmp_path / "adapter.safetensors")
    loaded = nlnn.load_adapters(copy.deepcopy(base), tmp_path / "adapter.safetensors")
    x = torch.randn(2, 5, 3, 3, dtype=F64)
    torch.testing.assert_close(loaded(x), model(x))
    assert len(loaded[0]._parts()) == 3 and not any(k.requires_grad for k in _held(loaded[0]))


def test_truncating_an_adapter_keeps_square_factors_held_and_frees_those_that_compress():
    torch.manual_seed(0)
    model = nlnn.add_adapters(nn.Sequential(nn.Conv2d(6, 7, 3).to(F64)), ["0"], 4, seed=0)
    adapter = model[0]
    with torch.no_grad():
        for p in adapter.delta.trainable_parameters():
            p.add_(torch.randn_like(p))
    before = adapter.delta_weight().detach().clone()
    nlnn.truncate_adapters(model, ranks=(2, 2, 3, 2))
    assert adapter.ranks == (2, 2, 3, 2) and adapter.delta.fixed_modes == (2,)
    assert _is_identity(adapter.delta.factors[2]) and not adapter.delta.factors[2].requires_grad
    assert adapter.delta.factors[3].requires_grad  # a 3 × 2 factor now: it trains
    # the kept delta is the best one of those ranks of the old: what the einsum reference of the new parts gives
    torch.testing.assert_close(adapter.delta_weight(), reference_delta(adapter))
    assert (adapter.delta_weight() - before).norm() < before.norm()
    nlnn.truncate_adapters(model, ranks=(1, 1, 3, 2))
    assert adapter.delta.fixed_modes == (2,)


@pytest.mark.parametrize("batch, side", [(2, 6), (2, 24)])  # 72 and 1152 input pixels: either core kernel
@pytest.mark.parametrize("path", ["factorized", "materialize"])
def test_the_core_convolution_matches_on_either_side_of_the_small_map_rule(batch, side, path):
    from ndlowrank.nn import _conv

    torch.manual_seed(0)
    adapter = nlnn.TuckerAdapter(nn.Conv2d(3, 4, 3, padding=1, stride=2).to(F64), (2, 3, 3, 2), seed=0)
    with torch.no_grad():
        for p in adapter.delta.trainable_parameters():
            p.add_(torch.randn_like(p))
    adapter.path = path
    x = torch.randn(batch, 3, side, side, dtype=F64)
    assert (batch * side * side <= _conv._SMALL_CORE_CONV_PIXELS) == (side == 6)
    probe = torch.randn(reference(adapter, x).shape, dtype=F64)
    force_form(adapter, x, plain=False)  # materialize through FusedTuckerConv, whose backward runs the core
    expected = outputs_and_grads(lambda inp: reference(adapter, inp), adapter, x, probe)
    assert_all_close(outputs_and_grads(adapter, adapter, x, probe), expected)


@pytest.mark.parametrize("kernel", [1, 3])
def test_a_file_whose_held_factors_are_not_the_identity_loads_with_the_core_taking_them_over(
    tmp_path, kernel
):
    # an older file trained the square spatial factors: loading gives the same ΔW with them held
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(5, 6, kernel)).to(F64)
    model = nlnn.add_adapters(copy.deepcopy(base), ["0"], 3, seed=0)
    with torch.no_grad():
        model[0].delta.core.add_(1.0)
        for k in _held(model[0]):
            k.copy_(torch.randn_like(k))
    expected = model[0].delta_weight().detach().clone()
    nlnn.save_adapters(model, tmp_path / "older.safetensors")
    loaded = nlnn.load_adapters(copy.deepcopy(base), tmp_path / "older.safetensors")
    assert all(_is_identity(k) and not k.requires_grad for k in _held(loaded[0]))
    assert len(loaded[0]._parts()) == 3
    torch.testing.assert_close(loaded[0].delta_weight(), expected, rtol=1e-12, atol=1e-12)
