"""Tucker decompositions: ndlowrank vs TensorLy, side by side in one process.

Run ``python benchmarks/bench_decompose.py`` (``--quick``: the first three CPU cases, 3
repeats; ``--device cuda`` for the GPU suite). For every case (float32, a random low-rank tensor plus 10% noise) it times,
interleaved:

- ``nl.sthosvd`` against TensorLy's HOSVD (``tucker(x, rank, n_iter_max=0, init="svd")``);
- ``nl.hooi`` against TensorLy's HOOI (``tucker(x, rank)``, its defaults);
- ``nl.sthosvd`` against a plain 15-line Gram-eigh ST-HOSVD in numpy (the practical floor);

and measures ``nl.sthosvd``'s peak extra memory with tracemalloc. The table goes to the
``bench_decompose`` section of ``benchmarks/RESULTS.md``.

The GPU suite (``--device cuda``) times ``nl.sthosvd`` and ``nl.hooi`` on torch CUDA tensors and on
cupy arrays (when cupy is installed) against TensorLy's HOSVD and HOOI with its PyTorch backend
on the same CUDA tensor, synchronising the device after every call, and measures the peak extra
CUDA memory of ``nl.sthosvd``; it goes to the ``bench_decompose_gpu`` section.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ndlowrank as nl
from benchmarks._common import (
    add_threads_option,
    blas_threads,
    interleaved_medians,
    machine,
    peak_extra_bytes,
    today,
    versions,
    write_section,
)
from benchmarks._plots import figure, save

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


def run(repeats: int, cases, threads: str) -> str:
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
    return _report(rows, repeats, threads)


def _mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _report(rows, repeats: int, threads: str) -> str:
    lines = [
        "## Tucker decompositions vs TensorLy (CPU, float32)",
        "",
        f"Written by `python benchmarks/bench_decompose.py` on {today()}. Machine: {machine()}. "
        f"Libraries: {versions('ndlowrank', 'numpy', 'scipy', 'tensorly')}.",
        f"BLAS/LAPACK threads: {threads} for every contender (`--threads` changes it; see `blas_threads` in "
        "`benchmarks/_common.py` for why one by default). "
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
    lines += [
        "",
        f"Geometric means: sthosvd {statistics.geometric_mean(speedups):.1f}x TensorLy's HOSVD (target ≥ 10x), "
        f"hooi {statistics.geometric_mean(hooi_speedups):.1f}x TensorLy's HOOI (target ≥ 3x), "
        f"{statistics.geometric_mean(floors):.2f}x the plain floor (target ≤ 1.5x); "
        f"peak extra memory at most {max(r[4] for r in rows):.2f}x the input (target ≤ 3x).",
        "",
        plot_speedups(
            rows,
            {
                "nl.sthosvd vs TensorLy HOSVD": ("tl.hosvd", "nl.sthosvd"),
                "nl.hooi vs TensorLy HOOI": ("tl.hooi", "nl.hooi"),
            },
            "bench_decompose",
            "Tucker decompositions, CPU float32: speed-up over TensorLy",
        ),
    ]
    return "\n".join(lines)


def plot_speedups(rows, series: dict[str, tuple[str, str]], name: str, title: str) -> str:
    """Grouped bars of speed-up per case; ``series`` maps a label to (peer key, ndlowrank key)."""
    fig, ax = figure(width=7.0, height=1.8 + 0.4 * len(rows) * len(series))
    height = 0.8 / len(series)
    for k, (label, (peer, ours)) in enumerate(series.items()):
        speedups = [times[peer] / times[ours] for _, _, times, _, _ in rows]
        positions = [i + (k - (len(series) - 1) / 2) * height for i in range(len(rows))]
        bars = ax.barh(positions, speedups, height=height, label=label)
        ax.bar_label(bars, labels=[f"{v:.1f}×" for v in speedups], padding=2, fontsize=8)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)), [f"{shape}\nranks {ranks}" for shape, ranks, *_ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over TensorLy (its time / ndlowrank's; log scale, > 1 is faster)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    return save(fig, name, title)


GPU_CASES = [
    ((512, 512, 3, 3), (64, 64, 3, 3)),
    ((256, 256, 256), (32, 32, 32)),
    ((400, 400, 400), (40, 40, 40)),
    ((96, 96, 96, 96), (12, 12, 12, 12)),
]


GPU_ERROR_RTOL = 1e-4


def _synced(fn, sync):
    """``fn`` followed by a device synchronisation, so wall time covers the GPU work."""

    def call():
        result = fn()
        sync()
        return result

    return call


def _gpu_contenders(xt, xc, ranks, tl_tucker):
    """The GPU contenders on the torch CUDA tensor ``xt`` and, when given, the cupy array ``xc``."""
    calls = {
        "nl.sthosvd": lambda: nl.sthosvd(xt, ranks),
        "nl.hooi": lambda: nl.hooi(xt, ranks),
        "tl.hosvd": lambda: tl_tucker(xt, rank=list(ranks), n_iter_max=0, init="svd"),
        "tl.hooi": lambda: tl_tucker(xt, rank=list(ranks)),
    }
    if xc is not None:
        calls["nl.sthosvd cupy"] = lambda: nl.sthosvd(xc, ranks)
        calls["nl.hooi cupy"] = lambda: nl.hooi(xc, ranks)
    return calls


def run_gpu(repeats: int, cases) -> str:
    """Time the decompositions on torch CUDA tensors (and cupy arrays) against TensorLy's PyTorch backend."""
    import tensorly as tl
    import torch
    from tensorly.decomposition import tucker as tl_tucker

    try:
        import cupy
    except ImportError:
        cupy = None

    def sync() -> None:
        torch.cuda.synchronize()
        if cupy is not None:
            cupy.cuda.Device().synchronize()

    tl.set_backend("pytorch")
    rows = []
    for shape, ranks in cases:
        host = low_rank_plus_noise(shape, ranks)
        xt = torch.from_numpy(host).cuda()
        xc = cupy.asarray(host) if cupy is not None else None
        calls = _gpu_contenders(xt, xc, ranks, tl_tucker)
        times = interleaved_medians({k: _synced(f, sync) for k, f in calls.items()}, repeats)
        errors = {
            "nl.sthosvd": relative_error(host, calls["nl.sthosvd"]().to_dense().cpu().numpy()),
            "nl.hooi": relative_error(host, calls["nl.hooi"]().to_dense().cpu().numpy()),
            "tl.hosvd": relative_error(host, tl.tucker_to_tensor(calls["tl.hosvd"]()).cpu().numpy()),
            "tl.hooi": relative_error(host, tl.tucker_to_tensor(calls["tl.hooi"]()).cpu().numpy()),
        }
        sync()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        _synced(calls["nl.sthosvd"], sync)()
        memory = (torch.cuda.max_memory_allocated() - start) / xt.nbytes
        rows.append((shape, ranks, times, errors, memory))
        print(
            f"{shape}: sthosvd {times['tl.hosvd'] / times['nl.sthosvd']:.1f}x TensorLy HOSVD, "
            f"hooi {times['tl.hooi'] / times['nl.hooi']:.1f}x TensorLy HOOI (torch CUDA), memory {memory:.2f}x input",
            flush=True,
        )
    return _report_gpu(rows, repeats, cupy is not None)


def _gpu_series(with_cupy: bool) -> dict[str, tuple[str, str]]:
    series = {
        "nl.sthosvd (torch) vs TL HOSVD": ("tl.hosvd", "nl.sthosvd"),
        "nl.hooi (torch) vs TL HOOI": ("tl.hooi", "nl.hooi"),
    }
    if with_cupy:
        series["nl.sthosvd (cupy) vs TL HOSVD"] = ("tl.hosvd", "nl.sthosvd cupy")
        series["nl.hooi (cupy) vs TL HOOI"] = ("tl.hooi", "nl.hooi cupy")
    return series


def _report_gpu(rows, repeats: int, with_cupy: bool) -> str:
    import torch

    lines = [
        "## Tucker decompositions vs TensorLy (GPU, float32)",
        "",
        f"Written by `python benchmarks/bench_decompose.py --device cuda` on {today()}. "
        f"GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); host: {machine()}. "
        f"Libraries: {versions('ndlowrank', 'torch', 'cupy-cuda13x', 'cupy-cuda12x', 'tensorly')}.",
        f"Medians of {repeats} interleaved runs, each followed by a device synchronisation; the same kind of data as the "
        "CPU table. TensorLy runs with its PyTorch backend on the same CUDA tensor. Speed-ups are TensorLy's "
        "time over ndlowrank's (higher is better); 'error ≤' compares to TensorLy within "
        f"{GPU_ERROR_RTOL:g} relative (float32 sums run in another order on the GPU). Peak memory: `torch.cuda.max_memory_allocated()` during "
        "`nl.sthosvd` on the torch tensor, over the input's size.",
        "",
        "| shape | ranks | sthosvd vs TL HOSVD | error ≤ | hooi vs TL HOOI | error ≤ |"
        + (" cupy sthosvd vs TL HOSVD | cupy hooi vs TL HOOI |" if with_cupy else "")
        + " peak extra memory / input |",
        "|---|---|---|---|---|---|" + ("---|---|" if with_cupy else "") + "---|",
    ]
    for shape, ranks, times, errors, memory in rows:
        cells = [
            f"{times['tl.hosvd'] / times['nl.sthosvd']:.1f}x",
            f"{_mark(errors['nl.sthosvd'] <= errors['tl.hosvd'] * (1 + GPU_ERROR_RTOL))} "
            f"({errors['nl.sthosvd']:.5f} vs {errors['tl.hosvd']:.5f})",
            f"{times['tl.hooi'] / times['nl.hooi']:.1f}x",
            f"{_mark(errors['nl.hooi'] <= errors['tl.hooi'] * (1 + GPU_ERROR_RTOL))} "
            f"({errors['nl.hooi']:.5f} vs {errors['tl.hooi']:.5f})",
        ]
        if with_cupy:
            cells += [
                f"{times['tl.hosvd'] / times['nl.sthosvd cupy']:.1f}x",
                f"{times['tl.hooi'] / times['nl.hooi cupy']:.1f}x",
            ]
        lines.append(f"| {shape} | {ranks} | " + " | ".join(cells) + f" | {memory:.2f} |")
    lines += [
        "",
        f"Geometric means (torch CUDA): sthosvd {statistics.geometric_mean([r[2]['tl.hosvd'] / r[2]['nl.sthosvd'] for r in rows]):.1f}x "
        f"TensorLy's HOSVD, hooi {statistics.geometric_mean([r[2]['tl.hooi'] / r[2]['nl.hooi'] for r in rows]):.1f}x TensorLy's HOOI; "
        f"peak extra memory at most {max(r[4] for r in rows):.2f}x the input.",
        "",
        plot_speedups(
            rows,
            _gpu_series(with_cupy),
            "bench_decompose_gpu",
            "Tucker decompositions, GPU float32: speed-up over TensorLy",
        ),
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="the first three CPU cases and 3 repeats instead of 7"
    )
    parser.add_argument("--repeats", type=int, default=None, help="interleaved runs per contender")
    parser.add_argument("--device", default="cpu", help="'cpu' (default) or 'cuda' for the GPU suite")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    repeats = args.repeats or (3 if args.quick else 7)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available here")
        write_section("bench_decompose_gpu", run_gpu(repeats, GPU_CASES))
    elif args.device == "cpu":
        with blas_threads(args.threads) as threads:
            section = run(repeats, CASES[:3] if args.quick else CASES, threads)
        write_section("bench_decompose", section)
    else:
        parser.error(f"--device must be 'cpu' or 'cuda', got {args.device!r}")
    print("wrote benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
