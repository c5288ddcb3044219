"""The layout of an adapter file: its metadata key, format name and version, and tensor names.

Shared by :mod:`ndlowrank.nn.io` (which writes and reads the files), its load planner and
:mod:`ndlowrank.nn.interop` (which tells adapter files from other safetensors files); and the
one reader of safetensors files into torch tensors, for those and for the peer formats.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ._host import DeltaHost
from .layers import _ADAPTERS, _PEER_ADAPTERS
from .parameters import ParameterAdapter

METADATA_KEY = "ndlowrank"
"""Key of the safetensors metadata entry that holds the JSON config."""

FILE_FORMAT = "tucker-adapters"
"""The ``"format"`` of an adapter file (``ndlowrank decompose`` writes ``"tucker-factors"`` files under the same key)."""

FORMAT_VERSION = 1
"""Version of the file layout written by :func:`~ndlowrank.nn.save_adapters`."""

_READABLE_FORMATS = (1,)
_LAYER_KINDS = tuple(sorted({adapter.kind for adapter in (*_ADAPTERS.values(), *_PEER_ADAPTERS.values())}))
_KINDS = (*_LAYER_KINDS, ParameterAdapter.kind)


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _principal_names(ndim: int) -> list[str]:
    return ["principal_core", *(f"principal_factor_{n}" for n in range(ndim))]


def _is_principal(adapter: DeltaHost) -> bool:
    return hasattr(adapter, "principal_core")


def _fspath(path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    result = os.fspath(path)
    if not isinstance(result, str):
        raise TypeError(f"path must be a str or os.PathLike of str, got {path!r}")
    return result


def _safetensors() -> Any:
    try:
        import safetensors
        import safetensors.torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "saving and loading adapters needs the safetensors package: pip install safetensors"
        ) from exc
    return safetensors


def read_safetensors(
    path: str, where: str | None = None, check: Callable[[dict[str, str]], None] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors (torch) and metadata of the safetensors file at ``path``.

    ``check`` sees the metadata before any tensor is read (and may raise); ``where`` names the
    file in the errors (``path`` by default).

    Raises
    ------
    FileNotFoundError, IsADirectoryError
        Nothing, or a folder, at ``path``.
    ValueError
        The file is not a readable safetensors file (the parser's message is kept).
    """
    where = where or repr(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no adapter file at {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory, not an adapter file")
    safetensors = _safetensors()
    refused: ValueError | None = None
    try:
        with safetensors.safe_open(path, framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            try:
                if check is not None:
                    check(metadata)
            except ValueError as exc:
                refused = exc
            tensors = {} if refused else {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # the parser raises its own types for every kind of damage
        raise ValueError(f"{where} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    if refused is not None:
        raise refused
    return tensors, metadata
