"""Tucker deltas on named parameters of any module, through ``torch.nn.utils.parametrize``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._host import DEFAULT_ADAPTER, DeltaHost

__all__ = [
    "ParameterAdapter",
    "attach_parameter_adapter",
    "detach_parameter_adapter",
    "remove_parameter_adapter",
]


class ParameterAdapter(DeltaHost):
    """A Tucker delta on one parameter of any module, applied as a parametrization: ``W ↦ W + ΔW``.

    For N-D parameters that are not a Linear/Conv/Embedding weight: an attention block's
    ``in_proj_weight``, a stacked expert weight ``(experts, out, in)``, a 5-D kernel used
    through ``F.conv3d`` in custom code. Registered by :func:`ndlowrank.nn.add_adapters` with
    ``target_parameters=``; merges, unmerges, saves and loads like a layer adapter.

    Parameters
    ----------
    parameter : nn.Parameter
        The parameter (2-D to any number of modes) the delta changes.
    ranks, init, scale, dtype, seed, adapter_name
        As for :class:`~ndlowrank.nn.TuckerAdapter`.
    """

    kind = "parameter"

    def __init__(
        self,
        parameter: nn.Parameter,
        ranks: int | Sequence[int],
        *,
        init: str = "zero_core",
        scale: float = 1.0,
        dtype: torch.dtype | None = None,
        seed: int | None = None,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        super().__init__()
        if not isinstance(parameter, torch.Tensor) or parameter.ndim < 2:
            shape = tuple(getattr(parameter, "shape", ()))
            raise ValueError(f"a Tucker delta needs a parameter with at least 2 modes, got shape {shape}")
        # a plain reference, not a registered parameter: the parametrization owns it
        self.__dict__["_weight"] = parameter
        self.parameter_order: list[str] = []
        self._init_delta(ranks, init=init, scale=scale, dtype=dtype, seed=seed, adapter_name=adapter_name)

    @property
    def weight(self) -> torch.Tensor:
        """The original (unparametrized) parameter.

        Once attached, the one its parametrization holds now: a wrapper that replaces the
        module's parameters (FSDP2's ``fully_shard`` swaps in sharded ones) replaces it there.
        """
        holder = self.__dict__.get("_holder")
        return holder.original if holder is not None else self.__dict__["_weight"]

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        """``original + ΔW`` (just ``original`` once merged, or while disabled)."""
        if self.merged or self.disabled or self.active_adapter is None:
            return original
        return original + self.total_delta_weight()

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}, init={self.init!r}, scale={self.scale}, merged={self.merged}"


def attach_parameter_adapter(module: nn.Module, name: str, adapter: ParameterAdapter) -> None:
    """Register ``adapter`` as the parametrization of ``module.<name>``."""
    # the module's order before its first parametrization, to put every parameter back in place
    if "_parameter_order" not in module.__dict__:
        module.__dict__["_parameter_order"] = list(module._parameters)
    adapter.parameter_order = module.__dict__["_parameter_order"]
    adapter.train(module.training)
    parametrize.register_parametrization(module, name, adapter)
    parametrizations: Any = module.parametrizations
    # the parametrization must keep the very parameter the adapter refers to
    assert parametrizations[name].original is adapter.weight
    adapter.__dict__["_holder"] = parametrizations[name]


def detach_parameter_adapter(
    module: nn.Module, name: str, *, merge: bool, names: Sequence[str] | None = None
) -> None:
    """Remove the parametrization of ``module.<name>``, leaving ``W + ΔW`` (``merge``; of the adapters ``names``) or ``W``."""
    parametrizations: Any = module.parametrizations
    adapter = next(p for p in parametrizations[name] if isinstance(p, ParameterAdapter))
    if merge:
        adapter.merge_for_good(names)
    else:
        adapter.restore_weight()
    remove_parameter_adapter(module, name)


def remove_parameter_adapter(module: nn.Module, name: str) -> None:
    """Undo :func:`attach_parameter_adapter` without changing the weight.

    The parameter object is the same as before, in the same place among the module's
    parameters (so ``state_dict`` keys keep their order). A no-op if not parametrized.
    """
    if not parametrize.is_parametrized(module, name):
        return
    parametrizations: Any = module.parametrizations
    adapter = next(p for p in parametrizations[name] if isinstance(p, ParameterAdapter))
    _own_parametrized_class(module)
    adapter.__dict__["_weight"] = adapter.__dict__.pop("_holder").original
    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    parameters = module._parameters
    reordered = {key: parameters[key] for key in adapter.parameter_order if key in parameters}
    reordered.update(parameters)
    parameters.clear()
    parameters.update(reordered)
    if not parametrize.is_parametrized(module):
        module.__dict__.pop("_parameter_order", None)


def _own_parametrized_class(module: nn.Module) -> None:
    """Give ``module`` a private copy of its parametrized class before a parametrization is removed.

    ``copy.deepcopy`` of a parametrized module shares torch's dynamically created class
    with the original, and ``remove_parametrizations`` deletes the property from that class,
    which would break every copy. A private class keeps the copies independent.
    """
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)
