"""Reading tensors from checkpoint files and writing files atomically (for the command line)."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FileError", "atomic_path", "read_metadata", "read_tensors", "write_tensors"]

SUFFIXES = (".npy", ".npz", ".safetensors", ".pt", ".pth")


class FileError(ValueError):
    """A file cannot be read or written as asked; the message names the file and the fix."""


def _one_line(exc: BaseException, limit: int = 160) -> str:
    """A parser's exception as one short line (some span several lines)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _torch(purpose: str) -> Any:
    try:
        import torch
    except ImportError:
        raise FileError(f"{purpose} needs PyTorch: pip install torch") from None
    return torch


def _from_torch(value: Any, path: Path) -> np.ndarray:
    torch = _torch(f"reading {path}")
    if not isinstance(value, torch.Tensor):
        raise FileError(f"{path} holds a {type(value).__name__} where a tensor was expected")
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
        value = value.float()
    return value.numpy()


def _flatten_state(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Tensors of a torch checkpoint: a tensor, or (nested) dicts of tensors such as a state_dict."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _flatten_state(value, f"{prefix}{key}.")
    elif hasattr(obj, "shape"):
        yield prefix.rstrip(".") or "tensor", obj


def read_tensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """All arrays in a ``.npy``, ``.npz``, ``.safetensors`` or PyTorch (``.pt``/``.pth``) file, by name.

    PyTorch files are loaded with ``weights_only=True`` (no code runs); bfloat16 tensors
    become float32.

    Raises
    ------
    FileError
        For a missing file, an unknown format or a file that cannot be parsed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise FileError(f"{path}: unknown format {suffix or '(no suffix)'}; use one of {', '.join(SUFFIXES)}")
    try:
        if suffix == ".npy":
            return {path.stem: np.load(path, allow_pickle=False)}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        if suffix == ".safetensors":
            return _read_safetensors(path)
        torch = _torch(f"reading {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {name: _from_torch(value, path) for name, value in _flatten_state(state)}
    except FileError:
        raise
    except Exception as exc:  # every parser has its own exception types
        raise FileError(f"{path}: cannot be read as {suffix} ({_one_line(exc)})") from exc


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except TypeError:  # bfloat16 has no numpy dtype: go through torch
        from safetensors.torch import load_file as load_torch

        return {key: _from_torch(value, path) for key, value in load_torch(str(path)).items()}


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:
        raise FileError(f"{path}: cannot be read as .safetensors ({_one_line(exc)})") from exc


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it only if the block succeeds.

    The temporary file is created with the permissions a new file gets (the umask's), kept
    after the writer ran (some writers create 0600 files), flushed to disk and renamed onto
    ``path``. On any error it is removed and an existing file at ``path`` is left
    untouched, so a failed write never leaves a truncated file in place of a good one.
    """
    target = Path(path)
    if target.is_dir():
        raise FileError(f"{target} is a directory; give a file name")
    if not target.parent.is_dir():
        raise FileError(f"{target}: the directory {target.parent} does not exist")
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = stat.S_IMODE(os.stat(temporary).st_mode)
        yield temporary
        os.chmod(temporary, mode)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_tensors(
    path: str | os.PathLike[str], tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Write arrays atomically; the format follows the suffix (``.safetensors``, ``.npz``, ``.pt``/``.pth``)."""
    target = Path(path)
    suffix = target.suffix.lower()
    writers: dict[str, Callable[[Path], None]] = {
        ".safetensors": lambda tmp: _save_safetensors(tmp, tensors, metadata),
        ".npz": lambda tmp: _save_npz(tmp, tensors),
        ".pt": lambda tmp: _save_torch(tmp, tensors),
        ".pth": lambda tmp: _save_torch(tmp, tensors),
    }
    if suffix not in writers:
        raise FileError(f"{target}: cannot write {suffix or '(no suffix)'}; use one of {', '.join(writers)}")
    try:
        with atomic_path(target) as temporary:
            writers[suffix](temporary)
    except OSError as exc:
        raise FileError(f"{target}: cannot be written ({exc.strerror or exc})") from exc


def _save_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)


def _save_npz(path: Path, tensors: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **tensors)  # type: ignore[arg-type]


def _save_torch(path: Path, tensors: dict[str, np.ndarray]) -> None:
    torch = _torch(f"writing {path}")
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, path)
