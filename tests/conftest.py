"""Shared fixtures: every test that takes ``xp`` runs on each installed backend.

Backends: numpy, torch (CPU; plus CUDA where a GPU exists), array_api_strict (with a
non-default device, to catch device leaks) and cupy where a GPU exists.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
from hypothesis import HealthCheck, settings

from ndlowrank._backend import available_backends

from _helpers import Backend

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=25,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_HAS_TORCH = importlib.util.find_spec("torch") is not None


def _torch_cuda() -> bool:
    if not _HAS_TORCH:
        return False
    import torch

    return torch.cuda.is_available()


def _backend_params() -> list:
    params = []
    for name in available_backends():
        marks = [pytest.mark.gpu] if name == "cupy" else []
        params.append(pytest.param(name, id=name, marks=marks))
    if "array_api_strict" in available_backends():
        params.append(pytest.param("array_api_strict:device1", id="array_api_strict-device1"))
    if _torch_cuda():
        params.append(pytest.param("torch:cuda", id="torch-cuda", marks=[pytest.mark.gpu]))
    return params


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The tests use small tensors: one intra-op thread is fastest and immune to an oversubscribed CPU."""
    if not _HAS_TORCH:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", params=_backend_params())
def backend(request) -> Backend:
    """Each installed backend in turn (session-scoped, so hypothesis can use it)."""
    return Backend(request.param)


@pytest.fixture(scope="session")
def xp(backend):
    """The array namespace of the backend under test."""
    return backend.xp
