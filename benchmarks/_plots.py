"""Shared helpers for the benchmark plots: a headless matplotlib figure and a safe PNG writer.

Every plot lands in ``benchmarks/plots/NAME.png`` and is referenced from ``RESULTS.md`` as
``plots/NAME.png``; ``docs/plots`` links to the same folder so the docs site shows them too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

PLOTS = Path(__file__).with_name("plots")


def figure(ncols: int = 1, width: float = 6.4, height: float = 4.2) -> tuple[Any, Any]:
    """A new figure with ``ncols`` axes side by side, drawn without a display (the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    for ax in axes.flat:
        ax.grid(True, which="both", alpha=0.3)
    return fig, (axes[0, 0] if ncols == 1 else list(axes.flat))


def save(fig: Any, name: str, alt: str) -> str:
    """Write ``fig`` to ``benchmarks/plots/<name>.png`` and return its markdown image line.

    The PNG is written to a temporary file first and then moved into place, so an interrupted
    run never leaves a truncated picture behind.
    """
    import matplotlib.pyplot as plt

    PLOTS.mkdir(exist_ok=True)
    target = PLOTS / f"{name}.png"
    tmp = target.with_suffix(".png.tmp")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(target)
    return f"![{alt}](plots/{name}.png)"


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``: the exponent ``p`` in ``y ∝ x**p``."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"need at least two (x, y) pairs of equal length, got {len(xs)} and {len(ys)}")
    bad = [(x, y) for x, y in zip(xs, ys, strict=True) if not (0 < x < math.inf and 0 < y < math.inf)]
    if bad:
        raise ValueError(f"a log-log slope needs positive finite values; got (x, y) = {bad[0]}")
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    if sxx == 0:
        raise ValueError("all x values are equal; a slope needs at least two distinct sizes")
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sxx
