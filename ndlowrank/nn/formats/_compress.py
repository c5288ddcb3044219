"""Many small Tucker forms brought to small ranks at once: QR and ST-HOSVD batched over layers.

An imported LoRA of 50 convolutions is 50 problems of the same shapes; solving them one by
one costs 50 times the per-call overhead of every QR, Gram product and eigensolver (which
dominates on a busy CPU). Here forms whose shapes agree are stacked and every step is one
batched call. Each mode's Gram matrix is formed on its smaller side (``Y Yᵀ`` or ``Yᵀ Y``),
a mode kept at full size gets no rotation at all (an identity factor), and the modes are
truncated smallest first, so the largest one (a convolution's input channels) sees the
already-truncated core. A layer where the Gram path is not accurate enough for its
``tol`` or ranks (see :mod:`ndlowrank._subspace`), or whose delta is zero or too large to
square in float64, goes through
:func:`~._layer.truncate_form` instead, so the guarantee ``‖ΔW_new − ΔW‖ ≤ tol · ‖ΔW‖``
holds per layer exactly as there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..._subspace import _GRAM_SAFETY, rank_for_budget
from ._layer import target_ranks, truncate_form

__all__ = ["small_forms", "truncate_forms"]

Form = tuple[torch.Tensor, list[torch.Tensor | None]]
Result = tuple[torch.Tensor, list[torch.Tensor], float]


def _groups(keys: Sequence[Any]) -> dict[Any, list[int]]:
    out: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return out


def _mode_product(x: torch.Tensor, m: torch.Tensor, mode: int) -> torch.Tensor:
    """``x ×ₙ m`` for a batch: ``x`` is ``(L, …)``, ``m`` is ``(L, J, I_n)``, ``mode`` counts from 0 after the batch."""
    moved = torch.movedim(x, mode + 1, -1)
    product = moved.reshape(x.shape[0], -1, moved.shape[-1]) @ m.transpose(1, 2)
    return torch.movedim(product.reshape(*moved.shape[:-1], m.shape[1]), -1, mode + 1)


@torch.no_grad()
def small_forms(forms: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor | None]]]) -> list[Form]:
    """:func:`~._layer.orthonormal_form` of every form, one batched QR per mode for forms of equal shapes."""
    keys = [
        (tuple(core.shape), tuple(None if f is None else tuple(f.shape) for f in factors))
        for core, factors in forms
    ]
    out: list[Form | None] = [None] * len(forms)
    for (_, factor_shapes), members in _groups(keys).items():
        x = torch.stack([forms[i][0].to(torch.float64) for i in members])
        qs: list[torch.Tensor | None] = []
        for n, shape in enumerate(factor_shapes):
            if shape is None:
                qs.append(None)
                continue
            factors = [forms[i][1][n] for i in members]
            q, r = torch.linalg.qr(torch.stack([f.to(torch.float64) for f in factors if f is not None]))
            qs.append(q)
            x = _mode_product(x, r, n)
        for j, i in enumerate(members):
            out[i] = (x[j], [None if q is None else q[j] for q in qs])
    return [form for form in out if form is not None]


@torch.no_grad()
def truncate_forms(forms: Sequence[Form], *, tol: float | None, ranks: Sequence[Any]) -> list[Result]:
    """:func:`~._layer.truncate_form` of every ``(small, qs)`` (``ranks[i]`` for the i-th), batched by shape.

    Returns ``(core, factors, relative error)`` per form, with the same guarantee.
    """
    keys = [
        (tuple(small.shape), tuple(None if q is None else tuple(q.shape) for q in qs)) for small, qs in forms
    ]
    out: list[Result | None] = [None] * len(forms)
    for (shape, _), members in _groups(keys).items():
        targets = [None if ranks[i] is None else target_ranks(ranks[i], shape) for i in members]
        done = _sthosvd_batch(torch.stack([forms[i][0] for i in members]), tol, targets)
        for j, i in enumerate(members):
            small, qs = forms[i]
            solved = done[j]
            if solved is None:  # the Gram path is not accurate enough here, or the delta is zero
                out[i] = truncate_form(small, qs, tol=tol, ranks=ranks[i])
                continue
            core, us = solved
            factors = [
                (torch.eye(size, dtype=torch.float64, device=core.device) if q is None else q)
                if u is None
                else (u if q is None else q @ u)
                for q, u, size in zip(qs, us, shape, strict=True)
            ]
            kept = float(torch.linalg.vector_norm(core)) / float(torch.linalg.vector_norm(small))
            out[i] = (core, factors, max(1.0 - kept * kept, 0.0) ** 0.5)
    return [result for result in out if result is not None]


def _sthosvd_batch(
    x: torch.Tensor, tol: float | None, targets: Sequence[tuple[int, ...] | None]
) -> list[tuple[torch.Tensor, list[torch.Tensor | None]] | None]:
    """ST-HOSVD of every ``x[l]`` (to ``tol``, or to ``targets[l]``), smallest mode first.

    Returns per layer ``(core, factors)`` with ``None`` for a factor kept as the identity, or
    ``None`` for a layer the Gram path cannot do accurately (or whose ``x[l]`` is zero or
    too large to square).
    """
    count, shape = x.shape[0], tuple(x.shape[1:])
    eps = float(torch.finfo(torch.float64).eps)
    squared = torch.linalg.vector_norm(x.reshape(count, -1), dim=1).square().tolist()
    # a zero delta, or one whose squares overflow: truncate_form's path (which rescales) takes it
    failed = [s == 0.0 or not math.isfinite(s) for s in squared]
    if any(failed):  # zeroed here, so that no inf reaches the batch's eigensolver
        drop = torch.tensor(failed, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        x = torch.where(drop, torch.zeros((), dtype=x.dtype, device=x.device), x)
    kept: list[list[int]] = [list(shape) for _ in range(count)]
    factors: list[list[torch.Tensor | None]] = [[None] * len(shape) for _ in range(count)]
    for mode in sorted(range(len(shape)), key=lambda n: shape[n]):
        size = x.shape[mode + 1]
        y = torch.movedim(x, mode + 1, 1).reshape(count, size, -1)
        rest = y.shape[2]
        tall = size > rest  # the Gram matrix on the small side: yᵀy, and u = y v / σ
        if not tall and all(target is not None and target[mode] == size for target in targets):
            continue  # fixed ranks keep the whole mode: no Gram matrix, no eigensolver
        gram = y.transpose(1, 2) @ y if tall else y @ y.transpose(1, 2)
        values, vectors = torch.linalg.eigh(gram)  # ascending
        spectra = values.flip(1).clamp_min(0.0).cpu().numpy()
        traces = gram.diagonal(dim1=1, dim2=2).sum(1).tolist()
        ranks = []
        for layer in range(count):
            delta = _GRAM_SAFETY * eps * math.sqrt(max(rest, size)) * traces[layer]
            target = targets[layer]
            if target is None:
                assert tol is not None
                budget = tol * tol * squared[layer] / len(shape)
                rank = min(rank_for_budget(spectra[layer], budget), size)
                # an eigenvector of the long side, y v / σ, needs σ² clear of the rounding too
                accurate = budget >= delta * math.sqrt(min(size, rest)) and (
                    not tall or spectra[layer, rank - 1] >= delta
                )
            else:
                rank = target[mode]
                accurate = (rank == size and not tall) or (
                    rank <= spectra.shape[1] and spectra[layer, rank - 1] >= delta
                )
            failed[layer] = failed[layer] or not accurate
            ranks.append(min(rank, spectra.shape[1]))  # more only where failed
        if all(rank == size for rank in ranks) and not tall:
            continue  # every layer keeps the whole mode: the identity, no rotation
        width = max(ranks)
        top = vectors.flip(2)[:, :, :width]
        if tall:
            sigma = spectra[:, :width].clip(min=np.finfo(np.float64).tiny) ** 0.5
            top, _ = torch.linalg.qr((y @ top) / torch.from_numpy(sigma).to(y.device)[:, None, :])
        mask = torch.arange(width, device=x.device)[None, :] < torch.tensor(ranks, device=x.device)[:, None]
        u = top * mask[:, None, :]  # a layer with a smaller rank: zero columns, cut off at the end
        x = _mode_product(x, u.transpose(1, 2), mode)
        for layer, rank in enumerate(ranks):
            kept[layer][mode] = rank
            factors[layer][mode] = u[layer, :, :rank]
    return [
        None if failed[layer] else (x[layer][tuple(slice(0, r) for r in kept[layer])].clone(), factors[layer])
        for layer in range(count)
    ]
