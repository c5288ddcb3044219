"""``TuckerAdapter``: a layer plus a Tucker-form delta on its weight.

One class for users, ``TuckerAdapter(base_layer, ranks, ...)``, which builds the subclass
for the layer's type. A subclass supplies only what differs between layer types: how to
run the layer with ``W + ΔW`` (the ``materialize`` path), how to run the delta on the
activations (the ``factorized`` path) and what each costs. Merging, unmerging, the
principal init and the choice of path are generic.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ._conv import (
    ConvGeometry,
    FactorizedTuckerConv,
    FusedTuckerConv,
    conv_costs,
    conv_delta,
    factorized_branch,
    merged_weight,
    spatial_fold,
)
from ._host import DEFAULT_ADAPTER, DeltaHost
from ._linear import fused_tucker_linear
from .distributed import gathered

__all__ = [
    "PATHS",
    "ConvAdapter",
    "EmbeddingAdapter",
    "LinearAdapter",
    "TransposedLinearAdapter",
    "TuckerAdapter",
    "supported_layers",
]

PATHS = ("auto", "materialize", "factorized")
_FUNCTION_STEP_OVERHEAD = 2_500_000
"""The fixed cost of a conv adapter's training step through one of its autograd functions beyond plain autograd, in flops.

:class:`FusedTuckerConv` and :class:`FactorizedTuckerConv` run a Python backward; on a
small convolution a step is dominated by per-call costs, and materializing with plain
autograd (``conv(x, W + ΔW)``, whose backward computes the full weight gradient in the
same call as the input gradient) has no Python backward and runs fewer, larger kernels
than the branch's small convolutions and products. Measured side by side on one CPU
thread at rank 8 (Conv2d(64, 16, 1) on a 1×1 map and Conv2d(16, 16, 3) on 8×8, batch 8;
a diffusers UNet's 3×3 convolutions with 32 to 128 input channels on 8×8 and 16×16,
batch 2) plain autograd is the faster path though its weight gradient costs up to 35
times the branch's flops; on Conv2d(64, 64, 3) at 16×16 and larger, and
Conv2d(256, 256, 1) at 16×16 (batch 8), the functions are about as fast or faster. The
two functions have about the same fixed cost, so their flops decide between them.
"""
_PLAIN_DISCOUNT = 3
"""How many times faster per flop plain autograd's materialize runs than the branch's small products and convolutions.

Its weight gradient runs in the convolution backward the input gradient needs anyway
(sharing its unfolded input), and it and the build of ``ΔW`` are products of full-width
matrices; fitted with :data:`_FUNCTION_STEP_OVERHEAD` to the measurements there, and to
Conv2d(64, 64, 3) on 8×64×32×32 at rank 16 (``bench_adapters``'s conv case), where
:class:`FusedTuckerConv` measured 7-20% faster than plain autograd, with less peak memory,
in side-by-side runs of the two forms on one CPU thread.
"""
_LINEAR_NODE_OVERHEAD = 1_000_000
"""Weight-sized work, in flops, above which an SE block's conv runs through :class:`FusedTuckerLinear`.

A pointwise conv on a 1×…×1 map is a linear layer. With plain autograd through
``F.linear(x, W + ΔW)`` its step builds ``ΔW``, backpropagates through the build and computes
the full weight gradient (``3 · build + weight gradient`` flops); the fused linear node does
none of that but runs a Python backward. Measured side by side on one CPU thread at rank 8
(``Conv2d(in, out, 1)`` on a 1×1 map): the plain product is faster for 64 → 16 and 96 → 24
(batch 4 and 8, 0.1-0.3M such flops) and 256 → 64 (batch 8, 0.6M), the node for 576 → 96
and 576 → 144 (batch 4, 1.7M and 2.4M), where it cut the adapter's extra cost over the
frozen layer by 15-35%.
"""
_POINTWISE_NODE_ACTIVATIONS = 300_000
"""Activation elements, tokens × (in + out), above which a pointwise conv's factorized path runs :class:`FactorizedTuckerConv`.

Below this, an ungrouped pointwise conv runs the base layer plus the branch as two 1×…×1
convolutions with plain autograd (C++ nodes only), which costs less than the node's Python
backward. Measured side by side on one CPU thread at rank 8 (extra cost over the frozen
layer against PEFT LoRA's): plain autograd 0.78-1.16 and the node 1.44-1.63 on 672 → 112 at
4 × 4 and 1152 → 192 at 2 × 2 (batch 4: 50K and 22K elements), 0.84-1.04 against 1.17-1.31
on 40 → 240 at 8 × 8 and 144 → 24 at 16 × 16 (72K and 172K); the node 0.55-0.96 against
0.71-1.37 on 240 → 40 at 16 × 16, 256 → 256 at 16 × 16 and 64 → 256 at 32 × 32 (batch 8:
573K, 1M and 2.6M elements).
"""
_COMPOSITE_STEP_OVERHEAD = 500_000
"""The fixed cost, in flops, of a pointwise conv's step as base plus branch with plain autograd (see :data:`_POINTWISE_NODE_ACTIVATIONS`).

Against plain autograd's ``conv(x, W + ΔW)`` (:data:`_PLAIN_DISCOUNT`), fitted to the same
side-by-side runs: the two forms measured alike on 576 → 96 and 288 → 96 at 2 × 2 (batch 4),
where this constant puts them about level, and the composite form cut the extra cost by
22-51% on 672 → 112 at 4 × 4 and 1152 → 192 at 2 × 2, whose weight gradients cost more
than their activations.
"""
_LINEAR_NODE_ACTIVATIONS = 48_000
"""Activation elements, tokens × (in + out), above which a linear layer's factorized path runs :class:`FusedTuckerLinear`.

The node runs the base layer and the branch in one pass over the activations forward and
backward, but its backward is Python; below this, plain autograd through
``base(x) + (x (G A1ᵀ)ᵀ) A0ᵀ`` (C++ nodes only) costs less. Measured side by side on one CPU
thread at rank 8, as the extra cost over the frozen layer against PEFT LoRA's: plain autograd
0.68-1.08 and the node 0.75-1.44 at 1K-32K elements, plain autograd ahead or level in each of
18 pairs (``Linear(64, 64)`` on 8 to 256 tokens, 32 → 32 on 512, 128 → 128 on 128,
256 → 256 on 32, 768 → 768 on 8); the node 0.46-0.74 and plain autograd 0.80-0.91 at
64K-164K (128 → 128 on 256 tokens, 320 → 320 on 128, 128 → 512 on 256).
"""
_AUTO_PATHS_KEPT = 64  # input shapes whose path="auto" choice an adapter remembers

# the cost rules whose choice an adapter remembers per input shape (see TuckerAdapter._form)
PLAIN_MERGE = "plain W+ΔW"  # a conv's materialize path: plain autograd, or else FusedTuckerConv
LINEAR_NODE = "linear node"  # a linear call through FusedTuckerLinear, or else plain autograd
COMPOSITE = "composite"  # a pointwise conv's factorized path: base plus branch with plain autograd


def supported_layers() -> tuple[type[nn.Module], ...]:
    """Layer types :class:`TuckerAdapter` can wrap (a peer's, such as transformers' ``Conv1D``, once imported)."""
    return tuple(_adapter_types())


def _adapter_types() -> dict[type[nn.Module], type[TuckerAdapter]]:
    """:data:`_ADAPTERS` plus the layer types of :data:`_PEER_ADAPTERS` whose peer module is imported."""
    types = dict(_ADAPTERS)
    for (module_name, type_name), adapter_type in _PEER_ADAPTERS.items():
        layer_type = getattr(sys.modules.get(module_name), type_name, None)
        if isinstance(layer_type, type):
            types[layer_type] = adapter_type
    return types


def _registered_type(base_layer: nn.Module) -> type[nn.Module]:
    """The supported layer type ``base_layer`` is an instance of."""
    for layer_type in _adapter_types():
        if isinstance(base_layer, layer_type):
            return layer_type
    names = ", ".join(t.__name__ for t in _adapter_types())
    raise TypeError(f"cannot adapt a {type(base_layer).__name__}; supported layers: {names}")


def _adapter_class(base_layer: nn.Module) -> type[TuckerAdapter]:
    return _adapter_types()[_registered_type(base_layer)]


def _remembered(cache: dict[tuple[Any, ...], Any], key: tuple[Any, ...], estimate: Callable[[], Any]) -> Any:
    """``cache[key]``, computed by ``estimate()`` the first time; a cache of many input shapes starts over.

    A choice per input shape that costs tens of microseconds to estimate is made once.
    """
    value = cache.get(key)
    if value is None:
        if len(cache) >= _AUTO_PATHS_KEPT:  # inputs of ever new shapes: start over
            cache.clear()
        value = cache[key] = estimate()
    return value


class TuckerAdapter(DeltaHost):
    """A layer whose weight is changed by ``ΔW = scale · G ×_0 A_0 … ×_{N-1} A_{N-1}`` in the weight's own layout.

    ``TuckerAdapter(layer, ...)`` returns a :class:`LinearAdapter`, :class:`ConvAdapter`
    (``nn.Conv1d/2d/3d``, every geometry including groups and padding modes),
    :class:`EmbeddingAdapter` or :class:`TransposedLinearAdapter` (transformers' ``Conv1D``).
    The delta has the weight's shape: ``(out, in)`` for a linear layer, ``(out, in/groups,
    *kernel)`` for a convolution, ``(num, dim)`` for an embedding, ``(in, out)`` for a ``Conv1D``.

    Parameters
    ----------
    base_layer : nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding or transformers' Conv1D
        Kept as ``self.base_layer``; it is not frozen here (:func:`add_adapters` does that).
    ranks : int or sequence of int
        An int is clipped to each mode's size (``8`` on a 3×3 kernel gives spatial ranks 3);
        a sequence is validated strictly, one rank per weight mode.
    init : {"zero_core", "zero_factor", "orthogonal", "principal"}, default "zero_core"
        Every init leaves the layer's output unchanged. ``"principal"`` takes the delta from
        the ST-HOSVD of the base weight and replaces the base weight by the residual.
    scale : float, default 1.0
        Multiplier of the delta (``alpha / r`` in LoRA terms).
    dropout : float, default 0.0
        Dropout on the adapter branch's input (for an embedding: on the looked-up factor
        rows); the factorized path only.
    path : {"auto", "materialize", "factorized"}, default "auto"
        ``"materialize"`` runs the layer once with ``W + ΔW`` (for convolutions in training,
        the factor gradients come from the full weight gradient or, where that costs more,
        in factorized form, see :mod:`ndlowrank.nn._conv`); ``"factorized"`` adds the delta
        computed on the activations; ``"auto"`` picks the one with the lower estimated cost
        (:meth:`path_costs`), factorized when dropout is on.
    dtype : torch.dtype, optional
        dtype of the adapter parameters: float32 by default (float64 for a float64 layer),
        also for a bfloat16/float16 layer; pass the layer's dtype to match it.
    seed : int, optional
        Seed of the random init; without it, torch's global generator seeds it.
    adapter_name : str, default "default"
        Name of the adapter (more can be added with :meth:`add_adapter`).
    """

    kind: ClassVar[str] = ""
    base_layer: Any

    def __new__(cls, base_layer: nn.Module | None = None, *args: Any, **kwargs: Any) -> TuckerAdapter:
        if cls is TuckerAdapter and base_layer is not None:
            cls = _adapter_class(base_layer)
        return super().__new__(cls)

    def __init__(
        self,
        base_layer: nn.Module,
        ranks: int | Sequence[int],
        *,
        init: str = "zero_core",
        scale: float = 1.0,
        dropout: float = 0.0,
        path: str = "auto",
        dtype: torch.dtype | None = None,
        seed: int | None = None,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        super().__init__()
        _adapter_class(base_layer)  # type check for direct subclass use
        if path not in PATHS:
            raise ValueError(f"unknown path={path!r}; known paths: {list(PATHS)}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout={dropout!r} must be a probability in [0, 1)")
        if path == "materialize" and dropout > 0:
            raise ValueError(
                "path='materialize' cannot apply dropout to the adapter branch; use path='factorized'"
            )
        self.base_layer = base_layer
        # a layer running its type's own forward, which a fused path may compute in its place
        self._plain_base = type(base_layer).forward is _registered_type(base_layer).forward
        self.path, self.dropout_p = path, float(dropout)
        self._auto_paths: dict[tuple[Any, ...], str] = {}  # path="auto"'s choice per input shape and mode
        # per input shape: the form a path takes (plain autograd or an autograd function)
        self._form_choices: dict[tuple[Any, ...], bool] = {}
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._init_delta(ranks, init=init, scale=scale, dtype=dtype, seed=seed, adapter_name=adapter_name)
        self._after_init()
        self.train(base_layer.training)  # an adapter on a model in eval mode starts in eval mode

    # -- what subclasses supply (and _after_init) ------------------------------------
    def _forward_summed(self, x: torch.Tensor) -> torch.Tensor:
        """The layer with ``W + ΣΔW`` of the active adapters (a materialize path that sums them)."""
        return self._forward_materialize(x)

    def _forward_materialize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _forward_factorized(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def path_costs(self, input_shape: tuple[int, ...], *, training: bool) -> tuple[float, float]:
        """Estimated flops ``(materialize, factorized)`` of one call on an input of this shape.

        With ``training`` the backward pass is included (the input is assumed to need a
        gradient). The base layer's own cost, common to both paths, is left out.
        """
        raise NotImplementedError

    # -- generic behaviour -----------------------------------------------------------
    def _parts(self) -> list[torch.Tensor]:
        """The active delta's core and factors that a call uses, in the weight's dtype (for the forward paths)."""
        dtype = self.base_layer.weight.dtype
        return [p if p.dtype == dtype else p.to(dtype) for p in self._used_parameters()]

    def _used_parameters(self) -> list[torch.Tensor]:
        """The active delta's core and factors, as stored."""
        delta = self.delta
        # the ParameterList's own dict: iterating the list itself costs microseconds a call
        return [delta.core, *delta.factors._parameters.values()]  # type: ignore[list-item]

    def _factors_and_core(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``A0``, ``A1`` and ``G`` of a two-mode delta, in the weight's dtype (for the forward paths)."""
        core, a0, a1 = self._parts()
        return a0, a1, core

    def _form_key(self, input_shape: tuple[int, ...], rule: str, training: bool = True) -> tuple[Any, ...]:
        """The key of ``rule``'s choice (:data:`PLAIN_MERGE`, :data:`LINEAR_NODE`, :data:`COMPOSITE`) for a call on ``input_shape``."""
        return (input_shape, rule, training, self.delta.core.shape)  # a torch.Size hashes as its tuple

    def _form(
        self, input_shape: tuple[int, ...], rule: str, estimate: Callable[[], bool], training: bool = True
    ) -> bool:
        """``rule``'s choice for a call on ``input_shape``: ``estimate()`` the first time, then remembered."""
        return _remembered(self._form_choices, self._form_key(input_shape, rule, training), estimate)

    def _fix_forms(self, input_shape: tuple[int, ...], choices: dict[str, bool]) -> None:
        """Make training calls on ``input_shape`` take ``choices`` (rule name to choice), whatever the cost rules say.

        Tests and ``benchmarks/bench_forms.py`` force every form in turn with it.
        """
        self._form_choices.clear()
        for rule, choice in choices.items():
            self._form_choices[self._form_key(input_shape, rule)] = choice

    def _linear_node_pays(self, x: torch.Tensor) -> bool:
        """Whether a linear layer's factorized call on ``x`` runs :class:`FusedTuckerLinear` (:data:`_LINEAR_NODE_ACTIVATIONS`)."""

        def estimate() -> bool:
            tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
            return tokens * sum(self.weight.shape) > _LINEAR_NODE_ACTIVATIONS

        return self._form(x.shape, LINEAR_NODE, estimate)

    def _runs_base_here(self, x: torch.Tensor) -> bool:
        """Whether a forward may compute the base layer's product itself instead of calling the layer.

        Not when anything could change what calling the layer does: hooks on it, a
        replaced ``forward`` (accelerate's offloading does that) or a subclass's own one, or
        dropout on the branch (its input then differs from the layer's).
        """
        base = self.base_layer
        return self._plain_base and not (
            base._forward_hooks
            or base._forward_pre_hooks
            or base._backward_hooks
            or base._backward_pre_hooks
            or "forward" in base.__dict__
            or (self.training and self.dropout_p > 0)
        )

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (merged or not)."""
        return self.base_layer.weight

    def __getattr__(self, name: str) -> Any:
        """Read the base layer's attributes through the adapter (``in_features``, ``bias``, ``kernel_size``, ...).

        Code that inspects a layer (transformers, torchvision, user models) keeps working
        on the adapted layer. Only reading is forwarded: the adapter's own attributes
        (``delta``, ``scale``, ``dropout``, ``path``, ...) take precedence, and setting an
        attribute sets it on the adapter.
        """
        modules = self.__dict__.get("_modules", {})
        if name != "delta" and name in modules:  # the common case first: forward reads its modules
            return modules[name]
        try:
            return super().__getattr__(name)
        except AttributeError as error:
            base = modules.get("base_layer")
            if base is None or name.startswith("__"):
                raise
            try:
                return getattr(base, name)
            except AttributeError:
                raise error from None

    def chosen_path(self, x: torch.Tensor) -> str:
        """The path a call on ``x`` takes."""
        if self.path != "auto":
            return self.path
        if self.dropout_p > 0 and self.training:
            return "factorized"
        training = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.delta.parameters())
        )
        shape = tuple(x.shape)  # the choice depends only on the shape, the mode and the ranks

        def estimate() -> str:
            materialize, factorized = self.path_costs(shape, training=training)
            return "materialize" if materialize < factorized else "factorized"

        return _remembered(self._auto_paths, (shape, training, tuple(self.delta.core.shape)), estimate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled or self.active_adapter is None:
            return self.base_layer(x)
        if self.__dict__["_also_active"]:  # several adapters: the layer with W + ΔW₁ + ΔW₂ ...
            return self._forward_summed(x)
        if self.chosen_path(x) == "materialize":
            return self._forward_materialize(x)
        return self._forward_factorized(x)

    def restore_base(self) -> nn.Module:
        """The base layer with its original weight (undoing a merge and the principal init)."""
        self.restore_weight()
        return self.base_layer

    def merged_base(self, names: Sequence[str] | None = None) -> nn.Module:
        """The base layer with ``ΔW`` merged in for good (the fine-tuned weight); ``names``: of these adapters."""
        self.merge_for_good(names)
        return self.base_layer

    def config(self) -> dict[str, Any]:
        """What is needed to rebuild this adapter on the same base layer (JSON-serialisable)."""
        return {
            **super().config(),
            "layer": type(self.base_layer).__name__,
            "dropout": self.dropout_p,
            "path": self.path,
        }

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}, init={self.init!r}, scale={self.scale}, path={self.path!r}, merged={self.merged}"


class LinearAdapter(TuckerAdapter):
    """Tucker adapter of an ``nn.Linear``: ``ΔW = scale · A0 G A1ᵀ`` of shape ``(out, in)``."""

    kind = "linear"

    def _forward_materialize(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.base_layer
        return F.linear(x, self.weight + self.total_delta_weight(), layer.bias)

    def _forward_factorized(self, x: torch.Tensor) -> torch.Tensor:
        a0, a1, core = self._factors_and_core()
        scale = self.delta.scale
        if self._runs_base_here(x) and self._linear_node_pays(x):
            layer = self.base_layer
            return fused_tucker_linear(x, layer.weight, layer.bias, a0, core, a1, scale)
        # G A1ᵀ (r0 × in) first: two products on the activations, as in LoRA, and one tiny one
        return self.base_layer(x) + F.linear(
            F.linear(self.dropout(x), F.linear(_scaled(core, scale), a1)), a0
        )

    def path_costs(self, input_shape: tuple[int, ...], *, training: bool) -> tuple[float, float]:
        out, inp = self.weight.shape
        r_out, r_in = self.ranks
        return _linear_costs(input_shape, out, inp, r_out, r_in, training=training)


def _scaled(core: torch.Tensor, scale: float) -> torch.Tensor:
    return core if scale == 1.0 else core * scale  # x · 1.0 is x: skip the call


def _linear_costs(
    input_shape: tuple[int, ...], out: int, inp: int, r_out: int, r_in: int, *, training: bool
) -> tuple[float, float]:
    """``(materialize, factorized)`` flops of a linear layer ``inp → out`` with ranks ``(r_out, r_in)``."""
    tokens = math.prod(input_shape) // inp
    build = out * inp * r_out + inp * r_out * r_in
    branch = inp * r_out * r_in + tokens * (inp * r_out + r_out * out)  # G A1ᵀ, then x (G A1ᵀ)ᵀ, then A0
    if not training:
        return float(build), float(branch)
    # materialize also pays the full weight gradient (tokens · out · in)
    return float(3 * build + tokens * out * inp), float(3 * branch)


class TransposedLinearAdapter(TuckerAdapter):
    """Tucker adapter of transformers' ``Conv1D`` (GPT-2's ``c_attn``, ``c_fc``, ``c_proj``).

    ``Conv1D`` is a linear layer whose weight is stored transposed, ``(in, out)``, and
    applied as ``x @ W + b``. The delta has the weight's own layout, ``ΔW = scale · A0 G A1ᵀ``
    of shape ``(in, out)``, so merging adds it as it is and a saved adapter names the
    modes as the weight does.
    """

    kind = "transposed_linear"

    def _forward_materialize(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, (self.weight + self.total_delta_weight()).T, self.base_layer.bias)

    def _forward_factorized(self, x: torch.Tensor) -> torch.Tensor:
        a0, a1, core = self._factors_and_core()
        scale = self.delta.scale
        if self._runs_base_here(x) and self._linear_node_pays(x):  # as (out, in): U = A1, V = A0, Gᵀ
            layer = self.base_layer
            return fused_tucker_linear(
                x, layer.weight, layer.bias, a1, core, a0, scale, weight_transposed=True, core_transposed=True
            )
        return self.base_layer(x) + F.linear(self.dropout(x) @ (a0 @ _scaled(core, scale)), a1)  # A0 G first

    def path_costs(self, input_shape: tuple[int, ...], *, training: bool) -> tuple[float, float]:
        inp, out = self.weight.shape
        r_in, r_out = self.ranks
        return _linear_costs(input_shape, out, inp, r_out, r_in, training=training)


def held_spatial_modes(kernel: Sequence[int], init: str) -> list[int]:
    """The spatial modes of a conv adapter with ``init`` on a ``kernel`` whose square factors it holds at the identity.

    A 1 × 1 factor (a 1×…×1 kernel's) only rescales the core: always held. A larger
    square factor (full spatial rank) only re-expresses the core too, but training it
    changes the course of training. ``benchmarks/quality/spatial.py`` (the quality study's
    conv net, five seeds, held minus trained accuracy at three budgets) measured holding as
    accurate with the default ``init="zero_core"`` (-0.3, -0.1 and +0.2 points), so it is
    held there, and worse with ``orthogonal`` (-5.3, -2.6, -0.4) and ``principal`` (-1.5,
    -0.4, -1.0), so with those inits it trains.

    Modes whose factor is not square (a spatial rank below the kernel size) are among them
    but not held: :meth:`TuckerDelta.fix_square_modes`, which holds them, skips those.
    """
    return [2 + d for d, size in enumerate(kernel) if size == 1 or init == "zero_core"]


class ConvAdapter(TuckerAdapter):
    """Tucker adapter of an ``nn.Conv1d/2d/3d``: ``ΔW`` of shape ``(out, in/groups, *kernel)``.

    The spatial factors and the scale are folded into the core (``spatial_core``) before
    use, so both paths work with three small convolutions at most. The factorized path is
    one autograd node (:class:`~ndlowrank.nn._conv.FactorizedTuckerConv`); materialize is
    plain autograd through ``conv(x, W + ΔW)`` where the full weight gradient is cheap, else
    one node (:class:`~ndlowrank.nn._conv.FusedTuckerConv`). See :mod:`ndlowrank.nn._conv`.
    """

    kind = "conv"

    def _after_init(self) -> None:
        self.geometry = ConvGeometry(self.base_layer)
        # the forms of _forward_materialize and _forward_as_linear, and whether the held spatial
        # factors still are the identity (see _used_parameters), for the new delta
        self._form_choices.clear()
        self._hold_square_factors()

    def _hold_square_factors(self) -> None:
        """Hold the spatial factors :func:`held_spatial_modes` names at the identity; let the others train."""
        held = held_spatial_modes(self.weight.shape[2:], self.init)
        self.delta.release_modes([n for n in range(2, self.weight.ndim) if n not in held])
        self.delta.fix_square_modes(held)

    def _used_parameters(self) -> list[torch.Tensor]:
        """As :meth:`TuckerAdapter._used_parameters`, without the spatial factors while they are held at the identity.

        Those factors (see :meth:`TuckerDelta.fix_square_modes`) multiply by the identity,
        and leaving them out spares every call the core's spatial products forward and
        backward, and their autograd nodes. Measured side by side on one CPU thread at rank 8,
        against the same adapter with the factors trainable, the adapter's cost over the
        frozen layer fell by 17-25% on small pointwise and SE convs from MobileNetV3 (1 × 1
        factors) and by 12-44% on seven of eight 3×3 convs of 8 to 256 channels (within the
        noise on a 512-channel one at 2×2). A factor that was made trainable again,
        or changed (a loaded file, an in-place edit: its version counter moves), is checked
        anew and used as it is if it is no longer a frozen identity. Under ``torch.compile``
        the factors are always used.
        """
        parts = super()._used_parameters()
        delta, spatial = self.delta, parts[3:]
        if not all(n in delta.fixed_modes for n in range(2, len(parts) - 1)) or torch.compiler.is_compiling():
            return parts  # a compiled graph cannot read version counters, and fuses the products anyway
        key = ("held", *((id(k), k._version, k.requires_grad) for k in spatial))

        def still_identity() -> bool:
            return not any(k.requires_grad for k in spatial) and all(
                torch.equal(gathered(k), torch.eye(k.shape[0], dtype=k.dtype, device=k.device))
                for k in spatial
            )

        return parts[:3] if _remembered(self._form_choices, key, still_identity) else parts

    def spatial_core(self) -> torch.Tensor:
        """``scale · G ×_2 K_2 … ×_N K_N`` of shape ``(r0, r1, *kernel)``, in the weight's dtype."""
        core, _, _, *spatial = self._parts()
        return spatial_fold(core, spatial, self.delta.scale, self.geometry)

    def _forward_materialize(self, x: torch.Tensor) -> torch.Tensor:
        """``conv(x, W + ΔW)`` with plain autograd where the full weight gradient is cheap, else :class:`FusedTuckerConv`."""
        if not self._computes_base(x):
            return self._forward_composite(x, dropout=False)
        if self._is_linear_on(x):
            return self._forward_as_linear(x)
        training = torch.is_grad_enabled()

        def estimate() -> bool:
            autograd, fused = self._materialize_costs(tuple(x.shape)) if training else (0.0, 1.0)
            return autograd <= fused

        plain = self._form(x.shape, PLAIN_MERGE, estimate, training)
        core, a0, a1, *spatial = self._parts()
        layer, scale = self.base_layer, self.delta.scale
        if plain:
            weight = merged_weight(layer.weight, a0, a1, spatial_fold(core, spatial, scale, self.geometry))
            return layer._conv_forward(x, weight, layer.bias)
        prepared = self.geometry.prepare(x)
        return FusedTuckerConv.apply(
            prepared, layer.weight, layer.bias, a0, a1, core, self.geometry, scale, *spatial
        )

    def _forward_factorized(self, x: torch.Tensor) -> torch.Tensor:
        if not self._computes_base(x):
            return self._forward_composite(x, dropout=True)
        if self._is_linear_on(x):
            return self._forward_as_linear(x)
        if self._composes(tuple(x.shape)):
            return self._forward_composite(x, dropout=False)
        core, a0, a1, *spatial = self._parts()
        layer = self.base_layer
        return FactorizedTuckerConv.apply(
            self.geometry.prepare(x), layer.weight, layer.bias, a0, a1, core, self.geometry, self.delta.scale,
            *spatial,
        )  # fmt: skip

    def _forward_as_linear(self, x: torch.Tensor) -> torch.Tensor:
        """Both paths where the convolution is a linear layer (:meth:`_is_linear_on`), with no convolution call.

        ``F.linear(x, W + ΔW)`` with plain autograd, or :class:`FusedTuckerLinear` where the
        weight-sized work of the former passes :data:`_LINEAR_NODE_OVERHEAD`.
        """
        core, a0, a1, *spatial = self._parts()
        layer, scale = self.base_layer, self.delta.scale
        x2 = x.reshape(x.shape[0], -1)

        def estimate() -> bool:
            costs = conv_costs(tuple(x.shape), self.weight.shape, self.ranks, self.geometry)
            return 3 * costs.build + costs.weight_gradient > _LINEAR_NODE_OVERHEAD

        if self._form(x.shape, LINEAR_NODE, estimate):
            y = fused_tucker_linear(x2, layer.weight, layer.bias, a0, core, a1, scale, spatial=tuple(spatial))
        else:
            gs = spatial_fold(core, spatial, scale, self.geometry)
            y = F.linear(x2, merged_weight(layer.weight, a0, a1, gs, as_matrix=True), layer.bias)
        return y.view(x.shape[0], -1, *x.shape[2:])

    def _composes(self, input_shape: tuple[int, ...]) -> bool:
        """Whether the factorized path runs base plus branch with plain autograd on this input (:data:`_POINTWISE_NODE_ACTIVATIONS`).

        Only an ungrouped pointwise conv, whose branch is two 1×…×1 convolutions.
        """
        geometry = self.geometry
        if not (geometry.pointwise and geometry.groups == 1):
            return False

        def estimate() -> bool:
            out, inp = self.weight.shape[:2]
            batch = input_shape[0] if len(input_shape) == geometry.dims + 2 else 1
            tokens = batch * math.prod(geometry.output_size(input_shape[-geometry.dims :]))
            return tokens * (inp + out) <= _POINTWISE_NODE_ACTIVATIONS

        return self._form(input_shape, COMPOSITE, estimate)

    def _is_linear_on(self, x: torch.Tensor) -> bool:
        """Whether the convolution is a linear layer on ``x``'s channels: pointwise, ungrouped, on a 1×…×1 map (an SE block's)."""
        return (
            self.geometry.pointwise and self.geometry.groups == 1 and all(size == 1 for size in x.shape[2:])
        )

    def _computes_base(self, x: torch.Tensor) -> bool:
        """Whether a path may compute the base convolution itself (:meth:`_runs_base_here`) with autograd functions.

        Not under autocast either: a function's backward would not replay autocast's casts.
        """
        return self._runs_base_here(x) and not torch.is_autocast_enabled(x.device.type)

    def _forward_composite(self, x: torch.Tensor, *, dropout: bool) -> torch.Tensor:
        """The base layer's own call plus the factorized branch as separate autograd operations."""
        core, a0, a1, *spatial = self._parts()
        branch_input = self.geometry.prepare(self.dropout(x) if dropout else x)
        spatial_core = spatial_fold(core, spatial, self.delta.scale, self.geometry)
        return self.base_layer(x).add_(factorized_branch(branch_input, self.geometry, a0, a1, spatial_core))

    def _forward_summed(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.base_layer
        return layer._conv_forward(x, self.weight + self.total_delta_weight(), layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == self.geometry.dims + 1:  # an unbatched input, as nn.ConvNd accepts
            return super().forward(x.unsqueeze(0)).squeeze(0)
        return super().forward(x)

    def delta_weight(self) -> torch.Tensor:
        core, a0, a1, *spatial = self._parts()
        return conv_delta(a0, a1, spatial_fold(core, spatial, self.delta.scale, self.geometry))

    def _materialize_costs(self, input_shape: tuple[int, ...]) -> tuple[float, float]:
        """Training-step costs of materializing ``(with plain autograd, with FusedTuckerConv)``, in flops."""
        costs = conv_costs(input_shape, self.weight.shape, self.ranks, self.geometry)
        # plain autograd: the delta's build, its backward through the build, the full weight gradient;
        # FusedTuckerConv: the build, each projection twice and the core three times in its backward
        plain = (3 * costs.build + costs.weight_gradient) / _PLAIN_DISCOUNT
        fused = 3 * costs.build + 2 * costs.projections + 3 * costs.core + _FUNCTION_STEP_OVERHEAD
        return float(plain), float(fused)

    def path_costs(self, input_shape: tuple[int, ...], *, training: bool) -> tuple[float, float]:
        costs = conv_costs(input_shape, self.weight.shape, self.ranks, self.geometry)
        if not training:
            return float(costs.build), float(costs.branch)
        # the factorized path runs its branch three times (forward and two gradients)
        overhead = _COMPOSITE_STEP_OVERHEAD if self._composes(input_shape) else _FUNCTION_STEP_OVERHEAD
        return min(self._materialize_costs(input_shape)), float(3 * costs.branch + overhead)


class EmbeddingAdapter(TuckerAdapter):
    """Tucker adapter of an ``nn.Embedding``: ``ΔW = scale · A0 G A1ᵀ`` of shape ``(num, dim)``.

    ``padding_idx`` is honoured: the padding row of ``ΔW`` starts at zero and gets no
    gradient. With ``max_norm`` the renormalisation applies to ``W + ΔW``, and with
    ``scale_grad_by_freq`` the gradient of every row of ``W + ΔW`` is scaled; only the
    materialize path can do either, so ``auto`` picks it.
    """

    kind = "embedding"

    @torch.no_grad()
    def _after_init(self) -> None:
        padding_idx = self.base_layer.padding_idx
        if padding_idx is not None:
            self.delta.factors[0][padding_idx].zero_()

    def _options(self) -> dict[str, Any]:
        layer = self.base_layer
        return {"padding_idx": layer.padding_idx, "scale_grad_by_freq": layer.scale_grad_by_freq}

    def chosen_path(self, x: torch.Tensor) -> str:
        layer = self.base_layer
        if layer.max_norm is not None or layer.scale_grad_by_freq:
            # both act on whole rows of W + ΔW, which only the materialize path has
            if self.path == "factorized":
                option = "max_norm" if layer.max_norm is not None else "scale_grad_by_freq"
                raise ValueError(f"an embedding with {option} needs path='materialize' or 'auto'")
            return "materialize"
        return super().chosen_path(x)

    def _principal_factors(self, factors: list[torch.Tensor]) -> list[torch.Tensor]:
        # the padding row of ΔW stays zero (and gets no gradient), so the start must not touch it
        padding_idx = self.base_layer.padding_idx
        if padding_idx is not None:
            factors[0] = factors[0].clone()
            factors[0][padding_idx] = 0.0
        return factors

    def _forward_materialize(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.base_layer
        weight = self.weight + self.total_delta_weight()
        return F.embedding(
            x, weight, max_norm=layer.max_norm, norm_type=layer.norm_type, sparse=False, **self._options()
        )

    def _forward_factorized(self, x: torch.Tensor) -> torch.Tensor:
        a0, a1, core = self._factors_and_core()
        rows = self.dropout(F.embedding(x, a0, **self._options()))
        return self.base_layer(x) + rows @ (_scaled(core, self.delta.scale) @ a1.T)

    def path_costs(self, input_shape: tuple[int, ...], *, training: bool) -> tuple[float, float]:
        num, dim = self.weight.shape
        r0, r1 = self.ranks
        lookups = math.prod(input_shape)
        build = num * dim * r0 + num * dim
        branch = lookups * (r0 * r1 + r1 * dim) + r0 * r1 * dim
        factor = 3 if training else 1
        return float(factor * build), float(factor * branch)


_ADAPTERS: dict[type[nn.Module], type[TuckerAdapter]] = {
    nn.Linear: LinearAdapter,
    nn.Conv1d: ConvAdapter,
    nn.Conv2d: ConvAdapter,
    nn.Conv3d: ConvAdapter,
    nn.Embedding: EmbeddingAdapter,
}

_PEER_ADAPTERS: dict[tuple[str, str], type[TuckerAdapter]] = {
    ("transformers.pytorch_utils", "Conv1D"): TransposedLinearAdapter,
}
"""Adapters of layer types defined by peer libraries, keyed by ``(module, type name)``.

They are looked up only where the peer is already imported (a model holding such a layer
has imported it), so ndlowrank never imports a peer itself.
"""
