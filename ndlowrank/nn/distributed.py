"""Adapters under ``torch.distributed``: saving and loading FSDP2's sharded parameters.

``torch.distributed.fsdp.fully_shard`` (FSDP2) turns every parameter, the adapters' cores
and factors included, into a ``DTensor`` that holds one shard per rank. Saving gathers the
full tensors (a collective: every rank calls :func:`~ndlowrank.nn.save_adapters`) and rank 0
writes the file, which holds exactly what one process would have saved; loading gives each
rank its shard of the file's tensors. Plain tensors (one process, or DDP, which keeps a
full replica per rank) go through unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["copy_full", "gathered", "is_sharded", "rank_writes", "unwrap", "wait_for_writer"]


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (``model.module``), or ``model`` itself."""
    if torch.distributed.is_available():
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            return model.module
    return model


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter sharded by FSDP2 or placed on a device mesh)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The full value of ``tensor``: a ``DTensor``'s ``full_tensor()``, ``tensor`` itself otherwise.

    For a ``DTensor`` this is a collective: every rank of its device mesh must call it.
    """
    return tensor.full_tensor() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


@torch.no_grad()
def copy_full(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the full tensor ``value`` into ``parameter``, or into this rank's shard of a ``DTensor``.

    Every rank holds the same ``value`` (each reads the same file), so the shard is cut
    locally, without communication.
    """
    if is_sharded(parameter):
        from torch.distributed.tensor import distribute_tensor

        local = value.to(device=parameter.device, dtype=parameter.dtype)
        mesh, placements = parameter.device_mesh, parameter.placements  # type: ignore[attr-defined]
        parameter.copy_(distribute_tensor(local, mesh, placements, src_data_rank=None))
    else:
        parameter.copy_(value)


def rank_writes(sharded: bool) -> bool:
    """Whether this process writes a file whose tensors were gathered (``sharded``): only rank 0 does."""
    return not sharded or torch.distributed.get_rank() == 0


def wait_for_writer(sharded: bool) -> None:
    """Let every rank return only once rank 0 has written the file (a barrier, when ``sharded``)."""
    if sharded:
        torch.distributed.barrier()
