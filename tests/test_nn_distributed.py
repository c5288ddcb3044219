"""Saving and loading adapters under FSDP2 (sharded DTensor parameters) and DDP, on two gloo processes.

Both processes train on their half of a batch; the file saved under FSDP2 (every rank calls
``save_adapters``, rank 0 writes) and under DDP (rank 0 saves the wrapped model) must hold
what one process trained on the whole batch saves, and loading it into a fresh sharded or
wrapped model must reproduce the trained outputs, merged, unmerged and removed too.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from ndlowrank import nn as nlnn  # noqa: E402

from _helpers import free_port  # noqa: E402

WORLD_SIZE = 2
STEPS = 2
F64 = torch.float64


def _model(start: int = 1) -> nn.Module:
    """The same small model in every process: layer and parameter adapters (non-zero deltas), a trained head.

    The conv adapter holds its square spatial factor at the identity (a frozen parameter in
    the sharded group).
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (2, 3)), nn.Conv1d(2, 4, 3, padding=1), nn.Flatten(),
        nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 4),
    ).to(F64)  # fmt: skip
    model = nlnn.add_adapters(
        model, ["1", "3"], ranks=3, target_parameters=["5.weight"], modules_to_save=["7"], seed=0
    )  # the head "7" is trained in full
    with torch.no_grad():  # each start is another point; start=1 is the one trained
        for _, adapter in nlnn.iter_adapters(model):
            adapter.delta.core.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(start))
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(4, 6, generator=gen, dtype=F64), torch.randn(4, 4, generator=gen, dtype=F64)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()  # gradients are averaged over the ranks
        optimizer.step()


def _worker(rank: int, port: int, folder: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        x, y = _batch()
        half = slice(2 * rank, 2 * rank + 2)

        sharded = fully_shard(_model())
        assert type(sharded.get_parameter("3.delta.core")).__name__ == "DTensor"
        assert sharded[1].delta.fixed_modes == (2,)
        _train(sharded, x[half], y[half])
        assert (
            len(sharded[1]._parts()) == 3
        )  # the held factor is still known to be the identity, read from its shards
        nlnn.save_adapters(sharded, f"{folder}/fsdp.safetensors")  # every rank calls it
        fresh = fully_shard(_model(start=3))
        nlnn.load_adapters(fresh, f"{folder}/fsdp.safetensors")
        with torch.no_grad():
            trained = sharded(x)
            assert torch.equal(fresh(x), trained)
            # merging writes into the sharded weights (the parameter adapter's too, which
            # fully_shard replaced by a DTensor in its parametrization)
            nlnn.merge_adapters(fresh)
            torch.testing.assert_close(fresh(x), trained, rtol=0, atol=1e-12)
            nlnn.unmerge_adapters(fresh)
            torch.testing.assert_close(fresh(x), trained, rtol=0, atol=1e-12)
            nlnn.remove_adapters(fresh, merge=True)
            torch.testing.assert_close(fresh(x), trained, rtol=0, atol=1e-12)

        replicated = DistributedDataParallel(_model())
        _train(replicated, x[half], y[half])
        if rank == 0:
            nlnn.save_adapters(replicated, f"{folder}/ddp.safetensors")
        dist.barrier()
        fresh_replica = nlnn.load_adapters(
            DistributedDataParallel(_model(start=3)), f"{folder}/ddp.safetensors"
        )
        with torch.no_grad():
            assert torch.equal(fresh_replica(x), replicated(x))
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def _read(path) -> tuple[list, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        return json.loads(file.metadata()["ndlowrank"])["targets"], {
            k: file.get_tensor(k) for k in file.keys()
        }


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_fsdp2_and_ddp_files_equal_one_process_training(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(
        _worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True, start_method="spawn"
    )
    model = _model()
    _train(model, *_batch())
    nlnn.save_adapters(model, tmp_path / "one.safetensors")
    targets, expected = _read(tmp_path / "one.safetensors")
    start = nlnn.adapter_state_dict(_model())
    assert not any(torch.equal(expected[key], start[key]) for key in expected if key.endswith("core"))
    for name in ("fsdp", "ddp"):
        saved_targets, saved = _read(tmp_path / f"{name}.safetensors")
        assert saved_targets == targets
        assert saved.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(saved[key], value, rtol=0, atol=1e-12, msg=f"{name}: {key}")
