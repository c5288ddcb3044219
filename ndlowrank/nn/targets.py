"""Choosing the modules to adapt: names, suffixes, a regex, module types, ``"all-linear"``, exclusions.

:func:`select_targets` is what :func:`~ndlowrank.nn.add_adapters` uses to turn its
``target_modules`` and ``exclude_modules`` into module names, with PEFT's rules where they
are sound (see the function's notes for where they differ).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .layers import TuckerAdapter
from .modules_to_save import TrainedCopy

__all__ = ["ALL_LINEAR", "OUTPUT_HEAD_NAMES", "select_targets"]

ALL_LINEAR = "all-linear"
"""The ``target_modules`` shorthand for every linear layer except the output head (as in PEFT)."""

OUTPUT_HEAD_NAMES = ("lm_head", "score", "classifier")
"""Top-level children that ``"all-linear"`` leaves out as the output head (besides ``get_output_embeddings()``)."""

_INTERNAL = ("base_layer", "parametrizations", "original_module", "trained_module")
"""Child names inside adapters, parametrizations and trained copies (``modules_to_save``)."""

Selector = str | type[nn.Module]
Targets = str | type[nn.Module] | Sequence[Selector]


def _is_internal(name: str) -> bool:
    """A module or parameter that belongs to an adapter or a parametrization, not to the user's model."""
    parts = name.split(".")
    return any(part in parts for part in _INTERNAL)


def _candidates(
    model: nn.Module, adapter_name: str | None = None, *, copies: bool = False
) -> dict[str, nn.Module]:
    """The user's own modules by name (not the model itself, nor anything inside an adapter).

    With ``adapter_name``, layer adapters that do not hold an adapter of that name are
    candidates too (they can take it beside theirs); with ``copies``, trained copies.
    """

    def eligible(module: nn.Module) -> bool:
        if isinstance(module, TuckerAdapter):
            return adapter_name is not None and adapter_name not in module.adapter_names
        return copies or not isinstance(module, TrainedCopy)

    return {
        name: module
        for name, module in model.named_modules()
        if name and eligible(module) and not _is_internal(name)
    }


def _is_linear(layer: nn.Module) -> bool:
    """An ``nn.Linear`` or transformers' ``Conv1D`` (a linear with its weight stored transposed), as in PEFT."""
    return isinstance(layer, nn.Linear) or _is_transformers_conv1d(layer)


def _is_transformers_conv1d(layer: nn.Module) -> bool:
    """Whether ``layer`` is a transformers ``Conv1D`` (GPT-2), without importing transformers."""
    return any(
        cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.") for cls in type(layer).__mro__
    )


def _output_heads(model: nn.Module, candidates: dict[str, nn.Module]) -> set[str]:
    """Names of the output head(s) that ``"all-linear"`` leaves out."""
    heads: list[nn.Module] = []
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if callable(get_output_embeddings):
        head = get_output_embeddings()
        if isinstance(head, nn.Module):
            heads.append(head)
    heads += [child for name, child in model.named_children() if name in OUTPUT_HEAD_NAMES]
    return {name for name, module in candidates.items() if any(module is head for head in heads)}


def _layer(module: nn.Module) -> nn.Module:
    """The layer a module is: an adapter's base layer, or the module itself."""
    return module.base_layer if isinstance(module, TuckerAdapter) else module


def _match(selector: Selector, name: str, module: nn.Module) -> bool:
    """A list entry selects a module by type, exact name or dotted suffix of its name."""
    if isinstance(selector, type):
        return isinstance(_layer(module), selector)
    return name == selector or name.endswith("." + selector)


def _check_entries(entries: Sequence[Selector], argument: str) -> None:
    for entry in entries:
        if not (isinstance(entry, str) or (isinstance(entry, type) and issubclass(entry, nn.Module))):
            raise TypeError(
                f"{argument} entries must be module names or nn.Module subclasses, got {entry!r} "
                f"({type(entry).__name__})"
            )


def _select(candidates: dict[str, nn.Module], selection: Targets, argument: str) -> list[str]:
    """Names that ``selection`` selects among ``candidates``; every entry must select something."""
    if isinstance(selection, str):
        try:
            compiled = re.compile(selection)
        except re.error as exc:
            raise ValueError(f"{argument}={selection!r} is not a valid regular expression ({exc})") from None
        matches = [name for name in candidates if compiled.fullmatch(name)]
        if not matches:
            raise ValueError(f"{argument}={selection!r} (a regex) matches no module of the model")
        return matches
    if isinstance(selection, type):
        selection = [selection]
    if not isinstance(selection, Sequence):
        raise TypeError(
            f"{argument} must be a regex string, a list of names or module types, or {ALL_LINEAR!r}; "
            f"got {type(selection).__name__}"
        )
    _check_entries(selection, argument)
    chosen: list[str] = []
    for entry in selection:
        matched = [name for name, module in candidates.items() if _match(entry, name, module)]
        if not matched:
            label = {"target_modules": "target", "exclude_modules": "excluded"}.get(argument, argument)
            what = f"module type {entry.__name__}" if isinstance(entry, type) else f"module {entry!r}"
            raise ValueError(f"{label} {what} matches no module of the model")
        chosen += [name for name in matched if name not in chosen]
    return chosen


def select_targets(
    model: nn.Module,
    target_modules: Targets,
    *,
    exclude_modules: Targets | None = None,
    adapter_name: str | None = None,
) -> list[str]:
    """Names of the modules of ``model`` that ``target_modules`` selects and ``exclude_modules`` does not.

    Parameters
    ----------
    model : nn.Module
    target_modules : str, sequence of str and module types, or a module type
        - ``"all-linear"``: every ``nn.Linear`` and transformers ``Conv1D`` except the
          output head: the module ``model.get_output_embeddings()``
          returns (transformers models) and top-level children named ``lm_head``, ``score``
          or ``classifier`` (:data:`OUTPUT_HEAD_NAMES`);
        - any other string: a regular expression matched against full module names;
        - a sequence: each entry an exact name, a dotted suffix (``"conv2"`` selects
          ``"layer1.0.conv2"``) or an ``nn.Module`` subclass (``nn.Conv2d`` selects every
          ``Conv2d`` and subclass). Every entry must select at least one module.
    exclude_modules : str, sequence of str and module types, or a module type, optional
        Modules taken out of the selection, written like ``target_modules`` (a string is a
        regex). Every entry must match a module of the model (a typo is an error, not a
        silent no-op).
    adapter_name : str, optional
        Also select layers that already hold adapters, but none of this name (as
        :func:`~ndlowrank.nn.add_adapters` does for a further named adapter).

    Returns
    -------
    list of str
        Module names in ``model.named_modules()`` order for a regex or ``"all-linear"``,
        in the order of the entries for a sequence. Modules inside adapters are never
        selected.

    Raises
    ------
    ValueError
        An entry that matches nothing, an empty ``target_modules``, or a selection that
        ``exclude_modules`` empties.
    TypeError
        An entry that is neither a string nor an ``nn.Module`` subclass.

    Notes
    -----
    PEFT leaves the output head out of ``"all-linear"`` only for a transformers
    ``PreTrainedModel`` (and its classifier only with ``task_type="SEQ_CLS"``); here the
    head is left out on any model that has one by those names, since adapting a fresh
    head is rarely intended (train it in full with ``modules_to_save``). PEFT ignores an
    ``exclude_modules`` entry that matches nothing; here it is an error.

    Examples
    --------
    >>> from torch import nn
    >>> from ndlowrank import nn as nlnn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(16), nn.Linear(16, 4))
    >>> nlnn.select_targets(model, [nn.Conv2d, nn.Linear], exclude_modules=["3"])
    ['0', '2']
    >>> model.classifier = nn.Linear(4, 2)
    >>> nlnn.select_targets(model, "all-linear")
    ['2', '3']
    """
    candidates = _candidates(model, adapter_name)
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        heads = _output_heads(model, candidates)
        chosen = [n for n, m in candidates.items() if _is_linear(_layer(m)) and n not in heads]
        if not chosen:
            raise ValueError(f"target_modules={ALL_LINEAR!r}: the model has no linear layer besides its head")
    else:
        if not isinstance(target_modules, (str, type)) and not target_modules:
            raise ValueError(
                "target_modules is empty; name the modules to adapt (exact names, suffixes, module types, "
                f"a regex or {ALL_LINEAR!r})"
            )
        chosen = _select(candidates, target_modules, "target_modules")
    if exclude_modules is None:
        return chosen
    excluded = set(_select(candidates, exclude_modules, "exclude_modules"))
    kept = [name for name in chosen if name not in excluded]
    if not kept:
        raise ValueError(
            f"exclude_modules={exclude_modules!r} excludes every module that target_modules selects"
        )
    return kept
