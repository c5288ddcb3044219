"""Finding the adapters of a model: layer adapters by module path, parameter adapters by parameter path."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from ._host import DeltaHost
from .layers import TuckerAdapter
from .parameters import ParameterAdapter


def _parameter_adapters(model: nn.Module) -> Iterator[tuple[str, ParameterAdapter, nn.Module, str]]:
    """``(parameter name, adapter, owning module, attribute)`` for every parameter adapter."""
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attribute, parametrizations in module.parametrizations.items():
            for adapter in parametrizations:
                if isinstance(adapter, ParameterAdapter):
                    yield (
                        f"{module_name}.{attribute}" if module_name else attribute,
                        adapter,
                        module,
                        attribute,
                    )


def iter_adapters(model: nn.Module) -> Iterator[tuple[str, DeltaHost]]:
    """``(name, adapter)`` for every adapter in ``model``.

    Layer adapters (:class:`TuckerAdapter`) are named by their module path
    (``"layer1.0.conv1"``), parameter adapters (:class:`ParameterAdapter`) by their
    parameter's path (``"attn.in_proj_weight"``). Each comes once, whatever named adapters
    it holds (``adapter.adapter_names``); ``adapter.delta`` is its active one's delta.
    """
    check_model(model)
    for name, module in model.named_modules():
        if isinstance(module, TuckerAdapter):
            yield name, module
    for name, adapter, _, _ in _parameter_adapters(model):
        yield name, adapter


def owner_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds ``name`` (the dotted path of a module or parameter) and its attribute there."""
    owner_name, _, attribute = name.rpartition(".")
    return model.get_submodule(owner_name), attribute


def check_model(model: Any) -> None:
    """Refuse anything but an ``nn.Module`` by name (instead of an ``AttributeError`` deep inside)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
