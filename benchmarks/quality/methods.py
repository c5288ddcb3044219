"""The methods compared, and the parameter counts that put them at matched budgets.

Every method is an ``adapt(model, targets, seed)`` function that leaves only its own
parameters trainable; :func:`benchmarks.quality.study.prepare` adds the new head. Budgets
are PEFT LoRA's adapter counts at ranks ``r``: the Tucker ranks ``(r_out, r_in, s, s)``
(or ``(r_out, r_in)``) and the LyCORIS rank at each budget are the ones whose adapter
counts come closest to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ndlowrank import nn as nlnn
from ndlowrank.nn.layers import held_spatial_modes

from .._common import tucker_params

Shape = tuple[int, ...]
Adapt = Callable[[nn.Module, Sequence[str], int], nn.Module]

HEAD_ONLY, FULL, LORA, LYCORIS = "head only", "full fine-tune", "PEFT LoRA", "LyCORIS LoCon-Tucker"
#: ndlowrank matches LoRA's adapter count within this relative tolerance (checked by the tests).
BUDGET_TOLERANCE = 0.10


@dataclass(frozen=True)
class Method:
    """One contender: its family (one plot series), its label and how it adapts a model.

    ``budget`` is the LoRA rank whose parameter count it is matched to (None for head-only and
    full fine-tuning); ``ranks``, ``spatial`` (the spatial rank) and ``init`` are an ndlowrank
    adapter's.
    """

    family: str
    label: str
    adapt: Adapt
    budget: int | None = None
    init: str | None = None
    spatial: int | None = None
    ranks: Shape | None = None


def ndlowrank_family(init: str, spatial: int | None) -> str:
    """The family name of ndlowrank adapters with one init (and spatial rank, for kernels)."""
    return f"ndlowrank {init}" + ("" if spatial is None else f", spatial rank {spatial}")


# -- parameter counts -------------------------------------------------------------------------


def lora_count(shape: Shape, rank: int) -> int:
    """PEFT LoRA's parameters on a weight of ``shape``: ``A`` is ``(r, in, *kernel)``, ``B`` is ``(out, r)``."""
    return rank * (shape[0] + math.prod(shape[1:]))


def locon_tucker_count(shape: Shape, rank: int) -> int:
    """LyCORIS LoCon with ``use_tucker``: down ``(r, in, 1, 1)``, mid ``(r, r, *kernel)``, up ``(out, r, 1, 1)``."""
    return rank * shape[1] + rank * rank * math.prod(shape[2:]) + shape[0] * rank


def tucker_count(shape: Shape, ranks: Shape, init: str = "zero_core") -> int:
    """An ndlowrank adapter's trainable parameters: the stored numbers less the spatial factors a conv adapter holds.

    It holds the square factors of :func:`~ndlowrank.nn.layers.held_spatial_modes`.
    """
    held = sum(shape[n] * ranks[n] for n in held_spatial_modes(shape[2:], init) if shape[n] == ranks[n])
    return tucker_params(shape, ranks) - held


def match_tucker_ranks(
    shapes: Sequence[Shape], budget: int, spatial: int | None = None, init: str = "zero_core"
) -> Shape:
    """The Tucker ranks, the same on every weight, whose trainable count with ``init`` fits ``budget``.

    The channel ranks ``(r_out, r_in)`` are searched, the spatial ranks (kernels only) are
    ``spatial``. Among the pairs whose total count is within ``BUDGET_TOLERANCE`` of the
    budget the most balanced one wins (then the closest count); when no pair is that close,
    the closest one.
    """
    kernel_modes = len(shapes[0]) - 2
    if kernel_modes and spatial is None:
        raise ValueError("a kernel needs a spatial rank")
    tail = (spatial,) * kernel_modes if kernel_modes and spatial is not None else ()
    max_out, max_in = min(s[0] for s in shapes), min(s[1] for s in shapes)

    def miss(pair: tuple[int, int]) -> float:
        return abs(sum(tucker_count(shape, (*pair, *tail), init) for shape in shapes) - budget) / budget

    pairs = [(a, b) for a in range(1, max_out + 1) for b in range(1, max_in + 1)]
    close = [pair for pair in pairs if miss(pair) <= BUDGET_TOLERANCE]
    if close:
        best = min(close, key=lambda pair: (abs(pair[0] - pair[1]), miss(pair)))
    else:
        best = min(pairs, key=lambda pair: (miss(pair), abs(pair[0] - pair[1])))
    return (*best, *tail)


def match_locon_rank(shapes: Sequence[Shape], budget: int) -> int:
    """The LyCORIS LoCon-Tucker rank whose total count is closest to ``budget``."""
    top = min(min(s[:2]) for s in shapes)
    return min(
        range(1, top + 1), key=lambda r: (abs(sum(locon_tucker_count(s, r) for s in shapes) - budget), r)
    )


# -- how each method adapts a model -----------------------------------------------------------


def _head_only(model: nn.Module, targets: Sequence[str], seed: int) -> nn.Module:
    return model.requires_grad_(False)


def _full(model: nn.Module, targets: Sequence[str], seed: int) -> nn.Module:
    return model.requires_grad_(True)


def _peft_lora(rank: int, model: nn.Module, targets: Sequence[str], seed: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(target_modules=list(targets), r=rank, lora_alpha=rank))


def _lycoris(rank: int, model: nn.Module, targets: Sequence[str], seed: int) -> nn.Module:
    from lycoris.modules.locon import LoConModule

    model.requires_grad_(False)
    torch.manual_seed(seed)
    for name in targets:
        module = LoConModule(
            name.replace(".", "_"), model.get_submodule(name), lora_dim=rank, alpha=rank, use_tucker=True
        )
        if not module.tucker:
            raise RuntimeError(f"LoConModule did not build its Tucker form on {name}")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    return model


def _ndlowrank(ranks: Shape, init: str, model: nn.Module, targets: Sequence[str], seed: int) -> nn.Module:
    return nlnn.add_adapters(model, list(targets), ranks, init=init, seed=seed)


def lycoris_available() -> bool:
    """Whether ``lycoris`` (the lycoris-lora package) imports."""
    try:
        import lycoris.modules.locon  # noqa: F401
    except Exception:
        return False
    return True


def methods(
    shapes: Sequence[Shape],
    lora_ranks: Sequence[int],
    inits: Sequence[str],
    spatial_ranks: Sequence[int | None],
    *,
    lycoris: bool = False,
) -> list[Method]:
    """Head-only, full fine-tuning, and at each LoRA rank's budget: LoRA, LyCORIS and ndlowrank.

    Parameters
    ----------
    shapes : sequence of tuple of int
        The weight shapes of the targeted layers (kernels ``(out, in, kh, kw)`` or ``(out, in)``).
    lora_ranks : sequence of int
        The PEFT LoRA ranks; each one's adapter count is a budget.
    inits, spatial_ranks : sequences
        ndlowrank runs every init at every spatial rank (``[None]`` for linear layers).
    lycoris : bool, default False
        Add LyCORIS LoCon with ``use_tucker=True`` (kernels only).
    """
    found = [Method(HEAD_ONLY, "head only", _head_only), Method(FULL, "full fine-tune", _full)]
    for r in lora_ranks:
        budget = sum(lora_count(shape, r) for shape in shapes)
        found.append(Method(LORA, f"LoRA r={r}", partial(_peft_lora, r), budget=r))
        if lycoris:
            rank = match_locon_rank(shapes, budget)
            found.append(Method(LYCORIS, f"LoCon-Tucker r={rank}", partial(_lycoris, rank), budget=r))
        for spatial in spatial_ranks:
            for init in inits:
                ranks = match_tucker_ranks(shapes, budget, spatial, init)
                found.append(
                    Method(
                        ndlowrank_family(init, spatial),
                        f"ndlowrank {ranks} {init}",
                        partial(_ndlowrank, ranks, init),
                        budget=r,
                        init=init,
                        spatial=spatial,
                        ranks=ranks,
                    )
                )
    return found
