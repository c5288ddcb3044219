"""Adapters at scale: DistributedDataParallel on two CPU processes, and torch.compile."""

from __future__ import annotations

import contextlib
import signal
import time
import warnings

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from ndlowrank import nn as nlnn  # noqa: E402

from _helpers import free_port  # noqa: E402

F64 = torch.float64
WORLD_SIZE = 2
STEPS = 3
LR = 0.2


def _model() -> nn.Module:
    """A small adapted conv model, the same numbers in every process."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=3, padding_mode="reflect"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    ).to(F64)
    model = nlnn.add_adapters(model, ["0", "2", "5"], 3, init="orthogonal", seed=0)
    model[0].path = "materialize"  # the fused autograd function
    model[2].path = "factorized"
    with torch.no_grad():  # a non-zero start, so that every factor gets a gradient
        for _, adapter in nlnn.iter_adapters(model):
            adapter.delta.core.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return (
        torch.randn(2 * WORLD_SIZE, 3, 5, 5, generator=gen, dtype=F64),
        torch.randn(2 * WORLD_SIZE, 4, generator=gen, dtype=F64),
    )


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)  # the mean over this process's samples
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _ddp_worker(rank: int, port: int, folder: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        model = DistributedDataParallel(_model())
        x, y = _batch()
        half = slice(rank * 2, rank * 2 + 2)
        _train(model, x[half], y[half])  # DDP averages the gradients: the full batch's mean loss
        state = {k.removeprefix("module."): v for k, v in _adapter_state(model).items()}
        torch.save(state, f"{folder}/rank{rank}.pt")
        # no rank tears gloo down while the other still talks to it ("terminate called without an
        # active exception", SIGABRT, seen on a loaded machine)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_on_two_processes_equals_one_process_on_the_full_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(
        _ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True, start_method="spawn"
    )
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    model = _model()
    start = _adapter_state(model)
    losses = _train(model, *_batch())
    expected = _adapter_state(model)
    assert losses[-1] < losses[0]
    assert set(expected) == {n for n in expected if ".delta." in n} and len(expected) == 2 * 5 + 3
    for state in per_rank:
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            assert not torch.equal(value, start[name]), name  # it trained
            torch.testing.assert_close(state[name], value, rtol=0, atol=1e-6, msg=name)


# -- torch.compile ------------------------------------------------------------------------------

COMPILE_BUDGET_S = 150  # a cold inductor compile of this model takes about 45 s on 2 cores


@contextlib.contextmanager
def _time_budget(seconds: int):
    """Fail (rather than hang) when the block runs longer than ``seconds`` (POSIX main thread only)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def _expired(signum, frame):
        raise TimeoutError(f"torch.compile test ran past its budget of {seconds} s")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _compile_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=2, padding_mode="reflect"),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 4),
    )
    model = nlnn.add_adapters(model, ["0", "2", "4"], 3, init="orthogonal", seed=0)
    model[0].path = "materialize"  # plain autograd through conv(x, W + ΔW) on an input this small
    model[2].path = "factorized"  # FactorizedTuckerConv (a custom autograd.Function) under dynamo
    model[4].path = "factorized"
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    return model


def _run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return out.detach(), x.grad, grads


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")  # dynamo and jit notes
def test_torch_compile_matches_eager_in_outputs_and_gradients():
    model = _compile_model()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    expected = _run(model, x)
    torch._dynamo.reset()
    start = time.monotonic()
    with _time_budget(COMPILE_BUDGET_S):
        try:
            backend = "inductor"
            actual = _run(torch.compile(model, backend=backend, fullgraph=True), x)
        except torch._dynamo.exc.BackendCompilerFailed as exc:  # e.g. no working C++ compiler
            warnings.warn(f"inductor cannot compile here ({exc}); using aot_eager", stacklevel=1)
            torch._dynamo.reset()
            backend = "aot_eager"
            actual = _run(torch.compile(model, backend=backend, fullgraph=True), x)
    print(f"torch.compile backend={backend}: {time.monotonic() - start:.1f} s")
    out, grad_x, grads = actual
    torch.testing.assert_close(out, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x, expected[1], rtol=1e-5, atol=1e-5)
    assert len(grads) == len(expected[2]) == 2 * 5 + 3
    for g, e in zip(grads, expected[2], strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
