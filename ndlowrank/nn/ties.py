"""Tied weights: one ``nn.Parameter`` used by several modules (GPT-2's ``wte`` and ``lm_head``).

An adapter on a tied weight changes what its own module computes, ``W + ΔW``, while the
other users of the parameter keep seeing ``W``: the same semantics as an adapter on an
untied weight. What would silently change the other users is writing into the shared
parameter, so on a tied weight

- ``init="principal"`` (which replaces ``W`` by the residual) is refused,
- :func:`~ndlowrank.nn.merge_adapters` (which adds ``ΔW`` in place) is refused, and
- :func:`~ndlowrank.nn.remove_adapters` with ``merge=True`` unties: the adapted module gets a
  parameter (a layer adapter: a layer) of its own holding ``W + ΔW``, and the other users
  keep ``W``.

A module registered at several paths (one layer object reused) is one user for a parameter
adapter, which parametrizes the object and so changes every path alike: nothing is tied
then. A layer adapter replaces the layer at one path only, so the other paths are other users.
"""

from __future__ import annotations

from collections.abc import Iterable
from copy import deepcopy

import torch
from torch import nn

from ._host import DeltaHost
from ._iter import owner_of
from .parameters import ParameterAdapter

__all__ = ["check_untied", "parameter_uses", "tied_users", "untie"]


def _holders(model: nn.Module, name: str, parameter: bool) -> tuple[str | None, list[nn.Module]]:
    """What counts as the target ``name`` itself: a path prefix (a layer) or the modules holding a parameter.

    A layer adapter replaces the layer at one path only, so uses of the same layer object
    at other paths are other users. A parameter adapter parametrizes the owning module
    object, so every path of that object sees ``ΔW``: its uses are the target's own.
    """
    if not parameter:
        return name, []
    owner, attribute = owner_of(model, name)
    holders = [owner]
    parametrizations = getattr(owner, "parametrizations", None)
    if parametrizations is not None and attribute in parametrizations:
        holders.append(parametrizations[attribute])
    return None, holders


Uses = dict[int, list[tuple[str, nn.Module, str]]]


def parameter_uses(model: nn.Module) -> Uses:
    """``id(parameter) -> [(module path, module, attribute), ...]``: every place ``model`` holds each parameter."""
    uses: Uses = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for attribute, value in module._parameters.items():
            if value is not None:
                uses.setdefault(id(value), []).append((path, module, attribute))
    return uses


def tied_users(
    model: nn.Module, weight: torch.Tensor, name: str, *, parameter: bool = False, uses: Uses | None = None
) -> list[str]:
    """The paths under which ``model`` holds ``weight`` besides the target ``name`` (empty if untied).

    ``name`` is a module path (a layer, or a layer adapter: the paths inside it are its
    own) or, with ``parameter``, a parameter path (a parameter or a parameter adapter: the
    module owning it is its own, at whatever paths it is registered). ``uses`` is
    :func:`parameter_uses` of ``model``, to share between many calls.
    """
    prefix, holders = _holders(model, name, parameter)
    users = []
    for path, module, attribute in (parameter_uses(model) if uses is None else uses).get(id(weight), []):
        if prefix is not None and (path == prefix or path.startswith(f"{prefix}.")):
            continue
        if not any(module is holder for holder in holders):
            users.append(f"{path}.{attribute}" if path else attribute)
    return users


def check_untied(
    model: nn.Module, targets: Iterable[tuple[str, torch.Tensor, bool]], what: str, fix: str
) -> None:
    """Raise ``ValueError`` naming the first target whose weight ``model`` shares with another module.

    ``targets`` are ``(name, weight, parameter)`` as for :func:`tied_users`; ``what`` says
    what would write into the shared weight, ``fix`` what to do instead.
    """
    uses = parameter_uses(model)
    for name, weight, parameter in targets:
        users = tied_users(model, weight, name, parameter=parameter, uses=uses)
        if users:
            raise ValueError(
                f"{name!r}: its weight is tied to {users} (the same parameter), so {what} would change "
                f"them as well; {fix}"
            )


@torch.no_grad()
def untie(model: nn.Module, name: str, adapter: DeltaHost, *, uses: Uses | None = None) -> None:
    """Give the adapter ``name`` a copy of its weight (a layer adapter: of its layer) if the weight is tied.

    Merging the adapter then changes no other module.
    """
    weight = adapter.weight
    parameter = isinstance(adapter, ParameterAdapter)
    if not tied_users(model, weight, name, parameter=parameter, uses=uses):
        return
    if parameter:
        copy = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        owner, attribute = owner_of(model, name)
        owner.parametrizations[attribute].original = copy  # type: ignore[index,union-attr]
    else:  # a layer of its own: the layer object itself may be registered at other paths too
        adapter.base_layer = deepcopy(adapter.base_layer)
