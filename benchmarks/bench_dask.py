"""Tucker decompositions of a dask array several times a memory limit: time, peak memory, passes, error.

Run ``python benchmarks/bench_dask.py`` (``--quick`` for a smaller tensor). The large tensor is
generated chunk by chunk when read (a rank-(8, 8, 8) Tucker tensor plus 1% noise), so it never
exists in memory: each pass over it regenerates its chunks, and the generator counts them. Peak
memory is what tracemalloc sees numpy and dask allocate during the call (the synchronous
scheduler, one thread), against a set limit several times smaller than the tensor. Errors are
measured on a smaller tensor that fits in memory, against the same method on the numpy array,
and the single-pass sketch against ST-HOSVD over several seeds.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dask
import dask.array as da

import ndlowrank as nl
from benchmarks._common import machine, peak_extra_bytes, today, versions, write_section

RANKS = (8, 8, 8)
NOISE = 0.01


class Generated:
    """A low-rank-plus-noise tensor made chunk by chunk on demand; counts the chunks it makes."""

    def __init__(self, shape: tuple[int, ...], chunk: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.core = rng.standard_normal(RANKS)
        self.factors = [
            np.linalg.qr(rng.standard_normal((size, r)))[0] for size, r in zip(shape, RANKS, strict=True)
        ]
        self.seed, self.made = seed, 0
        blocks = tuple((chunk,) * (size // chunk) for size in shape)
        self.array = da.map_blocks(
            self._block, chunks=blocks, dtype=np.float64, meta=np.empty((0,) * len(shape))
        )
        self.chunks = math.prod(self.array.numblocks)
        self.scale = float(np.linalg.norm(self.core)) / math.sqrt(math.prod(shape))

    def _block(self, block_info: Any = None) -> np.ndarray:
        location = block_info[None]["array-location"]
        parts = [f[start:stop] for f, (start, stop) in zip(self.factors, location, strict=True)]
        low = nl.tucker_to_tensor(self.core, parts)
        rng = np.random.default_rng([self.seed, *(start for start, _ in location)])
        self.made += 1
        return low + NOISE * self.scale * rng.standard_normal(low.shape)

    def passes(self) -> float:
        made, self.made = self.made, 0
        return made / self.chunks


METHODS: dict[str, Callable[[Any], Any]] = {
    "sthosvd": lambda x: nl.sthosvd(x, RANKS),
    "hosvd": lambda x: nl.hosvd(x, RANKS),
    "hooi (2 sweeps)": lambda x: nl.hooi(x, RANKS, max_iter=2, tol=0.0),
    "randomized sthosvd (power_iters=1)": lambda x: nl.sthosvd(
        x, RANKS, solver="randomized", power_iters=1, seed=0
    ),
    "sketch (single pass)": lambda x: nl.tucker_sketch(x, RANKS, seed=0),
    "select_ranks(energy=0.99)": lambda x: nl.select_ranks(x, energy=0.99),
}


def large(shape: tuple[int, ...], chunk: int, limit: int) -> list[str]:
    tensor = Generated(shape, chunk)
    rows = []
    for name, method in METHODS.items():
        with dask.config.set(scheduler="synchronous"):
            method(tensor.array[:chunk, :chunk, :chunk])  # imports and caches before measuring
            tensor.passes()
            start = time.perf_counter()
            peak = peak_extra_bytes(lambda method=method: method(tensor.array))
            seconds = time.perf_counter() - start
        passes = tensor.passes()
        print(f"{name}: {seconds:.1f} s, peak {peak / 2**20:.1f} MiB, {passes:g} passes")
        verdict = "yes" if peak < limit else "**no**"
        rows.append(f"| {name} | {seconds:.1f} s | {peak / 2**20:.1f} MiB | {verdict} | {passes:g} |")
    return rows


def small_errors(shape: tuple[int, ...], chunk: int) -> list[str]:
    tensor = Generated(shape, chunk, seed=1)
    x = tensor.array.compute()
    norm = np.linalg.norm(x)
    rows = []
    for name, method in list(METHODS.items())[:-1]:
        lazy, dense = method(tensor.array), method(x)
        error = np.linalg.norm(x - lazy.to_dense()) / norm
        gap = np.linalg.norm(lazy.to_dense() - dense.to_dense()) / norm
        rows.append(
            f"| {name} | {error:.5f} | {np.linalg.norm(x - dense.to_dense()) / norm:.5f} | {gap:.1e} |"
        )
    return rows


def sketch_vs_sthosvd(shape: tuple[int, ...], seeds: int) -> list[str]:
    x = Generated(shape, shape[0], seed=2).array.compute()
    norm = np.linalg.norm(x)
    best = np.linalg.norm(x - nl.sthosvd(x, RANKS).to_dense()) / norm
    rows = [f"| ST-HOSVD ({len(shape) + 1} passes) | – | {best:.5f} | 1.00 |"]
    for label, width in (("2r + 1 (default)", None), ("4r", tuple(4 * r for r in RANKS))):
        errors = [
            np.linalg.norm(x - nl.tucker_sketch(x, RANKS, width=width, seed=s).to_dense()) / norm
            for s in range(seeds)
        ]
        mean = float(np.mean(errors))
        rows.append(f"| sketch, width {label} (1 pass) | {seeds} | {mean:.5f} | {mean / best:.2f} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a 32 MiB tensor under an 8 MiB limit instead of 128 MiB under 24 MiB",
    )
    args = parser.parse_args(argv)
    shape, chunk, limit = (
        ((128, 128, 256), 64, 8 * 2**20) if args.quick else ((256, 256, 256), 64, 24 * 2**20)
    )
    size = math.prod(shape) * 8
    rows = large(shape, chunk, limit)
    errors = small_errors((64, 64, 64), 16)
    sketches = sketch_vs_sthosvd((64, 64, 64), 3 if args.quick else 10)
    command = "python benchmarks/bench_dask.py" + (" --quick" if args.quick else "")
    lines = [
        "## Tensors larger than memory (dask, CPU, float64)",
        "",
        f"Written by `{command}` on {today()}. Machine: {machine()}. "
        f"Libraries: {versions('ndlowrank', 'dask', 'numpy', 'scipy')}.",
        f"A generated {shape} float64 tensor ({size / 2**20:.0f} MiB, chunks of {chunk}³ = "
        f"{chunk**3 * 8 / 2**20:.2f} MiB; rank {RANKS} plus 1% noise), never held in memory: "
        f"{size / limit:.0f}x the {limit / 2**20:.0f} MiB limit. Ranks {RANKS}; dask's synchronous "
        "scheduler; peak = tracemalloc's peak during the call; passes = chunks generated / chunks.",
        "",
        "| method | time | peak memory | within the limit | passes over the data |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Errors on a (64, 64, 64) tensor in chunks of 16³ (relative to ‖x‖), the same method on the "
        "dask array and on the numpy array, and the difference between the two results:",
        "",
        "| method | error (dask) | error (numpy) | ‖dask − numpy‖ / ‖x‖ |",
        "|---|---|---|---|",
        *errors,
        "",
        "The single-pass sketch against ST-HOSVD on a (64, 64, 64) tensor, mean over seeds:",
        "",
        "| method | seeds | relative error | / ST-HOSVD |",
        "|---|---|---|---|",
        *sketches,
    ]
    write_section("bench_dask", "\n".join(lines))
    print("wrote benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
