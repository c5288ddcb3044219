"""Switching adapters off and on, and changing their scale at inference."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import TracebackType

from torch import nn

from ._host import DeltaHost
from .model import iter_adapters
from .modules_to_save import TrainedCopy, iter_trained_copies

__all__ = ["AdaptersDisabled", "disable_adapters", "enable_adapters", "set_adapter_scale"]


def _switchable(model: nn.Module) -> Iterator[DeltaHost | TrainedCopy]:
    """Everything that :func:`disable_adapters` switches off: the adapters and the trained copies."""
    for _, adapter in iter_adapters(model):
        yield adapter
    for _, wrapper in iter_trained_copies(model):
        yield wrapper


class AdaptersDisabled:
    """What :func:`disable_adapters` returns: the adapters it switched off, switched on again on exit."""

    def __init__(self, switched: list[DeltaHost | TrainedCopy]) -> None:
        self.switched = switched

    def __enter__(self) -> AdaptersDisabled:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for adapter in self.switched:
            adapter.enable()


def disable_adapters(model: nn.Module) -> AdaptersDisabled:
    """Switch every adapter of ``model`` off, now; as a context manager, on again at the end of the block.

    While disabled, the model computes what it computed before adapters were added: each
    layer uses its original weight, and each module trained in full (``modules_to_save``)
    its original. A merged adapter is unmerged (and merged again when
    enabled), and a ``"principal"`` adapter's start is added back to the residual base
    weight (the residual is kept and put back exactly when enabled). The adapters'
    parameters and ``requires_grad`` flags are left alone; they get no gradient while off.

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    AdaptersDisabled
        Usable in a ``with`` statement: on exit, the adapters this call switched off are
        switched on again (those that were off already stay off). Without ``with``, the
        adapters stay off until :func:`enable_adapters`.

    Notes
    -----
    PEFT's ``disable_adapter()`` unmerges merged layers inside ``forward`` and leaves them
    unmerged, and with a PiSSA-style init it gives the residual model, not the original.
    Here disabling gives the original model in both cases and enabling restores the state
    before. Merging, unmerging or loading into a disabled adapter is a ``ValueError``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from ndlowrank import nn as nlnn
    >>> base = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> x = torch.randn(3, 4)
    >>> reference = base(x)
    >>> model = nlnn.add_adapters(base, "all-linear", ranks=2, init="principal")
    >>> with nlnn.disable_adapters(model):
    ...     torch.allclose(model(x), reference, atol=1e-6)
    True
    """
    switched = [adapter for adapter in _switchable(model) if not adapter.disabled]
    for adapter in switched:
        adapter.disable()
    return AdaptersDisabled(switched)


def enable_adapters(model: nn.Module) -> nn.Module:
    """Switch every adapter of ``model`` on again (undo :func:`disable_adapters`). Returns ``model``."""
    for adapter in _switchable(model):
        adapter.enable()
    return model


def set_adapter_scale(model: nn.Module, scale: float, *, targets: Sequence[str] | None = None) -> nn.Module:
    """Set the multiplier of the adapters' deltas (``ΔW = scale · G ×₁ A₁ …``), merged or not.

    Parameters
    ----------
    model : nn.Module
    scale : float
        The new scale (a finite number; ``0`` switches the deltas off, ``2`` doubles them).
        It replaces the scale the adapters were built with; it is saved by
        :func:`~ndlowrank.nn.save_adapters`.
    targets : sequence of str, optional
        Adapted layers or parameters by their names in :func:`~ndlowrank.nn.iter_adapters`;
        all by default. The scale changes for each one's active adapters (each gets ``scale``).

    Returns
    -------
    nn.Module
        ``model``.

    Raises
    ------
    ValueError
        A name that is no adapter of ``model``, a scale that is not finite, or a merged
        adapter whose weight would hold NaN or Inf at the new scale; nothing is changed then.

    Notes
    -----
    Merged adapters are unmerged, rescaled and merged again, so the weight stays
    ``W + ΔW`` and :func:`~ndlowrank.nn.unmerge_adapters` still gives ``W`` back (bit for
    bit in float16/bfloat16). PEFT's ``set_scale`` changes the scaling of a merged layer
    without touching its weight, so its next unmerge subtracts the wrong delta.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from ndlowrank import nn as nlnn
    >>> model = nlnn.add_adapters(nn.Sequential(nn.Linear(4, 4)), "all-linear", ranks=2, scale=1.0)
    >>> model = nlnn.set_adapter_scale(model, 0.5)
    >>> model[0].scale
    0.5
    """
    found = dict(iter_adapters(model))
    names = list(found) if targets is None else list(targets)
    unknown = [name for name in names if name not in found]
    if unknown:
        raise ValueError(f"targets {unknown} are not adapted in the model; adapted: {sorted(found)}")
    old = {name: [delta.scale for delta in found[name]._scaled_deltas()] for name in names}
    done: list[str] = []
    try:
        for name in names:
            try:
                found[name].set_scale(scale)
            except ValueError as error:
                raise ValueError(f"{name!r}: {error}") from None
            done.append(name)
    except ValueError:
        for name in reversed(done):
            found[name]._set_scales(old[name])
        raise
    return model
