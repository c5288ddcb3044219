"""Saving and loading trained adapters: one safetensors file holding the tensors and a JSON config.

The file holds, per adapter named ``name`` (a module path for a layer adapter, a
parameter path for a parameter adapter), the tensors ``{name}.core`` and
``{name}.factors.{n}``, plus ``{name}.principal_core`` and ``{name}.principal_factor_{n}``
for a ``"principal"`` adapter (the start subtracted from the base weight, needed to rebuild
it on a fresh model). Its safetensors metadata holds, under the key ``"ndlowrank"``, a JSON
object::

    {"format": "tucker-adapters", "format_version": 1, "ndlowrank_version": "0.1.0",
     "targets": [{"name": "layer1.0.conv1", "kind": "conv", "layer": "Conv2d",
                   "weight_shape": [64, 64, 3, 3], "ranks": [16, 16, 3, 3], "init": "zero_core",
                   "scale": 1.0, "dropout": 0.0, "path": "auto", "dtype": "float32"},
                  {"name": "attn.in_proj_weight", "kind": "parameter",
                   "weight_shape": [96, 32], "ranks": [8, 8], "init": "principal",
                   "scale": 1.0, "dtype": "float32", "principal_ranks": [8, 8]}]}

A principal adapter adds ``"principal_ranks"``, the ranks of its start, which
:func:`~ndlowrank.nn.truncate_adapters` may have left larger than ``"ranks"``. The base
weight of a rebuilt adapter is ``W - ΔW₀`` computed from the same row-major start tensors
as when the adapter was made, so it comes out bit for bit the same.

:func:`load_adapters` validates the whole file against the model before changing it and
undoes its changes if anything fails part way, so a failed load leaves the model as it was;
:func:`save_adapters` writes a temporary file and renames it, so a failed save never
leaves a truncated file in place of a good one.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
from torch import nn

from .. import __version__
from .._files import write_atomically
from ._file_format import (
    FILE_FORMAT,
    FORMAT_VERSION,
    METADATA_KEY,
    _fspath,
    _is_principal,
    _prefix,
    _principal_names,
    _safetensors,
)
from ._host import DEFAULT_ADAPTER, DeltaHost, check_adapter_name
from ._iter import owner_of
from ._load_plan import _parse_header, _plan, _read_file, _Target
from .bypass import untrained_adapters
from .delta import TuckerDelta, fold_into_core
from .distributed import copy_full, gathered, is_sharded, rank_writes, unwrap, wait_for_writer
from .layers import TuckerAdapter
from .model import _set_submodule, iter_adapters, mark_only_adapters_trainable, runs_at_once
from .modules_to_save import (
    ModuleEntry,
    iter_trained_copies,
    load_module,
    plan_modules,
    trained_entries,
    trained_state,
    unsaved_trainable,
)
from .named import chosen_adapter
from .parameters import ParameterAdapter, attach_parameter_adapter, remove_parameter_adapter

__all__ = ["adapter_state_dict", "load_adapters", "save_adapters"]

Undo = list[Callable[[], object]]


def adapter_state_dict(model: nn.Module, *, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The trainable tensors of every adapter in ``model``, keyed by adapter name.

    Parameters
    ----------
    model : nn.Module
        A model with adapters (layer adapters, :class:`~ndlowrank.nn.TuckerAdapter`, named
        by module path; parameter adapters, :class:`~ndlowrank.nn.ParameterAdapter`, by
        parameter path). An empty dict without.

    Returns
    -------
    dict of str to torch.Tensor
        For an adapter named ``name``: ``f"{name}.core"`` (shape ``ranks``) and
        ``f"{name}.factors.{n}"`` (shape ``(weight.shape[n], ranks[n])``); for a
        ``"principal"`` adapter also its start, ``f"{name}.principal_core"`` and
        ``f"{name}.principal_factor_{n}"``. The tensors are detached and contiguous, on
        the adapters' device and in their dtype; like ``Module.state_dict`` they may share
        memory with the parameters. Modules trained in full (``modules_to_save``) add
        their trained copy's ``state_dict`` as ``f"{name}.{key}"``. Parameters sharded by
        FSDP2 (``DTensor``) are gathered into full tensors, a collective that every rank
        must join (see :mod:`ndlowrank.nn.distributed`).

    Examples
    --------
    >>> from torch import nn
    >>> from ndlowrank import nn as nlnn
    >>> model = nlnn.add_adapters(nn.Sequential(nn.Linear(8, 4)), ["0"], ranks=2, seed=0)
    >>> {key: tuple(t.shape) for key, t in nlnn.adapter_state_dict(model).items()}
    {'0.core': (2, 2), '0.factors.0': (4, 2), '0.factors.1': (8, 2)}
    """
    with chosen_adapter(model, adapter_name) as adapters:
        return _state(adapters, model)


def _state(adapters: list[tuple[str, DeltaHost]], model: nn.Module) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, adapter in adapters:
        prefix = _prefix(name)
        state[f"{prefix}core"] = gathered(adapter.delta.core.detach()).contiguous()
        for n, factor in enumerate(adapter.delta.factors):
            state[f"{prefix}factors.{n}"] = gathered(factor.detach()).contiguous()
        if _is_principal(adapter):
            for buffer in _principal_names(adapter.weight.ndim):
                state[prefix + buffer] = getattr(adapter, buffer).detach().contiguous()
    state.update(trained_state(model))
    return state


def _adapter_config(name: str, adapter: DeltaHost) -> dict[str, Any]:
    config = {"name": name, **adapter.config()}
    if _is_principal(adapter):
        buffers = [adapter.get_buffer(name) for name in _principal_names(adapter.weight.ndim)]
        config["principal_ranks"] = list(buffers[0].shape)
    return config


def save_adapters(model: nn.Module, path: str | os.PathLike[str], *, adapter_name: str | None = None) -> None:
    """Save every adapter of ``model`` (tensors and config) to one safetensors file.

    The file holds :func:`adapter_state_dict` and, in its metadata, a JSON config with the
    format version, the ndlowrank version and per adapter: name, kind, layer type, weight
    shape, ranks, init, scale, dropout, path and dtype (see :mod:`ndlowrank.nn.io`). The
    base model's own weights are not saved: load the file into the same base model with
    :func:`load_adapters`.

    Parameters
    ----------
    model : nn.Module
        A model with at least one adapter (layer or parameter adapter). Merged adapters are
        saved as well (their ``ΔW`` is read from the adapter, not from the weight).
    path : str or os.PathLike
        The file to write (``.safetensors`` by convention); an existing file is replaced.

    Raises
    ------
    ValueError
        If ``model`` has no adapters, or an adapter holds NaN or Inf or is on the meta
        device (a file that could not be loaded back).
    IsADirectoryError, FileNotFoundError
        If ``path`` is a directory or its directory does not exist (naming the path).
    OSError
        If the file cannot be written (a full disk, a file size limit), naming the path.

    Warns
    -----
    UserWarning
        If some adapters are still at ``ΔW = 0`` while others trained (see
        :func:`~ndlowrank.nn.find_bypassed_adapters`): they may never have run.
        If ``model`` has trainable parameters that the file does not hold (a head unfrozen
        by hand rather than listed in ``modules_to_save``): loading the file would not
        restore them.

    Notes
    -----
    The write is atomic: the file is written under a temporary name in the same directory,
    flushed to disk and renamed onto ``path``. If anything fails, the temporary file is
    removed and a file already at ``path`` is left untouched. Temporary files that a
    killed save left behind are removed by the next save to the same path.

    Under FSDP2 (``fully_shard``, whose parameters are ``DTensor`` shards) every rank must
    call this: the adapters' tensors are gathered, rank 0 writes the file (the same file one
    process would write) and every rank returns once it is written. Under DDP each caller
    writes its own copy; save on one rank (``if dist.get_rank() == 0``) as usual.

    Examples
    --------
    >>> import copy, os, tempfile
    >>> import torch
    >>> from torch import nn
    >>> from ndlowrank import nn as nlnn
    >>> base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> model = nlnn.add_adapters(copy.deepcopy(base), ["0", "2"], ranks=2, seed=0)
    >>> with torch.no_grad():  # stands in for training
    ...     _ = model[0].delta.core.normal_(), model[2].delta.core.normal_()
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "adapters.safetensors")
    ...     nlnn.save_adapters(model, path)
    ...     restored = nlnn.load_adapters(base, path)  # builds the adapters on the plain model
    >>> x = torch.randn(3, 8)
    >>> torch.equal(restored(x), model(x))
    True
    """
    model = unwrap(model)
    with chosen_adapter(model, adapter_name) as adapters:
        _save(model, adapters, path)


def _save(model: nn.Module, adapters: list[tuple[str, DeltaHost]], path: str | os.PathLike[str]) -> None:
    if not adapters:
        raise ValueError("the model has no adapters to save; add them with ndlowrank.nn.add_adapters")
    meta = [name for name, adapter in adapters if any(p.is_meta for p in adapter.delta.parameters())]
    if meta:
        raise ValueError(f"adapters {meta} are on the meta device and hold no values; nothing to save")
    diverged = [
        name
        for name, adapter in adapters
        if not all(torch.isfinite(p).all() for p in adapter.delta.parameters())
    ]
    if diverged:
        raise ValueError(
            f"adapters {diverged} hold NaN or Inf (training diverged?), which load_adapters refuses; nothing was saved"
        )
    target = _fspath(path)
    if os.path.isdir(target):
        raise IsADirectoryError(f"cannot save adapters to {target!r}: it is a directory")
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save adapters to {target!r}: directory {directory!r} does not exist")
    safetensors = _safetensors()
    untrained = untrained_adapters(adapters)
    if untrained:
        warnings.warn(
            f"adapters {untrained} are still at ΔW = 0 while others trained: they may never run (a parent "
            "that reads their layer's weight directly bypasses them; ndlowrank.nn.find_bypassed_adapters "
            "finds those) or their output is unused",
            stacklevel=3,
        )

    header = {
        "format": FILE_FORMAT,
        "format_version": FORMAT_VERSION,
        "ndlowrank_version": __version__,
        "targets": [*(_adapter_config(name, adapter) for name, adapter in adapters), *trained_entries(model)],
    }
    metadata = {METADATA_KEY: json.dumps(header), "format": "pt"}
    sharded = any(is_sharded(p) for _, adapter in adapters for p in adapter.delta.parameters())
    sharded |= any(is_sharded(p) for _, copy in iter_trained_copies(model) for p in copy.parameters())
    tensors = {key: t.to("cpu").contiguous() for key, t in _state(adapters, model).items()}

    try:
        if rank_writes(sharded):
            write_atomically(
                target,
                lambda temporary: safetensors.torch.save_file(tensors, str(temporary), metadata=metadata),
            )
    finally:
        wait_for_writer(sharded)
    unsaved = unsaved_trainable(model)
    if unsaved:
        shown = ", ".join(unsaved[:5]) + (f" and {len(unsaved) - 5} more" if len(unsaved) > 5 else "")
        warnings.warn(
            f"trainable parameters {shown} are not in the adapter file, so loading it will not restore "
            "them; to save a module trained in full, pass it to add_adapters(..., modules_to_save=[...])",
            UserWarning,
            stacklevel=3,
        )


# -- changing the model, keeping what undoes each change -----------------------------------


def _copy_trained(delta: TuckerDelta, target: _Target, tensors: Mapping[str, torch.Tensor]) -> None:
    prefix = _prefix(target.name)
    core = tensors[f"{prefix}core"]
    factors = [tensors[f"{prefix}factors.{n}"] for n in range(len(delta.factors))]
    # factors held at the identity, saved with other values (an older file): the core takes them over
    core, factors = fold_into_core(core, factors, delta.fixed_modes)
    copy_full(delta.core, core)
    for factor, value in zip(delta.factors, factors, strict=True):
        copy_full(factor, value)


def _file_start(
    target: _Target, tensors: Mapping[str, torch.Tensor], like: torch.Tensor
) -> list[torch.Tensor]:
    """The file's principal start ``[core, *factors]`` in ``like``'s dtype and device, row-major."""
    prefix = _prefix(target.name)
    names = _principal_names(len(target.weight_shape))
    return [tensors[prefix + name].to(dtype=like.dtype, device=like.device).contiguous() for name in names]


def _restore_tensors(tensors: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    for tensor, value in zip(tensors, saved, strict=True):
        tensor.copy_(value)


def _restore_buffers(adapter: DeltaHost, buffers: dict[str, torch.Tensor]) -> None:
    for name, buffer in buffers.items():
        adapter.register_buffer(name, buffer)


def _load_existing(
    adapter: DeltaHost, target: _Target, tensors: Mapping[str, torch.Tensor], undo: Undo
) -> None:
    """Copy the file's tensors into the adapter's own parameters (their identity is kept)."""
    parameters = [adapter.delta.core, *adapter.delta.factors]
    undo.append(partial(_restore_tensors, parameters, [p.detach().clone() for p in parameters]))
    if target.principal_ranks is not None:
        names = _principal_names(adapter.weight.ndim)
        old = {name: getattr(adapter, name) for name in names}
        new = _file_start(target, tensors, like=old["principal_core"])
        if not all(o.shape == n.shape and torch.equal(o, n) for o, n in zip(old.values(), new, strict=True)):
            # the model's adapter started elsewhere: move its base weight to the file's start
            weight = adapter.weight
            undo.append(partial(_restore_tensors, [weight], [weight.detach().clone()]))
            undo.append(partial(_restore_buffers, adapter, old))
            weight.add_(adapter._principal_start())
            _restore_buffers(adapter, {name: value.clone() for name, value in zip(names, new, strict=True)})
            weight.sub_(adapter._principal_start())
    _copy_trained(adapter.delta, target, tensors)


def _build(
    model: nn.Module,
    target: _Target,
    base: nn.Module | nn.Parameter,
    tensors: Mapping[str, torch.Tensor],
    undo: Undo,
    adapter_name: str = DEFAULT_ADAPTER,
) -> DeltaHost:
    """Put a new adapter on ``base`` (a layer or a parameter of ``model``) as the file describes it."""
    weight: torch.Tensor = base if isinstance(base, nn.Parameter) else base.weight  # type: ignore[assignment]
    options: dict[str, Any] = {
        "scale": target.scale,
        "dtype": target.dtype,
        "seed": 0,  # the values are overwritten; a fixed seed leaves torch's global RNG alone
        "adapter_name": adapter_name,
    }
    principal = target.principal_ranks is not None
    ranks = list(target.principal_ranks if target.principal_ranks is not None else target.ranks)
    init = "zero_core" if principal else target.init
    adapter: DeltaHost
    if isinstance(base, nn.Parameter):
        adapter = ParameterAdapter(base, ranks, init=init, **options)
    else:
        adapter = TuckerAdapter(base, ranks, init=init, dropout=target.dropout, path=target.path, **options)
        adapter.train(base.training)
    if principal:
        undo.append(partial(_restore_tensors, [weight], [weight.detach().clone()]))
        core, *factors = _file_start(target, tensors, like=adapter.delta.core)
        adapter._set_principal(core, factors)
        if target.principal_ranks != target.ranks:  # truncated after the principal init
            adapter.delta = TuckerDelta(
                target.weight_shape,
                target.ranks,
                scale=target.scale,
                dtype=target.dtype,
                device=weight.device,
                seed=0,
            )
            adapter._hold_square_factors()
    _copy_trained(adapter.delta, target, tensors)
    if isinstance(base, nn.Parameter):
        owner, attribute = owner_of(model, target.name)
        undo.append(partial(remove_parameter_adapter, owner, attribute))
        adapter.train(owner.training)
        attach_parameter_adapter(owner, attribute, adapter)  # type: ignore[arg-type]
    else:
        _set_submodule(model, target.name, adapter)
        undo.append(partial(_set_submodule, model, target.name, base))
    return adapter


def _add_named(
    host: DeltaHost, target: _Target, tensors: Mapping[str, torch.Tensor], undo: Undo, adapter_name: str
) -> None:
    """Add the file's adapter to a layer that holds other adapters, under ``adapter_name``."""
    host.add_adapter(
        adapter_name, list(target.ranks), init=target.init, scale=target.scale, dtype=target.dtype, seed=0
    )
    undo.append(partial(host.delete_adapter, adapter_name))
    _copy_trained(host.delta_of(adapter_name), target, tensors)


def _restore_flags(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for parameter, flag in flags:
        parameter.requires_grad_(flag)


def load_adapters(
    model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True, adapter_name: str | None = None
) -> nn.Module:
    """Load adapters saved by :func:`save_adapters` into ``model`` (in place) and return it.

    The whole file is checked against the model before anything changes. Then, per adapter
    in the file:

    - if ``model`` already has an adapter of that name, the file's tensors are copied into
      its parameters (the same ``nn.Parameter`` objects, so an optimizer holding them keeps
      working); its kind, layer type, weight shape, ranks and scale must match the file's,
      and it must be ``"principal"`` exactly when the file's adapter is. Its ``dropout``,
      ``path`` and dtype are kept;
    - otherwise the layer (or parameter) of that name gets a new adapter built from the
      file's config, a ``"principal"`` one from the file's saved start (the base weight
      becomes ``W - ΔW₀`` as when it was made); at the end
      :func:`~ndlowrank.nn.mark_only_adapters_trainable` is applied to ``model``.

    Loaded into the same base model, the result computes exactly what the saved model did.

    Parameters
    ----------
    model : nn.Module
        The base model the adapters were trained on, with or without adapters.
    path : str or os.PathLike
        A file written by :func:`save_adapters`.
    strict : bool, default True
        With ``True``, tensors in the file that no adapter uses, and adapters of the model
        that the file does not hold, are errors; with ``False`` they are ignored (the
        model's other adapters are left as they are). Missing tensors are always an error.

    Returns
    -------
    nn.Module
        ``model``.

    Raises
    ------
    FileNotFoundError, IsADirectoryError
        If ``path`` names no file.
    ValueError
        If the file is not a readable safetensors file written by :func:`save_adapters`
        (truncated, garbage, other metadata), has an unsupported format version, or does
        not fit the model: a target that does not exist or has another type or weight
        shape, an existing adapter with other ranks, kind, scale or init, a merged adapter,
        a missing tensor, a tensor of the wrong shape, a non-floating dtype or NaN or Inf, or (with
        ``strict``) unexpected tensors or adapters. The model is unchanged then, and also
        if building or copying fails later: every change is undone before re-raising.

    Notes
    -----
    - Tensors are cast to the dtype of the parameter they go into: into existing adapters
      that is the adapters' dtype (a float64 file loads into float32 adapters, rounded);
      new adapters get the file's dtype, so they hold the saved values exactly.
    - A merged adapter is refused rather than unmerged and merged again around the copy
      (which would change the base weight by rounding): unmerge first.
    - If an existing ``"principal"`` adapter started from another ``ΔW₀`` than the file's
      (an ST-HOSVD computed elsewhere may differ in signs), its base weight is moved to the
      file's start, ``W - ΔW₀(model) + ΔW₀(file)``, exact up to rounding.
    - To undo a failure exactly, the load keeps a copy of each base weight it changes (those
      of ``"principal"`` adapters) until it has finished.
    - Into a model sharded by FSDP2 (``DTensor`` parameters) every rank loads the file and
      copies its own shard of each tensor; add the adapters before ``fully_shard``, so that
      the file loads into existing adapters.
    - A model wrapped in ``DistributedDataParallel`` is unwrapped (``model.module``) by
      :func:`save_adapters` and :func:`load_adapters`, so adapter names carry no ``module.``.

    Examples
    --------
    See :func:`save_adapters`.
    """
    target_path = _fspath(path)
    wrapper, model = model, unwrap(model)
    where = f"adapter file {target_path!r}"
    metadata, tensors = _read_file(target_path, where)
    targets, modules = _parse_header(metadata[METADATA_KEY], where)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    # whether the loaded adapter runs, decided before the context below points hosts at it
    runs = adapter_name is None or runs_at_once(model, adapter_name)
    with chosen_adapter(model, adapter_name, must_exist=False) if adapter_name else nullcontext():
        _load(
            model, targets, modules, tensors, strict=strict, where=where, adapter_name=adapter_name, runs=runs
        )
    return wrapper


def _load(
    model: nn.Module,
    targets: list[_Target],
    modules: list[ModuleEntry],
    tensors: Mapping[str, torch.Tensor],
    *,
    strict: bool,
    where: str,
    adapter_name: str | None,
    runs: bool,
) -> nn.Module:
    plan = _plan(
        model,
        targets,
        tensors,
        strict=strict,
        where=where,
        modules=tuple(modules),
        adapter_name=adapter_name,
        runs=runs,
    )
    adapted = [*(t.name for t in targets), *(name for name, _ in iter_adapters(model))]
    module_plan = plan_modules(model, modules, adapted, tensors, strict=strict, where=where)

    undo: Undo = []
    try:
        with torch.no_grad():
            built = False
            for target, found in plan:
                if (
                    isinstance(found, DeltaHost)
                    and adapter_name is not None
                    and adapter_name not in found.adapter_names
                ):
                    _add_named(found, target, tensors, undo, adapter_name)
                    if runs:
                        found.set_active([*found.active_adapters, adapter_name])
                    built = True
                elif isinstance(found, DeltaHost):
                    _load_existing(found, target, tensors, undo)
                else:
                    adapter = _build(model, target, found, tensors, undo, adapter_name or DEFAULT_ADAPTER)
                    if not runs:  # beside other adapters: runs once made active
                        adapter.set_active(None)
                    built = True
            for entry, module in module_plan:
                built |= load_module(model, entry, module, tensors, undo, _set_submodule)
            if built:
                undo.append(partial(_restore_flags, [(p, p.requires_grad) for p in model.parameters()]))
                mark_only_adapters_trainable(model)
    except BaseException:
        with torch.no_grad():
            for step in reversed(undo):
                step()
        raise
    return model
