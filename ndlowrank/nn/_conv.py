"""Convolutions with a Tucker delta: geometry, the factorized branch and the fused path.

A conv weight of shape ``(out, in/groups, *k)`` gets ``ΔW[o, c, κ] = Σ A0[o, a] A1[c, b] Gs[a, b, κ]``,
where ``Gs`` is the *spatial core*: the Tucker core with its spatial factors (and the
scale) folded in, of shape ``(r0, r1, *k)``. Two ways to run it:

factorized
    ``base(x)`` plus three small convolutions: a 1×1 in-projection by ``A1ᵀ`` (per group),
    the spatial core carrying the base's stride, padding, dilation and padding mode, and a
    1×1 out-projection by ``A0`` (grouped like the base).
fused (the ``materialize`` path)
    one convolution with ``W + ΔW`` forward and for the input gradient; the gradients of
    ``A0``, ``A1`` and ``Gs`` come from the same small convolutions as above, so the full
    ``out × in × k`` weight gradient is never computed. :class:`FusedTuckerConv` is that
    autograd function.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["ConvGeometry", "FusedTuckerConv", "conv_delta", "factorized_branch", "project_in", "project_out"]

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
        # a 1×…×1 kernel without padding: the convolution is a matrix product on a strided input
        self.pointwise = self.pre_pad is None and all(k == 1 for k in self.kernel) and not any(self.padding)

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
    """The 1×…×1 in-projection by ``A1ᵀ`` per group, as one broadcast matmul: ``(B, g·r1, *S)``."""
    batch, channels = x.shape[:2]
    grouped = x.reshape(batch, groups, channels // groups, -1)
    # an expanded (not a 2-D) left operand keeps matmul from transposing x into a copy
    z = torch.matmul(a1.T.expand(batch, groups, *a1.T.shape), grouped)
    return z.reshape(batch, groups * a1.shape[1], *x.shape[2:])


def project_out(u: torch.Tensor, a0: torch.Tensor, groups: int) -> torch.Tensor:
    """The 1×…×1 out-projection by ``A0``, grouped like the base: ``(B, out, *S)``."""
    batch = u.shape[0]
    out, rank = a0.shape
    y = torch.matmul(a0.reshape(groups, out // groups, rank), u.reshape(batch, groups, rank, -1))
    return y.reshape(batch, out, *u.shape[2:])


def _tiled(kernel: torch.Tensor, groups: int) -> torch.Tensor:
    """Repeat a per-group kernel along the output channels for a grouped convolution."""
    return kernel if groups == 1 else kernel.repeat(groups, *([1] * (kernel.ndim - 1)))


def conv_delta(a0: torch.Tensor, a1: torch.Tensor, spatial_core: torch.Tensor) -> torch.Tensor:
    """``ΔW = Gs ×_0 A0 ×_1 A1`` of shape ``(out, in/groups, *k)``."""
    inner = torch.tensordot(spatial_core, a1, dims=([1], [1]))  # (r0, *k, in/g)
    inner = torch.movedim(inner, -1, 1)  # (r0, in/g, *k)
    return torch.tensordot(a0, inner, dims=([1], [0]))


def factorized_branch(
    x: torch.Tensor, geometry: ConvGeometry, a0: torch.Tensor, a1: torch.Tensor, spatial_core: torch.Tensor
) -> torch.Tensor:
    """``conv(x, ΔW)`` as in-projection, spatial-core convolution and out-projection (``x`` batched, prepared).

    The 1×…×1 projections are matrix products, which run several times faster than
    1×1 convolutions with few channels; so is the core of a pointwise geometry.
    """
    if geometry.pointwise:  # the core folded into A1 first: two products on the activations, as in LoRA
        r0, r1 = spatial_core.shape[:2]
        u = _project_read(x, geometry, F.linear(a1, spatial_core.reshape(r0, r1)))
    else:
        u = _core_output(_project_read(x, geometry, a1), geometry, spatial_core)
    return project_out(u, a0, geometry.groups)


class FusedTuckerConv(torch.autograd.Function):
    """``conv(x, W + ΔW) + b`` with the factor gradients computed in factorized form.

    Inputs: the *prepared* input, the base weight and bias, ``A0`` (out × r0), ``A1``
    (in/g × r1), the spatial core ``Gs`` (r0 × r1 × k…) and the geometry. Gradients flow to
    every tensor input that requires them (the base weight's is the full weight gradient,
    computed only when the base weight is trainable). A pointwise geometry
    (:attr:`ConvGeometry.pointwise`) computes the core's gradient by matrix products.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a0: torch.Tensor,
        a1: torch.Tensor,
        spatial_core: torch.Tensor,
        geometry: ConvGeometry,
    ) -> torch.Tensor:
        ctx.geometry = geometry
        ctx.save_for_backward(x, weight, a0, a1, spatial_core)
        return geometry.conv(x, weight + conv_delta(a0, a1, spatial_core), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        x, weight, a0, a1, spatial_core = ctx.saved_tensors
        grad_out = grad_out.contiguous()  # once, instead of in every op below (it may be an expanded view)
        geo: ConvGeometry = ctx.geometry
        need_x, need_w, need_b, need_a0, need_a1, need_core, _ = ctx.needs_input_grad
        g, dims = geo.groups, geo.dims
        grad_x = grad_w = grad_b = grad_a0 = grad_a1 = grad_core = None
        if need_x or need_w:
            merged = weight + conv_delta(a0, a1, spatial_core)
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                grad_out, x, merged, None, geo.stride, geo.padding, geo.dilation, False, [0] * dims, g,
                [need_x, need_w, False],
            )  # fmt: skip
        if need_b:
            grad_b = grad_out.sum(dim=[0, *range(2, grad_out.ndim)])
        if not (need_a0 or need_a1 or need_core):
            return grad_x, grad_w, grad_b, grad_a0, grad_a1, grad_core, None
        batch, out = grad_out.shape[:2]
        r0, r1 = spatial_core.shape[:2]
        z = _project_read(x, geo, a1)
        grouped_grad = grad_out.reshape(batch, g, out // g, -1)  # (B, g, out/g, S_out)
        q = torch.matmul(a0.reshape(g, out // g, r0).transpose(-1, -2), grouped_grad)  # at the core's output
        if geo.pointwise:
            if need_core:
                grouped_z = z.reshape(batch, g, r1, -1)
                grad_core = (
                    torch.matmul(q, grouped_z.transpose(-1, -2)).sum((0, 1)).reshape(spatial_core.shape)
                )
            grad_z = torch.matmul(spatial_core.reshape(r0, r1).T, q) if need_a1 else None
        else:
            q = q.reshape(batch, g * r0, *grad_out.shape[2:])
            grad_z, grad_core_tiled, _ = torch.ops.aten.convolution_backward(
                q, z, _tiled(spatial_core, g), None, geo.stride, geo.padding, geo.dilation, False, [0] * dims, g,
                [need_a1, need_core, False],
            )  # fmt: skip
            if need_core:
                grad_core = grad_core_tiled.reshape(g, r0, *spatial_core.shape[1:]).sum(0)
        if need_a1:
            read = geo.subsample(x) if geo.pointwise else x  # the input pixels the branch reads
            assert grad_z is not None
            grouped_read = read.reshape(batch, g, read.shape[1] // g, -1)
            grad_z = grad_z.reshape(batch, g, r1, -1)
            grad_a1 = torch.matmul(grouped_read, grad_z.transpose(-1, -2)).sum(dim=(0, 1))
        if need_a0:
            u = _core_output(z, geo, spatial_core)
            grad_a0 = torch.matmul(grouped_grad, u.reshape(batch, g, r0, -1).transpose(-1, -2)).sum(0)
            grad_a0 = grad_a0.reshape(out, r0)
        return grad_x, grad_w, grad_b, grad_a0, grad_a1, grad_core, None


def _project_read(x: torch.Tensor, geometry: ConvGeometry, a1: torch.Tensor) -> torch.Tensor:
    """The in-projection ``z`` of the pixels the branch reads from a prepared ``x``: ``(B, g·r1, *S)``."""
    return project_in(geometry.subsample(x) if geometry.pointwise else x, a1, geometry.groups)


def _core_output(z: torch.Tensor, geometry: ConvGeometry, spatial_core: torch.Tensor) -> torch.Tensor:
    """The spatial core applied to ``z``, per group: ``(B, g·r0, *S_out)``."""
    g = geometry.groups
    if not geometry.pointwise:
        return geometry.conv(z, _tiled(spatial_core, g))
    r0, r1 = spatial_core.shape[:2]
    batch = z.shape[0]
    u = torch.matmul(spatial_core.reshape(r0, r1), z.reshape(batch, g, r1, -1))
    return u.reshape(batch, g * r0, *z.shape[2:])
