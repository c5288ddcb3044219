"""How decomposition time grows with tensor size and with rank: ndlowrank vs TensorLy.

Run ``python benchmarks/bench_scaling.py`` (about 5 minutes on 2 cores; ``--quick`` for fewer
sizes and repeats, about a minute). Contenders, timed interleaved on the same float32 numpy
tensor (a random Tucker tensor plus 10% noise, ``bench_decompose.low_rank_plus_noise``):

- ``nl.sthosvd(x, ranks)`` and ``nl.hooi(x, ranks)``;
- TensorLy's HOSVD, ``tucker(x, rank, n_iter_max=0, init="svd")``, and its HOOI, ``tucker(x, rank)``.

Two sweeps:

- size: cubes ``n × n × n`` at rank ``n / 8`` in every mode;
- rank: a fixed ``128³`` cube at ranks 4 to 64.

For each contender the script fits the log-log slope of time against the number of elements
(sizes from ``FIT_FROM`` up, where fixed per-call costs no longer dominate) and against the
rank, draws both sweeps in ``benchmarks/plots/bench_scaling.png`` and writes the
``bench_scaling`` section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ndlowrank as nl
from benchmarks._common import (
    add_threads_option,
    blas_threads,
    interleaved_medians,
    load_window,
    machine,
    today,
    versions,
    write_section,
)
from benchmarks._plots import figure, loglog_slope, save
from benchmarks.bench_decompose import low_rank_plus_noise, relative_error

NAMES = ("nl.sthosvd", "nl.hooi", "tl.hosvd", "tl.hooi")
STYLE = {
    "nl.sthosvd": ("tab:blue", "o", "-"),
    "nl.hooi": ("tab:green", "s", "-"),
    "tl.hosvd": ("tab:orange", "^", "--"),
    "tl.hooi": ("tab:red", "v", "--"),
}
FIT_FROM = 64  # smallest cube side in the size fit: below it, per-call overheads dominate
RANK_DIVISOR = 8  # size sweep: rank n / 8 in every mode


@dataclass(frozen=True)
class Plan:
    """What one run measures: the sweeps, the repeats and which sizes TensorLy's HOOI runs at."""

    sizes: tuple[int, ...]
    rank_side: int
    ranks: tuple[int, ...]
    tl_hooi_max_side: int  # TensorLy's HOOI runs only on cubes up to this side (it is the slowest)

    def repeats(self, side: int, quick: bool) -> int:
        """Interleaved runs per contender at this cube side (after one warm-up each)."""
        if quick:
            return 1
        return 5 if side <= 96 else 3 if side <= 192 else 1


FULL = Plan(
    sizes=(32, 48, 64, 96, 128, 192, 256), rank_side=128, ranks=(4, 8, 16, 32, 64), tl_hooi_max_side=256
)
QUICK = Plan(sizes=(32, 48, 64, 96, 128, 192), rank_side=96, ranks=(4, 12, 24, 48), tl_hooi_max_side=128)


@dataclass
class Point:
    """One measured case: the shape, the ranks and each contender's median time and error."""

    side: int
    rank: int
    repeats: int
    times: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def elements(self) -> int:
        return self.side**3


def _contenders(x: Any, rank: int, with_tl_hooi: bool) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """The timed calls, each keeping its last result in ``last`` so errors cost no extra run."""
    from tensorly.decomposition import tucker as tl_tucker

    ranks = [rank] * x.ndim
    calls: dict[str, Callable[[], Any]] = {
        "nl.sthosvd": lambda: nl.sthosvd(x, ranks),
        "nl.hooi": lambda: nl.hooi(x, ranks),
        "tl.hosvd": lambda: tl_tucker(x, rank=ranks, n_iter_max=0, init="svd"),
    }
    if with_tl_hooi:
        calls["tl.hooi"] = lambda: tl_tucker(x, rank=ranks)
    last: dict[str, Any] = {}

    def keep(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            last[name] = fn()
            return last[name]

        return call

    return {name: keep(name, fn) for name, fn in calls.items()}, last


def measure(side: int, rank: int, repeats: int, with_tl_hooi: bool) -> Point:
    import tensorly as tl

    x = low_rank_plus_noise((side,) * 3, (rank,) * 3)
    calls, last = _contenders(x, rank, with_tl_hooi)
    point = Point(side, rank, repeats, interleaved_medians(calls, repeats))
    for name, result in last.items():
        dense = result.to_dense() if name.startswith("nl.") else tl.tucker_to_tensor(result)
        point.errors[name] = relative_error(x, dense)
    del x, last
    print(
        f"{side}³ rank {rank}: "
        + ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in point.times.items()),
        flush=True,
    )
    return point


def sthosvd_flops(shape: tuple[int, ...], ranks: tuple[int, ...]) -> float:
    """Multiply-adds of the Gram route of ST-HOSVD: per mode a Gram matrix, an eigh, a projection.

    Mode ``n`` of the partly truncated tensor ``c`` (``m = prod(c) / c_n`` columns) costs
    ``c_n² m`` for the Gram matrix, ``c_n³`` for the eigensolver and ``r_n c_n m`` for the
    projection; the mode's size then drops to ``r_n``. Constants of the eigensolver are ignored:
    this is a model of the exponent, not of the time.
    """
    current = list(shape)
    total = 0.0
    for n, rank in enumerate(ranks):
        size = current[n]
        columns = math.prod(current) / size
        total += size * size * columns + size**3 + rank * size * columns
        current[n] = rank
    return total


def slopes(points: list[Point], x_of: Callable[[Point], float]) -> dict[str, float]:
    """The log-log slope of each contender's time against ``x_of(point)``, over the points it ran at."""
    fitted = {}
    for name in NAMES:
        runs = [p for p in points if name in p.times]
        if len(runs) >= 2:
            fitted[name] = loglog_slope([x_of(p) for p in runs], [p.times[name] for p in runs])
    return fitted


def plot(size_points: list[Point], size_fit: list[Point], rank_points: list[Point]) -> str:
    from matplotlib.ticker import NullFormatter

    fig, (size_ax, rank_ax) = figure(ncols=2, width=5.6, height=4.4)
    size_slopes = slopes(size_fit, lambda p: p.elements)
    rank_slopes = slopes(rank_points, lambda p: p.rank)
    for ax, points, fitted, x_of in (
        (size_ax, size_points, size_slopes, lambda p: p.elements),
        (rank_ax, rank_points, rank_slopes, lambda p: p.rank),
    ):
        for name in NAMES:
            runs = [p for p in points if name in p.times]
            if not runs:
                continue
            color, marker, line = STYLE[name]
            label = f"{name} (slope {fitted[name]:.2f})" if name in fitted else name
            ax.plot(
                [x_of(p) for p in runs],
                [p.times[name] for p in runs],
                color=color,
                marker=marker,
                linestyle=line,
                label=label,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel("median time (s)")
        ax.legend(fontsize=8)
    first = min(p.elements for p in size_fit)
    size_ax.axvspan(min(p.elements for p in size_points), first, color="grey", alpha=0.12, lw=0)
    size_ax.set_xlabel(
        f"elements N = n³ (rank n/{RANK_DIVISOR}; slopes fitted from n = {FIT_FROM}, unshaded)"
    )
    size_ax.set_title("time vs tensor size")
    side = rank_points[0].side
    rank_ax.set_xlabel(f"rank r in every mode ({side}³ cube)")
    rank_ax.set_xticks([p.rank for p in rank_points], [str(p.rank) for p in rank_points])
    rank_ax.xaxis.set_minor_formatter(NullFormatter())
    rank_ax.set_title("time vs rank")
    fig.suptitle("Tucker decomposition time, float32 numpy, log-log (lower is better)")
    return save(fig, "bench_scaling", "Time vs tensor size and vs rank, log-log, with fitted slopes")


def _ratio(point: Point, tl_name: str, nl_name: str) -> str:
    if tl_name not in point.times:
        return "–"
    return f"{point.times[tl_name] / point.times[nl_name]:.1f}x"


def _fmt_ms(point: Point, name: str) -> str:
    return f"{point.times[name] * 1e3:.0f}" if name in point.times else "–"


@dataclass(frozen=True)
class Run:
    """How the run went: its mode, BLAS threads, machine load and wall time."""

    quick: bool
    threads_option: int
    threads: str
    load: str
    wall: float


def report(run: Run, size_points: list[Point], rank_points: list[Point], image: str) -> str:
    size_fit = [p for p in size_points if p.side >= FIT_FROM]
    size_slopes = slopes(size_fit, lambda p: p.elements)
    all_slopes = slopes(size_points, lambda p: p.elements)
    rank_slopes = slopes(rank_points, lambda p: p.rank)
    model_size = loglog_slope(
        [p.elements for p in size_fit], [sthosvd_flops((p.side,) * 3, (p.rank,) * 3) for p in size_fit]
    )
    model_rank = loglog_slope(
        [p.rank for p in rank_points], [sthosvd_flops((p.side,) * 3, (p.rank,) * 3) for p in rank_points]
    )
    tl_hooi_sides = [p.side for p in size_points if "tl.hooi" in p.times]
    tl_hooi_note = (
        f"TensorLy's HOOI ran only on cubes up to {max(tl_hooi_sides)}³, to keep `--quick` short. "
        if len(tl_hooi_sides) < len(size_points)
        else ""
    )
    command = "python benchmarks/bench_scaling.py" + (" --quick" if run.quick else "")
    if run.threads_option != 1:
        command += f" --threads {run.threads_option}"
    repeats = sorted({p.repeats for p in size_points + rank_points})
    lines = [
        "## How time grows with size and rank (CPU, float32)",
        "",
        f"Written by `{command}` on {today()} in {run.wall:.0f} s. Machine: {machine()}; "
        f"load average (1 min) {run.load}. Libraries: {versions('ndlowrank', 'numpy', 'scipy', 'tensorly')}.",
        "",
        f"BLAS/LAPACK threads: {run.threads} for every contender (`threadpoolctl`; `--threads` changes it). "
        "One thread by default because the exponents are properties of the algorithms and this machine is "
        "shared: with two threads and another process busy, LAPACK's SVD (many small BLAS calls, each "
        "waiting for both threads) ran dozens of times slower in a trial run (0.74 s instead of 9 ms for "
        "one 48 × 2304 float32 SVD), which would have measured the scheduler, not TensorLy.",
        "",
        "Data: a random Tucker tensor of the requested ranks plus 10% Gaussian noise, float32 numpy. "
        f"Medians of {'/'.join(map(str, repeats))} interleaved run(s) after one warm-up (fewer at the larger "
        "sizes: the repeats column says how many). Contenders: `nl.sthosvd`, `nl.hooi` (its defaults), TensorLy's "
        '`tucker(x, rank, n_iter_max=0, init="svd")` (HOSVD) and `tucker(x, rank)` (HOOI, its defaults). '
        + tl_hooi_note
        + "Slopes are least-squares fits of log time against "
        f"log N (elements, from n = {FIT_FROM} up) and against log r; they are the measurement.",
        "",
        "**What to expect.** For an n×n×n cube, every method's leading cost is N·I per mode for an "
        "N-element tensor with modes of size I = N^(1/3): ST-HOSVD's Gram matrix of the n × n² unfolding "
        "(n⁴ multiply-adds, then an n × n eigensolver, n³), TensorLy's thin SVD of the same unfolding "
        "(also ∝ n⁴, with a larger constant, in each of the three modes of the full tensor) and each HOOI "
        "sweep's projection onto the other factors (r·n³ = n⁴/8 at r = n/8). So at a fixed rank ratio "
        f"the expected slope in elements is **4/3**, not 1; a flop count of the Gram route "
        f"(`sthosvd_flops`) gives {model_size:.2f} over the fitted sizes. Memory-bound copies (unfolding "
        "is a transpose) cost O(N) and pull small sizes towards 1. At a fixed size, ST-HOSVD's Gram "
        "matrix does not depend on r and the projections grow like r·n³, so its slope in r is small "
        f"(the flop model gives {model_rank:.2f} over these ranks); TensorLy's full SVDs do not depend on "
        "r at all; HOOI's sweeps cost ∝ r·n³ each, so its slope lies between 0 and 1 and also moves with "
        "the number of sweeps it needs.",
        "",
        image,
        "",
        "| contender | slope in N (n ≥ "
        + f"{FIT_FROM}) | slope in N (all sizes) | slope in r ({rank_points[0].side}³) |",
        "|---|---|---|---|",
    ]
    for name in NAMES:
        cells = [
            f"{fitted[name]:.2f}" if name in fitted else "–"
            for fitted in (size_slopes, all_slopes, rank_slopes)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Size sweep, rank n/8. Times in ms (medians); ratios are TensorLy's time over ndlowrank's "
        "(higher is better for ndlowrank); errors are relative Frobenius errors of the result "
        "(ndlowrank / TensorLy, same ranks).",
        "",
        "| n | N | rank | repeats | nl.sthosvd | tl.hosvd | **TL HOSVD / nl.sthosvd** | nl.hooi | tl.hooi "
        "| **TL HOOI / nl.hooi** | error sthosvd / TL HOSVD |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in size_points:
        lines.append(
            f"| {p.side} | {p.elements:,} | {p.rank} | {p.repeats} | {_fmt_ms(p, 'nl.sthosvd')} | "
            f"{_fmt_ms(p, 'tl.hosvd')} | {_ratio(p, 'tl.hosvd', 'nl.sthosvd')} | {_fmt_ms(p, 'nl.hooi')} | "
            f"{_fmt_ms(p, 'tl.hooi')} | {_ratio(p, 'tl.hooi', 'nl.hooi')} | "
            f"{p.errors['nl.sthosvd']:.4f} / {p.errors['tl.hosvd']:.4f} |"
        )
    lines += [
        "",
        f"Rank sweep, {rank_points[0].side}³ cube, medians of {rank_points[0].repeats} interleaved run(s).",
        "",
        "| rank | nl.sthosvd | tl.hosvd | **TL HOSVD / nl.sthosvd** | nl.hooi | tl.hooi | **TL HOOI / nl.hooi** |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in rank_points:
        lines.append(
            f"| {p.rank} | {_fmt_ms(p, 'nl.sthosvd')} | {_fmt_ms(p, 'tl.hosvd')} | "
            f"{_ratio(p, 'tl.hosvd', 'nl.sthosvd')} | {_fmt_ms(p, 'nl.hooi')} | {_fmt_ms(p, 'tl.hooi')} | "
            f"{_ratio(p, 'tl.hooi', 'nl.hooi')} |"
        )
    lines += ["", summary(size_points, size_slopes, rank_slopes, model_size)]
    return "\n".join(lines)


def summary(
    size_points: list[Point], size_slopes: dict[str, float], rank_slopes: dict[str, float], model_size: float
) -> str:
    """The 'what we see' sentences, generated from the numbers."""
    st = size_slopes["nl.sthosvd"]
    top = size_points[-2:]
    local = loglog_slope([p.elements for p in top], [p.times["nl.sthosvd"] for p in top])
    if abs(st - model_size) <= 0.15:
        versus = f"close to the flop model's {model_size:.2f}"
    else:
        versus = (
            f"{'below' if st < model_size else 'above'} the flop model's {model_size:.2f}; between the two "
            f"largest sizes ({top[0].side}³ and {top[1].side}³) the local slope is {local:.2f}"
        )
    sentences = [f"**What we see.** `nl.sthosvd` grows like N^{st:.2f} ({versus})"]
    if "tl.hosvd" in size_slopes:
        tl_slope = size_slopes["tl.hosvd"]
        ratios = [p.times["tl.hosvd"] / p.times["nl.sthosvd"] for p in size_points]
        trend = (
            "grows" if tl_slope > st + 0.05 else "shrinks" if tl_slope < st - 0.05 else "stays about level"
        )
        sentences.append(
            f"TensorLy's HOSVD like N^{tl_slope:.2f}, so the speed-up {trend} with size "
            f"({ratios[0]:.1f}x at {size_points[0].side}³, {ratios[-1]:.1f}x at {size_points[-1].side}³)"
        )
    hooi_points = [p for p in size_points if "tl.hooi" in p.times]
    if hooi_points:
        ratios = [p.times["tl.hooi"] / p.times["nl.hooi"] for p in hooi_points]
        sentences.append(
            f"`nl.hooi` is {min(ratios):.1f}x to {max(ratios):.1f}x faster than TensorLy's HOOI "
            f"where both ran (slopes {size_slopes['nl.hooi']:.2f} and {size_slopes.get('tl.hooi', float('nan')):.2f})"
        )
    rank_text = ", ".join(f"{name} {slope:.2f}" for name, slope in rank_slopes.items())
    sentences.append(f"In rank the slopes are {rank_text}")
    return ". ".join(sentences) + "."


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer sizes and ranks, one repeat (about a minute)"
    )
    add_threads_option(parser)
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    import tensorly as tl

    tl.set_backend("numpy")
    plan = QUICK if args.quick else FULL
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with blas_threads(args.threads) as threads:
        size_points = [
            measure(side, side // RANK_DIVISOR, plan.repeats(side, args.quick), side <= plan.tl_hooi_max_side)
            for side in plan.sizes
        ]
        rank_repeats = plan.repeats(plan.rank_side, args.quick)
        rank_points = [measure(plan.rank_side, rank, rank_repeats, True) for rank in plan.ranks]
    wall = time.perf_counter() - start
    size_fit = [p for p in size_points if p.side >= FIT_FROM]
    image = plot(size_points, size_fit, rank_points)
    load = load_window(load_before)
    run = Run(args.quick, args.threads, threads, load, wall)
    write_section("bench_scaling", report(run, size_points, rank_points, image))
    print(f"wrote benchmarks/RESULTS.md and benchmarks/plots/bench_scaling.png ({wall:.0f} s)")


if __name__ == "__main__":
    main()
