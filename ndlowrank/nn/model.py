"""Model-level operations: add adapters by name, merge, unmerge and remove them."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .delta import layer_seed
from .layers import TuckerAdapter, _adapter_class

__all__ = [
    "add_adapters",
    "iter_adapters",
    "mark_only_adapters_trainable",
    "merge_adapters",
    "remove_adapters",
    "unmerge_adapters",
]

Ranks = int | Sequence[int]


def iter_adapters(model: nn.Module) -> Iterator[tuple[str, TuckerAdapter]]:
    """``(name, adapter)`` for every :class:`TuckerAdapter` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, TuckerAdapter):
            yield name, module


def _suffix_match(pattern: str, name: str) -> bool:
    """PEFT's rule for a list entry or a rank_pattern key: the name or a dotted suffix of it."""
    return re.fullmatch(rf"(.*\.)?({pattern})", name) is not None


def _targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the modules ``target_modules`` selects; every entry must select something."""
    inside_adapters = {f"{name}.base_layer" for name, _ in iter_adapters(model)}
    candidates = [
        name
        for name, module in model.named_modules()
        if name
        and not isinstance(module, TuckerAdapter)
        and not any(name.startswith(p) for p in inside_adapters)
    ]
    if isinstance(target_modules, str):
        chosen = [name for name in candidates if re.fullmatch(target_modules, name)]
        if not chosen:
            raise ValueError(f"target_modules={target_modules!r} (a regex) matches no module of the model")
        return chosen
    if not target_modules:
        raise ValueError(
            "target_modules is empty; name the modules to adapt (exact names, suffixes or a regex)"
        )
    chosen = []
    for target in target_modules:
        matched = [name for name in candidates if name == target or name.endswith("." + target)]
        if not matched:
            raise ValueError(f"target module {target!r} matches no module of the model")
        chosen += [name for name in matched if name not in chosen]
    return chosen


def _ranks_for(name: str, ranks: Ranks, rank_pattern: Mapping[str, Ranks] | None) -> Ranks:
    for pattern, pattern_ranks in (rank_pattern or {}).items():
        if _suffix_match(pattern, name):
            return pattern_ranks
    return ranks


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """Freeze every parameter of ``model`` except the adapters' cores and factors."""
    adapter_params = {id(p) for _, adapter in iter_adapters(model) for p in adapter.delta.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in adapter_params)


def add_adapters(
    model: nn.Module,
    target_modules: str | Sequence[str] | None,
    ranks: Ranks,
    *,
    init: str = "zero_core",
    scale: float = 1.0,
    dropout: float = 0.0,
    rank_pattern: Mapping[str, Ranks] | None = None,
    path: str = "auto",
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Wrap the target layers of ``model`` in :class:`TuckerAdapter` and train only the adapters.

    Parameters
    ----------
    model : nn.Module
        Changed in place and returned.
    target_modules : str or sequence of str
        A sequence selects modules by exact name or dotted suffix (``["conv1", "layer1.0.conv2"]``);
        a string is a regular expression matched against the full module name
        (``r".*\\.conv\\d"``). Every entry must match at least one module.
    ranks : int or sequence of int
        Ranks of every adapter. An int is clipped to each mode's size (``8`` works on a
        depthwise 1×3×3 kernel); a sequence must fit every targeted weight.
    init, scale, dropout, path, dtype
        As for :class:`TuckerAdapter`.
    rank_pattern : mapping of str to ranks, optional
        Per-module ranks: a key is a regex matched against the module name or a dotted
        suffix of it (as in PEFT); the first matching key wins, ``ranks`` otherwise.
    seed : int, optional
        Seed of the random inits; each layer gets its own stream derived from the seed and
        its name. Without it, torch's global generator is used.

    Returns
    -------
    nn.Module
        ``model``, with every base parameter frozen and only the adapters trainable.

    Raises
    ------
    ValueError
        A target that matches nothing, a rank that does not fit a weight (naming the
        module, mode, rank and size), or a bad option. The model is unchanged then.
    TypeError
        A target whose type cannot be adapted (naming the type and the supported ones).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from ndlowrank import nn as nlnn
    >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    >>> model = nlnn.add_adapters(model, ["0", "2"], ranks=(4, 3, 3, 3), seed=0)
    >>> sum(p.numel() for p in model.parameters() if p.requires_grad)
    437
    """
    if target_modules is None:
        raise ValueError(
            "target_modules is None; name the modules to adapt (exact names, suffixes or a regex)"
        )
    names = _targets(model, target_modules)
    for name in names:
        module = model.get_submodule(name)
        try:
            _adapter_class(module)
        except TypeError as exc:
            raise TypeError(f"module {name!r}: {exc}") from None
    built: list[tuple[str, TuckerAdapter]] = []
    try:
        for name in names:
            layer = model.get_submodule(name)
            options: dict[str, Any] = {
                "init": init,
                "scale": scale,
                "dropout": dropout,
                "path": path,
                "dtype": dtype,
            }
            adapter = TuckerAdapter(
                layer, _ranks_for(name, ranks, rank_pattern), seed=layer_seed(seed, name), **options
            )
            built.append((name, adapter))
    except (ValueError, TypeError) as exc:
        for _, adapter in built:  # undo the principal init's change of the base weights
            adapter.restore_base()
        message = f"module {name!r}: {exc}" if not str(exc).startswith("module") else str(exc)
        raise type(exc)(message) from None
    for name, adapter in built:
        _set_submodule(model, name, adapter)
    mark_only_adapters_trainable(model)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every adapter's ``ΔW`` into its base weight; forward then runs at the base layer's speed.

    Merging twice does not add twice. Returns ``model``.
    """
    adapters = list(iter_adapters(model))
    for _, adapter in adapters:
        adapter.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapters`. Returns ``model``."""
    for _, adapter in iter_adapters(model):
        adapter.unmerge()
    return model


def remove_adapters(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every adapter by its base layer: a plain model with the original module types and keys.

    Parameters
    ----------
    model : nn.Module
    merge : bool, default True
        Keep the fine-tuned weights (``W + ΔW``). With ``False`` the original weights come
        back (undoing a merge and a principal init).

    Returns
    -------
    nn.Module
        ``model`` without adapters; ``requires_grad`` of the base parameters is left as is.
    """
    for name, adapter in list(iter_adapters(model)):
        base = adapter.merged_base() if merge else adapter.restore_base()
        _set_submodule(model, name, base)
    return model
