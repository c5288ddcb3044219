"""Relative error vs parameters on trained conv kernels: Tucker decompositions vs a flattened SVD.

Run ``python benchmarks/bench_kernels.py`` (``--quick`` for fewer tolerances and ranks); it needs
``benchmarks/quality/pretrained_convnet.safetensors``, written by ``python -m benchmarks.quality``.
Every 4-D tensor in that file with at least 16 output and 16 input channels is compressed by:

- ``nl.sthosvd(w, tol=tol)`` over a sweep of tolerances (it chooses the ranks);
- ``nl.hosvd(w, ranks)`` and ``nl.hooi(w, ranks)`` over ranks ``(r, r, s, s)``: channel ranks
  ``r`` and spatial ranks ``s`` in 1..3 (the plot keeps each method's Pareto front);
- the flattened-matrix truncated SVD that LoRA-style reshaping keeps: ``w`` reshaped to
  ``(out, in·k·k)``, rank ``r``, ``r·(out + in·k·k)`` parameters, computed with numpy's float64
  ``np.linalg.svd`` as an independent reference.

Tucker parameters are the core's size plus ``Σ I_n·r_n``. Errors are relative Frobenius errors,
computed in float64 (the kernels are cast to float64 first). A synthetic, clearly labelled
"structured" kernel (a random Tucker tensor of small ranks plus noise, ``(256, 256, 3, 3)``) is
added so that the plot also shows a larger kernel. The script checks that every
``sthosvd(tol)`` result meets its guarantee (error ≤ tol) and compares ``hooi`` to ``hosvd`` at
the same ranks. Results: ``benchmarks/plots/bench_kernels.png`` and the ``bench_kernels``
section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ndlowrank as nl
from benchmarks._common import blas_threads, machine, today, versions, write_section
from benchmarks.bench_decompose import low_rank_plus_noise, relative_error

PRETRAINED = Path(__file__).resolve().with_name("quality") / "pretrained_convnet.safetensors"
MIN_CHANNELS = 16
BUDGETS = (0.05, 0.10, 0.25)  # fractions of the kernel's size
SYNTHETIC_SHAPE, SYNTHETIC_RANKS, SYNTHETIC_NOISE = (256, 256, 3, 3), (32, 32, 2, 2), 0.05

TOLS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.02, 0.01)
CHANNEL_RANKS = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128, 192)
SPATIAL_RANKS = (1, 2, 3)
QUICK_TOLS = (0.8, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02)
QUICK_CHANNEL_RANKS = (1, 2, 4, 8, 16, 32, 64, 128)
QUICK_SPATIAL_RANKS = (2, 3)

METHODS = ("sthosvd(tol)", "hosvd(ranks)", "hooi(ranks)", "flattened SVD")
STYLE = {
    "sthosvd(tol)": ("tab:blue", "o", "-"),
    "hosvd(ranks)": ("tab:orange", "^", "--"),
    "hooi(ranks)": ("tab:green", "s", ":"),
    "flattened SVD": ("tab:red", "D", "-"),
}


@dataclass(frozen=True)
class Fit:
    """One compressed kernel: the ranks kept, its parameter count and relative error."""

    ranks: tuple[int, ...]
    params: int
    error: float


@dataclass
class Kernel:
    """A kernel, where it came from, and every method's fits."""

    name: str
    weight: np.ndarray
    synthetic: bool = False
    fits: dict[str, list[Fit]] = field(default_factory=dict)
    tols: list[tuple[float, Fit]] = field(default_factory=list)  # sthosvd's (tol, fit) pairs

    @property
    def size(self) -> int:
        return int(self.weight.size)


def flattened_svd_fits(weight: np.ndarray) -> list[Fit]:
    """Every rank of the truncated SVD of ``weight`` reshaped to ``(out, rest)``, in float64.

    Rank ``r`` stores ``r·(out + rest)`` numbers; its relative error is
    ``sqrt(Σ_{i≥r} σ_i²) / ‖w‖`` (Eckart–Young), from numpy's ``np.linalg.svd``.
    """
    matrix = np.asarray(weight, dtype=np.float64).reshape(weight.shape[0], -1)
    singular = np.linalg.svd(matrix, compute_uv=False)
    energy = singular**2
    tails = np.cumsum(energy[::-1])[::-1]  # tails[r] = Σ_{i≥r} σ_i²
    total = float(tails[0])
    rows, cols = matrix.shape
    fits = []
    for rank in range(1, len(singular) + 1):
        tail = float(tails[rank]) if rank < len(singular) else 0.0
        fits.append(Fit((rank,), rank * (rows + cols), math.sqrt(max(tail, 0.0) / total)))
    return fits


def best_within(fits: Sequence[Fit], budget: float) -> Fit | None:
    """The fit of lowest error among those with at most ``budget`` parameters (None if there is none)."""
    inside = [fit for fit in fits if fit.params <= budget]
    return min(inside, key=lambda fit: (fit.error, fit.params)) if inside else None


def pareto(fits: Sequence[Fit]) -> list[Fit]:
    """The fits no other fit beats on both parameters and error, by increasing parameters."""
    front: list[Fit] = []
    for fit in sorted(fits, key=lambda f: (f.params, f.error)):
        if not front or fit.error < front[-1].error:
            front.append(fit)
    return front


def rank_grid(shape: tuple[int, ...], channel_ranks: Sequence[int], spatial_ranks: Sequence[int]):
    """Ranks ``(r_out, r_in, s, s)`` with each rank clipped to its mode, without repeats."""
    out, inp = shape[0], shape[1]
    grid = []
    for r in channel_ranks:
        for s in spatial_ranks:
            ranks = (min(r, out), min(r, inp), *(min(s, k) for k in shape[2:]))
            if ranks not in grid:
                grid.append(ranks)
    return grid


def load_kernels(path: Path) -> list[Kernel]:
    """Every 4-D tensor of the safetensors file with at least ``MIN_CHANNELS`` output and input channels."""
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    return [
        Kernel(name, tensor)
        for name, tensor in sorted(tensors.items())
        if tensor.ndim == 4 and tensor.shape[0] >= MIN_CHANNELS and tensor.shape[1] >= MIN_CHANNELS
    ]


def synthetic_kernel() -> Kernel:
    shape, ranks = SYNTHETIC_SHAPE, SYNTHETIC_RANKS
    name = f"synthetic {shape}: Tucker ranks {ranks} + {SYNTHETIC_NOISE:.0%} noise"
    return Kernel(name, low_rank_plus_noise(shape, ranks, noise=SYNTHETIC_NOISE, seed=1), synthetic=True)


def compress(kernel: Kernel, tols: Sequence[float], grid: list[tuple[int, ...]]) -> None:
    """Fill ``kernel.fits`` for every method (only fits smaller than the kernel itself are kept)."""
    w = np.asarray(kernel.weight, dtype=np.float64)
    for tol in tols:
        t = nl.sthosvd(w, tol=tol)
        kernel.tols.append((tol, Fit(t.ranks, t.n_params, relative_error(w, t.to_dense()))))
    kernel.fits["sthosvd(tol)"] = [fit for _, fit in kernel.tols]
    for method, decompose in (("hosvd(ranks)", nl.hosvd), ("hooi(ranks)", nl.hooi)):
        fits = []
        for ranks in grid:
            t = decompose(w, ranks)
            fits.append(Fit(t.ranks, t.n_params, relative_error(w, t.to_dense())))
        kernel.fits[method] = fits
    kernel.fits["flattened SVD"] = flattened_svd_fits(w)
    for method, fits in kernel.fits.items():
        kernel.fits[method] = [fit for fit in fits if fit.params < kernel.size]


def hooi_vs_hosvd(kernel: Kernel) -> tuple[int, int, float]:
    """At the same ranks: how many hooi errors are ≤ hosvd's, of how many, and the worst ratio."""
    hosvd = {fit.ranks: fit.error for fit in kernel.fits["hosvd(ranks)"]}
    pairs = [(fit.error, hosvd[fit.ranks]) for fit in kernel.fits["hooi(ranks)"] if fit.ranks in hosvd]
    better = sum(hooi <= ref * (1 + 1e-12) for hooi, ref in pairs)
    worst = max((hooi / ref for hooi, ref in pairs if ref > 0), default=float("nan"))
    return better, len(pairs), worst


def plot(kernels: list[Kernel]) -> str:
    from matplotlib.ticker import FuncFormatter, LogLocator

    from benchmarks._plots import figure, save

    fig, axes = figure(ncols=len(kernels), width=4.8, height=4.4)
    axes = axes if isinstance(axes, list) else [axes]
    for ax, kernel in zip(axes, kernels, strict=True):
        for method in METHODS:
            front = pareto(kernel.fits[method])
            color, marker, line = STYLE[method]
            label = method + (" (Pareto front)" if method in ("hosvd(ranks)", "hooi(ranks)") else "")
            ax.plot(
                [f.params for f in front],
                [f.error for f in front],
                color=color,
                marker=marker,
                markersize=4,
                linestyle=line,
                label=label,
            )
        for budget in BUDGETS:
            ax.axvline(budget * kernel.size, color="grey", linewidth=0.8, linestyle=":")
            ax.text(
                budget * kernel.size,
                1.0,
                f" {budget:.0%}",
                transform=ax.get_xaxis_transform(),
                va="top",
                fontsize=7,
                color="grey",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters kept (log)")
        ax.set_ylabel("relative error ‖w − ŵ‖ / ‖w‖")
        if kernel.synthetic:
            title = kernel.name.replace("synthetic", "SYNTHETIC", 1).replace(": ", ":\n", 1)
        else:
            title = f"trained {kernel.name} {tuple(kernel.weight.shape)}"
        ax.set_title(title, fontsize=9)
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Conv kernels: relative error vs parameters (lower left is better; dotted: % of the kernel)")
    return save(fig, "bench_kernels", "Relative error vs parameters kept, per kernel and method")


def _cell(fit: Fit | None) -> str:
    if fit is None:
        return "–"
    return f"{fit.error:.3f} ({','.join(map(str, fit.ranks))})"


TIE = 0.01  # errors within 1% of each other count as a tie in the findings


def flattened_takes_over(kernel: Kernel) -> Fit | None:
    """The smallest flattened-SVD fit whose error is below every Tucker fit of at most its size."""
    tucker = [fit for method in METHODS if method != "flattened SVD" for fit in kernel.fits[method]]
    for fit in sorted(kernel.fits["flattened SVD"], key=lambda f: f.params):
        rival = best_within(tucker, fit.params)
        if rival is None or fit.error < rival.error:
            return fit
    return None


def findings(kernels: list[Kernel]) -> list[str]:
    """The 'what we see' sentences, generated from the numbers."""
    lines = []
    for kernel in kernels:
        wins, flat_wins, ties, tol_behind = [], [], [], 0
        for budget in BUDGETS:
            best = {m: best_within(kernel.fits[m], budget * kernel.size) for m in METHODS}
            tucker = [(m, f) for m, f in best.items() if m != "flattened SVD" and f is not None]
            flat = best["flattened SVD"]
            if not tucker or flat is None:
                continue
            method, fit = min(tucker, key=lambda mf: mf[1].error)
            swept = [f.error for m in ("hosvd(ranks)", "hooi(ranks)") if (f := best[m]) is not None]
            by_tol = best["sthosvd(tol)"]
            if swept and (by_tol is None or by_tol.error > min(swept) * (1 + TIE)):
                tol_behind += 1
            pair = f"{budget:.0%}: {fit.error:.4f} ({method}) vs {flat.error:.4f}"
            if abs(fit.error - flat.error) <= TIE * flat.error:
                ties.append(pair)
            elif fit.error < flat.error:
                wins.append(pair)
            else:
                flat_wins.append(pair)
        parts = []
        if wins:
            parts.append("the best Tucker form has the lower error at " + "; ".join(wins))
        if flat_wins:
            parts.append("**the flattened SVD has the lower error** at " + "; ".join(flat_wins))
        if ties:
            parts.append("the two are within 1% at " + "; ".join(ties))
        label = "synthetic kernel" if kernel.synthetic else f"`{kernel.name}`"
        sentence = f"- {label}: " + (", ".join(parts) if parts else "no budget holds both kinds") + "."
        over = flattened_takes_over(kernel)
        if over is not None:
            sentence += (
                f" The flattened SVD first beats every Tucker fit of at most its size at rank {over.ranks[0]} "
                f"({over.params / kernel.size:.0%} of the kernel's size, error {over.error:.4f})."
            )
        if tol_behind:
            sentence += (
                f" `sthosvd(tol)` is more than 1% behind the best rank sweep at {tol_behind} of "
                f"{len(BUDGETS)} budgets: it lets every mode discard the same share of the error, "
                "which is not the split that minimises parameters."
            )
        lines.append(sentence)
    return lines


def report(kernels: list[Kernel], image: str, command: str, source: str, wall: float) -> str:
    lines = [
        "## Conv kernels: relative error vs parameters (Tucker vs flattened SVD)",
        "",
        f"Written by `{command}` on {today()} in {wall:.0f} s. Machine: {machine()}. "
        f"Libraries: {versions('ndlowrank', 'numpy', 'safetensors')}.",
        "",
        f"Kernels: {source}. Every method works on the kernel cast to float64; errors are relative Frobenius "
        "errors ‖w − ŵ‖ / ‖w‖. Tucker parameters: core size + Σ I_n·r_n. Flattened SVD: the kernel "
        "reshaped to (out, in·k·k), rank r, r·(out + in·k·k) parameters, errors from numpy's float64 "
        "`np.linalg.svd` (what LoRA-style reshaping of a conv weight can reach at best). `sthosvd(tol)` "
        f"sweeps {len(kernels[0].tols)} tolerances; `hosvd` and `hooi` sweep ranks (r, r, s, s) "
        "(channel rank r clipped to each mode, spatial rank s in 1..3) and the plot shows each one's Pareto "
        "front. Only fits with fewer parameters than the kernel itself are kept. The last panel and the "
        "rows marked *synthetic* are **not** a trained kernel: a random Tucker tensor of small ranks plus "
        "noise, included to show a larger kernel whose structure Tucker matches by construction "
        f"(its noise is {SYNTHETIC_NOISE:.0%} of the signal's norm, so errors below about "
        f"{SYNTHETIC_NOISE / math.sqrt(1 + SYNTHETIC_NOISE**2):.3f} are spent on fitting noise).",
        "",
        image,
        "",
        "Best relative error within a parameter budget (a share of the kernel's size), with the ranks "
        "that reach it (for the flattened SVD, its rank):",
        "",
        "| kernel | method | " + " | ".join(f"≤ {b:.0%} params" for b in BUDGETS) + " |",
        "|---|---|" + "---|" * len(BUDGETS),
    ]
    for kernel in kernels:
        label = ("*synthetic* " if kernel.synthetic else "") + f"{tuple(kernel.weight.shape)}"
        if not kernel.synthetic:
            label = f"`{kernel.name}` {label}"
        for method in METHODS:
            cells = [_cell(best_within(kernel.fits[method], b * kernel.size)) for b in BUDGETS]
            lines.append(f"| {label} | {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Checks: `sthosvd(tol)` guarantees ‖w − ŵ‖ ≤ tol · ‖w‖; `hooi` starts from ST-HOSVD and returns "
        "its best sweep, so at the same ranks its error is expected (not guaranteed) to be ≤ `hosvd`'s.",
        "",
        "| kernel | sthosvd: tolerances met | worst error / tol | hooi ≤ hosvd at the same ranks | worst hooi / hosvd |",
        "|---|---|---|---|---|",
    ]
    for kernel in kernels:
        met = sum(fit.error <= tol for tol, fit in kernel.tols)
        worst = max(fit.error / tol for tol, fit in kernel.tols)
        better, total, ratio = hooi_vs_hosvd(kernel)
        label = "*synthetic*" if kernel.synthetic else f"`{kernel.name}`"
        lines.append(
            f"| {label} | {met} of {len(kernel.tols)} | {worst:.3f} | {better} of {total} | {ratio:.6f} |"
        )
    lines += [
        "",
        "**What we see** (best error within each budget, best Tucker method vs the flattened SVD):",
        "",
    ]
    lines += findings(kernels)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tolerances and ranks")
    parser.add_argument(
        "--weights",
        type=Path,
        default=PRETRAINED,
        help="safetensors file of the trained model (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if not args.weights.exists():
        sys.exit(
            f"bench_kernels: {args.weights} does not exist; run `python -m benchmarks.quality` first "
            "(it trains the conv net and writes that file)."
        )
    kernels = load_kernels(args.weights)
    if not kernels:
        sys.exit(
            f"bench_kernels: {args.weights} holds no 4-D tensor with ≥ {MIN_CHANNELS} output and input channels"
        )
    digest = hashlib.sha256(args.weights.read_bytes()).hexdigest()[:12]
    try:
        shown = args.weights.resolve().relative_to(Path(__file__).resolve().parents[1])
    except ValueError:
        shown = args.weights
    source = (
        f"the trained conv net's weights in `{shown}` (sha256 {digest}…; "
        f"{', '.join(f'`{k.name}` {tuple(k.weight.shape)}' for k in kernels)}), plus the synthetic kernel"
    )
    kernels.append(synthetic_kernel())
    tols = QUICK_TOLS if args.quick else TOLS
    channel_ranks = QUICK_CHANNEL_RANKS if args.quick else CHANNEL_RANKS
    spatial_ranks = QUICK_SPATIAL_RANKS if args.quick else SPATIAL_RANKS
    start = time.perf_counter()
    with blas_threads(1):  # the errors do not depend on it; see blas_threads for why one
        for kernel in kernels:
            compress(kernel, tols, rank_grid(kernel.weight.shape, channel_ranks, spatial_ranks))
            print(f"{kernel.name}: {sum(len(f) for f in kernel.fits.values())} fits", flush=True)
    wall = time.perf_counter() - start
    image = plot(kernels)
    command = "python benchmarks/bench_kernels.py" + (" --quick" if args.quick else "")
    if args.weights != PRETRAINED:
        command += f" --weights {args.weights}"
    write_section("bench_kernels", report(kernels, image, command, source, wall))
    print(f"wrote benchmarks/RESULTS.md and benchmarks/plots/bench_kernels.png ({wall:.0f} s)")


if __name__ == "__main__":
    main()
