"""``modules_to_save``: modules trained in full beside the adapters, and saved in the adapter file.

:func:`~ndlowrank.nn.add_adapters` with ``modules_to_save=["classifier"]`` replaces each of
those modules by a :class:`TrainedCopy`: the original module is kept (frozen) and a trainable
copy of it runs in its place. :func:`~ndlowrank.nn.save_adapters` writes the copy's whole
``state_dict`` (parameters and buffers, such as a norm's running statistics) under
``{name}.{key}`` and an entry ``{"name": ..., "kind": "module", "layer": <type name>,
"keys": [...]}`` in the file's ``targets``; :func:`~ndlowrank.nn.load_adapters` restores it,
all or nothing with the adapters. A file without such modules is written exactly as before.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from ._file_format import _prefix
from .delta import TuckerDelta
from .distributed import copy_full, gathered

__all__ = ["MODULE_KIND", "TrainedCopy", "iter_trained_copies"]

MODULE_KIND = "module"
"""The ``"kind"`` of a trained module's entry in an adapter file."""


class TrainedCopy(nn.Module):
    """A module trained in full beside the adapters: a trainable copy runs in place of the original.

    Parameters
    ----------
    module : nn.Module
        Kept as ``original_module`` (its parameters are frozen by
        :func:`~ndlowrank.nn.mark_only_adapters_trainable`); ``trained_module`` is a deep copy,
        trainable, that ``forward`` calls. While disabled (:func:`~ndlowrank.nn.disable_adapters`)
        the original runs instead. Attributes of the running module read through
        (``model.classifier.out_features``).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.trained_module = copy.deepcopy(module)
        self.disabled = False
        self.train(module.training)

    @property
    def active(self) -> nn.Module:
        """The module that runs: the trained copy, or the original while disabled."""
        return self.original_module if self.disabled else self.trained_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError as error:
            modules = self.__dict__.get("_modules", {})
            running = modules.get("original_module" if self.__dict__.get("disabled") else "trained_module")
            if running is None or name.startswith("__"):
                raise
            try:
                return getattr(running, name)
            except AttributeError:
                raise error from None

    def disable(self) -> None:
        """Run the original module."""
        self.disabled = True

    def enable(self) -> None:
        """Run the trained copy again."""
        self.disabled = False


def iter_trained_copies(model: nn.Module) -> Iterator[tuple[str, TrainedCopy]]:
    """``(name, wrapper)`` for every module of ``model`` trained in full (``modules_to_save``)."""
    for name, module in model.named_modules():
        if isinstance(module, TrainedCopy):
            yield name, module


def unsaved_trainable(model: nn.Module) -> list[str]:
    """Trainable parameters of ``model`` that an adapter file does not hold (neither a delta's nor a trained copy's)."""
    saved = {id(p) for m in model.modules() if isinstance(m, TuckerDelta) for p in m.parameters()}
    saved |= {id(p) for _, wrapper in iter_trained_copies(model) for p in wrapper.trained_module.parameters()}
    return [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in saved]


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained copies' state, keyed ``{name}.{key}`` (detached, contiguous)."""
    return {
        _prefix(name) + key: gathered(value.detach()).contiguous()  # FSDP2's shards gathered
        for name, wrapper in iter_trained_copies(model)
        for key, value in wrapper.trained_module.state_dict().items()
    }


def trained_entries(model: nn.Module) -> list[dict[str, Any]]:
    """The file's ``targets`` entries of the trained copies."""
    return [
        {
            "name": name,
            "kind": MODULE_KIND,
            "layer": type(wrapper.trained_module).__name__,
            "keys": list(wrapper.trained_module.state_dict()),
        }
        for name, wrapper in iter_trained_copies(model)
    ]


@dataclass(frozen=True)
class ModuleEntry:
    """One module trained in full, as a file describes it."""

    name: str
    layer: str
    keys: tuple[str, ...]

    def tensor_names(self) -> list[str]:
        """The file's tensor keys of this module."""
        return [_prefix(self.name) + key for key in self.keys]


def is_module_entry(entry: Any) -> bool:
    """Whether a file's ``targets`` entry describes a module trained in full (not an adapter)."""
    return isinstance(entry, dict) and entry.get("kind") == MODULE_KIND


def parse_module_entry(entry: dict[str, Any], where: str) -> ModuleEntry:
    """Check a trained module's entry of the file at ``where`` and read it (``ValueError`` naming the field)."""
    name, layer, keys = entry.get("name"), entry.get("layer"), entry.get("keys")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: a trained module's name must be a non-empty string, got {name!r}")
    at = f"{where}, trained module {name!r}"
    if not isinstance(layer, str):
        raise ValueError(f"{at}: layer must be a string, got {layer!r}")
    if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)):
        raise ValueError(f"{at}: keys must be a list of strings, got {keys!r}")
    return ModuleEntry(name, layer, tuple(keys))


def plan_modules(
    model: nn.Module,
    entries: list[ModuleEntry],
    adapter_names: list[str],
    tensors: Mapping[str, torch.Tensor],
    *,
    strict: bool,
    where: str,
) -> list[tuple[ModuleEntry, TrainedCopy | nn.Module]]:
    """Check the file's trained modules against the model: ``(entry, wrapper or module to wrap)`` each."""
    wrappers = dict(iter_trained_copies(model))
    plan: list[tuple[ModuleEntry, TrainedCopy | nn.Module]] = []
    for entry in entries:
        at = f"{where}, trained module {entry.name!r}"
        overlaps = (
            n
            for n in adapter_names
            if n == entry.name or n.startswith(_prefix(entry.name)) or entry.name.startswith(_prefix(n))
        )
        clash = next(overlaps, None)
        if clash is not None:
            raise ValueError(
                f"{at}: it overlaps the adapter {clash!r}; a module is adapted or trained in full"
            )
        try:
            found = model.get_submodule(entry.name)
        except AttributeError:
            raise ValueError(f"{at}: the model has no module of that name") from None
        module = found.trained_module if isinstance(found, TrainedCopy) else found
        if type(module).__name__ != entry.layer:
            raise ValueError(
                f"{at}: the model's module is a {type(module).__name__}, the file's a {entry.layer}"
            )
        state = module.state_dict()
        if set(state) != set(entry.keys):
            raise ValueError(
                f"{at}: the model's module has state {sorted(state)} but the file's has {sorted(entry.keys)}"
            )
        missing = [key for key in entry.tensor_names() if key not in tensors]
        if missing:
            raise ValueError(f"{where}: tensors {missing} are missing")
        wrong = [
            f"{_prefix(entry.name)}{key} has shape {tuple(tensors[_prefix(entry.name) + key].shape)}, "
            f"expected {tuple(value.shape)}"
            for key, value in state.items()
            if tensors[_prefix(entry.name) + key].shape != value.shape
        ]
        if wrong:
            raise ValueError(f"{where}: {'; '.join(wrong)}")
        plan.append((entry, found))
    if strict:
        extra = [name for name in wrappers if name not in {entry.name for entry in entries}]
        if extra:
            raise ValueError(
                f"{where}: the model trains modules {extra} in full that the file does not hold "
                "(pass strict=False to load the file's adapters only)"
            )
    return plan


def _restore(tensors: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    for tensor, value in zip(tensors, saved, strict=True):
        tensor.copy_(value)


def load_module(
    model: nn.Module,
    entry: ModuleEntry,
    found: TrainedCopy | nn.Module,
    tensors: Mapping[str, torch.Tensor],
    undo: list[Any],
    set_submodule: Any,
) -> bool:
    """Copy the file's state into the trained copy (wrapping the module first if needed); ``True`` if wrapped."""
    wrapper = found if isinstance(found, TrainedCopy) else TrainedCopy(found)
    state = wrapper.trained_module.state_dict()
    targets = [state[key] for key in entry.keys]
    undo.append(partial(_restore, targets, [t.detach().clone() for t in targets]))
    for key, target in zip(entry.keys, targets, strict=True):
        copy_full(target, tensors[_prefix(entry.name) + key])  # a DTensor (FSDP2) gets its shard
    if wrapper is not found:
        set_submodule(model, entry.name, wrapper)
        undo.append(partial(set_submodule, model, entry.name, found))
    return wrapper is not found
