"""Shrinking trained adapters: ``truncate_adapters`` vs forming ΔW and decomposing it densely.

Run ``python benchmarks/bench_truncate.py`` (``--quick`` for fewer repeats). The model has 50
conv adapters of ranks (32, 32, 3, 3) on (256, 256, 3, 3) weights, "trained" (random cores,
perturbed factors). Contenders, interleaved:

- ``truncate_adapters(model, tol=0.3)``: QR of the factors, ST-HOSVD of the small core; ΔW
  is never formed;
- the dense alternative: form every ΔW (256 × 256 × 3 × 3) and run ``ndlowrank.sthosvd``
  with the same tolerance on it (what a user without the small-core trick would do).

Both reach the same guarantee, ``‖ΔW_new − ΔW‖ ≤ tol · ‖ΔW‖`` per layer; the table reports
the time of each, their ratio and the worst relative change measured against the dense ΔW.
The result goes to the ``bench_truncate`` section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ndlowrank as nl
from benchmarks._common import interleaved_medians, machine, today, versions, write_section
from ndlowrank import nn as nlnn

LAYERS, CHANNELS, RANKS, TOL = 50, 256, (32, 32, 3, 3), 0.3


def trained_model(seed: int = 0) -> nn.Module:
    """50 adapted convolutions whose deltas look trained: random cores, non-orthonormal factors."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1) for _ in range(LAYERS)])
    nlnn.add_adapters(model, [str(i) for i in range(LAYERS)], ranks=RANKS, init="orthogonal", seed=seed)
    with torch.no_grad():
        for _, adapter in nlnn.iter_adapters(model):
            adapter.delta.core.normal_()
            for factor in adapter.delta.factors:
                factor.add_(0.1 * torch.randn_like(factor))
    return model


def dense_alternative(model: nn.Module) -> list[nl.TuckerTensor]:
    """Form every ΔW and decompose it with the same tolerance."""
    with torch.no_grad():
        return [nl.sthosvd(adapter.delta_weight(), tol=TOL) for _, adapter in nlnn.iter_adapters(model)]


def run(repeats: int) -> str:
    model = trained_model()
    with torch.no_grad():
        before = [adapter.delta_weight().clone() for _, adapter in nlnn.iter_adapters(model)]
    copies = [copy.deepcopy(model) for _ in range(repeats + 1)]

    def truncate() -> None:
        nlnn.truncate_adapters(copies.pop(), tol=TOL)

    times = interleaved_medians(
        {"truncate_adapters": truncate, "dense ΔW + sthosvd": lambda: dense_alternative(model)}, repeats
    )
    truncated = copy.deepcopy(model)
    report = nlnn.truncate_adapters(truncated, tol=TOL)
    with torch.no_grad():
        changes = [
            float(torch.linalg.vector_norm(adapter.delta_weight() - old) / torch.linalg.vector_norm(old))
            for (_, adapter), old in zip(nlnn.iter_adapters(truncated), before, strict=True)
        ]
    dense_ranks = [t.ranks for t in dense_alternative(model)]
    ratio = times["dense ΔW + sthosvd"] / times["truncate_adapters"]
    print(
        f"truncate_adapters {times['truncate_adapters']:.3f} s, dense {times['dense ΔW + sthosvd']:.3f} s ({ratio:.1f}x)"
    )
    lines = [
        "## Shrinking trained adapters (CPU)",
        "",
        f"Written by `python benchmarks/bench_truncate.py` on {today()}. Machine: {machine()}. "
        f"Libraries: {versions('ndlowrank', 'torch', 'numpy', 'scipy')}; torch threads: {torch.get_num_threads()}.",
        f"{LAYERS} conv adapters of ranks {RANKS} on ({CHANNELS}, {CHANNELS}, 3, 3) weights, random cores and "
        f"perturbed factors, `tol={TOL}`; medians of {repeats} interleaved runs.",
        "",
        "| contender | time for all 50 layers | relative to truncate_adapters |",
        "|---|---|---|",
        f"| `truncate_adapters(model, tol={TOL})` | {times['truncate_adapters']:.3f} s | 1.0x |",
        f"| form ΔW + `sthosvd(ΔW, tol={TOL})` per layer | {times['dense ΔW + sthosvd']:.3f} s | {ratio:.1f}x slower |",
        "",
        f"Target: under 1 s on the CPU: **{'met' if times['truncate_adapters'] < 1.0 else 'not met'}**. "
        f"Worst relative change of ΔW: {max(changes):.3f} (guarantee ≤ {TOL}); ranks after truncation "
        f"{report[0].new_ranks} (first layer), the dense route chose {dense_ranks[0]}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved runs per contender")
    args = parser.parse_args(argv)
    write_section("bench_truncate", run(args.repeats or (3 if args.quick else 7)))
    print("wrote benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
