"""Finding layer adapters that never run because their parent reads the wrapped layer's weight.

A layer adapter applies ``ΔW`` when it is called. A parent that uses its child's weight
directly (timm's BEiT, EVA and SwinV2 attention call ``F.linear(x, self.qkv.weight, ...)``)
bypasses it: the output does not change and the adapter trains nothing.
:func:`~ndlowrank.nn.add_adapters` routes such targets to parameter adapters when the
parent's ``forward`` reads ``self.<child>.weight`` in its source; :func:`find_bypassed_adapters`
checks any model by running it once, and :func:`~ndlowrank.nn.save_adapters` warns about
adapters that are still at ``ΔW = 0`` while others trained (:func:`untrained_adapters`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ._host import DeltaHost
from .distributed import gathered
from .layers import TuckerAdapter

__all__ = ["find_bypassed_adapters", "untrained_adapters"]


def _tensors(output: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a model's output (a tensor, or tuples, lists and mappings of them)."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, dict):
        for value in output.values():
            yield from _tensors(value)
    elif isinstance(output, (tuple, list)):
        for value in output:
            yield from _tensors(value)


def find_bypassed_adapters(model: nn.Module, /, *args: Any, **kwargs: Any) -> list[str]:
    """Names of the layer adapters whose weight the model uses without calling the adapter.

    Runs ``model(*args, **kwargs)`` once in eval mode and reports every
    :class:`~ndlowrank.nn.TuckerAdapter` whose ``forward`` did not run although the output
    depends on its base weight (found by differentiating the output with respect to the
    weights). Such an adapter changes nothing; adapt its weight with
    ``target_parameters=["<name>.weight"]`` instead (a parameter adapter is seen by every
    use of the weight).

    Parameters
    ----------
    model : nn.Module
        A model with layer adapters.
    *args, **kwargs
        An input of the model.

    Returns
    -------
    list of str
        The bypassed adapters' names; empty when every adapter whose weight is used runs.
        The model's training modes, ``requires_grad`` flags and gradients are left as they were.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from ndlowrank import nn as nlnn
    >>> class Head(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.proj = nn.Linear(4, 4)
    ...     def project(self, x):
    ...         return nn.functional.linear(x, self.proj.weight)  # reads the weight, never calls proj
    ...     def forward(self, x):
    ...         return self.project(x)
    >>> model = nlnn.add_adapters(nn.Sequential(Head(), nn.Linear(4, 2)), ["proj", "1"], ranks=2, seed=0)
    >>> nlnn.find_bypassed_adapters(model, torch.randn(3, 4))
    ['0.proj']
    """
    adapters = [(name, module) for name, module in model.named_modules() if isinstance(module, TuckerAdapter)]
    if not adapters:
        return []
    ran: set[str] = set()
    handles = [
        adapter.register_forward_pre_hook(lambda module, inputs, name=name: ran.add(name))
        for name, adapter in adapters
    ]
    modes = [(module, module.training) for module in model.modules()]
    weights = [adapter.weight for _, adapter in adapters]
    flags = [weight.requires_grad for weight in weights]
    try:
        model.eval()
        for weight in weights:
            weight.requires_grad_(True)
        with torch.enable_grad():
            outputs = [t for t in _tensors(model(*args, **kwargs)) if t.requires_grad]
            if not outputs:
                return []
            total = torch.stack([t.float().sum() for t in outputs]).sum()
            grads = torch.autograd.grad(total, weights, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
        for weight, flag in zip(weights, flags, strict=True):
            weight.requires_grad_(flag)
    return [
        name for (name, _), grad in zip(adapters, grads, strict=True) if grad is not None and name not in ran
    ]


def _is_zero(adapter: DeltaHost) -> bool:
    """Whether ``ΔW`` is exactly zero: its core or one of its factors is all zeros."""
    tensors = [adapter.delta.core, *adapter.delta.factors]
    return any(not bool(gathered(t.detach()).any()) for t in tensors)


def untrained_adapters(adapters: list[tuple[str, DeltaHost]]) -> list[str]:
    """Names of the adapters still at ``ΔW = 0`` when others are not (empty when none or all are).

    Every init but ``"principal"`` starts at ``ΔW = 0`` with a zero core or factor, which the
    first gradient step moves; an adapter that never ran (or whose output nothing used)
    stays there. ``"principal"`` adapters start elsewhere and are not judged.
    """
    judged = [(name, _is_zero(adapter)) for name, adapter in adapters if adapter.init != "principal"]
    if all(zero for _, zero in judged):
        return []
    return [name for name, zero in judged if zero]
