"""Shared helpers for the benchmark scripts: interleaved timing, machine facts, RESULTS.md sections."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import re
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("RESULTS.md")


def interleaved_medians(contenders: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time (seconds) of each contender, run in turn ``repeats`` times after one warm-up.

    Interleaving spreads the machine's background noise evenly over the contenders.
    """
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


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
