"""The ``quality`` section of RESULTS.md: tables, plots and sentences computed from the measurements."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from .. import _plots
from .methods import FULL, HEAD_ONLY, LORA
from .study import CaseResult, Outcome

COLOURS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<")
SINGLE = {HEAD_ONLY: ("black", "x"), FULL: ("gray", "*")}


@dataclass(frozen=True)
class Panel:
    """One plot panel: a title and the families it shows (head-only and full fine-tuning always)."""

    title: str
    families: tuple[str, ...]


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def table(result: CaseResult) -> str:
    """A markdown table: method, family, budget, trainable parameters, chosen lr, test accuracy."""
    lines = [
        "| method | family | LoRA budget | trainable params (adapters + head) | lr | test accuracy % (mean ± std) |",
        "|---|---|---|---|---|---|",
    ]
    for o in result.outcomes:
        budget = "–" if o.method.budget is None else f"r={o.method.budget}"
        lines.append(
            f"| {o.method.label} | {o.method.family} | {budget} | {o.trainable:,} | {o.lr:g} "
            f"| {_pct(o.mean)} ± {_pct(o.std)} |"
        )
    return "\n".join(lines)


def _styles(families: Sequence[str]) -> dict[str, tuple[str, str]]:
    styles = dict(SINGLE)
    others = [f for f in dict.fromkeys(families) if f not in SINGLE]
    for i, family in enumerate(others):
        styles[family] = (COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)])
    return styles


def plot(result: CaseResult, panels: Sequence[Panel], name: str, alt: str) -> str:
    """Accuracy against trainable parameters (log x, error bars = std over seeds); the markdown image line."""
    fig, axes = _plots.figure(ncols=len(panels))
    axes = axes if isinstance(axes, list) else [axes]
    styles = _styles([o.method.family for o in result.outcomes])
    for ax, panel in zip(axes, panels, strict=True):
        for family in (HEAD_ONLY, FULL, *panel.families):
            points = sorted(
                (o for o in result.outcomes if o.method.family == family), key=lambda o: o.trainable
            )
            if not points:
                continue
            colour, marker = styles[family]
            ax.errorbar(
                [o.trainable for o in points],
                [100 * o.mean for o in points],
                yerr=[100 * o.std for o in points],
                color=colour,
                marker=marker,
                linestyle="-" if len(points) > 1 else "none",
                capsize=3,
                label=family,
            )
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (adapters + head)")
        ax.set_ylabel("test accuracy on digits 5–9 (%)")
        ax.set_title(panel.title, fontsize=10)
        ax.legend(fontsize=7)
    return _plots.save(fig, name, alt)


def _paired(a: Outcome, b: Outcome) -> tuple[float, int]:
    """Mean of ``a - b`` over the seeds (the same splits) and on how many seeds ``a`` is strictly better."""
    diffs = [x - y for x, y in zip(a.test, b.test, strict=True)]
    return statistics.fmean(diffs), sum(d > 0 for d in diffs)


def findings(result: CaseResult, lrs: Sequence[float]) -> list[str]:
    """Sentences that describe what the numbers of one case show, computed from them (``lrs``: the grid)."""
    by_family: dict[str, list[Outcome]] = {}
    for o in result.outcomes:
        by_family.setdefault(o.method.family, []).append(o)
    head, full = by_family[HEAD_ONLY][0], by_family[FULL][0]
    seeds = len(head.test)
    spread = statistics.median(o.std for o in result.outcomes)
    sentences = [
        f"Head-only reaches {_pct(head.mean)}% and full fine-tuning {_pct(full.mean)}% "
        f"({full.trainable:,} parameters); the median seed-to-seed std is {_pct(spread)} points, "
        "so differences well below that are within the noise of the splits."
    ]
    budgets = sorted({o.method.budget for o in result.outcomes if o.method.budget is not None})
    lora_wins = 0
    for r in budgets:
        group = [o for o in result.outcomes if o.method.budget == r]
        best = max(group, key=lambda o: o.mean)
        lora = next(o for o in group if o.method.family == LORA)
        tucker = [o for o in group if o.method.family.startswith("ndlowrank")]
        picked = max(tucker, key=lambda o: statistics.fmean(o.val))
        diff, wins = _paired(picked, lora)
        beaten = sum(lora.mean > o.mean for o in tucker)
        lora_wins += beaten == len(tucker)
        sentences.append(
            f"At LoRA r={r}'s budget the best mean is {best.method.label} ({_pct(best.mean)}%); LoRA has "
            f"{_pct(lora.mean)}% and a higher mean than {beaten} of the {len(tucker)} ndlowrank variants. "
            f"The ndlowrank variant with the best validation accuracy, {picked.method.label}, differs from "
            f"LoRA by {100 * diff:+.1f} points (mean of the paired differences over the same {seeds} splits) "
            f"and is ahead on {wins} of them."
        )
    sentences.append(
        f"LoRA beats every ndlowrank variant at {lora_wins} of {len(budgets)} budgets."
        if lora_wins
        else "LoRA beats every ndlowrank variant at none of the budgets."
    )
    adapters = {f: os for f, os in by_family.items() if f not in (HEAD_ONLY, FULL)}
    if len(adapters) > 1:
        means = sorted(
            ((statistics.fmean(o.mean for o in os), f) for f, os in adapters.items()), reverse=True
        )
        sentences.append(
            "Averaged over the budgets: "
            + ", ".join(f"{f} {_pct(m)}%" for m, f in means)
            + f" (best family: {means[0][1]}, worst: {means[-1][1]})."
        )
    for edge, word in ((min(lrs), "smallest"), (max(lrs), "largest")):
        chose = [o.method.label for o in result.outcomes if o.lr == edge]
        if chose:
            sentences.append(
                f"{len(chose)} of {len(result.outcomes)} methods chose the {word} learning rate of the grid "
                f"({edge:g}: {', '.join(chose)}); the grid may not contain their best one."
            )
    return sentences
