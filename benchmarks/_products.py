"""The products alone: what ndlowrank's adapters compute in factorized form in a training step, with nothing around it.

For every adapter of a model, :func:`products_step` replays the tensor products of its
factorized branch on the input the adapter gets in the model's forward: the branch forward
(added into an output of the base layer's shape) and the gradients of the factors, the core
and the input (added into an input gradient), with the same kernels and layouts the library
runs, under ``no_grad``. No autograd node, no module call, no path choice, no validation: the
arithmetic of the factorized form and the allocation of its intermediates, which no
per-call overhead of that form can go below. ``bench_models`` times it beside the real step,
so the table shows how much of an adapter's cost is that arithmetic and how much the fixed
cost of running it. (Where ``path="auto"`` builds ``W + ΔW`` instead, as on pointwise convs on
large maps, the step computes other products, which can cost less.)

A linear layer (``nn.Linear``, transformers' ``Conv1D``, and a pointwise conv on a 1×…×1 map)
takes :class:`~ndlowrank.nn._linear.FusedTuckerLinear`'s products: ``h = x (G Vᵀ)ᵀ``,
``y += h Uᵀ`` and the gradients at ``h``, ``x``, ``U``, ``G Vᵀ``, ``G`` and ``V``. A convolution
takes :class:`~ndlowrank.nn._conv.FactorizedTuckerConv`'s: in-projection, the spatial core's
convolution and the out-projection, and their gradients. An input that needs no gradient
(a network's first layer) gets none, as in the step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ndlowrank import nn as nlnn
from ndlowrank.nn._conv import ConvGeometry, _add_grouped_product, _branch, _branch_grads, spatial_fold

Forward = Callable[[nn.Module], torch.Tensor]
Replay = Callable[[], dict[str, torch.Tensor | None]]

__all__ = ["products_step", "replay"]


def products_step(model: nn.Module, forward: Forward) -> Callable[[], None]:
    """A function that runs the products of every adapter of ``model`` on the inputs of ``forward(model)``.

    One forward (with gradients enabled, so that each input says whether it needs one)
    records every call of every adapter; the returned function then replays the products of
    each call, once per call, as the step runs them.
    """
    adapters = [
        adapter for _, adapter in nlnn.iter_adapters(model) if isinstance(adapter, nlnn.TuckerAdapter)
    ]
    calls: list[tuple[nlnn.TuckerAdapter, torch.Tensor]] = []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        calls.append((module, args[0]))  # type: ignore[arg-type]

    hooks = [adapter.register_forward_pre_hook(record) for adapter in adapters]
    try:
        forward(model)
    finally:
        for hook in hooks:
            hook.remove()
    replays = [replay(adapter, x) for adapter, x in calls]

    def step() -> None:
        with torch.no_grad():
            for products in replays:
                products()

    return step


def replay(adapter: nlnn.TuckerAdapter, x: torch.Tensor) -> Replay:
    """The products of ``adapter``'s factorized branch on ``x``, as a function of no arguments.

    Each call adds the branch's output into ``"output"`` (zeros at first) and its input
    gradient into ``"input"`` (``None`` where ``x`` needs none), for the random
    ``"output gradient"``, and returns them with the gradients of the ``"out factor"``, the
    ``"core"`` and the ``"in factor"`` (``U``, ``G``, ``V`` of a linear layer's ``x (U G Vᵀ)ᵀ``;
    ``A0``, the spatial core and ``A1`` of a convolution), so a test can check them.
    """
    needs_input_grad = x.requires_grad
    x = x.detach()
    with torch.no_grad():
        parts = adapter._parts()
        core, a0, a1 = parts[:3]
        if isinstance(adapter, nlnn.LinearAdapter):
            return _linear_products(x, u=a0, g=core * adapter.delta.scale, v=a1, input_grad=needs_input_grad)
        if isinstance(adapter, nlnn.TransposedLinearAdapter):  # weight (in, out): ΔW = A0 G A1ᵀ
            return _linear_products(
                x, u=a1, g=core.t() * adapter.delta.scale, v=a0, input_grad=needs_input_grad
            )
        if not isinstance(adapter, nlnn.ConvAdapter):
            raise TypeError(
                f"no product replay for a {type(adapter).__name__}: a linear or conv adapter is needed"
            )
        batched = x if x.ndim == adapter.geometry.dims + 2 else x.unsqueeze(0)
        spatial_core = spatial_fold(core, parts[3:], adapter.delta.scale, adapter.geometry)
        if adapter._is_linear_on(batched):  # an SE block's conv: a linear layer on the channels
            g = spatial_core.reshape(spatial_core.shape[:2])
            return _linear_products(batched.flatten(1), u=a0, g=g, v=a1, input_grad=needs_input_grad)
        output = adapter.base_layer(batched)
        return _conv_products(
            adapter.geometry,
            adapter.geometry.prepare(batched),
            output,
            a0,
            a1,
            spatial_core,
            needs_input_grad,
        )


def _linear_products(
    x: torch.Tensor, *, u: torch.Tensor, g: torch.Tensor, v: torch.Tensor, input_grad: bool
) -> Replay:
    """FusedTuckerLinear's products for ``x (U G Vᵀ)ᵀ``: ``U`` (out × r_out), ``G`` (r_out × r_in), ``V`` (in × r_in)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.zeros(x2.shape[0], u.shape[0], dtype=x.dtype, device=x.device)
    grad = torch.randn_like(y)
    grad_x = torch.zeros_like(x2) if input_grad else None

    def replay() -> dict[str, torch.Tensor | None]:
        m = F.linear(g, v)  # G Vᵀ
        h_t = F.linear(m, x2)
        u_t = u.t().contiguous()
        y.addmm_(h_t.t(), u_t)
        grad_h_t = F.linear(u_t, grad)
        if grad_x is not None:
            grad_x.addmm_(grad_h_t.t(), m)
        grad_m = grad_h_t @ x2
        return {
            "output": y,
            "output gradient": grad,
            "input": grad_x,
            "out factor": (h_t @ grad).t(),
            "core": grad_m @ v,
            "in factor": grad_m.t() @ g,
        }

    return replay


def _conv_products(
    geometry: ConvGeometry,
    x: torch.Tensor,
    output: torch.Tensor,
    a0: torch.Tensor,
    a1: torch.Tensor,
    spatial_core: torch.Tensor,
    input_grad: bool,
) -> Replay:
    """FactorizedTuckerConv's branch products on the prepared, batched ``x`` (``output``: the base layer's on it)."""
    y = torch.zeros_like(output, memory_format=torch.contiguous_format)
    grad = torch.randn_like(y)
    grad_x = torch.zeros_like(x) if input_grad else None

    def replay() -> dict[str, torch.Tensor | None]:
        mid, t = _branch(x, geometry, a1, spatial_core)
        _add_grouped_product(y, a0, t, geometry.groups)
        grad_a0, grad_a1, grad_core = _branch_grads(
            grad, x, grad_x, geometry, a0, a1, spatial_core, mid, t, (True, True, True)
        )
        return {
            "output": y,
            "output gradient": grad,
            "input": grad_x,
            "out factor": grad_a0,
            "core": grad_core,
            "in factor": grad_a1,
        }

    return replay
