"""``DeltaHost``: what every holder of a Tucker delta on a weight does, whatever the weight belongs to.

A host owns a :class:`~ndlowrank.nn.TuckerDelta` and knows the weight it changes (its
:attr:`weight` property). It builds the delta with any init (including ``"principal"``,
which subtracts the start from the weight), merges and unmerges it, gives the weight back
(restored or merged for good) and describes itself for saving. Layer adapters
(:class:`~ndlowrank.nn.TuckerAdapter`) and parameter adapters
(:class:`~ndlowrank.nn.ParameterAdapter`) are hosts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from .._validation import check_scale, validate_ranks
from ..decompose import sthosvd
from ..init import KNOWN_INITS
from ..tucker import TuckerTensor
from .delta import TuckerDelta

__all__ = ["DEFAULT_ADAPTER", "DeltaHost", "check_adapter_name"]

DEFAULT_ADAPTER = "default"
"""The name of an adapter added without one (as in PEFT)."""

LOW_PRECISION = (torch.float16, torch.bfloat16)


class DeltaHost(nn.Module):
    """Base class of the modules that hold a Tucker delta on a weight (see the module docstring)."""

    kind: ClassVar[str] = ""

    @property
    def weight(self) -> torch.Tensor:
        """The weight the delta changes (merged or not)."""
        raise NotImplementedError

    # -- named adapters ---------------------------------------------------------------
    # The first adapter's delta is the submodule ``delta`` (so a host with one adapter has the
    # same parameters and state_dict keys whatever its name); further ones are in the
    # ModuleDict ``named_deltas``. ``self.delta`` reads the active adapter's delta.

    def __getattr__(self, name: str) -> Any:
        if name == "delta":
            state = self.__dict__
            active, modules = state.get("_active"), state.get("_modules", {})
            if active is not None and active != state.get("_first_name"):
                return modules["named_deltas"][active]
            if "delta" in modules:
                return modules["delta"]
        return super().__getattr__(name)

    def _point_at(self, active: str | None, also: tuple[str, ...] = ()) -> None:
        """Record which adapters run (no unmerging: bookkeeping only) and keep ``delta`` at hand.

        The active delta is also put in the instance ``__dict__``, where attribute lookup
        finds it without ``__getattr__`` (forward reads it several times per call);
        ``nn.Module.__setattr__`` drops that entry if ``delta`` is ever assigned, and
        ``__getattr__`` then answers.
        """
        state = self.__dict__
        state["_active"], state["_also_active"] = active, also
        state.pop("delta", None)
        state["delta"] = self.__getattr__("delta")

    @contextmanager
    def _pointing_at(self, name: str) -> Iterator[None]:
        """Inside the block, ``delta`` (and what reads it) is the adapter ``name``'s; then as before."""
        before = self.active_adapter, self.__dict__["_also_active"]
        self._point_at(name)
        try:
            yield
        finally:
            self._point_at(*before)

    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this host holds, the first one first."""
        named: Any = self._modules.get("named_deltas")
        return [self.__dict__["_first_name"], *(named.keys() if named is not None else ())]

    @property
    def active_adapter(self) -> str | None:
        """The (first) adapter that runs, whose delta ``delta`` is (``None``: none runs)."""
        return self.__dict__["_active"]

    @property
    def active_adapters(self) -> tuple[str, ...]:
        """Every adapter that runs; their deltas are summed."""
        first = self.__dict__["_active"]
        return () if first is None else (first, *self.__dict__["_also_active"])

    def delta_of(self, name: str) -> TuckerDelta:
        """The delta of the adapter ``name``."""
        if name == self.__dict__["_first_name"]:
            return self._modules["delta"]  # type: ignore[return-value]
        named: Any = self._modules.get("named_deltas")
        if named is None or name not in named:
            raise ValueError(f"no adapter named {name!r} here; adapters: {self.adapter_names}")
        return named[name]

    @property
    def init(self) -> str:
        """The init of the active adapter (of the first one when none is active)."""
        return self._inits[self.active_adapter or self.__dict__["_first_name"]]

    @init.setter
    def init(self, value: str) -> None:
        self._inits[self.active_adapter or self.__dict__["_first_name"]] = value

    def _check_switchable(self, action: str) -> None:
        if hasattr(self, "principal_core"):
            raise ValueError(
                f"cannot {action}: a 'principal' adapter changed the base weight, so it is the layer's only adapter"
            )
        if self.disabled:
            raise ValueError(f"cannot {action} while the adapters are disabled; enable them first")

    def add_adapter(
        self,
        name: str,
        ranks: int | Sequence[int],
        *,
        init: str = "zero_core",
        scale: float = 1.0,
        dtype: torch.dtype | None = None,
        seed: int | None = None,
    ) -> None:
        """Add another adapter (a new delta on the same weight), inactive; see :meth:`set_active`.

        Raises
        ------
        ValueError
            A name in use or not valid, ``init="principal"`` or a host with a principal
            adapter (a principal init changes the base weight, so it must be alone), a
            disabled host, or ranks that do not fit. Nothing is changed then.
        """
        self.check_can_add(name, init)
        delta = self._new_delta(ranks, init=init, scale=scale, dtype=dtype, seed=seed)
        if "named_deltas" not in self._modules:
            self.named_deltas = nn.ModuleDict()
        self.named_deltas[name] = delta
        self._inits[name] = init
        with self._pointing_at(name):
            self._after_init()

    def check_can_add(self, name: str, init: str) -> None:
        """Raise ``ValueError`` if :meth:`add_adapter` would refuse ``name`` with ``init`` (ranks aside)."""
        check_adapter_name(name)
        if name in self.adapter_names:
            raise ValueError(f"an adapter named {name!r} is already here; adapters: {self.adapter_names}")
        if init == "principal":
            raise ValueError(
                "init='principal' changes the base weight, so it cannot be a layer's second adapter"
            )
        self._check_switchable(f"add adapter {name!r}")

    def check_active(self, names: str | Sequence[str] | None, *, adding: str | None = None) -> list[str]:
        """The names :meth:`set_active` would make active, as a list; ``ValueError`` if it would refuse.

        ``adding``: a name about to be added, counted as known.
        """
        chosen = [] if names is None else [names] if isinstance(names, str) else list(names)
        unknown = [name for name in chosen if name not in self.adapter_names and name != adding]
        if unknown:
            raise ValueError(f"no adapter named {unknown[0]!r} here; adapters: {self.adapter_names}")
        if len(chosen) > 1 and getattr(self, "dropout_p", 0.0) > 0:
            raise ValueError(
                f"several adapters run as one summed weight, which cannot apply dropout={self.dropout_p} to "
                "the adapter branch; build the adapters with dropout=0.0"
            )
        return chosen

    def set_active(self, names: str | Sequence[str] | None) -> None:
        """Make ``names`` the adapters that run (``None``: none); a merged host is unmerged first.

        With several names, their deltas are summed (``W + ΔW₁ + ΔW₂ …``) and the layer runs
        with that weight, which needs ``dropout=0``.
        """
        chosen = self.check_active(names)
        if tuple(chosen) == self.active_adapters:
            return
        self.unmerge()
        self._point_at(chosen[0] if chosen else None, tuple(chosen[1:]))

    def delete_adapter(self, name: str) -> None:
        """Remove the adapter ``name`` (unmerged first if it is merged); not the host's only one."""
        names = self.adapter_names
        if name not in names:
            raise ValueError(f"no adapter named {name!r} here; adapters: {names}")
        if len(names) == 1:
            raise ValueError(f"{name!r} is the only adapter here; remove the adapter module instead")
        if name in self.active_adapters:
            self.unmerge()
            self.set_active([n for n in self.active_adapters if n != name])
        named: Any = self._modules["named_deltas"]
        if name == self.__dict__["_first_name"]:  # the next one takes the first one's place
            successor = names[1]
            self._modules["delta"] = named[successor]
            self.__dict__["_first_name"] = successor
            del named[successor]
            self._point_at(self.active_adapter, self.__dict__["_also_active"])
        else:
            del named[name]
        if not len(named):
            del self._modules["named_deltas"]
        del self._inits[name]

    def _after_init(self) -> None:
        """Layer-specific adjustments of a fresh delta (e.g. an embedding's padding row)."""

    def _hold_square_factors(self) -> None:
        """Hold the factors this kind of layer keeps at the identity, by the active adapter's init (a conv's spatial ones)."""

    def _new_delta(
        self,
        ranks: int | Sequence[int],
        *,
        init: str,
        scale: float,
        dtype: torch.dtype | None,
        seed: int | None,
    ) -> TuckerDelta:
        """A delta for ``self.weight`` (not the principal init); ints in ``ranks`` are clipped."""
        if init not in KNOWN_INITS:
            raise ValueError(f"unknown init={init!r}; known inits: {sorted(KNOWN_INITS)}")
        check_scale(scale, principal=init == "principal")
        weight = self.weight
        if init == "principal" and weight.is_meta:
            raise ValueError(
                "init='principal' decomposes the weight, which is on the meta device and holds no values; "
                "materialise the model first, or use another init"
            )
        shape = tuple(weight.shape)
        ranks = validate_ranks(ranks, shape, clip=True)
        param_dtype = dtype or (torch.float64 if weight.dtype == torch.float64 else torch.float32)
        if init == "principal":
            return TuckerDelta(shape, ranks, scale=scale, dtype=param_dtype, device=weight.device, seed=0)
        return TuckerDelta(
            shape, ranks, init=init, scale=scale, dtype=param_dtype, device=weight.device, seed=seed
        )

    def _init_delta(
        self,
        ranks: int | Sequence[int],
        *,
        init: str,
        scale: float,
        dtype: torch.dtype | None,
        seed: int | None,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        """Create ``self.delta`` for ``self.weight``; ints in ``ranks`` are clipped to each mode's size."""
        check_adapter_name(adapter_name)
        self.__dict__["_first_name"] = self.__dict__["_active"] = adapter_name
        self.__dict__["_also_active"] = ()
        self._inits = {adapter_name: init}
        self.delta = self._new_delta(ranks, init=init, scale=scale, dtype=dtype, seed=seed)
        self._point_at(adapter_name)
        self.merged = False
        self.disabled = False
        self._original_weight: torch.Tensor | None = None
        self._enabled_weight: torch.Tensor | None = None  # the weight to put back when enabled again
        self._merge_on_enable = False
        if init == "principal":
            core, factors = sthosvd(self.weight.detach().to(self.delta.core.dtype), self.delta.ranks)
            self._set_principal(core, self._principal_factors(list(factors)))

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.delta.ranks

    @property
    def scale(self) -> float:
        """Multiplier of the delta; setting it calls :meth:`set_scale` (exact when merged)."""
        return self.delta.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.set_scale(value)

    @torch.no_grad()
    def set_scale(self, scale: float) -> None:
        """Change the multiplier of the active adapters' deltas; the weight stays right when merged or disabled.

        With several active adapters, each gets ``scale``; with none, the first adapter does.

        A merged adapter is unmerged, rescaled and merged again, so the merged weight holds
        ``W + ΔW`` at the new scale and a later :meth:`unmerge` gives ``W`` back (bit for bit
        in float16/bfloat16, to rounding otherwise, as for any merge).

        Raises
        ------
        ValueError
            If ``scale`` is not a finite number, or if merging at the new scale would put
            NaN or Inf into the weight; nothing is changed then.
        """
        try:
            scale = check_scale(scale)
        except TypeError as exc:  # set_scale has always raised ValueError
            raise ValueError(f"scale={scale!r} must be a finite number ({exc})") from None
        self._set_scales([float(scale)] * len(self._scaled_deltas()))

    def _scaled_deltas(self) -> list[TuckerDelta]:
        """The deltas :meth:`set_scale` changes: the active adapters' (the first adapter's when none runs)."""
        return [self.delta_of(name) for name in self.active_adapters] or [self.delta]

    @torch.no_grad()
    def _set_scales(self, scales: Sequence[float]) -> None:
        """:meth:`set_scale` with one (already checked) scale per delta of :meth:`_scaled_deltas`, in order.

        For putting back scales that differ, which :meth:`set_scale` cannot do.
        """
        deltas = self._scaled_deltas()
        old = [delta.scale for delta in deltas]
        merged = self.merged
        if merged:
            self.unmerge()
        for delta, value in zip(deltas, scales, strict=True):
            delta.scale = value
        try:
            if merged:
                self.merge()
        except ValueError:
            for delta, value in zip(deltas, old, strict=True):
                delta.scale = value
            self.merge()
            raise

    @torch.no_grad()
    def disable(self) -> None:
        """Run as if the adapter were not there: the layer computes with its original weight.

        "Original" is the weight before the adapter was added: a merged adapter is unmerged
        (and merged again by :meth:`enable`), and a ``"principal"`` adapter's start is added
        back to the residual weight (which is kept and put back by :meth:`enable`, so it does
        not drift). A no-op when already disabled.
        """
        if self.disabled:
            return
        self._merge_on_enable = self.merged
        self.unmerge()
        if hasattr(self, "principal_core"):
            self._enabled_weight = self.weight.detach().clone()
            self.weight.add_(self._principal_start())
        self.disabled = True

    @torch.no_grad()
    def enable(self) -> None:
        """Undo :meth:`disable`; a no-op when enabled."""
        if not self.disabled:
            return
        if self._enabled_weight is not None:
            self.weight.copy_(self._enabled_weight)
            self._enabled_weight = None
        self.disabled = False
        if self._merge_on_enable:
            self._merge_on_enable = False
            self.merge()

    def _check_enabled(self, action: str) -> None:
        if self.disabled:
            raise ValueError(
                f"cannot {action} a disabled adapter; enable it first (ndlowrank.nn.enable_adapters)"
            )

    def delta_weight(self) -> torch.Tensor:
        """``ΔW`` in the base weight's dtype and layout (differentiable)."""
        return self.delta.delta(torch.float32 if self.weight.dtype in LOW_PRECISION else None).to(
            self.weight.dtype
        )

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``ΔW`` into the base weight in place (parameter identity is kept). Merging twice is a no-op.

        Low-precision (float16/bfloat16) weights keep an exact copy of the unmerged weight
        so that :meth:`unmerge` restores it bit for bit; float32/float64 weights are
        unmerged by subtraction (exact to rounding).

        Raises
        ------
        ValueError
            If the merged weight would hold NaN or Inf; nothing is changed then.
        """
        self._check_enabled("merge")
        if self.merged or self.active_adapter is None:
            return
        merged = self.weight + self.total_delta_weight()
        if not torch.isfinite(merged).all():
            raise ValueError("merging would put NaN or Inf into the base weight; the layer was left unmerged")
        if self.weight.dtype in LOW_PRECISION or self.__dict__["_also_active"]:
            self._original_weight = self.weight.detach().clone()
        self.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`; a no-op when not merged."""
        self._check_enabled("unmerge")
        if not self.merged:
            return
        if self._original_weight is not None:
            self.weight.copy_(self._original_weight)
            self._original_weight = None
        else:
            self.weight.sub_(self.total_delta_weight())
        self.merged = False

    # -- the principal init ----------------------------------------------------------
    @torch.no_grad()
    def _set_principal(self, core: torch.Tensor, factors: list[torch.Tensor]) -> None:
        """Start the delta at the Tucker tensor ``(core, factors)`` and subtract it from the base weight.

        The start is kept in buffers, so that removing the adapter without merging gives
        back the original weight and saved adapters can be rebuilt on a fresh model.
        """
        scale = self.delta.scale
        self.delta.core.copy_(core / scale)
        for parameter, factor in zip(self.delta.factors, factors, strict=True):
            parameter.copy_(factor)
        # row-major copies, so that the start computed from them (here and when a saved
        # adapter is rebuilt from its file) rounds identically
        self.register_buffer("principal_core", core.detach().clone(memory_format=torch.contiguous_format))
        for n, factor in enumerate(factors):
            self.register_buffer(
                f"principal_factor_{n}", factor.detach().clone(memory_format=torch.contiguous_format)
            )
        self.weight.sub_(self._principal_start())
        self.init = "principal"
        self._hold_square_factors()  # by the principal init's rule, on the start's factors

    def _principal_start(self) -> torch.Tensor:
        """The delta the principal init started from, in the weight's dtype (zero for other inits)."""
        if not hasattr(self, "principal_core"):
            return torch.zeros_like(self.weight)
        factors = [getattr(self, f"principal_factor_{n}") for n in range(self.weight.ndim)]
        start = TuckerDelta.from_tucker(TuckerTensor(self.principal_core, factors)).delta()
        return start.to(self.weight.dtype)

    def _principal_factors(self, factors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Adjust the principal start's factors before use (a hook for layer-specific rules)."""
        return factors

    def check_mergeable(self) -> None:
        """Raise ``ValueError`` if merging would put NaN or Inf into the weight (nothing changes)."""
        self._check_enabled("merge")
        if (
            self.active_adapter is not None
            and not self.merged
            and not torch.isfinite(self.weight + self.total_delta_weight()).all()
        ):
            raise ValueError("merging would put NaN or Inf into the base weight")

    @torch.no_grad()
    def check_unmergeable(self) -> None:
        """Raise ``ValueError`` if :meth:`unmerge` would put NaN or Inf into the weight (nothing changes)."""
        if self.merged and not self.disabled and self._original_weight is None:
            if not torch.isfinite(self.weight - self.total_delta_weight()).all():
                raise ValueError(
                    "unmerging would put NaN or Inf into the base weight (the delta changed to NaN or Inf "
                    "after the merge)"
                )

    @torch.no_grad()
    def check_removable(self, merge: bool, names: Sequence[str] | None = None) -> None:
        """Raise ``ValueError`` if taking the adapter out would put NaN or Inf into the weight (nothing changes).

        Computes what :meth:`merge_for_good` (``merge``) or :meth:`restore_weight` would
        leave, from the weight as :meth:`enable` and :meth:`unmerge` give it back.
        """
        if self.disabled:
            unmerged = self._enabled_weight if self._enabled_weight is not None else self.weight
            if self._merge_on_enable and not torch.isfinite(unmerged + self.total_delta_weight()).all():
                raise ValueError("enabling it again would merge NaN or Inf into the base weight")
        else:
            unmerged = self._unmerged_weight()
        if merge and names is None and self.merged and not self.disabled:
            final = self.weight  # merge_for_good keeps the merged weight as it is
        elif merge:
            final = self._plus_deltas(unmerged, names)
        else:
            final = unmerged + self._principal_start()
        if not torch.isfinite(final).all():
            what = "merging its delta" if merge else "restoring the original weight"
            raise ValueError(
                f"{what} would put NaN or Inf into the base weight (does the delta hold NaN or Inf?)"
            )

    @torch.no_grad()
    def restore_weight(self) -> None:
        """Give the weight back its original value (undoing a merge and the principal init)."""
        self.enable()
        self.unmerge()
        self.weight.add_(self._principal_start())

    @torch.no_grad()
    def merge_for_good(self, names: Sequence[str] | None = None) -> None:
        """Merge ``ΔW`` into the weight without keeping what :meth:`unmerge` would need.

        ``names`` chooses the adapters whose deltas are added (those this host holds);
        the active adapter by default.
        """
        self.enable()
        if names is not None or not self.merged:
            merged = self._plus_deltas(self._unmerged_weight(), names)
            if not torch.isfinite(merged).all():
                raise ValueError("merging would put NaN or Inf into the base weight; nothing was changed")
            self.weight.copy_(merged)
        self._original_weight = None
        self.merged = True

    def _unmerged_weight(self) -> torch.Tensor:
        """The weight :meth:`unmerge` would give back (the weight itself when not merged)."""
        if not self.merged:
            return self.weight
        if self._original_weight is not None:
            return self._original_weight
        return self.weight - self.total_delta_weight()

    def _plus_deltas(self, base: torch.Tensor, names: Sequence[str] | None) -> torch.Tensor:
        """A copy of ``base`` plus ``ΔW`` of the adapters ``names`` this host holds (the active ones by default)."""
        chosen = self.active_adapters if names is None else [n for n in self.adapter_names if n in names]
        total = base.clone()
        for name in chosen:
            total += self._delta_weight_of(name)
        return total

    def _delta_weight_of(self, name: str) -> torch.Tensor:
        """``ΔW`` of the adapter ``name``, active or not."""
        with self._pointing_at(name):
            return self.delta_weight()

    def total_delta_weight(self) -> torch.Tensor:
        """``ΔW`` of the active adapters, summed (that of the active one when one runs)."""
        if not self.__dict__["_also_active"]:
            return self.delta_weight()
        total = self._delta_weight_of(self.active_adapters[0])
        for name in self.active_adapters[1:]:
            total = total + self._delta_weight_of(name)
        return total

    # -- the merged state travels with the state_dict ---------------------------------
    def get_extra_state(self) -> torch.Tensor:
        """Whether ``ΔW`` is merged into the weight, saved in ``state_dict`` as ``<prefix>_extra_state``.

        A merged model's ``state_dict`` holds the weight ``W + ΔW`` and the delta; the flag
        tells an adapter that loads it that ``ΔW`` is in the weight already, so that it is
        not applied twice.
        """
        return torch.tensor(self.merged)

    def set_extra_state(self, state: Any) -> None:
        """Take the merged state of a loaded ``state_dict`` (the weight it loads matches it).

        A low-precision merged adapter then unmerges by subtraction: the exact copy of the
        unmerged weight that :meth:`merge` keeps is not part of a ``state_dict``.
        """
        if not (isinstance(state, torch.Tensor) and state.numel() == 1 and state.dtype == torch.bool):
            raise ValueError(
                f"an adapter's extra state must be a bool tensor (its merged flag), got {state!r}"
            )
        self.merged = bool(state)
        self._original_weight = None

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # a state_dict written before the flag was saved: the adapter keeps its merged state
        if prefix + "_extra_state" in missing_keys:
            missing_keys.remove(prefix + "_extra_state")

    def config(self) -> dict[str, Any]:
        """What is needed to rebuild this host on the same weight (JSON-serialisable)."""
        return {
            "kind": self.kind,
            "weight_shape": list(self.weight.shape),
            "ranks": list(self.ranks),
            "init": self.init,
            "scale": self.scale,
            "dtype": str(self.delta.core.dtype).removeprefix("torch."),
        }


def check_adapter_name(name: Any) -> None:
    """Raise ``ValueError`` unless ``name`` can name an adapter (a non-empty string without dots)."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name={name!r} must be a non-empty string without dots")
