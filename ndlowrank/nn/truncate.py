"""Shrinking trained Tucker deltas to smaller ranks without forming ``ΔW``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import array_api_compat.torch as torch_xp
import torch
from torch import nn

from .._subspace import mode_spectrum
from .._validation import validate_ranks
from ..decompose import check_tol, sthosvd
from ..ranks import budget_ranks
from ..tenalg import multi_mode_product
from ._host import DeltaHost
from .delta import TuckerDelta
from .model import iter_adapters, prepare_all

__all__ = ["TruncationReport", "truncate_adapters"]


@dataclass(frozen=True)
class TruncationReport:
    """What :func:`truncate_adapters` did to one delta."""

    name: str
    old_ranks: tuple[int, ...]
    new_ranks: tuple[int, ...]
    relative_change: float
    """``‖ΔW_new − ΔW‖ / ‖ΔW‖`` (0 when ``ΔW`` is zero)."""

    def __str__(self) -> str:
        return f"{self.name}: ranks {self.old_ranks} -> {self.new_ranks}, relative change {self.relative_change:.2e}"


def _iter_deltas(model: nn.Module) -> Iterator[tuple[str, TuckerDelta, DeltaHost | None]]:
    """Every Tucker delta of ``model``: those of adapters (by adapter name) and standalone ``TuckerDelta`` modules."""
    owned = set()
    hosts = {}  # the host of every named adapter's delta, so a merged host is unmerged around it
    for name, host in iter_adapters(model):
        owned.add(id(host.delta))
        hosts.update({id(host.delta_of(n)): host for n in host.adapter_names})
        yield name, host.delta, host
    for name, module in model.named_modules():
        if isinstance(module, TuckerDelta) and id(module) not in owned:
            yield name, module, hosts.get(id(module))


def _orthonormal_form(delta: TuckerDelta) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(G', Q)`` in float64 with ``ΔW / scale = G' ×_n Q_n`` and orthonormal ``Q_n``: ``A_n = Q_n R_n``, ``G' = G ×_n R_n``."""
    qs, rs = [], []
    for factor in delta.factors:
        q, r = torch.linalg.qr(factor.detach().to(torch.float64))
        qs.append(q)
        rs.append(r)
    return multi_mode_product(delta.core.detach().to(torch.float64), rs), qs


def _check_request(tol: Any, ranks: Any, budget: Any) -> None:
    given = [
        name for name, value in (("tol", tol), ("ranks", ranks), ("budget", budget)) if value is not None
    ]
    if len(given) != 1:
        raise ValueError(f"give exactly one of tol=, ranks= or budget=, got {given or 'none'}")
    if tol is not None:
        check_tol(tol)
    if budget is not None and (isinstance(budget, bool) or not hasattr(budget, "__index__")):
        raise TypeError(f"budget must be an int number of parameters, got {budget!r}")


def _target_ranks(
    small: list[torch.Tensor], shapes: list[tuple[int, ...]], ranks: Any, budget: Any, names: list[str]
) -> Sequence[tuple[int, ...] | None]:
    """New ranks per delta for ``ranks`` or ``budget`` (``None`` where ``tol`` decides)."""
    if ranks is not None:
        chosen = []
        for name, core in zip(names, small, strict=True):
            old = tuple(core.shape)
            try:
                new = validate_ranks(ranks, old, clip=True)
            except ValueError as exc:
                raise ValueError(
                    f"{name}: {exc} (truncation never grows a rank; current ranks {old})"
                ) from None
            chosen.append(new)
        return chosen
    if budget is not None:
        spectra = [[mode_spectrum(core, n, xp=torch_xp) for n in range(core.ndim)] for core in small]
        return list(budget_ranks(spectra, shapes, int(budget)))
    return [None] * len(small)


def truncate_adapters(
    model: nn.Module,
    *,
    tol: float | None = None,
    ranks: int | Sequence[int] | None = None,
    budget: int | None = None,
) -> list[TruncationReport]:
    """Shrink every Tucker delta of ``model`` to smaller ranks, without forming ``ΔW``.

    Each delta is brought to an orthonormal form (QR of every factor, the ``R`` s folded
    into the core), the small core is truncated by ST-HOSVD, and the orthonormal factors
    absorb the core's new factors. As the factors are orthonormal, the core's error is
    ``ΔW``'s error: with ``tol``, ``‖ΔW_new − ΔW‖ ≤ tol · ‖ΔW‖`` for every delta. Ranks never grow.

    Parameters
    ----------
    model : nn.Module
        Its adapters (and standalone :class:`TuckerDelta` modules) are changed in place;
        merged adapters are unmerged, truncated and merged again.
    tol : float in (0, 1), optional
        Relative error bound per delta.
    ranks : int or sequence of int, optional
        New ranks for every delta; an int is clipped to each delta's current ranks.
    budget : int, optional
        Total trainable parameters over all deltas, spread by captured energy: the rank of
        the (delta, mode) that gains the most ``‖ΔW‖²`` per added parameter grows first.

    Returns
    -------
    list of TruncationReport
        Per delta: name, old ranks, new ranks, relative change of ``ΔW``.

    Raises
    ------
    ValueError
        For a bad request, or a delta that holds NaN or Inf (naming it). All or nothing:
        every delta is truncated on the side before any changes, so the model is
        unchanged then.

    Notes
    -----
    The new cores and factors are new ``nn.Parameter`` objects (their shapes change):
    create the optimizer after truncating.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from ndlowrank import nn as nlnn
    >>> model = nlnn.add_adapters(nn.Sequential(nn.Conv2d(8, 8, 3)), ["0"], ranks=(8, 8, 3, 3), init="orthogonal", seed=0)
    >>> with torch.no_grad():
    ...     _ = model[0].delta.core.normal_()
    >>> report = nlnn.truncate_adapters(model, ranks=(4, 4, 3, 3))
    >>> report[0].new_ranks, model[0].ranks
    ((4, 4, 3, 3), (4, 4, 3, 3))
    """
    _check_request(tol, ranks, budget)
    entries = list(_iter_deltas(model))
    if not entries:
        raise ValueError("the model has no Tucker adapters to truncate")
    names = [name for name, _, _ in entries]
    # all or nothing: every delta is checked and truncated on the side before any changes
    prepare_all([(name, delta) for name, delta, _ in entries], _check_finite, verb="truncated")
    forms = [_orthonormal_form(delta) for _, delta, _ in entries]
    if budget is not None:
        minimum = sum(1 + sum(delta.shape) for _, delta, _ in entries)  # every delta at ranks 1
        if budget < minimum:
            raise ValueError(f"budget={budget} is below {minimum}, the size of every delta at ranks 1")
    shapes = [delta.shape for _, delta, _ in entries]
    targets = _target_ranks([small for small, _ in forms], shapes, ranks, budget, names)
    items = [
        (name, (delta, adapter, small, qs, target))
        for (name, delta, adapter), (small, qs), target in zip(entries, forms, targets, strict=True)
    ]
    plans = prepare_all(items, lambda item: _truncated(*item, tol=tol), verb="truncated")
    reports = []
    for (name, delta, adapter), (core, factors, change) in zip(entries, plans, strict=True):
        old_ranks = delta.ranks
        if adapter is not None and adapter.merged:
            adapter.unmerge()
            _adopt(delta, core, factors)
            adapter.merge()
        else:
            _adopt(delta, core, factors)
        reports.append(TruncationReport(name, old_ranks, delta.ranks, change))
    return reports


def _check_finite(delta: TuckerDelta) -> None:
    if not all(torch.isfinite(p).all() for p in (delta.core, *delta.factors)):
        raise ValueError("its core or factors hold NaN or Inf")


@torch.no_grad()
def _truncated(
    delta: TuckerDelta,
    adapter: DeltaHost | None,
    small: torch.Tensor,
    qs: list[torch.Tensor],
    target: tuple[int, ...] | None,
    *,
    tol: float | None,
) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """The truncated core and factors of ``delta`` (in its dtype) and the relative change; nothing changes."""
    old_ranks = delta.ranks
    norm = float(torch.linalg.vector_norm(small))
    if norm == 0.0:
        new = validate_ranks(target if target is not None else 1, old_ranks)
        core = torch.zeros(new, dtype=torch.float64, device=small.device)
        factors = [q[:, :r] for q, r in zip(qs, new, strict=True)]
        change = 0.0
    else:
        t = sthosvd(small, target) if target is not None else sthosvd(small, tol=tol)
        core = t.core
        factors = [q @ u for q, u in zip(qs, t.factors, strict=True)]
        change = float(torch.linalg.vector_norm(small - t.to_dense())) / norm
    dtype = delta.core.dtype
    core, factors = core.to(dtype), [f.to(dtype) for f in factors]
    if adapter is not None and adapter.merged:  # it is unmerged, truncated and merged again
        new_delta = (delta.scale * multi_mode_product(core, factors)).to(adapter.weight.dtype)
        if not torch.isfinite(adapter._unmerged_weight() + new_delta).all():
            raise ValueError("merging the truncated delta would put NaN or Inf into the base weight")
    return core, factors, change


@torch.no_grad()
def _adopt(delta: TuckerDelta, core: torch.Tensor, factors: list[torch.Tensor]) -> None:
    trainable = delta.core.requires_grad
    delta._adopt(core, factors, delta.scale)
    delta.requires_grad_(trainable)  # new parameters: keep a frozen delta frozen
