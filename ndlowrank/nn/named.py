"""Several named adapters on one model: list them, choose the one that runs, delete one.

Add one with ``add_adapters(model, targets, ranks, adapter_name="style")``; a model's first
adapter is named ``"default"`` unless named otherwise, and everything that takes no name works
on the active adapters as before. Each adapted layer (a host) keeps its first adapter's delta
as ``delta`` (so a model with one adapter has the same ``state_dict`` keys whatever its name)
and further ones in ``named_deltas``; ``host.delta`` is the active adapter's delta.
:func:`~ndlowrank.nn.save_adapters` and :func:`~ndlowrank.nn.load_adapters` take
``adapter_name=`` to save or load one adapter by name, in the same file format.

One adapter runs at a time (PEFT's ``set_adapter`` with one name). A ``"principal"`` adapter
changes the base weight, so it is the only adapter of its layers. ``dropout`` and ``path``
belong to the layer, shared by its adapters; ``modules_to_save`` are shared too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ._host import DeltaHost
from .layers import TuckerAdapter
from .model import _parameter_adapters, _set_submodule, iter_adapters
from .parameters import detach_parameter_adapter

__all__ = ["active_adapters", "adapter_names", "chosen_adapter", "delete_adapter", "set_active_adapter"]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters in ``model``, in the order they first appear.

    Examples
    --------
    >>> from torch import nn
    >>> from ndlowrank import nn as nlnn
    >>> model = nlnn.add_adapters(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), ["0", "1"], ranks=2)
    >>> model = nlnn.add_adapters(model, ["1"], ranks=1, adapter_name="small")
    >>> nlnn.adapter_names(model), nlnn.active_adapters(model)
    (['default', 'small'], ['default'])
    >>> model = nlnn.set_active_adapter(model, "small")
    >>> model[0].active_adapter, model[1].active_adapter, model[1].ranks
    (None, 'small', (1, 1))
    """
    names: dict[str, None] = {}
    for _, host in iter_adapters(model):
        names.update(dict.fromkeys(host.adapter_names))
    return list(names)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters that run (one, or none after :func:`delete_adapter` of the active one)."""
    names: dict[str, None] = {}
    for _, host in iter_adapters(model):
        if host.active_adapter is not None:
            names[host.active_adapter] = None
    return list(names)


def _check_known(model: nn.Module, name: str) -> None:
    known = adapter_names(model)
    if name not in known:
        raise ValueError(f"the model has no adapter named {name!r}; its adapters: {known}")


def set_active_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make the adapter ``name`` the one that runs; layers without it run their base weight.

    As PEFT's ``set_adapter``: a merged adapter that stops running is unmerged first. A
    disabled model stays disabled (:func:`~ndlowrank.nn.enable_adapters` then runs
    ``name``). Returns ``model``.

    Raises
    ------
    ValueError
        If ``model`` has no adapter of that name (naming the ones it has).
    """
    _check_known(model, name)
    for _, host in iter_adapters(model):
        host.set_active(name if name in host.adapter_names else None)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove the adapter ``name`` from every layer that holds it; a layer left without adapters is unwrapped.

    A layer whose only adapter this was gets its original module (or parameter) back, with
    the original weight (as ``remove_adapters(model, merge=False)``). If ``name`` was active,
    no adapter runs on its layers until :func:`set_active_adapter`. Returns ``model``.

    Raises
    ------
    ValueError
        If ``model`` has no adapter of that name.
    """
    _check_known(model, name)
    owners = {id(adapter): (owner, attribute) for _, adapter, owner, attribute in _parameter_adapters(model)}
    hosts: list[tuple[str, DeltaHost]] = [(n, h) for n, h in iter_adapters(model) if name in h.adapter_names]
    for module_name, host in hosts:
        if len(host.adapter_names) > 1:
            host.delete_adapter(name)
        elif isinstance(host, TuckerAdapter):
            _set_submodule(model, module_name, host.restore_base())
        else:
            owner, attribute = owners[id(host)]
            detach_parameter_adapter(owner, attribute, merge=False)
    return model


@contextmanager
def chosen_adapter(
    model: nn.Module, name: str | None, *, must_exist: bool = True
) -> Iterator[list[tuple[str, DeltaHost]]]:
    """The layers holding the adapter ``name``, with ``host.delta`` reading its delta inside the block.

    For reading and copying an adapter's tensors by name (saving, loading): only which delta
    ``host.delta`` means changes, never a weight, and it is put back at the end. With
    ``name=None``, every adapter as it is. ``must_exist``: a name the model lacks is a
    ``ValueError`` (else no layer holds it).
    """
    if name is None:
        yield list(iter_adapters(model))
        return
    if must_exist:
        _check_known(model, name)
    hosts = [(n, h) for n, h in iter_adapters(model) if name in h.adapter_names]
    before = [host.__dict__["_active"] for _, host in hosts]
    for _, host in hosts:
        host.__dict__["_active"] = name
    try:
        yield hosts
    finally:
        for (_, host), active in zip(hosts, before, strict=True):
            host.__dict__["_active"] = active
