"""Reading an adapter file and checking it against a model before :func:`~ndlowrank.nn.load_adapters` changes it.

:func:`_read_file` reads the metadata and tensors, :func:`_parse_header` turns the JSON config
into one :class:`_Target` per adapter (and the ``modules_to_save`` entries), and :func:`_plan`
checks every target against the model, returning what each adapter loads into; nothing here
changes the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import __version__
from .._header import check_ranks_fit as _check_ranks
from .._header import int_tuple as _int_tuple
from .._header import json_object, scale_field
from .._header import number as _number
from .._header import string as _string
from ..init import KNOWN_INITS
from ._file_format import (
    _KINDS,
    _LAYER_KINDS,
    _READABLE_FORMATS,
    FILE_FORMAT,
    METADATA_KEY,
    _is_principal,
    _prefix,
    _principal_names,
    read_safetensors,
)
from ._host import DeltaHost
from ._iter import iter_adapters
from .layers import PATHS, TuckerAdapter, _adapter_class
from .modules_to_save import ModuleEntry, is_module_entry, parse_module_entry
from .parameters import ParameterAdapter
from .targets import _is_internal
from .ties import check_untied


@dataclass(frozen=True)
class _Target:
    """One adapter described by a file."""

    name: str
    kind: str
    layer: str | None  # None for a parameter adapter
    weight_shape: tuple[int, ...]
    ranks: tuple[int, ...]
    init: str
    scale: float
    dropout: float
    path: str
    dtype: torch.dtype
    principal_ranks: tuple[int, ...] | None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        prefix = _prefix(self.name)
        shapes = {f"{prefix}core": self.ranks}
        for n, (size, rank) in enumerate(zip(self.weight_shape, self.ranks, strict=True)):
            shapes[f"{prefix}factors.{n}"] = (size, rank)
        if self.principal_ranks is not None:
            names = _principal_names(len(self.weight_shape))
            shapes[prefix + names[0]] = self.principal_ranks
            for name, size, rank in zip(names[1:], self.weight_shape, self.principal_ranks, strict=True):
                shapes[prefix + name] = (size, rank)
        return shapes


def _read_file(path: str, where: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata (with our key) and every tensor of the file at ``path``."""

    def ours(metadata: dict[str, str]) -> None:
        if METADATA_KEY not in metadata:
            raise ValueError(
                f"{where} is a safetensors file but not an ndlowrank adapter file (its metadata "
                f"has no {METADATA_KEY!r} entry); write adapter files with ndlowrank.nn.save_adapters"
            )

    tensors, metadata = read_safetensors(path, where, ours)
    return metadata, tensors


def _parse_target(entry: Any, where: str) -> _Target:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: an adapter entry must be a JSON object, got {entry!r}")
    name = _string(entry.get("name"), "an adapter's name", where)
    at = f"{where}, adapter {name!r}"
    kind = _string(entry.get("kind"), "kind", at, _KINDS)
    required = ["weight_shape", "ranks", "init", "scale", "dtype"]
    if kind in _LAYER_KINDS:
        required += ["layer", "dropout", "path"]
    missing = [key for key in required if key not in entry]
    if missing:
        raise ValueError(f"{at}: the entry lacks {missing}")
    weight_shape = _int_tuple(entry["weight_shape"], "weight_shape", at)
    ranks = _int_tuple(entry["ranks"], "ranks", at)
    _check_ranks("ranks", ranks, weight_shape, at)
    init = _string(entry["init"], "init", at, tuple(KNOWN_INITS))
    principal_ranks = None
    if init == "principal":
        principal_ranks = _int_tuple(entry.get("principal_ranks", entry["ranks"]), "principal_ranks", at)
        _check_ranks("principal_ranks", principal_ranks, weight_shape, at)
    layer, dropout, path = None, 0.0, "auto"
    if kind in _LAYER_KINDS:
        layer = _string(entry["layer"], "layer", at)
        dropout = _number(entry["dropout"], "dropout", at)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{at}: dropout={dropout} must be a probability in [0, 1)")
        path = _string(entry["path"], "path", at, PATHS)
        if path == "materialize" and dropout > 0:
            raise ValueError(f"{at}: path='materialize' cannot have dropout={dropout}")
    dtype_name = _string(entry["dtype"], "dtype", at)
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(f"{at}: dtype must name a floating torch dtype, got {dtype_name!r}")
    return _Target(
        name=name,
        kind=kind,
        layer=layer,
        weight_shape=weight_shape,
        ranks=ranks,
        init=init,
        scale=scale_field(entry["scale"], at, principal=init == "principal"),
        dropout=dropout,
        path=path,
        dtype=dtype,
        principal_ranks=principal_ranks,
    )


def _parse_header(text: str, where: str) -> tuple[list[_Target], list[ModuleEntry]]:
    header = json_object(text, METADATA_KEY, where)
    kind = header.get("format")
    if kind != FILE_FORMAT:
        raise ValueError(
            f"{where} holds {kind!r} data, not adapters (format {FILE_FORMAT!r}); "
            "write adapter files with ndlowrank.nn.save_adapters"
        )
    version = header.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{where}: format_version must be an int, got {version!r}")
    if version not in _READABLE_FORMATS:
        newer = ", it was written by a newer ndlowrank" if version > max(_READABLE_FORMATS) else ""
        raise ValueError(
            f"{where}: format_version {version} is not supported (ndlowrank {__version__} "
            f"reads {list(_READABLE_FORMATS)}{newer})"
        )
    entries = header.get("targets")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: 'targets' must be a non-empty list, got {entries!r}")
    targets = [_parse_target(entry, where) for entry in entries if not is_module_entry(entry)]
    modules = [parse_module_entry(entry, where) for entry in entries if is_module_entry(entry)]
    names = [*(t.name for t in targets), *(m.name for m in modules)]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{where}: adapters {duplicates} appear more than once")
    return targets, modules


def _check_existing(adapter: DeltaHost, target: _Target, at: str) -> None:
    found: dict[str, Any] = {
        "kind": adapter.kind,
        "weight shape": tuple(adapter.weight.shape),
        "ranks": adapter.ranks,
        "scale": adapter.scale,
    }
    wanted: dict[str, Any] = {
        "kind": target.kind,
        "weight shape": target.weight_shape,
        "ranks": target.ranks,
        "scale": target.scale,
    }
    if isinstance(adapter, TuckerAdapter):
        found["layer"], wanted["layer"] = type(adapter.base_layer).__name__, target.layer
    for field, value in wanted.items():
        if found[field] != value:
            raise ValueError(
                f"{at}: the model's adapter has {field} {found[field]} but the file's has {value}; "
                "load into a model without adapters, or build them with the file's options"
            )
    if _is_principal(adapter) != (target.principal_ranks is not None):
        raise ValueError(
            f"{at}: the model's adapter has init={adapter.init!r} but the file's has init={target.init!r}; "
            "a 'principal' adapter changes the base weight, so both must be 'principal' or neither"
        )
    if adapter.disabled:
        raise ValueError(
            f"{at}: the model's adapter is disabled; call ndlowrank.nn.enable_adapters(model) first"
        )
    if adapter.merged:
        raise ValueError(
            f"{at}: the model's adapter is merged; call ndlowrank.nn.unmerge_adapters(model) before "
            "loading (and merge again after)"
        )


def _fresh_layer(model: nn.Module, target: _Target, at: str) -> nn.Module:
    """The plain layer at ``target.name`` that a new adapter will wrap."""
    if not target.name:
        raise ValueError(f"{at}: an adapter at the model's root can only be loaded into an existing adapter")
    try:
        module = model.get_submodule(target.name)
    except AttributeError:
        raise ValueError(f"{at}: the model has no module of that name") from None
    if type(module).__name__ != target.layer:
        raise ValueError(
            f"{at}: the model's module is a {type(module).__name__}, the file's a {target.layer}"
        )
    try:
        kind = _adapter_class(module).kind
    except TypeError as exc:
        raise ValueError(f"{at}: {exc}") from None
    if kind != target.kind:
        raise ValueError(f"{at}: the model's module takes a {kind!r} adapter, the file's is {target.kind!r}")
    weight = getattr(module, "weight", None)
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
    if shape != target.weight_shape:
        raise ValueError(
            f"{at}: the model's weight has shape {shape} but the file's adapter is for {target.weight_shape}"
        )
    return module


def _fresh_parameter(model: nn.Module, target: _Target, at: str) -> nn.Parameter:
    """The plain parameter at ``target.name`` that a new parameter adapter will change."""
    try:
        parameter = model.get_parameter(target.name)
    except AttributeError:
        raise ValueError(f"{at}: the model has no (unparametrized) parameter of that name") from None
    if tuple(parameter.shape) != target.weight_shape:
        raise ValueError(
            f"{at}: the model's parameter has shape {tuple(parameter.shape)} but the file's adapter "
            f"is for {target.weight_shape}"
        )
    return parameter


def _check_not_meta(found: DeltaHost | nn.Module | nn.Parameter, at: str) -> None:
    """A weight (or adapter) on the meta device has no storage: the file's values would be dropped."""
    tensors = [found] if isinstance(found, nn.Parameter) else [found.weight]
    if isinstance(found, DeltaHost):
        tensors += list(found.delta.parameters())
    if any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
        raise ValueError(
            f"{at}: the model's weight is on the meta device, which holds no values, so the file's would be "
            "lost; materialise the model first (model.to_empty(device=...) and load its weights), then load "
            "the adapters"
        )


def _plan(
    model: nn.Module,
    targets: list[_Target],
    tensors: Mapping[str, torch.Tensor],
    *,
    strict: bool,
    where: str,
    modules: tuple[ModuleEntry, ...] = (),
    adapter_name: str | None = None,
    runs: bool = True,
) -> list[tuple[_Target, DeltaHost | nn.Module | nn.Parameter]]:
    """Check the file against the model: ``(target, existing adapter or what to adapt)`` per adapter."""
    hosts = dict(iter_adapters(model))
    # the layers that hold the adapter loaded into (every adapted layer when it is not named)
    adapters = {n: h for n, h in hosts.items() if adapter_name is None or adapter_name in h.adapter_names}
    layers = [name for name, adapter in adapters.items() if isinstance(adapter, TuckerAdapter)]
    layers += [t.name for t in targets if t.kind in _LAYER_KINDS]
    plan: list[tuple[_Target, DeltaHost | nn.Module | nn.Parameter]] = []
    for target in targets:
        at = f"{where}, adapter {target.name!r}"
        if target.name in adapters:
            _check_existing(adapters[target.name], target, at)
            plan.append((target, adapters[target.name]))
            continue
        if target.name in hosts and adapter_name is not None:  # another named adapter on this layer
            _check_addable(hosts[target.name], target, adapter_name, at, runs=runs)
            plan.append((target, hosts[target.name]))
            continue
        owner = next((n for n in layers if n != target.name and target.name.startswith(_prefix(n))), None)
        if owner is not None:
            raise ValueError(f"{at}: the name is inside the layer {owner!r}, which has or gets an adapter")
        if _is_internal(target.name):
            raise ValueError(f"{at}: the name is inside an adapter or a parametrization of the model")
        base: nn.Module | nn.Parameter
        if target.kind == ParameterAdapter.kind:
            base = _fresh_parameter(model, target, at)
        else:
            base = _fresh_layer(model, target, at)
        if target.principal_ranks is not None:
            weight: torch.Tensor = base if isinstance(base, nn.Parameter) else base.weight  # type: ignore[assignment]
            try:
                check_untied(
                    model,
                    [(target.name, weight, target.kind == ParameterAdapter.kind)],
                    "a 'principal' adapter",
                    "untie them first",
                )
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        plan.append((target, base))
    for target, found in plan:
        _check_not_meta(found, f"{where}, adapter {target.name!r}")
    if strict:
        names = {t.name for t in targets}
        extra = [name for name in adapters if name not in names]
        if extra:
            raise ValueError(
                f"{where}: the model has adapters {extra} that the file does not hold "
                "(pass strict=False to load the file's adapters only)"
            )
    _check_tensors(targets, tensors, strict=strict, where=where, modules=modules)
    return plan


def _check_tensors(
    targets: list[_Target],
    tensors: Mapping[str, torch.Tensor],
    *,
    strict: bool,
    where: str,
    modules: tuple[ModuleEntry, ...],
) -> None:
    """``ValueError`` unless ``tensors`` has each tensor the targets need, of its shape, floating and finite.

    With ``strict``, also if it has tensors that neither the targets nor ``modules`` use.
    """
    expected: dict[str, tuple[int, ...]] = {}
    for target in targets:
        expected.update(target.expected_shapes())
    missing = [key for key in expected if key not in tensors]
    if missing:
        raise ValueError(f"{where}: tensors {missing} are missing")
    wrong = [
        f"{key} has shape {tuple(tensors[key].shape)}, expected {shape}"
        for key, shape in expected.items()
        if tuple(tensors[key].shape) != shape
    ]
    if wrong:
        raise ValueError(f"{where}: {'; '.join(wrong)}")
    not_float = [
        f"{key} ({tensors[key].dtype})" for key in expected if not tensors[key].dtype.is_floating_point
    ]
    if not_float:
        raise ValueError(f"{where}: tensors {not_float} are not floating point")
    not_finite = [key for key in expected if not bool(torch.isfinite(tensors[key]).all())]
    if not_finite:
        raise ValueError(f"{where}: tensors {not_finite} hold NaN or Inf")
    unexpected = sorted(
        set(tensors) - set(expected) - {key for entry in modules for key in entry.tensor_names()}
    )
    if unexpected and strict:
        raise ValueError(f"{where}: unexpected tensors {unexpected} (pass strict=False to ignore them)")


def _check_addable(host: DeltaHost, target: _Target, adapter_name: str, at: str, *, runs: bool) -> None:
    """A layer with other adapters can take the file's adapter under ``adapter_name``."""
    found: dict[str, Any] = {"kind": host.kind, "weight shape": tuple(host.weight.shape)}
    wanted: dict[str, Any] = {"kind": target.kind, "weight shape": target.weight_shape}
    for field, value in wanted.items():
        if found[field] != value:
            raise ValueError(
                f"{at}: the model's adapter has {field} {found[field]} but the file's has {value}"
            )
    try:
        host.check_can_add(adapter_name, target.init)
        if runs:
            host.check_active([*host.active_adapters, adapter_name], adding=adapter_name)
    except ValueError as exc:
        raise ValueError(f"{at}: {exc}") from None
