"""Model-level operations: add adapters by name, merge, unmerge and remove them."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from .._validation import validate_ranks
from ._host import DEFAULT_ADAPTER, DeltaHost, check_adapter_name
from ._iter import _parameter_adapters, check_model, iter_adapters, owner_of
from .delta import TuckerDelta, layer_seed
from .layers import TuckerAdapter, _adapter_class
from .modules_to_save import TrainedCopy, iter_trained_copies
from .parameters import ParameterAdapter, attach_parameter_adapter, detach_parameter_adapter
from .routing import (
    READ_BY_ATTRIBUTE as READ_BY_ATTRIBUTE,
)
from .routing import (
    Ranks,
    _ranks_for,
    _regex,
    _routed_parameters,
    _select_modules,
    _target_parameters,
    _without_parameter_adapters,
)
from .targets import Targets, _candidates, _select
from .ties import check_untied, parameter_uses, tied_users, untie

__all__ = [
    "add_adapters",
    "iter_adapters",
    "mark_only_adapters_trainable",
    "merge_adapters",
    "remove_adapters",
    "unmerge_adapters",
]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, child = owner_of(model, name)
    setattr(parent, child, module)


def runs_at_once(model: nn.Module, adapter_name: str) -> bool:
    """Whether a new adapter named ``adapter_name`` runs when added: on a model without adapters, or if that name runs."""
    hosts = [host for _, host in iter_adapters(model)]
    return not hosts or any(adapter_name in host.active_adapters for host in hosts)


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """Freeze every parameter of ``model`` except the adapters' cores and factors and the trained copies (``modules_to_save``).

    The factors a delta holds at the identity (:meth:`TuckerDelta.fix_square_modes`) stay frozen.

    Of several named adapters, only those that run stay trainable (as in PEFT; see
    :func:`~ndlowrank.nn.set_active_adapter`). Standalone ``TuckerDelta`` modules are trainable.
    """
    hosts = [host for _, host in iter_adapters(model)]
    owned = {id(host.delta_of(name)) for host in hosts for name in host.adapter_names}
    adapter_params = {
        id(p) for h in hosts for name in h.active_adapters for p in h.delta_of(name).trainable_parameters()
    }
    adapter_params |= {
        id(p)
        for m in model.modules()
        if isinstance(m, TuckerDelta) and id(m) not in owned
        for p in m.trainable_parameters()
    }
    adapter_params |= {
        id(p) for _, wrapper in iter_trained_copies(model) for p in wrapper.trained_module.parameters()
    }
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in adapter_params)


def add_adapters(
    model: nn.Module,
    target_modules: Targets | None,
    ranks: Ranks,
    *,
    exclude_modules: Targets | None = None,
    init: str = "zero_core",
    scale: float = 1.0,
    dropout: float = 0.0,
    rank_pattern: Mapping[str, Ranks] | None = None,
    path: str = "auto",
    dtype: torch.dtype | None = None,
    seed: int | None = None,
    target_parameters: Sequence[str] | None = None,
    modules_to_save: Targets | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
) -> nn.Module:
    """Put Tucker adapters on the target layers (and parameters) of ``model``; train only the adapters.

    Parameters
    ----------
    model : nn.Module
        Changed in place and returned.
    target_modules : str, sequence of str and module types, or None
        Layers to wrap in :class:`TuckerAdapter`. A sequence selects modules by exact name,
        dotted suffix (``["conv1", "layer1.0.conv2"]``) or type (``[nn.Conv2d]``); a string
        is a regular expression matched against the full module name (``r".*\\.conv\\d"``),
        or ``"all-linear"``: every linear layer except the output head. Every entry must
        match at least one module (see :func:`select_targets`). ``None`` when only
        ``target_parameters`` are adapted.
        An ``nn.Linear`` that its parent reads by attribute instead of calling it (the
        ``out_proj`` of ``nn.MultiheadAttention``, ``linear1``/``linear2`` of
        ``nn.TransformerEncoderLayer``; the table is :data:`READ_BY_ATTRIBUTE`), and any
        layer whose weight its parent's ``forward`` passes on as ``self.<child>.weight``
        (timm's ``F.linear(x, self.qkv.weight, ...)``), gets a :class:`ParameterAdapter` on
        its ``weight`` instead, as if ``"<name>.weight"`` were in ``target_parameters``, so
        every path of the parent, fused kernels included, sees ``W + ΔW``. An
        ``nn.MultiheadAttention`` target gets parameter adapters on its projection weights
        (``in_proj_weight``, or ``q/k/v_proj_weight``, and ``out_proj.weight``). The ranks of
        such a parameter come from a ``rank_pattern`` key that matches its name, else from
        one that matches the module's name. transformers' ``Conv1D`` (GPT-2)
        gets a :class:`TransposedLinearAdapter`. A weight tied to another module (GPT-2's
        ``lm_head`` and ``wte``) is adapted for its target only, with a warning; see
        :mod:`ndlowrank.nn.ties`.
    ranks : int or sequence of int
        Ranks of every adapter. An int is clipped to each mode's size (``8`` works on a
        depthwise 1×3×3 kernel); a sequence must fit every targeted weight.
    exclude_modules : str, sequence of str and module types, optional
        Modules taken out of ``target_modules``' selection, written the same way (a string
        is a regex); as PEFT's ``exclude_modules``.
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
    modules_to_save : str, sequence of str and module types, optional
        Modules trained in full beside the adapters (a new classification head, norms),
        selected like ``target_modules``: each is replaced by a
        :class:`~ndlowrank.nn.TrainedCopy` that keeps the original and runs a trainable copy,
        which :func:`save_adapters` writes into the adapter file and :func:`load_adapters`
        restores. A module cannot be both adapted and trained in full.
    adapter_name : str, default "default"
        Name of the adapter (several named adapters can share a model, as in PEFT). On a
        model without adapters it is the active one. On a model with adapters, targets that
        already hold other adapters get this one beside them, inactive unless that name
        already runs: choose what runs with :func:`set_active_adapter` (see
        :mod:`ndlowrank.nn.named`).

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
        ``dropout > 0`` with a target module that gets a parameter adapter, or
        ``init="principal"`` on a tied weight. The model is unchanged then.
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
    401
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
    if target_modules is None and exclude_modules is not None:
        raise ValueError("exclude_modules narrows target_modules; pass target_modules too")
    check_adapter_name(adapter_name)
    chosen = _resolve(
        model, target_modules, exclude_modules, target_parameters, modules_to_save, dropout, adapter_name
    )
    _check_fits(model, chosen, ranks, rank_pattern, init, adapter_name)
    options: dict[str, Any] = {"init": init, "scale": scale, "dtype": dtype}
    built = _build(model, chosen, ranks, rank_pattern, options, seed, dropout, path, adapter_name)
    _commit(model, chosen, built, ranks, rank_pattern, options, seed, adapter_name)
    _warn_tied(model, chosen.targets())
    return model


@dataclass
class _Chosen:
    """What :func:`add_adapters` adapts, before it changes anything."""

    hosts: dict[str, DeltaHost]  # adapters that may take the named adapter beside theirs
    runs: bool  # whether the new adapter runs once added
    names: list[str]  # layers that get a layer adapter
    parameter_names: list[str]  # parameters that get a parameter adapter (routed ones first)
    routed: dict[str, str]  # parameter routed from a target module: that module's name
    saved: list[str]  # modules trained in full
    weights: list[torch.Tensor]  # of ``names`` then ``parameter_names``

    def all_names(self) -> list[str]:
        return [*self.names, *self.parameter_names]

    def targets(self) -> list[tuple[str, torch.Tensor, bool]]:
        """``(name, weight, whether it is a parameter)`` per target."""
        kinds = [False] * len(self.names) + [True] * len(self.parameter_names)
        return list(zip(self.all_names(), self.weights, kinds, strict=True))

    def ranks_of(self, name: str, ranks: Ranks, rank_pattern: Mapping[str, Ranks] | None) -> Ranks:
        """A rank_pattern key for a parameter itself wins over one for the module it is routed from."""
        return _ranks_for(name, _ranks_for(self.routed.get(name, name), ranks, rank_pattern), rank_pattern)


def _resolve(
    model: nn.Module,
    target_modules: Targets | None,
    exclude_modules: Targets | None,
    target_parameters: Sequence[str] | None,
    modules_to_save: Targets | None,
    dropout: float,
    adapter_name: str,
) -> _Chosen:
    """The layers, parameters and modules trained in full that :func:`add_adapters` adapts."""
    # adapters that may take this named adapter beside theirs
    hosts = {n: h for n, h in iter_adapters(model) if adapter_name not in h.adapter_names}
    runs = runs_at_once(model, adapter_name)
    names = (
        []
        if target_modules is None
        else _select_modules(model, target_modules, exclude_modules, adapter_name)
    )
    _without_parameter_adapters(model, [name for name in names if name not in hosts])
    parameter_names = (
        [] if not target_parameters else _target_parameters(model, target_parameters, hosts, adapter_name)
    )
    for name in parameter_names:
        owner_name = name.rpartition(".")[0]
        if owner_name in names:
            raise ValueError(
                f"parameter {name!r} belongs to the target module {owner_name!r}; adapt the module or the "
                "parameter, not both"
            )
    # a layer that its parent reads by attribute gets a parameter adapter on its weight, an
    # attention block parameter adapters on its projections, with the ranks (rank_pattern)
    # of the module's name
    routed = {p: name for name in names if name not in hosts for p in _routed_parameters(model, name)}
    if routed and dropout > 0:
        module_name = next(iter(routed.values()))
        raise ValueError(
            f"module {module_name!r} is read by its parent through its .weight (or is an attention block "
            f"adapted through its projection weights), so it gets parameter adapters, which cannot apply "
            f"dropout={dropout} to the adapter's input; pass dropout=0.0, or leave it out of target_modules"
        )
    names = [name for name in names if name not in routed.values() and f"{name}.weight" not in routed]
    parameter_names = [*routed, *(p for p in parameter_names if p not in routed)]
    # modules trained in full already (for another named adapter) are shared, not wrapped again
    saved = (
        []
        if modules_to_save is None
        else _select(_candidates(model, copies=True), modules_to_save, "modules_to_save")
    )
    _check_saved(saved, [*names, *parameter_names])
    for name in names:
        try:
            if name not in hosts:
                _adapter_class(model.get_submodule(name))
        except TypeError as exc:
            raise TypeError(f"module {name!r}: {exc}") from None
    weights: list[torch.Tensor] = [model.get_submodule(n).weight for n in names]  # type: ignore[misc]
    weights += [hosts[n].weight if n in hosts else model.get_parameter(n) for n in parameter_names]
    return _Chosen(hosts, runs, names, parameter_names, routed, saved, weights)


def _check_fits(
    model: nn.Module,
    chosen: _Chosen,
    ranks: Ranks,
    rank_pattern: Mapping[str, Ranks] | None,
    init: str,
    adapter_name: str,
) -> None:
    """Every target can take the adapter: a free name on existing adapters, valid ranks, untied for ``"principal"``."""
    hosts = chosen.hosts
    for name in chosen.all_names():
        if name in hosts:
            try:
                hosts[name].check_can_add(adapter_name, init)
                if chosen.runs:
                    hosts[name].check_active(
                        [*hosts[name].active_adapters, adapter_name], adding=adapter_name
                    )
            except ValueError as exc:
                raise ValueError(f"{name!r}: {exc}") from None
    for name, weight in zip(chosen.all_names(), chosen.weights, strict=True):
        try:  # every rank is checked before any principal init changes a weight
            validate_ranks(chosen.ranks_of(name, ranks, rank_pattern), tuple(weight.shape), clip=True)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{name!r}: {exc}") from None
    if init == "principal":
        check_untied(
            model,
            chosen.targets(),
            "the principal init (which replaces the weight by its residual)",
            "use another init, or untie the weights first",
        )


def _build(
    model: nn.Module,
    chosen: _Chosen,
    ranks: Ranks,
    rank_pattern: Mapping[str, Ranks] | None,
    options: dict[str, Any],
    seed: int | None,
    dropout: float,
    path: str,
    adapter_name: str,
) -> list[tuple[str, DeltaHost]]:
    """The new adapters, not yet in ``model``; a failure restores the weights a principal init changed."""
    snapshots = [w.detach().clone() for w in chosen.weights] if options["init"] == "principal" else []
    built: list[tuple[str, DeltaHost]] = []
    try:
        for name in [n for n in chosen.names if n not in chosen.hosts]:
            layer = model.get_submodule(name)
            adapter: DeltaHost = TuckerAdapter(
                layer,
                chosen.ranks_of(name, ranks, rank_pattern),
                seed=layer_seed(seed, name),
                dropout=dropout,
                path=path,
                adapter_name=adapter_name,
                **options,
            )
            built.append((name, adapter))
        for name in [n for n in chosen.parameter_names if n not in chosen.hosts]:
            parameter = model.get_parameter(name)
            adapter = ParameterAdapter(
                parameter,
                chosen.ranks_of(name, ranks, rank_pattern),
                seed=layer_seed(seed, name),
                adapter_name=adapter_name,
                **options,
            )
            built.append((name, adapter))
    except (ValueError, TypeError) as exc:
        with torch.no_grad():  # undo the principal init's change of the base weights, bit for bit
            for weight, snapshot in zip(chosen.weights, snapshots, strict=False):
                weight.copy_(snapshot)
        raise type(exc)(f"{name!r}: {exc}") from None
    return built


def _commit(
    model: nn.Module,
    chosen: _Chosen,
    built: list[tuple[str, DeltaHost]],
    ranks: Ranks,
    rank_pattern: Mapping[str, Ranks] | None,
    options: dict[str, Any],
    seed: int | None,
    adapter_name: str,
) -> None:
    """Put the adapters in ``model``, wrap the modules trained in full and train only those."""
    hosts = chosen.hosts
    for name in [n for n in chosen.all_names() if n in hosts]:
        ranks_here = chosen.ranks_of(name, ranks, rank_pattern)
        hosts[name].add_adapter(adapter_name, ranks_here, seed=layer_seed(seed, name), **options)
        if chosen.runs:
            hosts[name].set_active([*hosts[name].active_adapters, adapter_name])
    for name, adapter in built:
        if not chosen.runs:
            adapter.set_active(None)
        if isinstance(adapter, TuckerAdapter):
            _set_submodule(model, name, adapter)
        else:
            attach_parameter_adapter(*owner_of(model, name), adapter)  # type: ignore[arg-type]
    for name in chosen.saved:
        if not isinstance(model.get_submodule(name), TrainedCopy):
            _set_submodule(model, name, TrainedCopy(model.get_submodule(name)))
    mark_only_adapters_trainable(model)


def _warn_tied(model: nn.Module, targets: list[tuple[str, torch.Tensor, bool]]) -> None:
    """Warn, from :func:`add_adapters`' caller, about each target whose weight is shared."""
    uses = parameter_uses(model)
    for name, weight, is_parameter in targets:
        users = tied_users(model, weight, name, parameter=is_parameter, uses=uses)
        if users:
            warnings.warn(
                f"{name!r}: its weight is tied to {users}; the adapter changes only {name!r}'s use of it, "
                "merge_adapters refuses to write into the shared weight, and remove_adapters(merge=True) "
                "gives the module a weight of its own",
                stacklevel=3,
            )


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


def _check_saved(saved: list[str], adapted: list[str]) -> None:
    """Modules trained in full may not hold, be or sit inside an adapter, nor each other."""
    for name in saved:
        inside = [other for other in [*adapted, *saved] if other != name and other.startswith(f"{name}.")]
        clash = [other for other in adapted if other == name or name.startswith(f"{other}.")]
        if inside or clash:
            raise ValueError(
                f"modules_to_save selects {name!r}, which overlaps {(inside or clash)[0]!r}; a module is "
                "either adapted or trained in full, once"
            )


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every adapter's ``ΔW`` into its weight; forward then runs at the base model's speed.

    Merging twice does not add twice. All or nothing: if any merged weight would hold NaN
    or Inf, or is tied to another module (whose output merging would change; see
    :mod:`ndlowrank.nn.ties`), a ``ValueError`` names the adapter and no weight changes.
    Returns ``model``.
    """
    adapters = list(iter_adapters(model))
    check_untied(
        model,
        [
            (name, adapter.weight, isinstance(adapter, ParameterAdapter))
            for name, adapter in adapters
            if not adapter.merged
        ],
        "merging into it",
        "keep the adapter unmerged, or call remove_adapters(model, merge=True), which gives the module a "
        "merged weight of its own; no adapter was merged",
    )
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


def remove_adapters(
    model: nn.Module, merge: bool = True, *, adapter_names: Sequence[str] | None = None
) -> nn.Module:
    """Take every adapter out: a plain model with the original module types and ``state_dict`` keys.

    Parameters
    ----------
    model : nn.Module
    merge : bool, default True
        Keep the fine-tuned weights (``W + ΔW``, and the trained copies of
        ``modules_to_save``). With ``False`` the original weights and modules come back
        (undoing a merge and a principal init). A weight tied to another module (GPT-2's
        ``lm_head`` and ``wte``) is untied by merging: the adapted module gets a parameter
        of its own, the other keeps the original (see :mod:`ndlowrank.nn.ties`).
    adapter_names : sequence of str, optional
        With ``merge``, the named adapters whose deltas are merged, summed where a layer
        holds several (PEFT's ``merge_and_unload(adapter_names=...)``); the active ones by
        default. Every name must be an adapter of ``model``.

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
    if adapter_names is not None:
        if not merge:
            raise ValueError("adapter_names chooses the adapters to merge; pass merge=True, or leave it out")
        known = {name for _, adapter in iter_adapters(model) for name in adapter.adapter_names}
        unknown = [name for name in adapter_names if name not in known]
        if unknown:
            raise ValueError(
                f"adapter_names {unknown} are not adapters of the model; its adapters: {sorted(known)}"
            )
    prepare_all(
        list(iter_adapters(model)), lambda host: host.check_removable(merge, adapter_names), verb="removed"
    )
    if merge:  # a tied weight is copied first, so that merging changes no other module
        uses = parameter_uses(model)  # untying only removes uses: at worst an extra copy
        for name, adapter in list(iter_adapters(model)):
            untie(model, name, adapter, uses=uses)
    for name, module in list(model.named_modules()):
        if isinstance(module, TuckerAdapter):
            base = module.merged_base(adapter_names) if merge else module.restore_base()
            _set_submodule(model, name, base)
    for _, _, owner, attribute in list(_parameter_adapters(model)):
        detach_parameter_adapter(owner, attribute, merge=merge, names=adapter_names)
    for name, wrapper in list(iter_trained_copies(model)):
        _set_submodule(model, name, wrapper.trained_module if merge else wrapper.original_module)
    return model
