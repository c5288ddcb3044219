"""Tucker decompositions: ndlowrank vs TensorLy, side by side in one process.

Run ``python benchmarks/bench_decompose.py`` (``--quick`` for fewer repeats). For every
case (float32, a random low-rank tensor plus 10% noise) it times, interleaved:

- ``nl.sthosvd`` against TensorLy's HOSVD (``tucker(x, rank, n_iter_max=0, init="svd")``);
- ``nl.hooi`` against TensorLy's HOOI (``tucker(x, rank)``, its defaults);
- ``nl.sthosvd`` against a plain 15-line Gram-eigh ST-HOSVD in numpy (the practical floor);

and measures ``nl.sthosvd``'s peak extra memory with tracemalloc. The table goes to the
``bench_decompose`` section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ndlowrank as nl
from benchmarks._common import (
    interleaved_medians,
    machine,
    peak_extra_bytes,
    today,
    versions,
    write_section,
)

CASES = [
    ((256, 256, 3, 3), (32, 32, 3, 3)),
    ((512, 512, 3, 3), (64, 64, 3, 3)),
    ((128, 128, 128), (16, 16, 16)),
    ((200, 200, 200), (20, 20, 20)),
    ((64, 64, 64, 64), (8, 8, 8, 8)),
]


def low_rank_plus_noise(shape, ranks, noise=0.1, seed=0):
    """A Tucker tensor of the given ranks plus Gaussian noise of ``noise`` times its norm, float32."""
    rng = np.random.default_rng(seed)
    core = rng.standard_normal(ranks)
    factors = [rng.standard_normal((size, rank)) for size, rank in zip(shape, ranks, strict=True)]
    signal = nl.tucker_to_tensor(core, factors)
    perturbation = rng.standard_normal(shape)
    x = signal + noise * np.linalg.norm(signal) / np.linalg.norm(perturbation) * perturbation
    return x.astype(np.float32)


def plain_sthosvd(x, ranks):
    """The floor: Gram matrix + numpy eigh per mode, nothing else."""
    core, factors = x, []
    for n, rank in enumerate(ranks):
        y = np.moveaxis(core, n, 0).reshape(core.shape[n], -1)
        _, vectors = np.linalg.eigh(y @ y.T)
        u = vectors[:, ::-1][:, :rank]
        factors.append(u)
        core = np.moveaxis(np.tensordot(u.T, np.moveaxis(core, n, 0), axes=1), 0, n)
    return core, factors


def relative_error(x, dense):
    x64 = x.astype(np.float64)
    return float(np.linalg.norm(x64 - np.asarray(dense, dtype=np.float64)) / np.linalg.norm(x64))


def _contenders(x, ranks, tl_tucker):
    return {
        "nl.sthosvd": lambda: nl.sthosvd(x, ranks),
        "nl.hooi": lambda: nl.hooi(x, ranks),
        "plain": lambda: plain_sthosvd(x, ranks),
        "tl.hosvd": lambda: tl_tucker(x, rank=list(ranks), n_iter_max=0, init="svd"),
        "tl.hooi": lambda: tl_tucker(x, rank=list(ranks)),
    }


def run(repeats: int, cases) -> str:
    import tensorly as tl
    from tensorly.decomposition import tucker as tl_tucker

    tl.set_backend("numpy")
    rows = []
    for shape, ranks in cases:
        x = low_rank_plus_noise(shape, ranks)
        results = _contenders(x, ranks, tl_tucker)
        times = interleaved_medians(results, repeats)
        errors = {
            "nl.sthosvd": relative_error(x, nl.sthosvd(x, ranks).to_dense()),
            "nl.hooi": relative_error(x, nl.hooi(x, ranks).to_dense()),
            "tl.hosvd": relative_error(x, tl.tucker_to_tensor(results["tl.hosvd"]())),
            "tl.hooi": relative_error(x, tl.tucker_to_tensor(results["tl.hooi"]())),
        }
        memory = peak_extra_bytes(results["nl.sthosvd"]) / x.nbytes
        rows.append((shape, ranks, times, errors, memory))
        print(
            f"{shape}: sthosvd {times['tl.hosvd'] / times['nl.sthosvd']:.1f}x TensorLy HOSVD, "
            f"hooi {times['tl.hooi'] / times['nl.hooi']:.1f}x TensorLy HOOI, "
            f"{times['nl.sthosvd'] / times['plain']:.2f}x the plain floor, memory {memory:.2f}x input",
            flush=True,
        )
    return _report(rows, repeats)


def _mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _report(rows, repeats: int) -> str:
    lines = [
        "## Tucker decompositions vs TensorLy (CPU, float32)",
        "",
        f"Written by `python benchmarks/bench_decompose.py` on {today()}. Machine: {machine()}. "
        f"Libraries: {versions('ndlowrank', 'numpy', 'scipy', 'tensorly')}.",
        f"Medians of {repeats} interleaved runs; data: a random Tucker tensor of the given ranks "
        "plus 10% Gaussian noise. Speed-ups are TensorLy's time over ndlowrank's (higher is better); "
        "the floor ratio is ndlowrank's time over a plain 15-line Gram-eigh ST-HOSVD in numpy (lower is better). "
        "Errors are relative Frobenius errors; 'error ≤' compares to TensorLy within 1e-5 relative.",
        "",
        "| shape | ranks | sthosvd vs TL HOSVD | error ≤ | hooi vs TL HOOI | error ≤ | sthosvd / floor | peak extra memory / input |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape, ranks, times, errors, memory in rows:
        st_speed = times["tl.hosvd"] / times["nl.sthosvd"]
        hooi_speed = times["tl.hooi"] / times["nl.hooi"]
        floor = times["nl.sthosvd"] / times["plain"]
        st_ok = errors["nl.sthosvd"] <= errors["tl.hosvd"] * (1 + 1e-5)
        hooi_ok = errors["nl.hooi"] <= errors["tl.hooi"] * (1 + 1e-5)
        lines.append(
            f"| {shape} | {ranks} | {st_speed:.1f}x | {_mark(st_ok)} ({errors['nl.sthosvd']:.5f} vs {errors['tl.hosvd']:.5f}) "
            f"| {hooi_speed:.1f}x | {_mark(hooi_ok)} ({errors['nl.hooi']:.5f} vs {errors['tl.hooi']:.5f}) "
            f"| {floor:.2f} | {memory:.2f} |"
        )
    speedups = [r[2]["tl.hosvd"] / r[2]["nl.sthosvd"] for r in rows]
    hooi_speedups = [r[2]["tl.hooi"] / r[2]["nl.hooi"] for r in rows]
    floors = [r[2]["nl.sthosvd"] / r[2]["plain"] for r in rows]
    geo = lambda values: math.exp(sum(math.log(v) for v in values) / len(values))  # noqa: E731
    lines += [
        "",
        f"Geometric means: sthosvd {geo(speedups):.1f}x TensorLy's HOSVD (target ≥ 10x), "
        f"hooi {geo(hooi_speedups):.1f}x TensorLy's HOOI (target ≥ 3x), "
        f"{geo(floors):.2f}x the plain floor (target ≤ 1.5x); "
        f"peak extra memory at most {max(r[4] for r in rows):.2f}x the input (target ≤ 3x).",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved runs per contender")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    write_section("bench_decompose", run(repeats, CASES))
    print("wrote benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
