"""``python -m benchmarks.quality.spatial [--quick]``: square spatial factors held or trained, per init.

A conv adapter at full spatial rank (``(r_out, r_in, 3, 3)`` on a 3×3 kernel) can hold its
square spatial factors at the identity, so that only the core and the channel factors train
(the Tucker-2 form, with fewer autograd nodes per call), or train them. Both span the same
deltas but train differently. This runs the quality study's conv case (the same
pre-training, splits, learning-rate grid and budgets) with each init both ways, and writes
the ``quality_spatial`` section of ``benchmarks/RESULTS.md``: the measurement behind which
inits hold them by default (``ndlowrank.nn.layers.held_spatial_modes``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ndlowrank import nn as nlnn

from .._common import RESULTS, machine, today, versions, write_section
from . import conv
from .data import fewshot_split
from .methods import Method, Shape, lora_count, match_tucker_ranks
from .run import FULL, QUICK, Config, _shapes
from .study import Outcome, evaluate_method, pretrain

HOW = ("held", "trained")


def _adapt(
    ranks: Shape, init: str, hold: bool, model: nn.Module, targets: Sequence[str], seed: int
) -> nn.Module:
    adapted = nlnn.add_adapters(model, list(targets), ranks, init=init, seed=seed)
    for _, adapter in nlnn.iter_adapters(adapted):
        spatial = range(2, adapter.weight.ndim)
        if hold:
            adapter.delta.fix_square_modes(spatial)
        else:
            adapter.delta.release_modes(spatial)
    return adapted


def pairs(
    shapes: Sequence[Shape], lora_ranks: Sequence[int], inits: Sequence[str]
) -> list[tuple[Method, Method]]:
    """Per LoRA budget and init, the ``(held, trained)`` methods at spatial rank 3.

    Both take the channel ranks that the init's default form matches to the budget, so they
    differ only in whether the spatial factors train.
    """
    found = []
    for r in lora_ranks:
        budget = sum(lora_count(shape, r) for shape in shapes)
        for init in inits:
            ranks = match_tucker_ranks(shapes, budget, 3, init)
            held, trained = (
                Method(
                    f"ndlowrank {init}, spatial factors {how}",
                    f"ndlowrank {ranks} {init}, {how}",
                    partial(_adapt, ranks, init, how == "held"),
                    budget=r,
                    init=init,
                    spatial=3,
                    ranks=ranks,
                )
                for how in HOW
            )
            found.append((held, trained))
    return found


def _cell(outcome: Outcome) -> str:
    return f"{100 * outcome.mean:.1f} ± {100 * outcome.std:.1f} (lr {outcome.lr:g}, {outcome.trainable:,})"


def row(held: Outcome, trained: Outcome) -> str:
    """A table row: the accuracies, and the paired difference over the same splits."""
    differences = [h - t for h, t in zip(held.test, trained.test, strict=True)]
    ahead = sum(d > 0 for d in differences)
    method = held.method
    return (
        f"| {method.init} | r={method.budget} | {method.ranks} | {_cell(held)} | {_cell(trained)} | "
        f"{100 * statistics.fmean(differences):+.1f} (ahead on {ahead} of {len(differences)}) |"
    )


def run(
    config: Config, results: Path = RESULTS, *, command: str = "python -m benchmarks.quality.spatial"
) -> str:
    """Evaluate every pair, write the section, and return its text."""
    start = time.perf_counter()
    settings = config.settings
    torch.manual_seed(0)  # the quality study's conv net, pre-trained as there
    model = conv.ConvNet()
    pretrain(model, settings)
    tasks = {s: fewshot_split(s, settings.train_per_class, settings.val_per_class) for s in settings.seeds}
    rows = []
    for held, trained in pairs(_shapes(model, conv.TARGETS), config.lora_ranks, config.inits):
        outcomes = [evaluate_method(model, m, conv.TARGETS, tasks, settings) for m in (held, trained)]
        rows.append(row(*outcomes))
        print(rows[-1], flush=True)
    minutes = (time.perf_counter() - start) / 60
    body = "\n".join(
        [
            "## Quality: square spatial factors held or trained (few-shot digits, conv net)",
            "",
            f"Written by `{command}` on {today()} in {minutes:.1f} minutes. Machine: {machine()}, one torch "
            f"thread. Libraries: {versions('ndlowrank', 'torch', 'scikit-learn')}.",
            "",
            "The quality study's conv case (its pre-training, splits, seeds "
            f"{', '.join(map(str, settings.seeds))}, learning-rate grid and budgets) with ndlowrank at "
            "spatial rank 3 on the 3×3 convs, each init twice: the square spatial factors *held* at the "
            "identity (`TuckerDelta.fix_square_modes`: only the core and the channel factors train) or "
            "*trained* (`TuckerDelta.release_modes`). Both have the same channel ranks and span the same "
            "deltas. Cells: test accuracy %, mean ± sample std over the seeds (the lr chosen on validation, "
            "the trainable parameters); the last column is held minus trained, the mean of the paired "
            "differences over the same splits. A conv adapter holds them by default where holding measured "
            "as accurate or better.",
            "",
            "| init | LoRA budget | ranks | held | trained | held − trained (points) |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    write_section("quality_spatial", body, results)
    return body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quality study's quick settings")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    command = "python -m benchmarks.quality.spatial" + (" --quick" if args.quick else "")
    run(QUICK if args.quick else FULL, command=command)
    print("wrote the quality_spatial section of benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
