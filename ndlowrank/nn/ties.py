"""Tied weights: one ``nn.Parameter`` used by several modules (GPT-2's ``wte`` and ``lm_head``).

An adapter on a tied weight changes what its own module computes, ``W + ΔW``, while the
other users of the parameter keep seeing ``W``: the same semantics as an adapter on an
untied weight. What would silently change the other users is writing into the shared
parameter, so on a tied weight

- ``init="principal"`` (which replaces ``W`` by the residual) is refused,
- :func:`~ndlowrank.nn.merge_adapters` (which adds ``ΔW`` in place) is refused, and
- :func:`~ndlowrank.nn.remove_adapters` with ``merge=True`` unties: the adapted module gets a
  parameter of its own holding ``W + ΔW``, and the other users keep ``W``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ._host import DeltaHost
from .parameters import ParameterAdapter

__all__ = ["check_untied", "tied_users", "untie"]


def _belongs(key: str, name: str) -> bool:
    """Whether the parameter path ``key`` is the target ``name`` itself (a module or a parameter path)."""
    owner, _, attribute = name.rpartition(".")
    parametrized = (
        f"{owner}.parametrizations.{attribute}.original"
        if owner
        else f"parametrizations.{attribute}.original"
    )
    return key == name or key.startswith(f"{name}.") or key == parametrized


def tied_users(model: nn.Module, weight: torch.Tensor, name: str) -> list[str]:
    """The paths under which ``model`` holds ``weight`` besides the target ``name`` (empty if untied).

    ``name`` is a module path (a layer adapter's or a layer's) or a parameter path (a
    parameter adapter's); the paths inside it (``lm_head.base_layer.weight``) are its own.
    """
    return [
        key
        for key, parameter in model.named_parameters(remove_duplicate=False)
        if parameter is weight and not _belongs(key, name)
    ]


def check_untied(model: nn.Module, targets: Iterable[tuple[str, torch.Tensor]], what: str, fix: str) -> None:
    """Raise ``ValueError`` naming the first target whose weight ``model`` shares with another module.

    ``what`` says what would write into the shared weight, ``fix`` what to do instead.
    """
    for name, weight in targets:
        users = tied_users(model, weight, name)
        if users:
            raise ValueError(
                f"{name!r}: its weight is tied to {users} (the same parameter), so {what} would change "
                f"them as well; {fix}"
            )


@torch.no_grad()
def untie(model: nn.Module, name: str, adapter: DeltaHost) -> None:
    """Give the adapter ``name`` a copy of its weight if the weight is tied, so that merging it changes no other module."""
    weight = adapter.weight
    if not tied_users(model, weight, name):
        return
    copy = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    if isinstance(adapter, ParameterAdapter):
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner.parametrizations[attribute].original = copy  # type: ignore[index,union-attr]
        adapter.__dict__["_weight"] = copy
    else:
        adapter.base_layer.weight = copy  # type: ignore[union-attr]
