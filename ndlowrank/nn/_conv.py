"""Convolutions with a Tucker delta: geometry, the factorized branch and the fused path.

A conv weight of shape ``(out, in/groups, *k)`` gets ``ΔW[o, c, κ] = Σ A0[o, a] A1[c, b] Gs[a, b, κ]``,
where ``Gs`` is the *spatial core*: the Tucker core with its spatial factors (and the
scale) folded in, of shape ``(r0, r1, *k)``. Two ways to run it:

factorized
    ``base(x)`` plus three small convolutions: a 1×1 in-projection by ``A1ᵀ`` (per group),
    the spatial core carrying the base's stride, padding, dilation and padding mode, and a
    1×1 out-projection by ``A0`` (grouped like the base). :class:`FactorizedTuckerConv`
    runs all of it, the base convolution included, as one autograd node.
fused (the ``materialize`` path)
    one convolution with ``W + ΔW`` forward and for the input gradient
    (:class:`FusedTuckerConv`); the gradients of ``A0``, ``A1`` and ``Gs`` come from the
    small convolutions above, so the full ``out × in × k`` weight gradient is never
    computed for them.

Both functions take the core and the spatial factors and fold them (and the scale) into
``Gs`` themselves, so a call records one autograd node and no more.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .delta import trailing_mode_products

__all__ = [
    "ConvCosts",
    "ConvGeometry",
    "FactorizedTuckerConv",
    "FusedTuckerConv",
    "conv_costs",
    "conv_delta",
    "factorized_branch",
    "merged_weight",
    "project_in",
    "project_out",
    "spatial_fold",
    "spatial_unfold_grads",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvGeometry:
    """How a base ``nn.ConvNd`` pads and strides, reduced to a pre-padding plus numeric padding.

    ``padding_mode`` other than zeros, and ``padding="same"`` with an asymmetric need, become
    an explicit ``F.pad`` of the input (as ``nn.ConvNd`` itself does); everything else stays a
    numeric padding of the convolution.
    """

    def __init__(self, conv: Any) -> None:
        self.dims = len(conv.kernel_size)
        self.kernel = list(conv.kernel_size)
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        self.groups = int(conv.groups)
        self.pre_pad: list[int] | None = None
        self.pad_mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        reversed_twice = [int(p) for p in conv._reversed_padding_repeated_twice]
        symmetric = all(reversed_twice[i] == reversed_twice[i + 1] for i in range(0, len(reversed_twice), 2))
        if conv.padding_mode != "zeros" or not symmetric:
            self.pre_pad = reversed_twice
            self.padding = [0] * self.dims
        else:
            self.padding = reversed_twice[::2][::-1]
        self.unit_kernel = all(k == 1 for k in self.kernel)
        # a 1×…×1 kernel without padding: the convolution is a matrix product on a strided input
        self.pointwise = self.pre_pad is None and self.unit_kernel and not any(self.padding)

    def output_size(self, spatial: Sequence[int]) -> list[int]:
        """Spatial size of the convolution's output for an input of spatial size ``spatial``."""
        sizes = []
        for d, size in enumerate(spatial):
            if self.pre_pad is not None:  # F.pad lists the last dimension first
                size += self.pre_pad[2 * (self.dims - 1 - d)] + self.pre_pad[2 * (self.dims - 1 - d) + 1]
            span = self.dilation[d] * (self.kernel[d] - 1) + 1
            sizes.append(max((size + 2 * self.padding[d] - span) // self.stride[d] + 1, 0))
        return sizes

    def subsample(self, x: torch.Tensor) -> torch.Tensor:
        """The input pixels a pointwise convolution reads: every ``stride``-th along each spatial dimension."""
        if all(s == 1 for s in self.stride):
            return x
        index: tuple[Any, ...] = (..., *[slice(None, None, s) for s in self.stride])
        return x[index]

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the pre-padding, if any."""
        return x if self.pre_pad is None else F.pad(x, self.pre_pad, mode=self.pad_mode)

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The base convolution's geometry on a prepared input."""
        return _CONV[self.dims](x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def project_in(x: torch.Tensor, a1: torch.Tensor, groups: int) -> torch.Tensor:
    """The 1×…×1 in-projection by ``A1ᵀ`` per group, as one batched product: ``(B, g·r1, *S)``."""
    batch, channels = x.shape[:2]
    per_group = x.reshape(batch * groups, channels // groups, -1)
    z = torch.bmm(a1.T.expand(batch * groups, *a1.T.shape), per_group)
    return z.view(batch, groups * a1.shape[1], *x.shape[2:])


def _per_image(matrices: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-group matrices ``(g, m, n)`` repeated for ``batch`` images: ``(batch·g, m, n)``, a view when g = 1."""
    return matrices.expand(batch, *matrices.shape).reshape(-1, *matrices.shape[1:])


def project_out(u: torch.Tensor, a0: torch.Tensor, groups: int) -> torch.Tensor:
    """The 1×…×1 out-projection by ``A0``, grouped like the base: ``(B, out, *S)``."""
    batch = u.shape[0]
    out, rank = a0.shape
    y = torch.matmul(a0.reshape(groups, out // groups, rank), u.reshape(batch, groups, rank, -1))
    return y.reshape(batch, out, *u.shape[2:])


def _tiled(kernel: torch.Tensor, groups: int) -> torch.Tensor:
    """Repeat a per-group kernel along the output channels for a grouped convolution."""
    return kernel if groups == 1 else kernel.repeat(groups, *([1] * (kernel.ndim - 1)))


def _inner(a1: torch.Tensor, spatial_core: torch.Tensor) -> torch.Tensor:
    """``Gs ×_1 A1`` laid out ``(r0, in/g · k)``: one product, no transposition."""
    r0, r1 = spatial_core.shape[:2]
    if spatial_core.numel() == r0 * r1:  # a 1×…×1 kernel: one plain product
        return F.linear(spatial_core.reshape(r0, r1), a1)
    return torch.matmul(a1, spatial_core.reshape(r0, r1, -1)).reshape(r0, -1)


def conv_delta(a0: torch.Tensor, a1: torch.Tensor, spatial_core: torch.Tensor) -> torch.Tensor:
    """``ΔW = Gs ×_0 A0 ×_1 A1`` of shape ``(out, in/groups, *k)``."""
    inner = _inner(a1, spatial_core)
    return torch.mm(a0, inner.reshape(inner.shape[0], -1)).reshape(
        a0.shape[0], a1.shape[0], *spatial_core.shape[2:]
    )


def merged_weight(
    weight: torch.Tensor,
    a0: torch.Tensor,
    a1: torch.Tensor,
    spatial_core: torch.Tensor,
    *,
    as_matrix: bool = False,
) -> torch.Tensor:
    """``W + ΔW`` by one product-and-add (``ΔW`` as :func:`conv_delta`).

    With ``as_matrix`` laid out ``(out, in/groups · k)``, as the product gives it: no view
    back to the kernel's shape (one autograd node fewer for a caller that wants the matrix).
    """
    merged = torch.addmm(weight.reshape(weight.shape[0], -1), a0, _inner(a1, spatial_core))
    return merged if as_matrix else merged.view(weight.shape)


def spatial_fold(
    core: torch.Tensor, spatial: Sequence[torch.Tensor], scale: float, geometry: ConvGeometry
) -> torch.Tensor:
    """The spatial core ``Gs = scale · core ×_2 K_2 … ×_N K_N`` of shape ``(r0, r1, *kernel)``.

    For a 1×…×1 kernel every ``K_d`` is a 1 × 1 number: their product times the core.
    """
    if geometry.unit_kernel:
        folded = core * functools.reduce(operator.mul, spatial) if spatial else core
    else:
        folded = trailing_mode_products(core, spatial)
    return folded if scale == 1.0 else folded * scale  # x · 1.0 is x: skip the call


def spatial_unfold_grads(
    grad: torch.Tensor,
    core: torch.Tensor,
    spatial: Sequence[torch.Tensor],
    scale: float,
    needs: Sequence[bool],
) -> list[torch.Tensor | None]:
    """Gradients of ``core`` and of each spatial factor (where ``needs`` says) from that of :func:`spatial_fold`.

    Reverse mode through the fold's mode products, last one first: with ``P_d`` the core
    times ``K_2 … K_{d-1}`` (the fold's intermediate before ``K_d``) and ``∂P_{d+1}`` the
    gradient arriving there, ``∂K_d`` is the contraction of ``∂P_{d+1}`` and ``P_d`` over every
    mode but ``d``, and ``∂P_d = ∂P_{d+1} ×_d K_dᵀ``; ``∂core = ∂P_2``, all times ``scale``. A
    1×…×1 kernel (every ``K_d`` a 1 × 1 number) takes a shortcut of a few scalar products.
    """
    if scale != 1.0:
        grad = grad * scale
    grads: list[torch.Tensor | None] = [None] * (1 + len(spatial))
    if grad.shape == core.shape and all(k.numel() == 1 for k in spatial):
        if needs[0]:
            grads[0] = grad * functools.reduce(operator.mul, spatial) if spatial else grad
        if any(needs[1:]):
            dot = torch.dot(grad.reshape(-1), core.reshape(-1))
            for d in range(len(spatial)):
                if needs[1 + d]:
                    others = [k for j, k in enumerate(spatial) if j != d]
                    grads[1 + d] = (
                        dot * functools.reduce(operator.mul, others) if others else dot.reshape(1, 1)
                    )
        return grads
    chain = [core]  # the fold's intermediates, needed for the factors' gradients only
    if any(needs[1:]):
        for d, k in enumerate(spatial[:-1]):
            chain.append(_mode_product(chain[-1], k, 2 + d))
    for d in reversed(range(len(spatial))):
        if needs[1 + d]:
            grads[1 + d] = _mode_gram(grad, chain[d], 2 + d)
        if d > 0 or needs[0]:
            grad = _mode_product(grad, spatial[d].T, 2 + d)
    if needs[0]:
        grads[0] = grad
    return grads


def _mode_product(x: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``x ×_mode matrix`` for a ``matrix`` of shape ``(J, I_mode)``, without moving axes for the last two modes."""
    if mode == x.ndim - 1:
        return F.linear(x, matrix)
    if mode == x.ndim - 2:
        return torch.matmul(matrix, x)
    return torch.movedim(torch.tensordot(x, matrix, dims=([mode], [1])), -1, mode)


def _mode_gram(a: torch.Tensor, b: torch.Tensor, mode: int) -> torch.Tensor:
    """``Σ a[…, i, …] b[…, j, …]`` over every mode but ``mode``: shape ``(a.shape[mode], b.shape[mode])``."""
    if mode == a.ndim - 1:
        return torch.mm(a.reshape(-1, a.shape[-1]).T, b.reshape(-1, b.shape[-1]))
    if mode == a.ndim - 2:
        return torch.matmul(a, b.transpose(-1, -2)).reshape(-1, a.shape[-2], b.shape[-2]).sum(0)
    others = [m for m in range(a.ndim) if m != mode]
    return torch.tensordot(a, b, dims=(others, others))


_SMALL_CORE_CONV_PIXELS = 1024
"""Input pixels (batch × height × width) up to which the spatial core's 2-D convolution skips oneDNN on the CPU.

The core's convolution has a rank's few channels. On small maps oneDNN's fixed cost per call
dominates it, and PyTorch's own im2col kernel (``_slow_conv2d_forward`` / ``_backward``) ran it
3-4× faster, measured on one thread for an 8 → 8 channel 3×3 core: forward 10 µs against
32 µs and both gradients 19 µs against 80 µs on 4×8×4×4, 16 µs against 34 µs and 35 µs
against 91 µs on 4×8×8×8, and still faster for the gradients on 4×8×16×16 (1024 pixels,
79 µs against 113 µs); on 8×16×32×32 oneDNN was 2.7× faster.
"""


def _small_core_conv(geometry: ConvGeometry, z: torch.Tensor) -> bool:
    """Whether the core's convolution of ``z`` takes PyTorch's own kernel (:data:`_SMALL_CORE_CONV_PIXELS`).

    Only inside the autograd functions (grad mode off), for an ungrouped, undilated 2-D
    convolution of a float32 or float64 tensor on the CPU.
    """
    return (
        geometry.dims == 2
        and geometry.groups == 1
        and z.device.type == "cpu"
        and z.dtype in (torch.float32, torch.float64)
        and not torch.is_grad_enabled()
        and geometry.dilation == [1, 1]
        and z.shape[0] * z.shape[2] * z.shape[3] <= _SMALL_CORE_CONV_PIXELS
    )


def _core_conv(geometry: ConvGeometry, z: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The spatial core's convolution of the in-projected ``z``, in the base's geometry."""
    if _small_core_conv(geometry, z):
        return torch.ops.aten._slow_conv2d_forward(
            z, kernel, geometry.kernel, None, geometry.stride, geometry.padding
        )
    return geometry.conv(z, kernel)


def _core_conv_backward(
    geometry: ConvGeometry,
    grad: torch.Tensor,
    z: torch.Tensor,
    kernel: torch.Tensor,
    needs: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`_core_conv` for ``z`` and the kernel (where ``needs`` says), from ``grad``."""
    mask = [*needs, False]
    if _small_core_conv(geometry, z):
        grad_z, grad_kernel, _ = torch.ops.aten._slow_conv2d_backward(
            grad, z, kernel, geometry.kernel, geometry.stride, geometry.padding, mask
        )
    else:
        grad_z, grad_kernel, _ = torch.ops.aten.convolution_backward(
            grad, z, kernel, None, geometry.stride, geometry.padding, geometry.dilation, False,
            [0] * geometry.dims, geometry.groups, mask,
        )  # fmt: skip
    return grad_z, grad_kernel


def _branch(
    x: torch.Tensor, geometry: ConvGeometry, a1: torch.Tensor, spatial_core: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The branch up to its out-projection on a prepared, batched ``x``: ``(mid, t)``.

    ``t`` (B, g·r0, *S_out) is what the out-projection by ``A0`` takes. For a pointwise
    geometry ``mid`` is the core folded into ``A1ᵀ`` (r0 × in/g) and ``t`` its product with
    the pixels the convolution reads: two products on the activations, as in LoRA. Otherwise
    ``mid`` is the in-projection ``z`` (B, g·r1, *S_in) and ``t`` the spatial core's
    convolution of it. The 1×…×1 projections are matrix products (no convolution call).
    """
    g = geometry.groups
    if not geometry.pointwise:
        mid = project_in(x, a1, g)
        return mid, _core_conv(geometry, mid, _tiled(spatial_core, g))
    r0, r1 = spatial_core.shape[:2]
    mid = torch.matmul(spatial_core.reshape(r0, r1), a1.T)
    read = geometry.subsample(x)
    images = read.shape[0] * g
    t = torch.bmm(mid.expand(images, *mid.shape), read.reshape(images, mid.shape[1], -1))
    return mid, t.view(read.shape[0], g * r0, *read.shape[2:])


def factorized_branch(
    x: torch.Tensor, geometry: ConvGeometry, a0: torch.Tensor, a1: torch.Tensor, spatial_core: torch.Tensor
) -> torch.Tensor:
    """``conv(x, ΔW)`` as in-projection, spatial-core convolution and out-projection (``x`` batched, prepared).

    Plain autograd runs it (the autograd functions run :func:`_branch` themselves). An
    ungrouped pointwise geometry takes two 1×…×1 convolutions, by the core folded into ``A1ᵀ``
    and by ``A0``, as LoRA's two: fewer autograd nodes than products on reshaped activations.
    """
    if geometry.pointwise and geometry.groups == 1:
        r0, ones = spatial_core.shape[0], [1] * geometry.dims
        mid = geometry.conv(x, _inner(a1, spatial_core).view(r0, -1, *ones))
        return _CONV[geometry.dims](mid, a0.view(a0.shape[0], r0, *ones))
    return project_out(_branch(x, geometry, a1, spatial_core)[1], a0, geometry.groups)


def _add_grouped_product(y: torch.Tensor, matrix: torch.Tensor, t: torch.Tensor, groups: int) -> None:
    """``y += matrix @ t`` per group and image, in place: ``y`` (B, g·P, *S), ``t`` (B, g·r, *S).

    ``matrix`` is ``(g·P, r)``, or ``(P, r)`` shared by the groups. ``y`` may be a strided view.
    """
    batch, rank = y.shape[0], matrix.shape[1]
    rows = y.shape[1] // groups
    if groups == 1 and y.is_contiguous():  # one fused product-and-add instead of a product and an add
        y.view(batch, rows, -1).baddbmm_(matrix.expand(batch, rows, rank), t.reshape(batch, rank, -1))
        return
    product = torch.matmul(matrix.reshape(-1, rows, rank), t.reshape(batch, groups, rank, -1))
    y.add_(product.reshape(y.shape))


def _branch_grads(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    grad_x: torch.Tensor | None,
    geo: ConvGeometry,
    a0: torch.Tensor,
    a1: torch.Tensor,
    spatial_core: torch.Tensor,
    mid: torch.Tensor,
    t: torch.Tensor,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(A0, A1, Gs)`` of the branch in factorized form (where ``needs`` says).

    ``mid`` and ``t`` are :func:`_branch`'s; the branch's input gradient is added to
    ``grad_x`` in place when one is given. Products are laid out ``(r × S)(S × C)``, twice as
    fast as ``(C × S)(S × r)`` for a small rank, and transposed at the end.
    """
    need_a0, need_a1, need_gs = needs
    g = geo.groups
    batch, out = grad_out.shape[:2]
    images = batch * g  # the products run batched over images and groups
    r0, r1 = spatial_core.shape[:2]
    grad_a0 = grad_a1 = grad_gs = None
    per_group_grad = grad_out.view(images, out // g, -1)
    if need_a0:
        product = torch.bmm(t.reshape(images, r0, -1), per_group_grad.transpose(1, 2))
        grad_a0 = product.view(batch, g, r0, -1).sum(0).transpose(1, 2).reshape(out, r0)
    if not (need_a1 or need_gs or grad_x is not None):
        return grad_a0, grad_a1, grad_gs
    a0_t = _per_image(a0.reshape(g, out // g, r0).transpose(1, 2), batch)
    q = torch.bmm(a0_t, per_group_grad)  # (B·g, r0, S_out)
    if geo.pointwise:
        read = geo.subsample(x)
        if need_a1 or need_gs:
            grad_mid = torch.bmm(q, read.reshape(images, -1, q.shape[-1]).transpose(1, 2)).sum(0)
            if need_gs:
                grad_gs = torch.matmul(grad_mid, a1).reshape(spatial_core.shape)
            if need_a1:
                grad_a1 = torch.matmul(grad_mid.T, spatial_core.reshape(r0, r1))
        if grad_x is not None:
            _add_grouped_product(geo.subsample(grad_x), mid.T, q, g)
        return grad_a0, grad_a1, grad_gs
    grad_z, grad_gs_tiled = _core_conv_backward(
        geo, q.view(batch, g * r0, *grad_out.shape[2:]), mid, _tiled(spatial_core, g),
        (need_a1 or grad_x is not None, need_gs),
    )  # fmt: skip
    if grad_gs_tiled is not None:
        grad_gs = grad_gs_tiled if g == 1 else grad_gs_tiled.reshape(g, r0, *spatial_core.shape[1:]).sum(0)
    if grad_z is None:
        return grad_a0, grad_a1, grad_gs
    if need_a1:
        per_group_x = x.reshape(images, x.shape[1] // g, -1)
        grad_a1 = torch.bmm(grad_z.reshape(images, r1, -1), per_group_x.transpose(1, 2)).sum(0).T
    if grad_x is not None:
        _add_grouped_product(grad_x, a1, grad_z, g)
    return grad_a0, grad_a1, grad_gs


class ConvCosts(NamedTuple):
    """Multiply-adds of the parts of a conv adapter's call on one input (see :func:`conv_costs`)."""

    build: int  # ΔW = Gs ×_0 A0 ×_1 A1
    branch: int  # the factorized branch, once
    projections: int  # its in- and out-projections
    core: int  # the spatial core's convolution
    weight_gradient: int  # the full weight gradient, batch · out_pixels · |W|


def conv_costs(
    input_shape: Sequence[int], weight_shape: Sequence[int], ranks: Sequence[int], geometry: ConvGeometry
) -> ConvCosts:
    """:class:`ConvCosts` of a call on an input of ``input_shape`` (batched or not)."""
    out, in_per_group = weight_shape[:2]
    kernel = math.prod(weight_shape[2:])
    r0, r1 = ranks[:2]
    groups, dims = geometry.groups, geometry.dims
    batch = input_shape[0] if len(input_shape) == dims + 2 else 1
    in_pixels = math.prod(input_shape[-dims:])
    out_pixels = math.prod(geometry.output_size(input_shape[-dims:]))
    build = out * in_per_group * kernel * r0 + r0 * in_per_group * kernel * r1
    pixels_read = out_pixels if geometry.pointwise else in_pixels  # a pointwise conv reads strided
    core = batch * out_pixels * groups * r0 * r1 * kernel
    projections = batch * (pixels_read * in_per_group * groups * r1 + out_pixels * out * r0)
    if geometry.pointwise:  # the core folded into A1ᵀ first
        branch = batch * out_pixels * (in_per_group * groups * r0 + out * r0) + in_per_group * r0 * r1
    else:
        branch = projections + core
    weight_gradient = batch * out_pixels * out * in_per_group * kernel
    return ConvCosts(build, branch, projections, core, weight_gradient)


class FactorizedTuckerConv(torch.autograd.Function):
    """``conv(x, W, b) + conv(x, ΔW)``, the delta run on the activations, as one autograd node.

    Inputs: the *prepared*, batched input, the base weight and bias, ``A0`` (out × r0),
    ``A1`` (in/g × r1), the core (r0 × r1 × k'…), the geometry, the scale and the spatial
    factors (k × k' each). The branch (:func:`_branch`) is added in place to the base's
    output by one fused product-and-add. The backward computes the input gradient of base
    and branch, the base weight's and bias' gradients where they are needed, and the
    gradients of the factors and the core in factorized form, from the branch's two
    intermediates kept from the forward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a0: torch.Tensor,
        a1: torch.Tensor,
        core: torch.Tensor,
        geometry: ConvGeometry,
        scale: float,
        *spatial: torch.Tensor,
    ) -> torch.Tensor:
        gs = spatial_fold(core, spatial, scale, geometry)
        y = geometry.conv(x, weight, bias)
        mid, t = _branch(x, geometry, a1, gs)
        if y.is_contiguous():
            _add_grouped_product(y, a0, t, geometry.groups)
        else:  # a channels-last output: no in-place product on it
            y = y + project_out(t, a0, geometry.groups)
        ctx.geometry, ctx.scale, ctx.has_bias = geometry, scale, bias is not None
        ctx.save_for_backward(x, weight, a0, a1, core, gs, mid, t, *spatial)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        x, weight, a0, a1, core, gs, mid, t, *spatial = ctx.saved_tensors
        need_x, need_w, need_b, need_a0, need_a1, need_core, _, _, *need_spatial = ctx.needs_input_grad
        grad_out = grad_out.contiguous()  # once, instead of in every op below (it may be an expanded view)
        grad_x, grad_w, grad_b = _base_backward(ctx, grad_out, x, weight, (need_x, need_w, need_b))
        if grad_x is not None and not grad_x.is_contiguous():
            grad_x = grad_x.contiguous()
        need_gs = need_core or any(need_spatial)
        grad_a0, grad_a1, grad_gs = _branch_grads(
            grad_out, x, grad_x, ctx.geometry, a0, a1, gs, mid, t, (need_a0, need_a1, need_gs)
        )
        core_grads = _core_grads(ctx, grad_gs, core, spatial, need_core, need_spatial)
        return grad_x, grad_w, grad_b, grad_a0, grad_a1, core_grads[0], None, None, *core_grads[1:]


class FusedTuckerConv(torch.autograd.Function):
    """``conv(x, W + ΔW) + b`` with the factor gradients computed in factorized form.

    Inputs as :class:`FactorizedTuckerConv`. The forward builds ``W + ΔW`` by one product
    and add and runs one convolution; the backward runs one convolution backward with it
    for the input gradient (and the base weight's and bias' where needed), and the
    gradients of the factors and the core from the branch in factorized form, so the full
    ``out × in × k`` weight gradient is never computed for them.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a0: torch.Tensor,
        a1: torch.Tensor,
        core: torch.Tensor,
        geometry: ConvGeometry,
        scale: float,
        *spatial: torch.Tensor,
    ) -> torch.Tensor:
        gs = spatial_fold(core, spatial, scale, geometry)
        merged = merged_weight(weight, a0, a1, gs)
        ctx.geometry, ctx.scale, ctx.has_bias = geometry, scale, bias is not None
        ctx.save_for_backward(x, merged, a0, a1, core, gs, *spatial)
        return geometry.conv(x, merged, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        x, merged, a0, a1, core, gs, *spatial = ctx.saved_tensors
        need_x, need_w, need_b, need_a0, need_a1, need_core, _, _, *need_spatial = ctx.needs_input_grad
        grad_out = grad_out.contiguous()  # once, instead of in every op below (it may be an expanded view)
        grad_x, grad_w, grad_b = _base_backward(ctx, grad_out, x, merged, (need_x, need_w, need_b))
        needs = (need_a0, need_a1, need_core or any(need_spatial))
        grad_a0 = grad_a1 = grad_gs = None
        if any(needs):
            mid, t = _branch(x, ctx.geometry, a1, gs)
            grad_a0, grad_a1, grad_gs = _branch_grads(
                grad_out, x, None, ctx.geometry, a0, a1, gs, mid, t, needs
            )
        core_grads = _core_grads(ctx, grad_gs, core, spatial, need_core, need_spatial)
        return grad_x, grad_w, grad_b, grad_a0, grad_a1, core_grads[0], None, None, *core_grads[1:]


def _base_backward(
    ctx: Any, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, needs: tuple[bool, bool, bool]
) -> tuple[torch.Tensor | None, ...]:
    """Input, weight and bias gradients of ``conv(x, weight, bias)`` in one call (where ``needs`` says)."""
    if not any(needs):
        return None, None, None
    geo: ConvGeometry = ctx.geometry
    bias_sizes = [grad_out.shape[1]] if ctx.has_bias else None
    return tuple(
        torch.ops.aten.convolution_backward(
            grad_out, x, weight, bias_sizes, geo.stride, geo.padding, geo.dilation, False, [0] * geo.dims,
            geo.groups, list(needs),
        )
    )  # fmt: skip


def _core_grads(
    ctx: Any,
    grad_gs: torch.Tensor | None,
    core: torch.Tensor,
    spatial: Sequence[torch.Tensor],
    need_core: bool,
    need_spatial: Sequence[bool],
) -> list[torch.Tensor | None]:
    """Gradients of the core and the spatial factors from that of ``Gs`` (Nones where not needed)."""
    if grad_gs is None:
        return [None] * (1 + len(spatial))
    return spatial_unfold_grads(grad_gs, core, spatial, ctx.scale, [need_core, *need_spatial])
