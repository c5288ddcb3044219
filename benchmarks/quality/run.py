"""``python -m benchmarks.quality [--quick]``: run both cases and write the ``quality`` section."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from .._common import machine, today, versions, write_section
from . import conv, transformer
from .data import fewshot_split
from .methods import BUDGET_TOLERANCE, LORA, LYCORIS, Method, lycoris_available, methods, ndlowrank_family
from .report import Panel, findings, plot, table
from .study import CaseResult, Settings, run_case

INITS = ("zero_core", "orthogonal", "principal")
LRS = (3e-3, 1e-2, 3e-2, 1e-1)


@dataclass(frozen=True)
class Config:
    """What a mode runs: the settings shared by every method, the budgets and the ndlowrank variants."""

    settings: Settings
    lora_ranks: tuple[int, ...]
    spatial_ranks: tuple[int, ...]  # zero_core runs at each of them
    inits: tuple[str, ...]  # each init runs at spatial rank 3 (full 3×3) and on the linears


FULL = Config(Settings(seeds=(0, 1, 2, 3, 4), lrs=LRS, epochs=50), (1, 4, 16), (1, 2, 3), INITS)
QUICK = Config(Settings(seeds=(0, 1, 2), lrs=LRS, epochs=40), (1, 8), (1, 3), ("zero_core", "principal"))


def conv_methods(config: Config, shapes: list[tuple[int, ...]], lycoris: bool) -> list[Method]:
    """Every conv contender: zero_core at each spatial rank, every other init at spatial rank 3."""
    found = methods(shapes, config.lora_ranks, ["zero_core"], config.spatial_ranks, lycoris=lycoris)
    others = [init for init in config.inits if init != "zero_core"]
    extra = methods(shapes, config.lora_ranks, others, [3]) if others else []
    adapters = [m for m in extra if m.init is not None]
    return sorted(found + adapters, key=lambda m: -1 if m.budget is None else m.budget)


def _shapes(model: torch.nn.Module, targets: tuple[str, ...]) -> list[tuple[int, ...]]:
    return [tuple(model.get_parameter(f"{name}.weight").shape) for name in targets]


def run_conv(config: Config, lycoris: bool) -> tuple[CaseResult, str]:
    """The conv case; saves the pre-trained net; returns the result and its plot's markdown line."""
    torch.manual_seed(0)
    model = conv.ConvNet()
    contenders = conv_methods(config, _shapes(model, conv.TARGETS), lycoris)
    result = run_case("conv", model, conv.TARGETS, contenders, config.settings)
    conv.save_pretrained(model)
    spatial = tuple(ndlowrank_family("zero_core", s) for s in config.spatial_ranks)
    inits = tuple(ndlowrank_family(init, 3) for init in config.inits)
    panels = [
        Panel("zero_core at each spatial rank", (LORA, *((LYCORIS,) if lycoris else ()), *spatial)),
        Panel("each init at spatial rank 3", (LORA, *inits)),
    ]
    return result, plot(result, panels, "quality_conv", "conv net: accuracy against trainable parameters")


def run_transformer(config: Config) -> tuple[CaseResult, str]:
    """The transformer case; returns the result and its plot's markdown line."""
    torch.manual_seed(0)
    model = transformer.DigitTransformer()
    contenders = methods(_shapes(model, transformer.TARGETS), config.lora_ranks, config.inits, [None])
    result = run_case("transformer", model, transformer.TARGETS, contenders, config.settings)
    panels = [Panel("feed-forward linears", (LORA, *(ndlowrank_family(i, None) for i in config.inits)))]
    alt = "transformer: accuracy against trainable parameters"
    return result, plot(result, panels, "quality_transformer", alt)


def _how(config: Config, quick: bool, lycoris: bool, seconds: float) -> str:
    s = config.settings
    test = len(fewshot_split(s.seeds[0], s.train_per_class, s.val_per_class).test)
    command = "python -m benchmarks.quality" + (" --quick" if quick else "")
    return f"""Written by `{command}` on {today()} in {seconds / 60:.1f} minutes. Machine: {machine()}, one torch thread.
Libraries: {versions("ndlowrank", "torch", "peft", "lycoris-lora", "scikit-learn")}.

A small-scale version of FLoRA's comparison on scikit-learn's bundled 8×8 digits (1797 images):
each network is pre-trained once (seed 0, {s.pretrain_epochs} epochs of AdamW at lr {s.pretrain_lr:g} on 80%
of digits 0–4; its accuracy on the other 20% is given below), then gets a new 5-way head and is adapted
to digits 5–9 from {s.train_per_class} training images per class. Each seed ({", ".join(map(str, s.seeds))})
draws its own {s.train_per_class} training and {s.val_per_class} validation images per class (the rest,
{test} images, is the test set) and seeds the head and adapter inits; every method sees the same splits.
Every method trains with AdamW (weight decay 0.01), batch {s.batch_size}, {s.epochs} epochs, constant lr;
each method's lr is the one of {", ".join(f"{lr:g}" for lr in s.lrs)} with the best mean validation accuracy
over the seeds, and the table gives the test accuracy at that lr (mean ± sample std over the seeds).
The head is always trainable and is counted in the trainable parameters.

Budgets: PEFT LoRA (`lora_alpha = r`, scale 1, its default init) at r = {", ".join(map(str, config.lora_ranks))};
at each one, ndlowrank's channel ranks `(r_out, r_in)` (the same on every target) are the most balanced pair
whose adapter count is within {BUDGET_TOLERANCE:.0%} of LoRA's{", and LyCORIS LoCon (`use_tucker=True`, alpha = rank) takes the rank whose count is closest" if lycoris else "; LyCORIS did not import, so it is left out"}.
ndlowrank adapters use `add_adapters(..., init=..., seed=seed)` with scale 1."""


def main(argv: list[str] | None = None) -> None:
    """Run the study and write the ``quality`` section of ``benchmarks/RESULTS.md`` and its plots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, 2 budgets, 40 epochs, fewer variants")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    start = time.perf_counter()
    lycoris = lycoris_available()
    conv_result, conv_plot = run_conv(config, lycoris)
    tf_result, tf_plot = run_transformer(config)
    seconds = time.perf_counter() - start
    body = [
        "## Quality: Tucker adapters vs LoRA at matched budgets (few-shot digits)",
        "",
        _how(config, args.quick, lycoris, seconds),
        "",
        "### Conv net",
        "",
        "Conv 1→32, 32→64, 2×2 max pool, 64→64 (3×3, padding 1, ReLU), global average pool, linear head "
        f"({conv_result.pretrain_accuracy:.1%} held-out accuracy on digits 0–4 after pre-training). The adapters "
        "go on the 32→64 and 64→64 convolutions; LoRA flattens their kernels to matrices, ndlowrank keeps "
        "them 4-D with ranks `(r_out, r_in, s, s)`. The pre-trained weights are in "
        "`benchmarks/quality/pretrained_convnet.safetensors`. "
        f"This case took {conv_result.seconds / 60:.1f} minutes.",
        "",
        table(conv_result),
        "",
        conv_plot,
        "",
        "### Transformer",
        "",
        "`nn.TransformerEncoder` (d_model 64, 4 heads, feed-forward 128, 2 layers, no dropout) over the 8 rows "
        "of each image as tokens, learned positions, mean pool, linear head "
        f"({tf_result.pretrain_accuracy:.1%} held-out accuracy on digits 0–4). The adapters go on `linear1` and "
        "`linear2` of both layers (attention is left out for every method); ndlowrank's ΔW = A G Bᵀ has ranks "
        "`(r_out, r_in)`. "
        f"This case took {tf_result.seconds / 60:.1f} minutes.",
        "",
        table(tf_result),
        "",
        tf_plot,
        "",
        "### What we see",
        "",
        "Conv net: " + " ".join(findings(conv_result, config.settings.lrs)),
        "",
        "Transformer: " + " ".join(findings(tf_result, config.settings.lrs)),
    ]
    write_section("quality", "\n".join(body))
    print(f"wrote the quality section of benchmarks/RESULTS.md in {seconds:.0f} s", flush=True)
