"""Test helpers shared by the test modules: the backend under test and one assertion."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ndlowrank._backend import backend_name, device_of, get_namespace, resolve_backend, to_numpy


class Backend:
    """A backend under test: its namespace, the device to create arrays on, and helpers."""

    def __init__(self, spec: str) -> None:
        name, _, device = spec.partition(":")
        self.name = name
        self.xp = resolve_backend(name)
        self.device: Any = None
        if name == "array_api_strict" and device:
            self.device = self.xp.Device(device)
        elif name == "torch" and device:
            # arrays report the indexed device ("cuda:0"), so the expected one must name its index too
            import torch

            self.device = torch.device(device)
            if self.device.type == "cuda" and self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())

    def asarray(self, array, dtype: str | None = None):
        """Move a numpy array (or nested list) to this backend and device."""
        array = np.asarray(array)
        out = self.xp.asarray(array, device=self.device)
        if dtype is not None:
            out = self.xp.astype(out, getattr(self.xp, dtype))
        return out

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, device={self.device!r})"


def assert_close(actual, desired, *, backend: Backend | None = None, rtol=1e-6, atol=0.0, dtype=None):
    """Check namespace, device, dtype and shape of ``actual``, then its values against ``desired``.

    ``desired`` is a numpy array (an independent reference) or an array of any backend.
    """
    if backend is not None:
        assert backend_name(get_namespace(actual)) == backend.name, type(actual)
        if backend.device is not None:
            assert str(device_of(actual)).startswith(str(backend.device)), device_of(actual)
    if dtype is not None:
        assert actual.dtype == dtype, (actual.dtype, dtype)
    actual_np, desired_np = to_numpy(actual), to_numpy(desired)
    assert actual_np.shape == desired_np.shape, (actual_np.shape, desired_np.shape)
    np.testing.assert_allclose(actual_np, desired_np, rtol=rtol, atol=atol)


LETTERS = "abcdefg"


def normal(seed: int, *shape: int) -> np.ndarray:
    """Standard normal float64 numbers of ``shape`` from ``seed`` (the tests' data source)."""
    return np.random.default_rng(seed).standard_normal(shape)


def einsum_tucker(core: np.ndarray, factors: list[np.ndarray]) -> np.ndarray:
    """Independent reference for ``core ×_0 factors[0] ... ×_{N-1} factors[N-1]`` in one einsum."""
    idx = LETTERS[: core.ndim]
    out = "".join(chr(ord("n") + k) for k in range(core.ndim))
    operands = ",".join(f"{o}{i}" for o, i in zip(out, idx, strict=True))
    return np.einsum(f"{idx},{operands}->{out}", core, *factors)


def valid_multilinear(ranks) -> tuple[int, ...]:
    """Shrink ranks until each is at most the product of the others (then they are generic ranks)."""
    ranks = list(ranks)
    changed = True
    while changed:
        changed = False
        for n, r in enumerate(ranks):
            limit = math.prod(ranks[:n] + ranks[n + 1 :])
            if r > limit:
                ranks[n], changed = limit, True
    return tuple(ranks)


def perturb_adapters(model, seed: int = 2, std: float = 0.3) -> None:
    """Stands in for training: move every adapter's core and factors away from their init."""
    import torch  # only the adapter tests use this helper

    from ndlowrank import nn as nlnn

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in nlnn.iter_adapters(model):
            for p in adapter.delta.parameters():
                p.add_(std * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def import_peer(name: str):
    """Import a peer library for a test, or skip the test with the reason it cannot be imported.

    ``pytest.importorskip`` skips only on ``ImportError``; a peer can also be installed and
    broken (PyPI's torchvision beside torch's CPU build raises ``RuntimeError: operator
    torchvision::nms does not exist``), and that must skip with its reason too, never fail
    the collection.
    """
    import importlib

    import pytest

    try:
        return importlib.import_module(name)
    except Exception as error:  # a peer's import can fail in any way; the reason is reported
        pytest.skip(f"{name} cannot be imported here: {type(error).__name__}: {error}")


class CountingSource:
    """An in-memory array that counts the chunk reads dask makes from it."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.reads = 0

    def __getitem__(self, key):
        out = self.array[key]
        if out.size:
            self.reads += 1
        return out


def low_rank_tensor(shape=(20, 16, 12), ranks=(3, 4, 2), noise=1e-3, seed=0):
    import ndlowrank as nl

    rng = np.random.default_rng(seed)
    factors = [rng.standard_normal((i, r)) for i, r in zip(shape, ranks, strict=True)]
    x = nl.tucker_to_tensor(rng.standard_normal(ranks), factors)
    return x + noise * rng.standard_normal(shape)


def counted_dask(x, chunks=(7, 5, 6)):
    import dask.array as da

    source = CountingSource(x)
    lazy = da.from_array(source, chunks=chunks)

    def passes() -> float:
        return source.reads / lazy.npartitions

    return lazy, passes


# 24 MiB in float64, chunks of 0.75 MiB, a limit of 8 MiB
MEMORY_CASE = ((128, 128, 192), (32, 32, 96), 8 * 2**20)


def generated_dask(shape, chunks, seed=0):
    """A lazily generated low-rank-plus-noise tensor: each chunk is made when it is read."""
    import dask.array as da

    import ndlowrank as nl

    rng = np.random.default_rng(seed)
    core, factors = rng.standard_normal((4, 4, 4)), [rng.standard_normal((i, 4)) for i in shape]

    def block(block_info=None):
        location = block_info[None]["array-location"]
        parts = [f[start:stop] for f, (start, stop) in zip(factors, location, strict=True)]
        noise = np.random.default_rng([seed, *(start for start, _ in location)])
        low = nl.tucker_to_tensor(core, parts)
        return low + 0.01 * noise.standard_normal(low.shape)

    blocks = tuple((c,) * (i // c) for i, c in zip(shape, chunks, strict=True))
    return da.map_blocks(block, chunks=blocks, dtype=np.float64, meta=np.empty((0, 0, 0)))


def check_larger_than_memory(decompose) -> None:
    """``decompose(x, rank)`` of a generated dask tensor 3x the memory limit stays within it and fits.

    The peak is tracemalloc's under dask's synchronous scheduler; the fit is checked on a corner
    of the tensor against its dense values.
    """
    import tracemalloc

    import dask

    import ndlowrank as nl

    shape, chunks, limit = MEMORY_CASE
    x = generated_dask(shape, chunks)
    assert x.nbytes >= 3 * limit
    decompose(x[:8, :8, :8], 2)  # imports done before measuring
    tracemalloc.start()
    try:
        with dask.config.set(scheduler="synchronous"):
            t = decompose(x, 4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak {peak / 2**20:.1f} MiB"
    sample = x[:16, :16, :16].compute()
    dense = nl.tucker_to_tensor(t.core, [f[:16] for f in t.factors])
    assert np.linalg.norm(sample - dense) < 0.05 * np.linalg.norm(sample)


def free_port() -> int:
    """A TCP port on localhost that is free now (for a gloo process group in a test)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
