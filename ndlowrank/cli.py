"""The ``ndlowrank`` command line: decompose, reconstruct, extract, convert, info and demo.

Every subcommand reports bad input as one line on stderr and exits with status 2, with no
traceback and no partial output file (files are written to a temporary name and renamed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from array_api_compat import array_namespace
from tqdm.auto import tqdm

from . import __version__
from ._files import FileError, read_metadata, read_tensors, write_tensors
from ._header import check_ranks_fit, int_tuple, json_object, number, scale_field, string
from ._subspace import mode_spectrum
from .decompose import METHODS, ToleranceWarning, sthosvd, tucker
from .ranks import budget_ranks
from .tenalg import tucker_to_tensor

__all__ = ["main"]

FACTORS_KEY = "ndlowrank"
FACTORS_FORMAT = "tucker-factors"
FORMAT_VERSION = 1


class UsageError(ValueError):
    """Bad input from the command line; reported as one line, exit status 2."""


# -- decompose -------------------------------------------------------------------------------
def _ranks_option(ranks: list[int] | None, ndim: int, name: str) -> int | tuple[int, ...] | None:
    if ranks is None:
        return None
    if len(ranks) == 1:
        return ranks[0]
    if len(ranks) != ndim:
        raise UsageError(f"--ranks gives {len(ranks)} ranks but tensor {name!r} has {ndim} modes")
    return tuple(ranks)


def _decompose_one(x: np.ndarray, name: str, args: argparse.Namespace) -> tuple[Any, float]:
    ranks = _ranks_option(args.ranks, x.ndim, name)
    if isinstance(ranks, int):
        ranks = tuple(min(ranks, size) for size in x.shape)
    # the random methods are seeded, so that the same file gives the same factors every run
    options: dict[str, Any] = {"seed": 0} if args.method in ("randomized", "sketch") else {}
    tol = None if ranks is not None else args.tol
    try:
        t = tucker(x, ranks, tol=tol, method=args.method, **options)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"tensor {name!r}: {exc}") from None
    dense = np.asarray(t.to_dense(), dtype=np.float64)
    reference = x.astype(np.float64)
    norm = float(np.linalg.norm(reference))
    error = float(np.linalg.norm(reference - dense)) / norm if norm > 0 else 0.0
    return t, error


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    line = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def cmd_decompose(args: argparse.Namespace) -> int:
    """Decompose every large-enough floating tensor of a file into Tucker factors."""
    if args.method in ("hosvd", "randomized", "sketch") and args.ranks is None:
        raise UsageError(f"--method {args.method} needs --ranks")
    tensors = read_tensors(args.input)
    out: dict[str, np.ndarray] = {}
    entries: dict[str, Any] = {}
    rows = []
    chosen = [
        name
        for name, x in tensors.items()
        if np.issubdtype(x.dtype, np.floating) and x.ndim >= 2 and x.size >= max(args.min_size, 1)
    ]
    if not chosen:
        raise UsageError(f"{args.input}: no floating tensor with >= 2 modes and >= {args.min_size} elements")
    for name in tqdm(chosen, desc="decompose", unit="tensor", file=sys.stderr, disable=args.quiet):
        x = tensors[name]
        t, error = _decompose_one(x, name, args)
        dense_size = x.size
        if t.n_params >= dense_size:
            rows.append(
                (name, str(x.shape), str(t.ranks), f"{dense_size:,}", f"{dense_size:,}", "kept dense")
            )
            continue
        out[f"{name}.core"] = np.asarray(t.core)
        for n, factor in enumerate(t.factors):
            out[f"{name}.factors.{n}"] = np.asarray(factor)
        entries[name] = {
            "shape": list(x.shape),
            "ranks": list(t.ranks),
            "dtype": str(x.dtype),
            "method": args.method,
            "relative_error": error,
        }
        rows.append((name, str(x.shape), str(t.ranks), f"{dense_size:,}", f"{t.n_params:,}", f"{error:.3e}"))
    dense = [name for name in tensors if name not in entries]
    clash = sorted(set(out) & set(dense))
    if clash:
        raise UsageError(
            f"{args.input}: the tensors {clash} kept dense have the names of decomposed tensors' "
            "factors; rename them or raise --min-size so that nothing is overwritten"
        )
    out.update({name: tensors[name] for name in dense})
    metadata = {
        FACTORS_KEY: json.dumps(
            {
                "format": FACTORS_FORMAT,
                "format_version": FORMAT_VERSION,
                "ndlowrank_version": __version__,
                "tensors": entries,
                "dense": dense,
            }
        )
    }
    write_tensors(args.output, out, metadata)
    before = sum(x.size for x in tensors.values())
    after = sum(v.size for v in out.values())
    print(_table(rows, ("tensor", "shape", "ranks", "params before", "params after", "rel. error")))
    print(
        f"\n{len(entries)} of {len(tensors)} tensors decomposed; {before:,} -> {after:,} numbers; wrote {args.output}"
    )
    return 0


# -- extract ---------------------------------------------------------------------------------
def _paired_differences(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """``TUNED − BASE`` for every floating tensor with >= 2 modes and >= --min-size elements that changed."""
    base, tuned = read_tensors(args.base), read_tensors(args.tuned)
    only = sorted(set(base) ^ set(tuned))
    if only:
        shown = ", ".join(only[:5]) + (" ..." if len(only) > 5 else "")
        raise UsageError(
            f"{args.base} and {args.tuned} hold different tensors ({len(only)} unmatched: {shown})"
        )
    differences = {}
    for name in base:
        if base[name].shape != tuned[name].shape:
            raise UsageError(
                f"tensor {name!r} has shape {base[name].shape} in BASE but {tuned[name].shape} in TUNED"
            )
        x = tuned[name]
        if not np.issubdtype(x.dtype, np.floating) or x.ndim < 2 or x.size < args.min_size:
            continue
        if not (np.isfinite(base[name]).all() and np.isfinite(tuned[name]).all()):
            raise UsageError(f"tensor {name!r}: BASE or TUNED holds NaN or Inf")
        exact = tuned[name].astype(np.float64) - base[name].astype(np.float64)
        if exact.size and not np.abs(exact).max() <= np.finfo(np.float32).max:
            raise UsageError(
                f"tensor {name!r}: TUNED − BASE exceeds float32's range (3.4e38), which adapters hold"
            )
        difference = exact.astype(np.float32)
        if np.any(difference):
            differences[name] = difference
    if not differences:
        raise UsageError(
            f"no tensor with >= 2 modes and >= {args.min_size} elements differs between BASE and TUNED"
        )
    return differences


def _extraction_ranks(differences: dict[str, np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    """Ranks per tensor: from --ranks, from --budget (spread by energy), or None (--tol decides)."""
    if args.budget is not None:
        names = list(differences)
        shapes = [differences[n].shape for n in names]
        minimum = sum(1 + sum(shape) for shape in shapes)
        if args.budget < minimum:
            raise UsageError(
                f"--budget {args.budget} is below {minimum}, the size of every adapter at ranks 1"
            )
        spectra = [[mode_spectrum(differences[n], m, xp=array_namespace(differences[n])) for m in range(len(s))]
                   for n, s in zip(names, shapes, strict=True)]  # fmt: skip
        return dict(zip(names, budget_ranks(spectra, shapes, args.budget), strict=True))
    return {name: _ranks_option(args.ranks, x.ndim, name) for name, x in differences.items()}


def cmd_extract(args: argparse.Namespace) -> int:
    """Compress the difference of a fine-tuned checkpoint and its base into Tucker adapters."""
    differences = _paired_differences(args)
    ranks = _extraction_ranks(differences, args)
    out: dict[str, np.ndarray] = {}
    targets, rows = [], []
    for name in tqdm(list(differences), desc="extract", unit="tensor", file=sys.stderr, disable=args.quiet):
        x = differences[name]
        chosen = ranks[name]
        if isinstance(chosen, int):
            chosen = tuple(min(chosen, size) for size in x.shape)
        try:
            t = sthosvd(x, chosen) if chosen is not None else sthosvd(x, tol=args.tol)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"tensor {name!r}: {exc}") from None
        reference = x.astype(np.float64)  # squares of float32 entries above 1.8e19 overflow
        error = float(np.linalg.norm(reference - t.to_dense()) / np.linalg.norm(reference))
        out[f"{name}.core"] = np.asarray(t.core, dtype=np.float32)
        for n, factor in enumerate(t.factors):
            out[f"{name}.factors.{n}"] = np.asarray(factor, dtype=np.float32)
        targets.append({"name": name, "kind": "parameter", "weight_shape": list(x.shape), "ranks": list(t.ranks),
                        "init": "zero_core", "scale": 1.0, "dtype": "float32"})  # fmt: skip
        rows.append((name, str(x.shape), str(t.ranks), f"{x.size:,}", f"{t.n_params:,}", f"{error:.3e}"))
    header = {
        "format": "tucker-adapters",
        "format_version": 1,
        "ndlowrank_version": __version__,
        "targets": targets,
    }
    write_tensors(args.output, out, {FACTORS_KEY: json.dumps(header), "format": "pt"})
    print(_table(rows, ("parameter", "shape", "ranks", "dense delta", "adapter", "rel. error")))
    total = sum(v.size for v in out.values())
    dense = sum(x.size for x in differences.values())
    print(
        f"\n{len(targets)} parameter adapters, {total:,} numbers (the dense deltas hold {dense:,}); wrote {args.output}"
    )
    print("load them with ndlowrank.nn.load_adapters(model, path) on the base model")
    return 0


# -- reconstruct and info --------------------------------------------------------------------
def _factors_header(path: str) -> dict[str, Any]:
    metadata = read_metadata(path)
    if FACTORS_KEY not in metadata:
        raise UsageError(f"{path} is not an ndlowrank file (no '{FACTORS_KEY}' metadata)")
    try:
        return json_object(metadata[FACTORS_KEY], FACTORS_KEY, path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _factors_entries(header: dict[str, Any], path: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The validated ``tensors`` (name -> shape, ranks, dtype, relative_error) and ``dense`` of a factors file."""
    version = header.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise UsageError(
            f"{path}: format_version {version!r} is not supported (this ndlowrank reads {FORMAT_VERSION})"
        )
    tensors, dense = header.get("tensors"), header.get("dense", [])
    if not isinstance(tensors, dict):
        raise UsageError(f"{path}: 'tensors' must be a JSON object of tensor entries, got {tensors!r}")
    if not isinstance(dense, list) or not all(isinstance(name, str) for name in dense):
        raise UsageError(f"{path}: 'dense' must be a list of tensor names, got {dense!r}")
    entries = {}
    try:
        for name, entry in tensors.items():
            at = f"{path}, tensor {name!r}"
            if not isinstance(entry, dict):
                raise ValueError(f"{at}: the entry must be a JSON object, got {entry!r}")
            shape = int_tuple(entry.get("shape"), "shape", at)
            ranks = int_tuple(entry.get("ranks"), "ranks", at)
            check_ranks_fit("ranks", ranks, shape, at)
            dtype = string(entry.get("dtype"), "dtype", at)
            if dtype not in ("float16", "float32", "float64"):
                raise ValueError(f"{at}: dtype must be float16, float32 or float64, got {dtype!r}")
            error = number(entry.get("relative_error"), "relative_error", at)
            if error < 0:
                raise ValueError(f"{at}: relative_error must be >= 0, got {error!r}")
            entries[name] = {"shape": shape, "ranks": ranks, "dtype": dtype, "relative_error": error}
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return entries, dense


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """Turn a factors file back into dense tensors."""
    if not str(args.input).endswith(".safetensors"):
        raise UsageError(
            f"{args.input}: a factors file is a .safetensors file written by 'ndlowrank decompose'"
        )
    header = _factors_header(args.input)
    if header.get("format") != FACTORS_FORMAT:
        raise UsageError(f"{args.input} holds {header.get('format', 'something else')}, not Tucker factors")
    entries, kept = _factors_entries(header, args.input)
    stored = read_tensors(args.input)
    dense: dict[str, np.ndarray] = {}
    for name, entry in entries.items():
        expected = {f"{name}.core": entry["ranks"]}
        expected.update({f"{name}.factors.{n}": (size, rank)
                         for n, (size, rank) in enumerate(zip(entry["shape"], entry["ranks"], strict=True))})  # fmt: skip
        for key, shape in expected.items():
            if key not in stored:
                raise UsageError(f"{args.input}: tensor {key!r} is missing; the file is damaged")
            if stored[key].shape != shape:
                raise UsageError(
                    f"{args.input}: tensor {key!r} has shape {stored[key].shape}, expected {shape}"
                )
        core, *factors = (stored[key] for key in expected)
        dense[name] = np.asarray(tucker_to_tensor(core, factors)).astype(entry["dtype"])
    for name in kept:
        if name not in stored:
            raise UsageError(f"{args.input}: tensor {name!r} is missing; the file is damaged")
        dense[name] = stored[name]
    write_tensors(args.output, dense)
    print(f"reconstructed {len(entries)} tensors (+{len(kept)} kept dense); wrote {args.output}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Describe a factors or adapter file."""
    if not str(args.file).endswith(".safetensors"):
        raise UsageError(f"{args.file}: ndlowrank files are .safetensors files")
    if Path(args.file).is_dir():
        raise UsageError(f"{args.file} is a directory; give a file")
    if not Path(args.file).is_file():
        raise UsageError(f"{args.file}: no such file")
    header = _factors_header(args.file)
    kept: list[str] = []
    if header.get("format") == FACTORS_FORMAT:  # every field is checked before anything is printed
        entries, kept = _factors_entries(header, args.file)
        rows = [
            (name, str(e["shape"]), str(e["ranks"]), e["dtype"], f"{e['relative_error']:.3e}")
            for name, e in entries.items()
        ]
        table = _table(rows, ("tensor", "shape", "ranks", "dtype", "rel. error"))
    else:
        columns = ("target", "kind", "weight shape", "ranks", "init", "scale", "params")
        table = _table(_adapter_rows(header, args.file), columns)
    print(f"{args.file}: {header.get('format', 'adapters')} (format {header.get('format_version')}), "
          f"written by ndlowrank {header.get('ndlowrank_version', '?')}")  # fmt: skip
    print(table)
    if kept:
        print(f"kept dense: {', '.join(kept)}")
    return 0


def _adapter_rows(header: dict[str, Any], path: str) -> list[tuple[str, ...]]:
    """One validated row per adapter of an adapter file's header."""
    targets = header.get("targets")
    if not isinstance(targets, list) or not targets:
        raise UsageError(f"{path}: 'targets' must be a non-empty list of adapter entries, got {targets!r}")
    rows: list[tuple[str, ...]] = []
    try:
        for entry in targets:
            if not isinstance(entry, dict):
                raise ValueError(f"{path}: an adapter entry must be a JSON object, got {entry!r}")
            name = string(entry.get("name"), "an adapter's name", path)
            at = f"{path}, adapter {name!r}"
            shape = int_tuple(entry.get("weight_shape"), "weight_shape", at)
            ranks = int_tuple(entry.get("ranks"), "ranks", at)
            check_ranks_fit("ranks", ranks, shape, at)
            init = string(entry.get("init"), "init", at)
            scale = scale_field(entry.get("scale"), at, principal=init == "principal")
            size = math.prod(ranks) + sum(i * r for i, r in zip(shape, ranks, strict=True))
            rows.append(
                (
                    name,
                    string(entry.get("kind"), "kind", at),
                    str(shape),
                    str(ranks),
                    init,
                    str(scale),
                    f"{size:,}",
                )
            )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return rows


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a PEFT / kohya / LyCORIS adapter to another of these formats, optionally resized."""
    try:
        from .nn import convert_adapters  # imported on use: it needs torch
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        raise UsageError("convert needs PyTorch: pip install torch") from None
    ranks = None if args.ranks is None else (args.ranks[0] if len(args.ranks) == 1 else tuple(args.ranks))
    try:
        reports = convert_adapters(
            args.input,
            args.target,
            format=args.to,
            tol=args.tol,
            ranks=ranks,
            budget=args.budget,
            prefix=args.prefix,
        )
    except (ValueError, TypeError, OSError) as exc:
        raise UsageError(str(exc)) from None
    rows = [(r.name, str(r.old_ranks), str(r.new_ranks), f"{r.relative_change:.2e}") for r in reports]
    print(_table(rows, ("layer", "exact ranks", "new ranks", "rel. change")))
    print(f"converted {len(reports)} layers; wrote {args.target} ({args.to})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Pre-train a small conv net and adapt it with Tucker adapters (needs PyTorch)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UsageError("the demo needs PyTorch: pip install torch") from None
    from ._demo import run_demo  # imported on use: it needs torch

    run_demo(Path(args.output), quiet=args.quiet)
    return 0


def cmd_tour(args: argparse.Namespace) -> int:
    """Print the quick tour."""
    from ._tour import main as tour  # imported on use: it builds example data

    tour()
    return 0


# -- the parser --------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ndlowrank", description="N-dimensional low-rank weight deltas in Tucker form."
    )
    parser.add_argument("--version", action="version", version=f"ndlowrank {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    dec = sub.add_parser("decompose", help="decompose the tensors of a file into Tucker factors")
    dec.add_argument(
        "input", help=".npy, .npz, .safetensors or PyTorch (.pt/.pth, loaded with weights_only=True)"
    )
    dec.add_argument("-o", "--output", required=True, help="the factors file to write (.safetensors)")
    how = dec.add_mutually_exclusive_group()
    how.add_argument("--tol", type=float, default=0.05, help="relative error bound per tensor (default 0.05)")
    how.add_argument("--ranks", type=int, nargs="+", help="one rank for every mode, or one per mode")
    dec.add_argument(
        "--method", choices=METHODS, default="sthosvd", help="decomposition method (default sthosvd)"
    )
    dec.add_argument(
        "--min-size", type=int, default=1024, help="skip tensors with fewer elements (default 1024)"
    )
    dec.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    dec.set_defaults(run=cmd_decompose)

    ext = sub.add_parser(
        "extract", help="compress TUNED - BASE into Tucker adapters that load_adapters loads"
    )
    ext.add_argument("base", help="the base checkpoint")
    ext.add_argument("tuned", help="the fine-tuned checkpoint (same tensors and shapes)")
    ext.add_argument("-o", "--output", required=True, help="the adapter file to write (.safetensors)")
    rule = ext.add_mutually_exclusive_group()
    rule.add_argument("--tol", type=float, default=0.1, help="relative error bound per delta (default 0.1)")
    rule.add_argument("--ranks", type=int, nargs="+", help="one rank for every mode, or one per mode")
    rule.add_argument("--budget", type=int, help="total adapter parameters, spread over the deltas by energy")
    ext.add_argument(
        "--min-size", type=int, default=1024, help="skip tensors with fewer elements (default 1024)"
    )
    ext.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ext.set_defaults(run=cmd_extract)

    rec = sub.add_parser("reconstruct", help="turn a factors file back into dense tensors")
    rec.add_argument("input", help="a factors file written by 'ndlowrank decompose'")
    rec.add_argument(
        "-o", "--output", required=True, help="dense tensors to write (.safetensors, .npz or .pt)"
    )
    rec.set_defaults(run=cmd_reconstruct)

    conv = sub.add_parser(
        "convert",
        help="convert a PEFT / diffusers / kohya / LyCORIS adapter to another format, optionally resized",
    )
    conv.add_argument(
        "input", help="a PEFT adapter directory, or a diffusers / kohya / LyCORIS .safetensors file"
    )
    conv.add_argument("target", help="the PEFT directory or .safetensors file to write")
    conv.add_argument(
        "--to", required=True, choices=("peft", "diffusers", "kohya", "lycoris"), help="format of TARGET"
    )
    size = conv.add_mutually_exclusive_group()
    size.add_argument("--tol", type=float, help="relative error bound per layer (default: exact to rounding)")
    size.add_argument(
        "--ranks", type=int, nargs="+", help="Tucker ranks: one for every mode, or one per mode"
    )
    size.add_argument("--budget", type=int, help="total adapter parameters, spread over the layers by energy")
    conv.add_argument(
        "--prefix",
        help="key prefix of a diffusers / kohya / LyCORIS target (unet, lora_unet, lora_te, lycoris)",
    )
    conv.set_defaults(run=cmd_convert)

    demo = sub.add_parser(
        "demo", help="pre-train a small conv net on the CPU and adapt it with Tucker adapters"
    )
    demo.add_argument(
        "-o", "--output", default="ndlowrank-demo-adapters.safetensors", help="where to save the adapters"
    )
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=cmd_demo)

    tour = sub.add_parser("tour", help="a quick tour: decompose a conv-like kernel with every method")
    tour.set_defaults(run=cmd_tour)

    info = sub.add_parser("info", help="describe a factors or adapter file")
    info.add_argument("file")
    info.set_defaults(run=cmd_info)
    return parser


INPUT_ARGUMENTS = ("input", "base", "tuned", "file")
"""Arguments of the subcommands that name files they read; no output may be one of them."""

OUTPUT_ARGUMENTS = ("output", "target")
"""Arguments that name what a subcommand writes (``-o``, and ``convert``'s TARGET)."""


def _inputs(args: argparse.Namespace) -> list[str]:
    return [str(getattr(args, name)) for name in INPUT_ARGUMENTS if getattr(args, name, None) is not None]


def _same_file(output: str, source: str) -> bool:
    """Whether ``output`` is the file ``source`` (the same path, a link to it or a hard link)."""
    if Path(output).resolve() == Path(source).resolve():
        return True
    try:
        return os.path.samefile(output, source)
    except OSError:  # one of them does not exist
        return False


def _warning_line(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    """Show a warning as one ``ndlowrank: warning: ...`` line on stderr (no source line)."""
    print(f"ndlowrank: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success, 2 on bad input)."""
    parser = _parser()
    args = parser.parse_args(argv)
    output = getattr(args, "output", None)
    if output is not None:
        if args.command != "reconstruct" and Path(output).suffix.lower() != ".safetensors":
            parser.exit(2, f"ndlowrank: error: -o {output}: the output file must end in .safetensors\n")
        if Path(output).is_dir():
            parser.exit(2, f"ndlowrank: error: -o {output} is a directory; give a file name\n")
        if not Path(output).resolve().parent.is_dir():
            parser.exit(
                2, f"ndlowrank: error: -o {output}: the directory {Path(output).parent} does not exist\n"
            )
    for destination in [str(getattr(args, name)) for name in OUTPUT_ARGUMENTS if getattr(args, name, None)]:
        for source in _inputs(args):
            if _same_file(destination, source):
                parser.exit(
                    2,
                    f"ndlowrank: error: the output {destination} is the input file {source}; writing it "
                    "would overwrite the input: give another output file\n",
                )
    if getattr(args, "min_size", 0) < 0:
        parser.exit(2, f"ndlowrank: error: --min-size {args.min_size} must be >= 0\n")
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        with warnings.catch_warnings():  # restores the warning machinery on the way out
            warnings.simplefilter("default", ToleranceWarning)
            warnings.showwarning = _warning_line
            return run(args)
    except (UsageError, FileError) as exc:
        parser.exit(2, f"ndlowrank: error: {exc}\n")
    except OSError as exc:  # a write that failed part way (a full disk), also in the demo's save
        parser.exit(2, f"ndlowrank: error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, "ndlowrank: interrupted\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
