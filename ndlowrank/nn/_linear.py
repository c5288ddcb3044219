"""A linear layer with a Tucker delta as one autograd node: :class:`FusedTuckerLinear`.

A linear weight ``W`` of shape ``(out, in)`` gets ``ΔW = scale · U G Vᵀ`` with ``U`` of shape
``(out, r_out)``, ``G`` of shape ``(r_out, r_in)`` and ``V`` of shape ``(in, r_in)``. The layer
computes ``x Wᵀ + b + scale · (x M ᵀ) Uᵀ`` with the small ``M = G Vᵀ`` of shape ``(r_out, in)``:
two skinny products on the activations, as LoRA makes.

Written out as torch calls this is five or six autograd nodes (the base layer, ``M``, two
products, the scale and the sum), and on the small layers of real networks the fixed cost of
each call and node outweighs the arithmetic. As one node, the forward is three matrix
products (the last one accumulating into the base output in place) and the backward chooses
for every product the operand layout that the CPU matrix kernels run fastest for a rank of a
few: a reduction over the tokens is computed with the rank on the left (``(hᵀ g)ᵀ`` rather than
``gᵀ h``), and a skinny right operand is a transposed view of a row-major ``(r, n)`` matrix.
Measured in ``benchmarks/RESULTS.md`` (the whole-model and per-call tables).

The same node serves transformers' ``Conv1D``, whose weight is stored as ``(in, out)``, and a
pointwise convolution on a 1×…×1 map (an SE block's), whose weight and core carry trailing
1-sized modes and whose 1 × 1 spatial factors multiply the core.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch
import torch.nn.functional as F

from ._conv import spatial_unfold_grads

__all__ = ["FusedTuckerLinear", "fused_tucker_linear"]


def fused_tucker_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    u: torch.Tensor,
    core: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    weight_transposed: bool = False,
    core_transposed: bool = False,
    spatial: tuple[torch.Tensor, ...] = (),
) -> torch.Tensor:
    """:class:`FusedTuckerLinear` as ``F.linear`` would run under the caller's autocast.

    Inside an autocast region every float32 (or float16/bfloat16) input is cast to the
    autocast dtype first, as autocast casts a linear layer's input, weight and bias; the
    casts are differentiable, so the gradients reach the parameters in their own dtype.
    float64 is left alone, as autocast leaves it.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, u, core, v = (_autocast(t, dtype) for t in (x, weight, u, core, v))
        bias = None if bias is None else _autocast(bias, dtype)
        spatial = tuple(_autocast(k, dtype) for k in spatial)
    return FusedTuckerLinear.apply(
        x, weight, bias, u, core, v, scale, weight_transposed, core_transposed, *spatial
    )


def _autocast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if tensor.dtype == dtype or tensor.dtype == torch.float64 or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


class FusedTuckerLinear(torch.autograd.Function):
    """``x Wᵀ + b + scale · x (U G Vᵀ)ᵀ`` and its gradients as one autograd function.

    Inputs: the input ``x`` (any leading shape, features last), the base ``weight`` and
    ``bias`` (``bias`` may be ``None``), the out-side factor ``U`` (out × r_out), the core ``G``
    and the in-side factor ``V`` (in × r_in), the ``scale`` (a float), and two layout flags:
    ``weight_transposed`` when the weight is stored ``(in, out)`` (transformers' ``Conv1D``),
    and ``core_transposed`` when the core is stored ``(r_in, r_out)``. A pointwise conv's weight
    ``(out, in, 1, …)`` and core ``(r_out, r_in, 1, …)`` are taken as they are, with its
    spatial factors (1 × 1 each) last: the core is multiplied by them inside. Gradients flow
    to every tensor input that requires them, in its own shape; the base weight's (the full
    ``out × in`` product) is computed only when the base weight is trainable.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        u: torch.Tensor,
        core: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        weight_transposed: bool,
        core_transposed: bool,
        *spatial: torch.Tensor,
    ) -> torch.Tensor:
        # each torch call costs a fixed time that outweighs the arithmetic on small layers, so
        # the products are written with the fewest calls (F.linear(a, b) is a bᵀ in one)
        x2 = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
        kernel = weight
        if weight.ndim > 2:  # a pointwise conv's (out, in, 1, …)
            weight = weight.reshape(weight.shape[:2])
        g = core.t() if core_transposed else core.reshape(core.shape[:2])
        if spatial:
            g = g * functools.reduce(operator.mul, spatial)
        m = F.linear(g, v)  # G Vᵀ (r_out × in)
        h_t = F.linear(m, x2)  # hᵀ (r_out × tokens): the rank on the left is the fast layout
        if not weight_transposed:
            y = F.linear(x2, weight, bias)
        else:
            y = x2 @ weight if bias is None else torch.addmm(bias, x2, weight)
        u_t = u.t().contiguous()  # Uᵀ row-major: the fast layout here and for the backward's grad h
        y.addmm_(h_t.t(), u_t, alpha=scale)
        ctx.save_for_backward(x2, weight, u_t, g, v, m, h_t, core, *spatial)
        ctx.options = scale, weight_transposed, core_transposed, x.shape, kernel.shape
        return y if x.ndim == 2 else y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        x2, weight, u_t, g, v, m, h_t, core, *spatial = ctx.saved_tensors
        need_x, need_w, need_b, need_u, need_core, need_v = ctx.needs_input_grad[:6]
        need_spatial = ctx.needs_input_grad[9:]
        need_g = need_core or any(need_spatial)
        scale, weight_transposed, core_transposed, input_shape, kernel_shape = ctx.options
        grad = grad_out if grad_out.ndim == 2 else grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = grad_u = grad_core = grad_v = None
        # the branch's gradient at h, transposed and without the scale (that rides on alpha and
        # one small mul_)
        grad_h_t = F.linear(u_t, grad) if (need_x or need_g or need_v) else None
        if need_x:
            assert grad_h_t is not None
            grad_x = F.linear(grad, weight) if weight_transposed else grad @ weight
            grad_x.addmm_(grad_h_t.t(), m, alpha=scale)
            if grad_x.shape != input_shape:
                grad_x = grad_x.view(input_shape)
        if need_w:
            grad_w = x2.t() @ grad if weight_transposed else grad.t() @ x2
            if grad_w.shape != kernel_shape:
                grad_w = grad_w.view(kernel_shape)
        if need_b:
            grad_b = grad.sum(0)
        if need_u:
            grad_u = (h_t @ grad).t()  # rank on the left: 3-5× faster than gradᵀ h here (r = 8, C = 128-512)
            if scale != 1.0:
                grad_u = grad_u * scale
        grad_spatial: list[torch.Tensor | None] = [None] * len(spatial)
        if need_g or need_v:
            assert grad_h_t is not None
            grad_m = grad_h_t @ x2
            if scale != 1.0:
                grad_m.mul_(scale)
            if need_g:
                grad_g = grad_m @ v
                if core_transposed:
                    grad_core = grad_g.t()
                elif spatial:  # through the product with the 1 × 1 factors
                    grad_core, *grad_spatial = spatial_unfold_grads(
                        grad_g.view(core.shape), core, spatial, 1.0, [need_core, *need_spatial]
                    )
                else:
                    grad_core = grad_g.view(core.shape)
            if need_v:
                grad_v = grad_m.t() @ g
        return grad_x, grad_w, grad_b, grad_u, grad_core, grad_v, None, None, None, *grad_spatial
