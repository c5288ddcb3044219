"""``ndlowrank tour``: a quick tour that decomposes a tensor with every method and prints a table."""

from __future__ import annotations

import math
import time

import numpy as np

import ndlowrank as nl


def _conv_like_kernel(seed: int = 0) -> np.ndarray:
    """A (128, 64, 3, 3) float32 kernel: a Tucker tensor of ranks (16, 16, 3, 3) plus 5% noise."""
    rng = np.random.default_rng(seed)
    shape, ranks = (128, 64, 3, 3), (16, 16, 3, 3)
    signal = nl.tucker_to_tensor(
        rng.standard_normal(ranks), [rng.standard_normal((i, r)) for i, r in zip(shape, ranks, strict=True)]
    )
    noise = rng.standard_normal(shape)
    return (signal + 0.05 * np.linalg.norm(signal) / np.linalg.norm(noise) * noise).astype(np.float32)


def _row(name: str, x: np.ndarray, t: nl.TuckerTensor, seconds: float) -> str:
    error = np.linalg.norm(x.astype(np.float64) - t.to_dense()) / np.linalg.norm(x.astype(np.float64))
    return (
        f"{name:<28} {t.ranks!s:<16} {math.prod(x.shape):>9,} {t.n_params:>8,} "
        f"{math.prod(x.shape) / t.n_params:>6.1f}x {error:>10.2e} {seconds * 1e3:>8.1f}"
    )


def main() -> None:
    """Print the tour."""
    x = _conv_like_kernel()
    print(f"ndlowrank {nl.__version__}: backends available here: {', '.join(nl.available_backends())}\n")
    print(f"A conv-like kernel of shape {x.shape} (float32): Tucker ranks (16, 16, 3, 3) plus 5% noise.\n")
    print(
        f"{'method':<28} {'ranks':<16} {'dense':>9} {'tucker':>8} {'ratio':>7} {'rel. error':>10} {'ms':>8}"
    )
    runs = [
        ("sthosvd(tol=0.1)", lambda: nl.sthosvd(x, tol=0.1)),
        ("sthosvd(tol=0.01)", lambda: nl.sthosvd(x, tol=0.01)),
        ("hosvd(ranks=(16,16,3,3))", lambda: nl.hosvd(x, (16, 16, 3, 3))),
        ("hooi(ranks=(16,16,3,3))", lambda: nl.hooi(x, (16, 16, 3, 3))),
        ("randomized((16,16,3,3))", lambda: nl.tucker(x, (16, 16, 3, 3), method="randomized", seed=0)),
        ("select_ranks(budget=8000)", lambda: nl.sthosvd(x, nl.select_ranks(x, budget=8000))),
    ]
    for name, run in runs:
        start = time.perf_counter()
        t = run()
        print(_row(name, x, t, time.perf_counter() - start))

    d = nl.tucker_delta(x.shape, (8, 8, 3, 3), init="zero_core", scale=4.0, seed=0)
    print(
        f"\nA Tucker delta for that kernel: {d}\n"
        f"  it starts at zero (max |ΔW| = {float(np.abs(d.to_dense()).max())}) and trains "
        f"{d.n_params:,} numbers instead of {math.prod(x.shape):,}."
    )
    print("\nTests: python -m pytest    Benchmarks: benchmarks/RESULTS.md")
