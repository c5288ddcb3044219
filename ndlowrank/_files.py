"""Reading tensors from checkpoint files and writing files atomically (for the command line)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FileError", "atomic_path", "read_metadata", "read_tensors", "write_atomically", "write_tensors"]

SUFFIXES = (".npy", ".npz", ".safetensors", ".pt", ".pth")

STALE_AFTER_S = 60.0
"""A temporary file of a write whose process is gone is removed once it is this old (seconds)."""


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
    """Tensors of a torch checkpoint: a tensor, or (nested) dicts, lists and tuples of tensors such as a state_dict.

    Nested keys are joined with dots (a list's items are numbered); other values (an epoch
    count, a string) are skipped.
    """
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _flatten_state(value, f"{prefix}{key}.")
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _flatten_state(value, f"{prefix}{index}.")
    elif hasattr(obj, "shape"):
        yield prefix.rstrip(".") or "tensor", obj


def _unique(pairs: Iterator[tuple[str, Any]], path: Path) -> dict[str, Any]:
    """The pairs as a dict; two tensors under one flattened name are a :class:`FileError`, never one lost."""
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise FileError(
                f"{path}: two tensors flatten to the name {name!r} (a key with a dot beside a nested "
                "dict); rename one of them"
            )
        result[name] = value
    return result


def read_tensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """All arrays in a ``.npy``, ``.npz``, ``.safetensors`` or PyTorch (``.pt``/``.pth``) file, by name.

    PyTorch files are loaded with ``weights_only=True`` (no code runs); bfloat16 tensors
    become float32.

    Raises
    ------
    FileError
        For a missing file, a directory, an unknown format, a file that cannot be parsed, or
    a PyTorch checkpoint in which two tensors flatten to the same name.
    """
    path = Path(path)
    if path.is_dir():
        raise FileError(f"{path} is a directory; give a file")
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
        return {
            name: _from_torch(value, path) for name, value in _unique(_flatten_state(state), path).items()
        }
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


def _temporary_pattern(target: Path) -> re.Pattern[str]:
    """Names of the temporary files of writes to ``target``: ``.{name}.{pid}-{12 hex digits}.tmp``."""
    return re.compile(rf"\.{re.escape(target.name)}\.(\d+)-[0-9a-f]{{12}}\.tmp")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):  # no such process (or no such process id)
        return False
    except OSError:  # it exists but belongs to someone else
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporary files that killed writes to ``target`` left behind; returns them.

    Only files of this module's naming count, and only when the process that wrote one is
    gone and it is older than :data:`STALE_AFTER_S`, so a write in progress is never
    touched. On systems without POSIX signals nothing is removed.
    """
    if os.name != "posix":
        return []
    pattern = _temporary_pattern(target)
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            match = pattern.fullmatch(entry.name)
            if match is None or _process_alive(int(match.group(1))):
                continue
            with contextlib.suppress(OSError):
                if time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it only if the block succeeds.

    The temporary file is created with the permissions a new file gets (the umask's), kept
    after the writer ran (some writers create 0600 files), flushed to disk and renamed onto
    ``path``. On any error it is removed and an existing file at ``path`` is left
    untouched, so a failed write never leaves a truncated file in place of a good one.
    Temporary files that a killed write left behind are removed first
    (:func:`remove_stale_temporaries`).
    """
    target = Path(path)
    if target.is_dir():
        raise FileError(f"{target} is a directory; give a file name")
    if not target.parent.is_dir():
        raise FileError(f"{target}: the directory {target.parent} does not exist")
    remove_stale_temporaries(target)
    temporary = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp")
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


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """Run ``write(temporary)`` in :func:`atomic_path`; whatever the writer raises becomes an ``OSError``.

    Writers report a full disk in their own ways (safetensors a ``SafetensorError``, torch a
    ``RuntimeError``); here every failure of the writer is an ``OSError`` whose ``filename``
    is ``path`` and whose ``errno`` is the writer's when its message gives one (``EIO``
    otherwise), chaining the original.
    """
    with atomic_path(path) as temporary:
        try:
            write(temporary)
        except OSError:
            raise
        except Exception as exc:
            found = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(exc))
            code = int(found.group(1) or found.group(2)) if found else errno.EIO
            raise OSError(code, _one_line(exc), str(path)) from exc


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
        write_atomically(target, writers[suffix])
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
