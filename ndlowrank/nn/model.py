"""Model-level operations: add adapters by name, merge, unmerge and remove them."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._validation import validate_ranks
from ._host import DeltaHost
from .delta import TuckerDelta, layer_seed
from .layers import TuckerAdapter, _adapter_class
from .parameters import ParameterAdapter, attach_parameter_adapter, detach_parameter_adapter

__all__ = [
    "add_adapters",
    "iter_adapters",
    "mark_only_adapters_trainable",
    "merge_adapters",
    "remove_adapters",
    "unmerge_adapters",
]

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
    parameter's path (``"attn.in_proj_weight"``).
    """
    check_model(model)
    for name, module in model.named_modules():
        if isinstance(module, TuckerAdapter):
            yield name, module
    for name, adapter, _, _ in _parameter_adapters(model):
        yield name, adapter


def check_model(model: Any) -> None:
    """Refuse anything but an ``nn.Module`` by name (instead of an ``AttributeError`` deep inside)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _regex(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{what} is not a valid regular expression ({exc})") from None


def _suffix_match(pattern: str, name: str) -> bool:
    """PEFT's rule for a list entry or a rank_pattern key: the name or a dotted suffix of it."""
    return re.fullmatch(rf"(.*\.)?({pattern})", name) is not None


def _already_adapted(model: nn.Module, matches: Callable[[str], bool], what: str) -> None:
    """Raise if ``what`` (a target that selects nothing adaptable) selects an adapter or what one holds."""
    for name, adapter in iter_adapters(model):
        covered = [name]
        if isinstance(adapter, TuckerAdapter):  # the wrapped layer's parameters, by their user-facing names
            covered += [f"{name}.{key}" if name else key for key, _ in adapter.base_layer.named_parameters()]
            covered += [f"{name}.{key}" if name else key for key, _ in adapter.named_parameters()]
        if any(matches(n) for n in covered):
            raise ValueError(_adapted_message(what, name, adapter))


def _adapted_message(what: str, name: str, adapter: nn.Module) -> str:
    return (
        f"{what} already has an adapter ({type(adapter).__name__} {name!r}); a weight takes one "
        "adapter: remove it first (ndlowrank.nn.remove_adapters) or load trained values into it "
        "(ndlowrank.nn.load_adapters)"
    )


def _suffix_of(target: str) -> Callable[[str], bool]:
    return lambda name: name == target or name.endswith("." + target)


def _targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the modules ``target_modules`` selects; every entry must select something."""
    candidates = [
        name
        for name, module in model.named_modules()
        if name and not isinstance(module, TuckerAdapter) and not _is_internal(name)
    ]
    if isinstance(target_modules, str):
        compiled = _regex(target_modules, f"target_modules={target_modules!r}")
        chosen = [name for name in candidates if compiled.fullmatch(name)]
        if not chosen:
            matches = lambda name: compiled.fullmatch(name) is not None  # noqa: E731
            _already_adapted(model, matches, f"target_modules={target_modules!r}")
            raise ValueError(f"target_modules={target_modules!r} (a regex) matches no module of the model")
        return _without_parameter_adapters(model, chosen)
    if not target_modules:
        raise ValueError(
            "target_modules is empty; name the modules to adapt (exact names, suffixes or a regex)"
        )
    chosen = []
    for k, target in enumerate(target_modules):
        if not isinstance(target, str):
            raise TypeError(
                f"target_modules[{k}]={target!r} is a {type(target).__name__}; give module names as strings"
            )
        matched = [name for name in candidates if _suffix_of(target)(name)]
        if not matched:
            _already_adapted(model, _suffix_of(target), f"target module {target!r}")
            raise ValueError(f"target module {target!r} matches no module of the model")
        chosen += [name for name in matched if name not in chosen]
    return _without_parameter_adapters(model, chosen)


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


def _is_internal(name: str) -> bool:
    """A module or parameter that belongs to an adapter or a parametrization, not to the user's model."""
    parts = name.split(".")
    return "base_layer" in parts or "parametrizations" in parts


def _target_parameters(model: nn.Module, target_parameters: Sequence[str]) -> list[str]:
    """Names of the parameters ``target_parameters`` selects (exact names or dotted suffixes)."""
    if isinstance(target_parameters, str):
        raise TypeError("target_parameters must be a list of parameter names, e.g. ['attn.in_proj_weight']")
    owned = {id(p) for _, adapter in iter_adapters(model) for p in adapter.parameters()}
    candidates = [
        name for name, p in model.named_parameters() if not _is_internal(name) and id(p) not in owned
    ]
    chosen: list[str] = []
    for k, target in enumerate(target_parameters):
        if not isinstance(target, str):
            raise TypeError(
                f"target_parameters[{k}]={target!r} is a {type(target).__name__}; give parameter names as strings"
            )
        matched = [name for name in candidates if _suffix_of(target)(name)]
        if not matched:
            _already_adapted(model, _suffix_of(target), f"target parameter {target!r}")
            raise ValueError(f"target parameter {target!r} matches no parameter of the model")
        for name in matched:
            shape = tuple(model.get_parameter(name).shape)
            if len(shape) < 2:
                raise ValueError(
                    f"parameter {name!r} has shape {shape}: a Tucker delta needs at least 2 modes"
                )
        chosen += [name for name in matched if name not in chosen]
    return chosen


def _read_by_parent(model: nn.Module, name: str) -> bool:
    """Whether the module ``name`` is an ``nn.Linear`` that its parent reads by attribute (:data:`READ_BY_ATTRIBUTE`)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return isinstance(model.get_submodule(name), nn.Linear) and any(
        isinstance(parent, parent_type) and child == child_name
        for parent_type, child_name in READ_BY_ATTRIBUTE
    )


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
    adapter_params |= {id(p) for m in model.modules() if isinstance(m, TuckerDelta) for p in m.parameters()}
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
    target_parameters: Sequence[str] | None = None,
) -> nn.Module:
    """Put Tucker adapters on the target layers (and parameters) of ``model``; train only the adapters.

    Parameters
    ----------
    model : nn.Module
        Changed in place and returned.
    target_modules : str, sequence of str or None
        Layers to wrap in :class:`TuckerAdapter`. A sequence selects modules by exact name or
        dotted suffix (``["conv1", "layer1.0.conv2"]``); a string is a regular expression
        matched against the full module name (``r".*\\.conv\\d"``). Every entry must match at
        least one module. ``None`` when only ``target_parameters`` are adapted.
        An ``nn.Linear`` that its parent reads by attribute instead of calling it (the
        ``out_proj`` of ``nn.MultiheadAttention``, ``linear1``/``linear2`` of
        ``nn.TransformerEncoderLayer``; the table is :data:`READ_BY_ATTRIBUTE`) gets a
        :class:`ParameterAdapter` on its ``weight`` instead, as if ``"<name>.weight"`` were in
        ``target_parameters`` (its ranks still come from ``rank_pattern`` by the module name),
        so every path of the parent, fused kernels included, sees ``W + ΔW``.
    ranks : int or sequence of int
        Ranks of every adapter. An int is clipped to each mode's size (``8`` works on a
        depthwise 1×3×3 kernel); a sequence must fit every targeted weight.
    init, scale, dropout, path, dtype
        As for :class:`TuckerAdapter`. ``dropout`` and ``path`` apply to layer adapters only:
        ``path`` is ignored by parameter adapters, and ``dropout > 0`` with a target module
        that gets a parameter adapter is a ``ValueError``.
    rank_pattern : mapping of str to ranks, optional
        Per-target ranks: a key is a regex matched against the module (or parameter) name
        or a dotted suffix of it (as in PEFT); the first matching key wins.
    seed : int, optional
        Seed of the random inits; each target gets its own stream derived from the seed and
        its name. Without it, torch's global generator is used.
    target_parameters : sequence of str, optional
        Named parameters of any module and any number of modes (2 or more), by exact name or
        dotted suffix (``["attn.in_proj_weight"]``): each gets a :class:`ParameterAdapter`
        registered as a ``torch.nn.utils.parametrize`` parametrization, so the module
        sees ``W + ΔW`` wherever it uses the parameter.

    Returns
    -------
    nn.Module
        ``model``, with every base parameter frozen and only the adapters trainable.

    Raises
    ------
    ValueError
        A target that matches nothing or already has an adapter (a weight takes one, also
        across calls), an invalid regex, a parameter with fewer than 2 modes, a rank that
        does not fit a weight (naming the target, mode, rank and size), a bad option, or
        ``dropout > 0`` with a target module that gets a parameter adapter.
        The model is unchanged then.
    TypeError
        A target whose type cannot be adapted (naming the type and the supported ones), a
        target name that is not a string, or a ``model`` that is not an ``nn.Module``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from ndlowrank import nn as nlnn
    >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    >>> model = nlnn.add_adapters(model, ["0", "2"], ranks=(4, 3, 3, 3), seed=0)
    >>> sum(p.numel() for p in model.parameters() if p.requires_grad)
    437
    >>> attention = nn.MultiheadAttention(32, 4)
    >>> attention = nlnn.add_adapters(attention, None, ranks=8, target_parameters=["in_proj_weight"], seed=0)
    >>> [name for name, _ in nlnn.iter_adapters(attention)]
    ['in_proj_weight']
    >>> layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    >>> layer = nlnn.add_adapters(layer, ["linear1", "linear2", "out_proj"], ranks=4, seed=0)
    >>> [(name, type(adapter).__name__) for name, adapter in nlnn.iter_adapters(layer)]  # read by attribute
    [('self_attn.out_proj.weight', 'ParameterAdapter'), ('linear1.weight', 'ParameterAdapter'), ('linear2.weight', 'ParameterAdapter')]
    """
    check_model(model)
    if rank_pattern is not None:
        if not isinstance(rank_pattern, Mapping):
            raise TypeError(
                f"rank_pattern must be a mapping of regex to ranks, got {type(rank_pattern).__name__}"
            )
        for key in rank_pattern:
            if not isinstance(key, str):
                raise TypeError(f"rank_pattern keys must be regex strings, got {key!r}")
            _regex(rf"(.*\.)?({key})", f"rank_pattern key {key!r}")  # as _suffix_match uses it
    if target_modules is None and not target_parameters:
        raise ValueError(
            "name the layers to adapt with target_modules= or the parameters with target_parameters="
        )
    names = [] if target_modules is None else _targets(model, target_modules)
    parameter_names = [] if not target_parameters else _target_parameters(model, target_parameters)
    for name in parameter_names:
        owner_name = name.rpartition(".")[0]
        if owner_name in names:
            raise ValueError(
                f"parameter {name!r} belongs to the target module {owner_name!r}; adapt the module or the "
                "parameter, not both"
            )
    # a Linear that its parent reads by attribute gets a parameter adapter on its weight,
    # with the ranks (rank_pattern) of its module name
    routed = {f"{name}.weight": name for name in names if _read_by_parent(model, name)}
    if routed and dropout > 0:
        module_name = next(iter(routed.values()))
        raise ValueError(
            f"module {module_name!r} is read by its parent through its .weight, so it gets a parameter "
            f"adapter, which cannot apply dropout={dropout} to the adapter's input; pass dropout=0.0, "
            "or leave it out of target_modules"
        )
    names = [name for name in names if f"{name}.weight" not in routed]
    parameter_names = [*routed, *parameter_names]
    for name in names:
        try:
            _adapter_class(model.get_submodule(name))
        except TypeError as exc:
            raise TypeError(f"module {name!r}: {exc}") from None
    weights: list[torch.Tensor] = [model.get_submodule(n).weight for n in names]  # type: ignore[misc]
    weights += [model.get_parameter(n) for n in parameter_names]
    for name, weight in zip([*names, *parameter_names], weights, strict=True):
        try:  # every rank is checked before any principal init changes a weight
            validate_ranks(
                _ranks_for(routed.get(name, name), ranks, rank_pattern), tuple(weight.shape), clip=True
            )
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{name!r}: {exc}") from None
    snapshots = [w.detach().clone() for w in weights] if init == "principal" else []
    options: dict[str, Any] = {"init": init, "scale": scale, "dtype": dtype}
    built: list[tuple[str, DeltaHost]] = []
    try:
        for name in names:
            layer = model.get_submodule(name)
            adapter: DeltaHost = TuckerAdapter(
                layer,
                _ranks_for(name, ranks, rank_pattern),
                seed=layer_seed(seed, name),
                dropout=dropout,
                path=path,
                **options,
            )
            built.append((name, adapter))
        for name in parameter_names:
            parameter = model.get_parameter(name)
            parameter_ranks = _ranks_for(routed.get(name, name), ranks, rank_pattern)
            adapter = ParameterAdapter(parameter, parameter_ranks, seed=layer_seed(seed, name), **options)
            built.append((name, adapter))
    except (ValueError, TypeError) as exc:
        with torch.no_grad():  # undo the principal init's change of the base weights, bit for bit
            for weight, snapshot in zip(weights, snapshots, strict=False):
                weight.copy_(snapshot)
        raise type(exc)(f"{name!r}: {exc}") from None
    for name, adapter in built:
        if isinstance(adapter, TuckerAdapter):
            _set_submodule(model, name, adapter)
        else:
            owner_name, _, attribute = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            attach_parameter_adapter(owner, attribute, adapter)  # type: ignore[arg-type]
    mark_only_adapters_trainable(model)
    return model


T = TypeVar("T")
R = TypeVar("R")


def prepare_all(items: Iterable[tuple[str, T]], prepare: Callable[[T], R], *, verb: str) -> list[R]:
    """All or nothing: run ``prepare`` on every item before the caller changes any.

    ``prepare`` computes (or checks) what the change of one item needs without changing
    anything; the caller commits the results only once every item is prepared. The first
    failure is re-raised as the same exception type naming the item and saying that
    nothing was ``verb`` (``merge_adapters``, ``remove_adapters`` and
    ``truncate_adapters`` all work this way).
    """
    results = []
    for name, item in items:
        try:
            results.append(prepare(item))
        except (ValueError, TypeError, RuntimeError) as exc:
            raise type(exc)(f"{name!r}: {exc}; no adapter was {verb}") from None
    return results


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every adapter's ``ΔW`` into its weight; forward then runs at the base model's speed.

    Merging twice does not add twice. All or nothing: if any merged weight would hold NaN
    or Inf, a ``ValueError`` names the adapter and no weight changes. Returns ``model``.
    """
    adapters = list(iter_adapters(model))
    prepare_all(adapters, DeltaHost.check_mergeable, verb="merged")
    for _, adapter in adapters:
        adapter.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapters`. Returns ``model``.

    All or nothing: if any unmerged weight would hold NaN or Inf (a delta that diverged
    after the merge), a ``ValueError`` names the adapter and no weight changes.
    """
    adapters = list(iter_adapters(model))
    prepare_all(adapters, DeltaHost.check_unmergeable, verb="unmerged")
    for _, adapter in adapters:
        adapter.unmerge()
    return model


def remove_adapters(model: nn.Module, merge: bool = True) -> nn.Module:
    """Take every adapter out: a plain model with the original module types and ``state_dict`` keys.

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

    Raises
    ------
    ValueError
        If a weight would hold NaN or Inf after the removal (a delta that diverged), naming
        the adapter. All or nothing: every adapter is checked before any is removed, so the
        model is unchanged then.
    """
    check = DeltaHost.check_mergeable if merge else DeltaHost.check_restorable
    prepare_all(list(iter_adapters(model)), check, verb="removed")
    for name, module in list(model.named_modules()):
        if isinstance(module, TuckerAdapter):
            base = module.merged_base() if merge else module.restore_base()
            _set_submodule(model, name, base)
    for _, _, owner, attribute in list(_parameter_adapters(model)):
        detach_parameter_adapter(owner, attribute, merge=merge)
    return model
