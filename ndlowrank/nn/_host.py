"""``DeltaHost``: what every holder of a Tucker delta on a weight does, whatever the weight belongs to.

A host owns a :class:`~ndlowrank.nn.TuckerDelta` and knows the weight it changes (its
:attr:`weight` property). It builds the delta with any init (including ``"principal"``,
which subtracts the start from the weight), merges and unmerges it, gives the weight back
(restored or merged for good) and describes itself for saving. Layer adapters
(:class:`~ndlowrank.nn.TuckerAdapter`) and parameter adapters
(:class:`~ndlowrank.nn.ParameterAdapter`) are hosts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from .._validation import check_scale, validate_ranks
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
        self.init = init
        self.merged = False
        self._original_weight: torch.Tensor | None = None
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
        return self.delta.scale

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
        if not self.merged and not torch.isfinite(self.weight + self.delta_weight()).all():
            raise ValueError("merging would put NaN or Inf into the base weight")

    @torch.no_grad()
    def check_unmergeable(self) -> None:
        """Raise ``ValueError`` if :meth:`unmerge` would put NaN or Inf into the weight (nothing changes)."""
        if self.merged and self._original_weight is None:
            if not torch.isfinite(self.weight - self.delta_weight()).all():
                raise ValueError(
                    "unmerging would put NaN or Inf into the base weight (the delta changed to NaN or Inf "
                    "after the merge)"
                )

    @torch.no_grad()
    def check_restorable(self) -> None:
        """Raise ``ValueError`` if :meth:`restore_weight` would put NaN or Inf into the weight (nothing changes)."""
        if not self.merged:
            base = self.weight
        elif self._original_weight is not None:
            base = self._original_weight
        else:
            base = self.weight - self.delta_weight()
        if not torch.isfinite(base + self._principal_start()).all():
            raise ValueError(
                "restoring the original weight would put NaN or Inf into it (does the delta hold NaN or Inf?)"
            )

    @torch.no_grad()
    def restore_weight(self) -> None:
        """Give the weight back its original value (undoing a merge and the principal init)."""
        self.unmerge()
        self.weight.add_(self._principal_start())

    @torch.no_grad()
    def merge_for_good(self) -> None:
        """Merge ``ΔW`` into the weight without keeping what :meth:`unmerge` would need."""
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
