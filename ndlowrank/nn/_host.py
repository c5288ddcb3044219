"""``DeltaHost``: what every holder of a Tucker delta on a weight does, whatever the weight belongs to.

A host owns a :class:`~ndlowrank.nn.TuckerDelta` and knows the weight it changes (its
:attr:`weight` property). It builds the delta with any init (including ``"principal"``,
which subtracts the start from the weight), merges and unmerges it, gives the weight back
(restored or merged for good) and describes itself for saving. Layer adapters
(:class:`~ndlowrank.nn.TuckerAdapter`) and parameter adapters
(:class:`~ndlowrank.nn.ParameterAdapter`) are hosts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from .._validation import validate_ranks
from ..decompose import sthosvd
from ..init import KNOWN_INITS
from ..tucker import TuckerTensor
from .delta import TuckerDelta

__all__ = ["DeltaHost"]

LOW_PRECISION = (torch.float16, torch.bfloat16)


class DeltaHost(nn.Module):
    """Base class of the modules that hold a Tucker delta on a weight (see the module docstring)."""

    kind: ClassVar[str] = ""

    @property
    def weight(self) -> torch.Tensor:
        """The weight the delta changes (merged or not)."""
        raise NotImplementedError

    def _init_delta(
        self,
        ranks: int | Sequence[int],
        *,
        init: str,
        scale: float,
        dtype: torch.dtype | None,
        seed: int | None,
    ) -> None:
        """Create ``self.delta`` for ``self.weight``; ints in ``ranks`` are clipped to each mode's size."""
        if init not in KNOWN_INITS:
            raise ValueError(f"unknown init={init!r}; known inits: {sorted(KNOWN_INITS)}")
        weight = self.weight
        shape = tuple(weight.shape)
        ranks = validate_ranks(ranks, shape, clip=True)
        param_dtype = dtype or (torch.float64 if weight.dtype == torch.float64 else torch.float32)
        self.init = init
        self.merged = False
        self.disabled = False
        self._original_weight: torch.Tensor | None = None
        self._enabled_weight: torch.Tensor | None = None  # the weight to put back when enabled again
        self._merge_on_enable = False
        if init == "principal":
            self.delta = TuckerDelta(
                shape, ranks, scale=scale, dtype=param_dtype, device=weight.device, seed=0
            )
            core, factors = sthosvd(weight.detach().to(param_dtype), ranks)
            self._set_principal(core, self._principal_factors(list(factors)))
        else:
            self.delta = TuckerDelta(
                shape, ranks, init=init, scale=scale, dtype=param_dtype, device=weight.device, seed=seed
            )

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.delta.ranks

    @property
    def scale(self) -> float:
        """Multiplier of the delta; set it with :meth:`set_scale` (exact when merged)."""
        return self.delta.scale

    @torch.no_grad()
    def set_scale(self, scale: float) -> None:
        """Change the delta's multiplier; the weight stays right when merged or disabled.

        A merged adapter is unmerged, rescaled and merged again, so the merged weight holds
        ``W + ΔW`` at the new scale and a later :meth:`unmerge` gives ``W`` back (bit for bit
        in float16/bfloat16, to rounding otherwise, as for any merge).

        Raises
        ------
        ValueError
            If ``scale`` is not a finite number, or if merging at the new scale would put
            NaN or Inf into the weight; nothing is changed then.
        """
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale={scale!r} must be a finite number")
        old = self.delta.scale
        if not self.merged:
            self.delta.scale = float(scale)
            return
        self.unmerge()
        self.delta.scale = float(scale)
        try:
            self.merge()
        except ValueError:
            self.delta.scale = old
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
        if self.merged:
            return
        merged = self.weight + self.delta_weight()
        if not torch.isfinite(merged).all():
            raise ValueError("merging would put NaN or Inf into the base weight; the layer was left unmerged")
        if self.weight.dtype in LOW_PRECISION:
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
            self.weight.sub_(self.delta_weight())
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
        if not self.merged and not torch.isfinite(self.weight + self.delta_weight()).all():
            raise ValueError("merging would put NaN or Inf into the base weight")

    @torch.no_grad()
    def restore_weight(self) -> None:
        """Give the weight back its original value (undoing a merge and the principal init)."""
        self.enable()
        self.unmerge()
        self.weight.add_(self._principal_start())

    @torch.no_grad()
    def merge_for_good(self) -> None:
        """Merge ``ΔW`` into the weight without keeping what :meth:`unmerge` would need."""
        self.enable()
        if not self.merged:
            merged = self.weight + self.delta_weight()
            if not torch.isfinite(merged).all():
                raise ValueError("merging would put NaN or Inf into the base weight; nothing was changed")
            self.weight.copy_(merged)
        self._original_weight = None
        self.merged = True

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.dtype == self.weight.dtype else tensor.to(self.weight.dtype)

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
