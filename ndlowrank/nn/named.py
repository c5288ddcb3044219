"""Several named adapters on one model: list them, choose the one that runs, delete one.

Add one with ``add_adapters(model, targets, ranks, adapter_name="style")``; a model's first
adapter is named ``"default"`` unless named otherwise, and everything that takes no name works
on the active adapters as before. Each adapted layer (a host) keeps its first adapter's delta
as ``delta`` (so a model with one adapter has the same ``state_dict`` keys whatever its name)
and further ones in ``named_deltas``; ``host.delta`` is the active adapter's delta.
:func:`~ndlowrank.nn.save_adapters` and :func:`~ndlowrank.nn.load_adapters` take
``adapter_name=`` to save or load one adapter by name, in the same file format.

One adapter runs, or several summed (PEFT's ``set_adapter``). A ``"principal"`` adapter
changes the base weight, so it is the only adapter of its layers. ``dropout`` and ``path``
belong to the layer, shared by its adapters; ``modules_to_save`` are shared too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ..tenalg import mode_product
from ._host import DeltaHost, check_adapter_name
from ._iter import _parameter_adapters, iter_adapters
from .delta import TuckerDelta
from .layers import TuckerAdapter
from .model import _set_submodule
from .parameters import detach_parameter_adapter

__all__ = [
    "active_adapters",
    "adapter_names",
    "add_weighted_adapter",
    "chosen_adapter",
    "delete_adapter",
    "set_active_adapter",
]


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
    """Names of the adapters that run (none after :func:`delete_adapter` of the only active one)."""
    names: dict[str, None] = {}
    for _, host in iter_adapters(model):
        names.update(dict.fromkeys(host.active_adapters))
    return list(names)


def _check_known(model: nn.Module, name: str) -> None:
    known = adapter_names(model)
    if name not in known:
        raise ValueError(f"the model has no adapter named {name!r}; its adapters: {known}")


def set_active_adapter(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Make the adapter ``names`` (one name or several) the ones that run; layers without any run their base weight.

    As PEFT's ``set_adapter``: a merged layer whose adapters change is unmerged first, and
    the adapters that run are made trainable, the others frozen. With
    several names, a layer holding more than one of them runs with ``W + ΔW₁ + ΔW₂ …``
    (in the materialize form, so its adapters need ``dropout=0``); ``host.delta`` is the
    delta of the first. A disabled model stays disabled
    (:func:`~ndlowrank.nn.enable_adapters` then runs ``names``). Returns ``model``.

    Raises
    ------
    ValueError
        If ``model`` has no adapter of a name (naming the ones it has), a name is given
        twice, or several adapters would run on a layer with dropout; nothing changes then.
    """
    chosen = [names] if isinstance(names, str) else list(names)
    if not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"name the adapters to run, each once; got {names!r}")
    for name in chosen:
        _check_known(model, name)
    hosts = [host for _, host in iter_adapters(model)]
    plan = [[name for name in chosen if name in host.adapter_names] for host in hosts]
    for host, here in zip(hosts, plan, strict=True):  # check every layer before changing any
        host.check_active(here)
    for host, here in zip(hosts, plan, strict=True):
        host.set_active(here or None)
        for name in host.adapter_names:  # only what runs trains, as in PEFT
            host.delta_of(name).requires_grad_(name in here)
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
    ``name=None``, the layers where an adapter runs, as they are (a ``ValueError`` where
    several run). ``must_exist``: a name the model lacks is a ``ValueError`` (else no layer
    holds it).
    """
    if name is None:  # what runs: one delta per layer
        hosts = [(n, h) for n, h in iter_adapters(model) if h.active_adapters]
        several = [n for n, h in hosts if len(h.active_adapters) > 1]
        if several:
            raise ValueError(
                f"several adapters run on {several}; name the one to read with adapter_name= "
                f"(the model's adapters: {adapter_names(model)})"
            )
        yield hosts
        return
    if must_exist:
        _check_known(model, name)
    hosts = [(n, h) for n, h in iter_adapters(model) if name in h.adapter_names]
    with ExitStack() as stack:
        for _, host in hosts:
            stack.enter_context(host._pointing_at(name))
        yield hosts


def _weighted_sum(deltas: list[TuckerDelta], weights: list[float]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``Σ wᵢ ΔWᵢ`` exactly, in Tucker form: block-diagonal core, concatenated factors.

    Where the summed rank of a mode exceeds its size, the factor is replaced by the ``Q`` of
    its QR decomposition and ``R`` is folded into the core, so every rank fits its mode
    (exact: the factor's columns span at most the whole mode).
    """
    dtype = deltas[0].core.dtype
    ranks = [sum(d.ranks[n] for d in deltas) for n in range(len(deltas[0].ranks))]
    core = torch.zeros(ranks, dtype=dtype, device=deltas[0].core.device)
    offsets = [0] * len(ranks)
    for delta, weight in zip(deltas, weights, strict=True):
        block = tuple(slice(o, o + r) for o, r in zip(offsets, delta.ranks, strict=True))
        core[block] = weight * delta.scale * delta.core.detach().to(dtype)
        offsets = [o + r for o, r in zip(offsets, delta.ranks, strict=True)]
    factors = []
    for n in range(len(ranks)):
        factor = torch.cat([d.factors[n].detach().to(dtype) for d in deltas], dim=1)
        if factor.shape[1] > factor.shape[0]:
            q, r = torch.linalg.qr(factor)
            core, factor = mode_product(core, r, n), q
        factors.append(factor)
    return core, factors


def add_weighted_adapter(
    model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str
) -> nn.Module:
    """Add the adapter ``adapter_name`` with ``ΔW = Σ wᵢ ΔWᵢ`` of the named ``adapters``, exactly.

    On every layer that holds at least one of ``adapters``, the new delta is the weighted sum
    of the ones it holds, in Tucker form without approximation: the cores go on the diagonal
    of a larger core and the factors side by side (the ranks add up, capped at each mode's
    size by a QR of the factor; :func:`~ndlowrank.nn.truncate_adapters` shrinks it further).
    This is PEFT's ``add_weighted_adapter(..., combination_type="cat")``, exact for every
    weight shape. The new adapter has scale 1 and is inactive (see :func:`set_active_adapter`).

    Parameters
    ----------
    model : nn.Module
    adapters : sequence of str
        Names of adapters of ``model`` (at least one).
    weights : sequence of float
        One finite weight per adapter.
    adapter_name : str
        A new name.

    Returns
    -------
    nn.Module
        ``model``.

    Raises
    ------
    ValueError
        An unknown or repeated adapter, weights that do not match, a name in use, a layer
        with a ``"principal"`` adapter or disabled adapters. Nothing changes then.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from ndlowrank import nn as nlnn
    >>> model = nlnn.add_adapters(nn.Sequential(nn.Linear(4, 4)), ["0"], ranks=2, init="orthogonal")
    >>> model = nlnn.add_adapters(model, ["0"], ranks=1, init="orthogonal", adapter_name="b")
    >>> model = nlnn.add_weighted_adapter(model, ["default", "b"], [0.5, 2.0], "mix")
    >>> model[0].delta_of("mix").ranks
    (3, 3)
    """
    check_adapter_name(adapter_name)
    adapters, weights = list(adapters), [float(w) for w in weights]
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters {adapters} name an adapter more than once")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights {weights} must be finite numbers")
    for name in adapters:
        _check_known(model, name)
    hosts = [host for _, host in iter_adapters(model) if any(n in host.adapter_names for n in adapters)]
    for host in hosts:  # everything is checked before any layer changes
        host.check_can_add(adapter_name, "zero_core")
    with torch.no_grad():
        for host in hosts:
            chosen = [
                (host.delta_of(n), w)
                for n, w in zip(adapters, weights, strict=True)
                if n in host.adapter_names
            ]
            core, factors = _weighted_sum([d for d, _ in chosen], [w for _, w in chosen])
            host.add_adapter(adapter_name, list(core.shape), dtype=core.dtype, seed=0)
            delta = host.delta_of(adapter_name)
            delta.core.copy_(core)
            for parameter, factor in zip(delta.factors, factors, strict=True):
                parameter.copy_(factor)
    return model
