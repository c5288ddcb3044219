"""Run every benchmark, side by side with its peers, and refresh ``RESULTS.md`` and the plots.

From the repository root, with the ``bench`` extra installed (``pip install -e ".[bench]"``)::

    python -m benchmarks              # the whole suite (about 15 minutes on 2 cores)
    python -m benchmarks --quick      # fewer repeats, seeds and sizes: a few minutes
    python -m benchmarks --only decompose adapters
    python -m benchmarks --list

Each benchmark runs in a fresh Python process (``python benchmarks/bench_NAME.py``), one after
the other, so none of them times another's leftovers and one failure does not stop the rest.
A benchmark whose peers are not installed is skipped with the command that installs them.
The runner then writes the ``run`` section of ``RESULTS.md``: what ran, for how long, and how
it ended. The GPU suite is ``bash benchmarks/gpu.sh`` on a machine with a CUDA device.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine, today, write_section  # noqa: E402

INSTALL = 'pip install -e ".[bench]"'


@dataclass(frozen=True)
class Benchmark:
    """One benchmark script, the modules it cannot run without, and what it measures."""

    name: str
    command: tuple[str, ...]
    needs: tuple[str, ...]
    about: str

    def missing(self) -> list[str]:
        return [module for module in self.needs if importlib.util.find_spec(module) is None]


BENCHMARKS = [
    Benchmark(
        "decompose",
        ("benchmarks/bench_decompose.py",),
        ("tensorly", "matplotlib", "threadpoolctl"),
        "ST-HOSVD and HOOI vs TensorLy: speed, error, memory",
    ),
    Benchmark(
        "scaling",
        ("benchmarks/bench_scaling.py",),
        ("tensorly", "matplotlib", "threadpoolctl"),
        "how time grows with tensor size and rank (log-log slopes)",
    ),
    Benchmark(
        "quality",
        ("-m", "benchmarks.quality"),
        ("torch", "peft", "sklearn", "matplotlib", "safetensors"),
        "accuracy vs trainable parameters: Tucker adapters, LoRA, LyCORIS on digits",
    ),
    Benchmark(
        "quality_spatial",
        ("-m", "benchmarks.quality.spatial"),
        ("torch", "sklearn", "safetensors"),
        "accuracy with a conv adapter's square spatial factors held or trained, per init",
    ),
    Benchmark(
        "kernels",
        ("benchmarks/bench_kernels.py",),
        ("matplotlib", "safetensors", "threadpoolctl"),
        "relative error vs parameters on trained conv kernels, Tucker vs flattened SVD",
    ),
    Benchmark(
        "adapters",
        ("benchmarks/bench_adapters.py",),
        ("torch", "peft", "matplotlib"),
        "adapter training-step time and peak memory vs PEFT LoRA and LyCORIS",
    ),
    Benchmark(
        "dask",
        ("benchmarks/bench_dask.py",),
        ("dask",),
        "dask arrays several times a memory limit: time, peak memory, passes, error",
    ),
    Benchmark(
        "models",
        ("benchmarks/bench_models.py",),
        ("torch", "peft", "transformers", "diffusers"),
        "whole real networks (tiny configs): training step and memory vs PEFT LoRA, per-call cost",
    ),
    Benchmark(
        "forms",
        ("benchmarks/bench_forms.py",),
        ("torch", "peft"),
        "every form of an adapter's step on real layer shapes: does path='auto' pick the fastest",
    ),
    Benchmark(
        "truncate",
        ("benchmarks/bench_truncate.py",),
        ("torch",),
        "truncate_adapters vs forming ΔW and decomposing it",
    ),
    Benchmark(
        "interop",
        ("benchmarks/bench_interop.py",),
        ("torch", "peft", "lycoris", "safetensors"),
        "PEFT / kohya / LyCORIS files: size, load time, import + re-compress time and error",
    ),
]
NAMES = [b.name for b in BENCHMARKS]


@dataclass
class Outcome:
    benchmark: Benchmark
    status: str  # "ok", "failed (exit N)" or "skipped: ..."
    seconds: float = 0.0


def run_one(benchmark: Benchmark, quick: bool) -> Outcome:
    """Run one benchmark in a fresh process, streaming its output."""
    missing = benchmark.missing()
    if missing:
        return Outcome(benchmark, f"skipped: {', '.join(missing)} not installed ({INSTALL})")
    command = [sys.executable, *benchmark.command, *(["--quick"] if quick else [])]
    start = time.perf_counter()
    returncode = subprocess.run(command, cwd=ROOT).returncode
    seconds = time.perf_counter() - start
    return Outcome(benchmark, "ok" if returncode == 0 else f"failed (exit {returncode})", seconds)


def summary(outcomes: list[Outcome], quick: bool) -> str:
    mode = "`python -m benchmarks --quick`" if quick else "`python -m benchmarks`"
    lines = [
        "## The last run",
        "",
        f"{mode} on {today()}. Machine: {machine()}. Each benchmark ran in its own process, one after "
        "the other; every section below names the script that wrote it, its date and its libraries.",
        "",
        "| benchmark | what it measures | status | wall time |",
        "|---|---|---|---|",
    ]
    for outcome in outcomes:
        wall = f"{outcome.seconds:.0f} s" if outcome.seconds else "–"
        lines.append(f"| {outcome.benchmark.name} | {outcome.benchmark.about} | {outcome.status} | {wall} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.splitlines()[0],
        epilog="benchmarks: " + ", ".join(NAMES),
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats, seeds and sizes: a few minutes")
    parser.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME", help="run just these benchmarks")
    parser.add_argument(
        "--skip", nargs="+", choices=NAMES, metavar="NAME", default=[], help="leave these out"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        width = max(len(name) for name in NAMES)
        for benchmark in BENCHMARKS:
            missing = benchmark.missing()
            note = f"  [needs {', '.join(missing)}: {INSTALL}]" if missing else ""
            print(f"{benchmark.name:<{width}} {benchmark.about}{note}")
        return 0
    chosen = [b for b in BENCHMARKS if (not args.only or b.name in args.only) and b.name not in args.skip]
    if not chosen:
        parser.error("--only and --skip leave no benchmark to run")
    outcomes = []
    for index, benchmark in enumerate(chosen, 1):
        print(f"\n[{index}/{len(chosen)}] {benchmark.name}: {benchmark.about}", flush=True)
        outcome = run_one(benchmark, args.quick)
        print(
            f"[{index}/{len(chosen)}] {benchmark.name}: {outcome.status} ({outcome.seconds:.0f} s)",
            flush=True,
        )
        outcomes.append(outcome)
    write_section("run", summary(outcomes, args.quick))
    failed = [o.benchmark.name for o in outcomes if o.status.startswith("failed")]
    print(
        f"\nwrote benchmarks/RESULTS.md; {len(outcomes) - len(failed)} of {len(outcomes)} benchmarks did not fail"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
