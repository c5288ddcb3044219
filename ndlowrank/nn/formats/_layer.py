"""One adapted layer as the LoRA-family formats see it, and the maths between it and Tucker form.

Every format of this package stores, per layer, ``ΔW = scale · up ×₀ down`` (the rank
index of ``up`` contracted with the first index of ``down``), optionally with a middle
kernel: ``ΔW = scale · up ×₀ (mid ×₁ downᵀ)``. In weight layout:

========  ==============  =========================  ==================
layer     ``up``          ``down``                   ``mid``
========  ==============  =========================  ==================
linear    ``(O, r)``      ``(r, I)``                 --
conv      ``(O, r)``      ``(r, I/g, *k)``           --
conv      ``(O, r)``      ``(r', I/g)``              ``(r, r', *k)``
========  ==============  =========================  ==================

A Tucker delta ``ΔW = s · G ×₀ A0 ×₁ A1 ×₂ K2 …`` is one of these exactly:
``up = A0`` and ``down = s · (G ×₂ K2 …) ×₁ A1`` (a LoRA of rank ``r0``), or with
``r = max(r0, r1)``, ``up = A0``, ``mid = s · G ×₂ K2 …`` and ``down = A1ᵀ``, each
zero-padded to ``r`` (LyCORIS LoCon with ``use_tucker``). Reading goes the other way:
``(scale · down, [up, I, I, …])`` is an exact Tucker form of a LoRA's ``ΔW``, which
:func:`orthonormal_form` and :func:`truncate_form` bring to small ranks without forming ``ΔW``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..._validation import validate_ranks
from ...decompose import sthosvd
from ...tenalg import multi_mode_product
from .._host import DeltaHost
from ..layers import ConvAdapter, EmbeddingAdapter, LinearAdapter, TransposedLinearAdapter
from ..parameters import ParameterAdapter

__all__ = [
    "LowRankLayer",
    "block_sum",
    "from_host",
    "lora_form",
    "lora_layers",
    "orthonormal_form",
    "refuse_geometry",
    "target_ranks",
    "truncate_form",
]


TRANSPOSED = "transposed_linear"
"""The kind of transformers' ``Conv1D`` (GPT-2), whose weight is ``(in, out)``."""


@dataclass(frozen=True)
class LowRankLayer:
    """``ΔW = scale · up ×₀ down`` (or ``scale · up ×₀ (mid ×₁ downᵀ)``) of the layer ``name``.

    A transformers ``Conv1D`` (kind ``"transposed_linear"``, weight ``(in, out)``) keeps its
    factors in ``nn.Linear``'s layout, as the files do (``up`` ``(out, r)``, ``down`` ``(r, in)``;
    PEFT runs them with ``fan_in_fan_out=True``): its ``ΔW`` is ``(scale · up · down)ᵀ``.
    """

    name: str
    kind: str  # "linear", "transposed_linear", "conv", "embedding" or "parameter" (PEFT's target_parameters)
    up: torch.Tensor
    down: torch.Tensor
    mid: torch.Tensor | None = None
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ``ΔW`` (the layer's weight)."""
        if self.kind == TRANSPOSED:
            return (int(self.down.shape[1]), int(self.up.shape[0]))
        if self.mid is None:
            return (int(self.up.shape[0]), *self.down.shape[1:])
        return (int(self.up.shape[0]), int(self.down.shape[1]), *self.mid.shape[2:])

    @property
    def tucker_shape(self) -> tuple[int, ...]:
        """Core shape of :meth:`tucker`'s form."""
        if self.kind == TRANSPOSED:
            return (self.rank, int(self.up.shape[0]))
        return tuple((self.down if self.mid is None else self.mid).shape)

    def tucker(self) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """An exact Tucker form ``(core, factors)`` of ``ΔW``; ``None`` stands for an identity factor."""
        if self.kind == TRANSPOSED:  # ΔW = (scale · up · down)ᵀ = downᵀ ×₀ (scale · upᵀ)
            return self.scale * self.up.T, [self.down.T, None]
        if self.mid is None:
            core = self.scale * self.down
            return core, [self.up, *([None] * (core.ndim - 1))]
        core = self.scale * self.mid
        return core, [self.up, self.down.T, *([None] * (core.ndim - 2))]


def from_host(name: str, host: DeltaHost, *, tucker: bool = False) -> LowRankLayer:
    """The exact ``up``/``down`` (with ``tucker``, ``mid``) form of a layer adapter's ``ΔW``, scale folded in."""
    if not isinstance(
        host, (LinearAdapter, TransposedLinearAdapter, ConvAdapter, EmbeddingAdapter, ParameterAdapter)
    ):
        raise TypeError(f"{name}: a {type(host).__name__} has no LoRA form")
    delta = host.delta
    core = delta.scale * delta.core.detach()
    factors: list[torch.Tensor] = [f.detach() for f in delta.factors]
    if hasattr(host, "principal_core"):
        # the base weight holds W − start: relative to the original W the change is ΔW − start
        start = [host.get_buffer(f"principal_factor_{n}") for n in range(core.ndim)]
        summed, blocks = block_sum(
            [(1.0, core, factors), (-1.0, host.get_buffer("principal_core"), start)], delta.shape
        )
        core, factors = summed.to(core.dtype), [b.to(core.dtype) for b in blocks if b is not None]
    return lora_form(name, host.kind, core, factors, tucker=tucker)


def lora_layers(entries: list[tuple[str, DeltaHost]]) -> list[LowRankLayer]:
    """The LoRA form of every (checked) adapter: what the PEFT, diffusers and kohya formats write."""
    return [from_host(name, host) for name, host in entries]


def lora_form(
    name: str, kind: str, core: torch.Tensor, factors: Sequence[torch.Tensor], *, tucker: bool = False
) -> LowRankLayer:
    """The exact LoRA form of ``core ×ₙ factors[n]`` (with ``tucker``, the LoCon-Tucker form).

    LoRA: ``up = A0``, ``down = G ×₁ A1 ×₂ A2 …`` (transposed for a ``Conv1D``). LoCon-Tucker (a kernel's modes ≥ 2):
    ``r = max(r0, r1)``, ``up = A0``, ``mid = G ×₂ A2 …``, ``down = A1ᵀ``, each zero-padded to ``r``.
    """
    if not tucker:
        down = multi_mode_product(core, list(factors[1:]), modes=range(1, core.ndim))
        if kind == TRANSPOSED:  # (A0 · G A1ᵀ)ᵀ = (A1 Gᵀ) · A0ᵀ, in nn.Linear's layout
            return LowRankLayer(name, kind, down.T, factors[0].T)
        return LowRankLayer(name, kind, factors[0], down)
    spatial = multi_mode_product(core, list(factors[2:]), modes=range(2, core.ndim))
    r = max(core.shape[:2])
    up, down = factors[0], factors[1].T
    return LowRankLayer(
        name,
        kind,
        _pad(up, (up.shape[0], r)),
        _pad(down, (r, down.shape[1])),
        _pad(spatial, (r, r, *spatial.shape[2:])),
    )


def block_sum(
    terms: Sequence[tuple[float, torch.Tensor, Sequence[torch.Tensor | None]]], shape: tuple[int, ...]
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """``Σ w_i · G_i ×ₙ F_iₙ`` as one Tucker form: block-diagonal core, factors side by side.

    A mode where every term's factor is the identity stays one (the cores are added there).
    """
    ndim = len(shape)
    identity = [all(factors[n] is None for _, _, factors in terms) for n in range(ndim)]
    sizes = [shape[n] if identity[n] else sum(core.shape[n] for _, core, _ in terms) for n in range(ndim)]
    core = torch.zeros(sizes, dtype=torch.float64)
    factors: list[list[torch.Tensor]] = [[] for _ in range(ndim)]
    offsets = [0] * ndim
    for weight, term_core, term_factors in terms:
        index = []
        for n in range(ndim):
            width = term_core.shape[n]
            index.append(slice(0, width) if identity[n] else slice(offsets[n], offsets[n] + width))
            if not identity[n]:
                f = term_factors[n]
                factors[n].append(
                    torch.eye(shape[n], dtype=torch.float64) if f is None else f.to(torch.float64)
                )
                offsets[n] += width
        core[tuple(index)] += weight * term_core.to(torch.float64)
    return core, [None if identity[n] else torch.cat(factors[n], dim=1) for n in range(ndim)]


def _pad(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``x`` zero-padded at the end of every mode to ``shape``."""
    out = x.new_zeros(tuple(shape))
    out[tuple(slice(0, n) for n in x.shape)] = x
    return out


def refuse_geometry(
    name: str, host: DeltaHost, fmt: str, *, groups: bool, dilation: bool, kinds: Sequence[str]
) -> None:
    """Raise ``ValueError`` naming the layer if ``fmt`` cannot carry ``host`` exactly.

    ``kinds`` are the layer kinds the format holds; ``groups`` and ``dilation`` say whether its
    loaders run grouped and dilated convolutions. No format's loader pads the delta's
    convolution other than with zeros.
    """
    kind = getattr(host, "kind", "")
    if kind == TRANSPOSED and kind not in kinds:
        raise ValueError(
            f"layer {name!r} is a transformers Conv1D (weight stored (in, out)), which {fmt} loaders"
            " do not transpose: the file would not reproduce the model; use format='peft' or 'diffusers'"
        )
    if kind not in kinds:
        what = f"a parameter adapter on {name!r}" if kind == "parameter" else f"layer {name!r} ({kind})"
        raise ValueError(f"{fmt} files cannot hold {what}; they hold {', '.join(kinds)} layers")
    layer = getattr(host, "base_layer", None)
    if isinstance(layer, nn.modules.conv._ConvNd):
        problems = []
        if layer.groups != 1 and not groups:
            problems.append(f"groups={layer.groups}")
        if any(d != 1 for d in layer.dilation) and not dilation:
            problems.append(f"dilation={tuple(layer.dilation)}")
        if layer.padding_mode != "zeros":
            problems.append(f"padding_mode={layer.padding_mode!r}")
        if problems:
            raise ValueError(
                f"layer {name!r} has {', '.join(problems)}, which {fmt} loaders do not apply to the adapter:"
                " the file would not reproduce the model; use format='lycoris' or ndlowrank's own save_adapters"
            )
    if isinstance(layer, nn.Embedding) and layer.max_norm is not None:
        raise ValueError(
            f"layer {name!r} is an embedding with max_norm, which {fmt} loaders apply to W and ΔW apart"
        )


@torch.no_grad()
def orthonormal_form(
    core: torch.Tensor, factors: Sequence[torch.Tensor | None]
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """``(small, Q)`` in float64 with ``core ×ₙ factors[n] = small ×ₙ Q[n]``, every ``Q[n]`` orthonormal.

    QR of every given factor, the ``R`` s folded into the core; ``None`` (an identity factor)
    stays ``None``.
    """
    qs: list[torch.Tensor | None] = []
    rs, modes = [], []
    for n, factor in enumerate(factors):
        if factor is None:
            qs.append(None)
            continue
        q, r = torch.linalg.qr(factor.to(torch.float64))
        qs.append(q)
        rs.append(r)
        modes.append(n)
    return multi_mode_product(core.to(torch.float64), rs, modes=modes), qs


def target_ranks(ranks: int | Sequence[int], shape: tuple[int, ...]) -> tuple[int, ...]:
    """``ranks`` for a small core of ``shape``: one per mode, each clipped to its mode's size."""
    ranks = validate_ranks(ranks, shape, clip=True) if isinstance(ranks, int) else ranks
    if len(ranks) != len(shape):
        raise ValueError(f"ranks={tuple(ranks)} gives {len(ranks)} ranks for a delta with {len(shape)} modes")
    return tuple(min(int(r), size) for r, size in zip(ranks, shape, strict=True))


@torch.no_grad()
def truncate_form(
    small: torch.Tensor,
    qs: Sequence[torch.Tensor | None],
    *,
    tol: float | None,
    ranks: int | Sequence[int] | None,
) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """ST-HOSVD of ``small`` (to ``tol`` or ``ranks``, each clipped to ``small``'s modes), ``Q`` s absorbing its factors.

    As the ``Q`` s are orthonormal, the core's error is the tensor's error: with ``tol``,
    ``‖ΔW_new − ΔW‖ ≤ tol · ‖ΔW‖``. Returns ``(core, factors, relative error)``.
    """
    norm = float(torch.linalg.vector_norm(small))
    if ranks is not None:
        ranks = target_ranks(ranks, tuple(small.shape))
    if norm == 0.0:
        shape = (1,) * small.ndim if ranks is None else tuple(ranks)
        t_core = torch.zeros(shape, dtype=torch.float64)
        t_factors = [
            torch.eye(size, n, dtype=torch.float64) for size, n in zip(small.shape, shape, strict=True)
        ]
        error = 0.0
    else:
        t = sthosvd(small, ranks) if ranks is not None else sthosvd(small, tol=tol)
        t_core, t_factors = t.core, list(t.factors)
        # ST-HOSVD's factors are orthonormal, so ‖small − t‖² = ‖small‖² − ‖G‖² (no dense product)
        kept = float(torch.linalg.vector_norm(t_core)) / norm
        error = max(1.0 - kept * kept, 0.0) ** 0.5
    out = [u if q is None else q @ u for q, u in zip(qs, t_factors, strict=True)]
    return t_core, out, error


# -- files ----------------------------------------------------------------------------------------


def keys_of(path: str) -> list[str]:
    """The tensor names of a safetensors file (none if it cannot be read: the reader then says why)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return list(handle.keys())
    except Exception:  # reported by read_safetensors, with the parser's message
        return []


def write_safetensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` atomically (a failed write leaves an existing file untouched and is an ``OSError``)."""
    from safetensors.torch import save_file

    from ..._files import write_atomically

    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_atomically(path, lambda temporary: save_file(cpu, str(temporary), metadata=dict(metadata)))


def write_json(path: str, value: Any) -> None:
    """Write ``value`` as JSON atomically."""
    from ..._files import write_atomically

    text = json.dumps(value, indent=2, sort_keys=True) + "\n"
    write_atomically(path, lambda temporary: temporary.write_text(text))
