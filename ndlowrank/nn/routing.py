"""Resolving the targets of :func:`~ndlowrank.nn.add_adapters`: which modules and parameters, routed how, at which ranks.

A target module becomes a layer adapter unless its parent reads its weight by attribute
(:data:`READ_BY_ATTRIBUTE`, or ``self.<child>.weight`` in the parent's ``forward``) or it is
an attention block: those are routed to parameter adapters on their weights.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._host import DEFAULT_ADAPTER, DeltaHost
from ._iter import iter_adapters, owner_of
from .layers import TuckerAdapter
from .parameters import ParameterAdapter
from .targets import Targets, _is_internal, select_targets

__all__ = ["READ_BY_ATTRIBUTE"]

Ranks = int | Sequence[int]

READ_BY_ATTRIBUTE: tuple[tuple[type[nn.Module], str], ...] = (
    # F.multi_head_attention_forward(..., out_proj.weight, out_proj.bias): in training too
    (nn.MultiheadAttention, "out_proj"),
    # the inference fast path, torch._transformer_encoder_layer_fwd(..., linear1.weight, ...)
    (nn.TransformerEncoderLayer, "linear1"),
    (nn.TransformerEncoderLayer, "linear2"),
)
"""``(parent type, child name)``: an ``nn.Linear`` its parent reads as ``.weight``/``.bias`` instead of calling it.

A layer adapter in its place would be bypassed (or break the parent), so :func:`add_adapters`
gives such a target a :class:`ParameterAdapter` on its ``weight`` instead. torch's
``nn.TransformerDecoderLayer`` calls its own linears, and ``nn.TransformerEncoder`` reads only
the children of its layers listed here. Where torch has ``nn.LinearCrossEntropyLoss``, its
``linear`` (whose weight and bias ``forward`` reshapes) is in the table too.
"""
if hasattr(nn, "LinearCrossEntropyLoss"):
    READ_BY_ATTRIBUTE += ((nn.LinearCrossEntropyLoss, "linear"),)


def _regex(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{what} is not a valid regular expression ({exc})") from None


def _suffix_match(pattern: str, name: str) -> bool:
    """PEFT's rule for a list entry or a rank_pattern key: the name or a dotted suffix of it."""
    return re.fullmatch(rf"(.*\.)?({pattern})", name) is not None


def _already_adapted(model: nn.Module, matches: Callable[[str], bool], what: str, adapter_name: str) -> None:
    """Raise if ``what`` (a target that selects nothing adaptable) selects an adapter that holds ``adapter_name``."""
    for name, adapter in iter_adapters(model):
        if adapter_name not in adapter.adapter_names:
            continue
        covered = [name]
        if isinstance(adapter, TuckerAdapter):  # the wrapped layer's parameters, by their user-facing names
            covered += [f"{name}.{key}" if name else key for key, _ in adapter.base_layer.named_parameters()]
            covered += [f"{name}.{key}" if name else key for key, _ in adapter.named_parameters()]
        if any(matches(n) for n in covered):
            raise ValueError(_adapted_message(what, name, adapter, adapter_name))


def _select_modules(
    model: nn.Module, target_modules: Targets, exclude_modules: Targets | None, adapter_name: str
) -> list[str]:
    """:func:`select_targets`, saying so when a target selects nothing because it already has this adapter."""
    try:
        return select_targets(
            model, target_modules, exclude_modules=exclude_modules, adapter_name=adapter_name
        )
    except ValueError as exc:
        if "matches no module" not in str(exc):
            raise
        if isinstance(target_modules, str):
            compiled = re.compile(target_modules)
            _already_adapted(
                model,
                lambda n: compiled.fullmatch(n) is not None,
                f"target_modules={target_modules!r}",
                adapter_name,
            )
        elif isinstance(target_modules, Sequence):
            for entry in target_modules:
                if isinstance(entry, str):
                    _already_adapted(model, _suffix_of(entry), f"target module {entry!r}", adapter_name)
        raise


def _adapted_message(what: str, name: str, adapter: nn.Module, adapter_name: str | None = None) -> str:
    named = f" named {adapter_name!r}" if adapter_name is not None else ""
    return (
        f"{what} already has an adapter{named} ({type(adapter).__name__} {name!r}); a weight takes one "
        "adapter of each name and one kind of adapter: remove it first (ndlowrank.nn.remove_adapters), load "
        "trained values into it (ndlowrank.nn.load_adapters) or add another one under another adapter_name"
    )


def _suffix_of(target: str) -> Callable[[str], bool]:
    return lambda name: name == target or name.endswith("." + target)


def _without_parameter_adapters(model: nn.Module, names: list[str]) -> list[str]:
    """``names``, after checking that no parameter of these modules has a parameter adapter already."""
    for name in names:
        module = model.get_submodule(name)
        if parametrize.is_parametrized(module):
            parametrized: Any = module.parametrizations
            for attribute, parametrizations in parametrized.items():
                adapters = [p for p in parametrizations if isinstance(p, ParameterAdapter)]
                if adapters:
                    raise ValueError(_adapted_message(f"module {name!r}", f"{name}.{attribute}", adapters[0]))
    return names


def _target_parameters(
    model: nn.Module,
    target_parameters: Sequence[str],
    hosts: Mapping[str, DeltaHost] | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
) -> list[str]:
    """Names of the parameters ``target_parameters`` selects (exact names or dotted suffixes).

    ``hosts``: parameter adapters that may take another named adapter, candidates too.
    """
    if isinstance(target_parameters, str):
        raise TypeError("target_parameters must be a list of parameter names, e.g. ['attn.in_proj_weight']")
    owned = {id(p) for _, adapter in iter_adapters(model) for p in adapter.parameters()}
    # every name of a tied parameter (GPT-2's lm_head.weight is wte.weight) can be a target
    candidates = [
        name
        for name, p in model.named_parameters(remove_duplicate=False)
        if not _is_internal(name) and id(p) not in owned
    ]
    candidates += [name for name, host in (hosts or {}).items() if isinstance(host, ParameterAdapter)]
    chosen: list[str] = []
    for k, target in enumerate(target_parameters):
        if not isinstance(target, str):
            raise TypeError(
                f"target_parameters[{k}]={target!r} is a {type(target).__name__}; give parameter names as strings"
            )
        matched = [name for name in candidates if _suffix_of(target)(name)]
        if not matched:
            _already_adapted(model, _suffix_of(target), f"target parameter {target!r}", adapter_name)
            raise ValueError(f"target parameter {target!r} matches no parameter of the model")
        for name in matched:
            shape = tuple(
                (hosts[name].weight if hosts and name in hosts else model.get_parameter(name)).shape
            )
            if len(shape) < 2:
                raise ValueError(
                    f"parameter {name!r} has shape {shape}: a Tucker delta needs at least 2 modes"
                )
        chosen += [name for name in matched if name not in chosen]
    return chosen


def _read_by_parent(model: nn.Module, name: str) -> bool:
    """Whether its parent reads the layer ``name``'s weight instead of calling it.

    True for the pairs of :data:`READ_BY_ATTRIBUTE` and for any child whose weight the
    parent's ``forward`` passes on as ``self.<child>.weight`` (timm's BEiT/EVA attention:
    ``F.linear(x, self.qkv.weight, ...)``), found in the parent class's source.
    """
    if not name:
        return False
    parent, child = owner_of(model, name)
    if any(
        isinstance(parent, parent_type) and child == child_name
        for parent_type, child_name in READ_BY_ATTRIBUTE
    ):
        return isinstance(model.get_submodule(name), nn.Linear)
    return child in _weights_read_in_forward(type(parent).forward)


@functools.cache
def _weights_read_in_forward(forward: Callable[..., Any]) -> frozenset[str]:
    """Children whose weight a parent's ``forward`` uses as a tensor (``self.<child>.weight`` not followed by ``.`` or ``[``)."""
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):  # no source (a compiled or built-in class): nothing is known
        return frozenset()
    return frozenset(re.findall(r"self\.(\w+)\.weight\b(?!\s*[.\[])", source))


def _routed_parameters(model: nn.Module, name: str) -> list[str]:
    """Parameters that stand for the target module ``name``: its weight if its parent reads it, the projections of attention.

    Empty for a module that gets a layer adapter.
    """
    module = model.get_submodule(name)
    prefix = f"{name}." if name else ""
    if isinstance(module, nn.MultiheadAttention):
        projections = ["in_proj_weight"] if module.in_proj_weight is not None else []
        projections = projections or ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        return [prefix + p for p in projections] + [f"{prefix}out_proj.weight"]
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim >= 2 and _read_by_parent(model, name):
        return [f"{prefix}weight"]
    return []


def _ranks_for(name: str, ranks: Ranks, rank_pattern: Mapping[str, Ranks] | None) -> Ranks:
    for pattern, pattern_ranks in (rank_pattern or {}).items():
        if _suffix_match(pattern, name):
            return pattern_ranks
    return ranks
