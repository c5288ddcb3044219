"""Shared helpers for the benchmark scripts: interleaved timing, machine facts, RESULTS.md sections."""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.metadata
import math
import os
import platform
import random
import re
import statistics
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("RESULTS.md")


def interleaved_medians(contenders: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time (seconds) of each contender, run in turn ``repeats`` times after one warm-up.

    Interleaving spreads the machine's background noise evenly over the contenders, and each
    round runs them in its own (seeded, so repeatable) shuffled order, so no contender always
    follows the same one, whose leftovers in caches and allocators could favour or slow it.
    """
    for fn in contenders.values():
        fn()
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(repeats):
        random.Random(round_).shuffle(names)
        for name in names:
            fn = contenders[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: the BLAS/LAPACK threads every contender gets (default 1)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="BLAS/LAPACK threads for every contender (default 1; 0 keeps the libraries' own default)",
    )


@contextlib.contextmanager
def blas_threads(limit: int) -> Iterator[str]:
    """Limit numpy's and scipy's BLAS/LAPACK threads to ``limit`` (0: leave them) while inside.

    Yields the thread counts in force, e.g. ``"1"``. One thread is the benchmarks' default: on a
    shared 2-core machine OpenBLAS's two threads ran up to dozens of times slower than one while
    another process was busy, and numpy and scipy each bring an OpenBLAS whose idle threads spin,
    so timings at two threads measured the scheduler more than the libraries.
    """
    if limit < 0:
        raise ValueError(f"--threads must be >= 0, got {limit}")
    import scipy.linalg  # noqa: F401  (loaded first, so that the limit reaches scipy's own BLAS too)
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(limits=limit or None):
        counts = sorted({info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"})
        yield "/".join(map(str, counts)) or "unknown"


def peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated while ``fn`` runs, beyond what existed before (numpy reports to tracemalloc)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base


def machine() -> str:
    """One line describing the CPU, core count and Python."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"model name\s*:\s*(.+)", f.read())
        if names:
            cpu = names[0].strip()
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def versions(*packages: str) -> str:
    """``name version`` pairs of the installed packages, comma separated."""
    found = []
    for name in packages:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def today() -> str:
    return _dt.date.today().isoformat()


def tucker_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Stored numbers of a Tucker form: the core, ``prod(r_n)``, plus the factors, ``Σ I_n·r_n``."""
    return math.prod(ranks) + sum(size * rank for size, rank in zip(shape, ranks, strict=True))


def load_window(before: float) -> str:
    """The 1-minute load average before a run (``before``) and now, as the sections print it."""
    return f"{before:.1f} before the run, {os.getloadavg()[0]:.1f} after it"


def write_section(name: str, body: str, results: Path = RESULTS) -> None:
    """Replace (or append) the section of ``RESULTS.md`` between this benchmark's markers."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = (
        results.read_text()
        if results.exists()
        else "# Benchmark results\n\nEach section is written by the script it names; rerun it to refresh.\n"
    )
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    text = (
        pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    )
    tmp = results.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(results)
