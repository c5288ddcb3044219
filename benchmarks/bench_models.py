"""Whole real networks: a Tucker-adapter training step vs PEFT LoRA's, and per-call overhead.

Run ``python benchmarks/bench_models.py`` (``--quick`` for fewer repeats; ``--device cuda``
for the GPU suite, which writes the ``bench_models_gpu`` section). Each model is a tiny
configuration of the real architecture from its own library (transformers, diffusers,
torchvision, timm) on the CPU, and one of realistic size on a GPU, built with random weights
from a fixed seed; a model whose library cannot be imported here is listed with the reason.
For every model the same target layers get

- PEFT LoRA, ``r=8, lora_alpha=8`` (``get_peft_model``), and
- ndlowrank ``add_adapters(..., ranks=8)`` (an int rank is clipped to each mode: ``(8, 8)`` on a
  linear weight, ``(8, 8, 3, 3)`` on a 3×3 kernel), default init and ``path="auto"``.

One *training step* is the forward on a fixed batch, a scalar loss (the mean square of the
output), its backward, and the adapter gradients reset to ``None``; no optimizer. Each model
is measured ``--rounds`` times (3 by default), each time as medians of interleaved runs; the
table gives the median over the rounds, the range of the rounds' ratios to PEFT LoRA, the
trainable parameters of each and the peak extra memory of a step; then the merged model's
forward under ``no_grad`` against the base model's.

A third contender is the *floor*: the frozen model with a zero scalar parameter added to each
target layer's output, so that its backward runs through every target layer as an adapter's
must, and adds nothing else. The step minus the floor is what the adapters themselves cost;
the table gives ndlowrank's adapter cost as a ratio to PEFT LoRA's. Beside it, the tensor
products of ndlowrank's adapters in factorized form are timed by themselves
(``benchmarks/_products.py``): their arithmetic without the fixed cost of running it (autograd
nodes, module calls, Python).

The second table isolates the fixed cost per adapted layer: a training step of single small
layers (where the work is a few microseconds) for the frozen layer, PEFT LoRA and ndlowrank.
The results go to the ``bench_models`` section of ``benchmarks/RESULTS.md``; ``--only`` runs
some of the models and prints their table instead.

torchvision (and timm, which imports it) cannot be imported beside the CPU build of
``torch==2.13.0`` that the project installs: PyPI's torchvision is built against a CUDA torch,
and loading its operators fails (``operator torchvision::nms does not exist``). Their rows then
read "not run". To run every model, use a separate virtual environment with the releases that
PyPI pairs::

    pip install torch==2.14.1 torchvision==0.29.1 timm -e ".[bench,test]"
    python benchmarks/bench_models.py

(a CUDA build of several GB that runs on the CPU); the table's library line says which torch
wrote it.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import interleaved_medians, load_window, machine, today, versions, write_section
from benchmarks._products import products_step
from benchmarks.bench_adapters import Device, Holder
from ndlowrank import nn as nlnn

MiB = 2**20
RANK = 8
TARGET_VS_PEFT = 1.0  # every model
TARGET_GEOMEAN = 0.85  # the geometric mean over the models


@dataclass(frozen=True)
class Scale:
    """Where a model runs and how big it is: tiny configurations on the CPU, realistic ones on a GPU."""

    device: str = "cpu"

    @property
    def gpu(self) -> bool:
        return self.device.startswith("cuda")

    def pick(self, cpu: Any, gpu: Any) -> Any:
        """``gpu`` for the GPU suite, else ``cpu``."""
        return gpu if self.gpu else cpu

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(self.device)

    def tokens(self, vocab: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0)).to(self.device)


Forward = Callable[[nn.Module], torch.Tensor]


@dataclass
class ModelCase:
    """A real architecture, its sizes on the CPU and on a GPU, the layers to adapt and one batch."""

    name: str
    library: str
    build: Callable[[Scale], tuple[nn.Module, Forward]]
    targets: list[str] | str  # names or dotted suffixes, or one regex on full names (PEFT's rules)
    sizes: tuple[str, str]  # what the CPU and the GPU configurations are, for the table

    def title(self, scale: Scale) -> str:
        return f"{self.name} ({scale.pick(*self.sizes)})"


def _llama(scale: Scale) -> tuple[nn.Module, Forward]:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, vocab = scale.pick(128, 1024), scale.pick(512, 32000)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=scale.pick(344, 2816),
        num_hidden_layers=scale.pick(2, 4),
        num_attention_heads=scale.pick(4, 16),
        num_key_value_heads=scale.pick(2, 8),
        max_position_embeddings=scale.pick(128, 1024),
    )
    ids = scale.tokens(vocab, 4, scale.pick(64, 512))
    return LlamaForCausalLM(config), lambda model: model(input_ids=ids).logits


def _gpt2(scale: Scale) -> tuple[nn.Module, Forward]:
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = scale.pick(512, 50257)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=scale.pick(128, 1024),
        n_embd=scale.pick(128, 768),
        n_layer=scale.pick(2, 4),
        n_head=scale.pick(4, 12),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )
    config.attn_pdrop = 0.0
    ids = scale.tokens(vocab, 4, scale.pick(64, 512))
    return GPT2LMHeadModel(config), lambda model: model(input_ids=ids).logits


def _bert(scale: Scale) -> tuple[nn.Module, Forward]:
    from transformers import BertConfig, BertModel

    vocab = scale.pick(512, 30522)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=scale.pick(128, 768),
        num_hidden_layers=scale.pick(2, 4),
        num_attention_heads=scale.pick(4, 12),
        intermediate_size=scale.pick(512, 3072),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    ids = scale.tokens(vocab, 4, scale.pick(64, 512))
    return BertModel(config), lambda model: model(input_ids=ids).last_hidden_state


def _unet(scale: Scale) -> tuple[nn.Module, Forward]:
    from diffusers import UNet2DConditionModel

    context_dim, latent = scale.pick(32, 768), scale.pick(16, 64)
    model = UNet2DConditionModel(
        sample_size=latent,
        in_channels=4,
        out_channels=4,
        block_out_channels=scale.pick((32, 64), (320, 640)),
        layers_per_block=scale.pick(1, 2),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=context_dim,
        attention_head_dim=8,
        norm_num_groups=scale.pick(8, 32),
    )
    sample = scale.randn(2, 4, latent, latent)
    context = scale.randn(2, scale.pick(8, 77), context_dim)
    timestep = torch.tensor([10, 500], device=scale.device)
    return model, lambda m: m(sample, timestep, encoder_hidden_states=context).sample


def _images(scale: Scale) -> torch.Tensor:
    side = scale.pick(64, 224)
    return scale.randn(scale.pick(4, 32), 3, side, side)


def _torchvision(name: str) -> Callable[[Scale], tuple[nn.Module, Forward]]:
    def build(scale: Scale) -> tuple[nn.Module, Forward]:
        models = importlib.import_module("torchvision.models")
        model = getattr(models, name)(num_classes=10)
        batch = _images(scale)
        return model, lambda m: m(batch)

    return build


def _timm(name: str, cpu_options: dict[str, Any]) -> Callable[[Scale], tuple[nn.Module, Forward]]:
    def build(scale: Scale) -> tuple[nn.Module, Forward]:
        timm = importlib.import_module("timm")
        model = timm.create_model(name, pretrained=False, num_classes=10, **scale.pick(cpu_options, {}))
        batch = _images(scale)
        return model, lambda m: m(batch)

    return build


_IMAGES = ("4×3×64×64", "32×3×224×224")
CASES = [
    ModelCase(
        "LLaMA",
        "transformers",
        _llama,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ("2 layers, hidden 128, 4×64 tokens", "4 layers, hidden 1024, 4×512 tokens"),
    ),
    ModelCase(
        "GPT-2",
        "transformers",
        _gpt2,
        ["c_attn", "c_proj", "c_fc"],
        ("2 layers, hidden 128, 4×64 tokens", "4 layers, hidden 768, 4×512 tokens"),
    ),
    ModelCase(
        "BERT",
        "transformers",
        _bert,
        ["query", "key", "value", "dense"],
        ("2 layers, hidden 128, 4×64 tokens", "4 layers, hidden 768, 4×512 tokens"),
    ),
    ModelCase(
        "UNet2DConditionModel",
        "diffusers",
        _unet,
        ["conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"],
        ("32/64 channels, 2×4×16×16", "320/640 channels, 2×4×64×64, 77 context tokens"),
    ),
    ModelCase("resnet18", "torchvision", _torchvision("resnet18"), ["conv1", "conv2"], _IMAGES),
    ModelCase(  # the pointwise convolutions and the SE layers: PEFT LoRA cannot take a depthwise conv at r=8
        "mobilenet_v3_small",
        "torchvision",
        _torchvision("mobilenet_v3_small"),
        r"features\.([2-9]|1[01])\.block\.0\.0|.*\.block\.[23]\.0|.*\.fc[12]",
        _IMAGES,
    ),
    ModelCase(  # the two linear layers of every block (its depthwise 7×7 conv as above)
        "convnext_tiny", "torchvision", _torchvision("convnext_tiny"), ["block.3", "block.5"], _IMAGES
    ),
    ModelCase("timm efficientnet_b0", "timm", _timm("efficientnet_b0", {}), ["conv_pw", "conv_pwl"], _IMAGES),
    ModelCase(
        "timm vit_tiny",
        "timm",
        _timm("vit_tiny_patch16_224", {"img_size": 64, "patch_size": 8}),
        ["qkv", "proj", "fc1", "fc2"],
        ("patch 8, 4×3×64×64", "patch 16, 32×3×224×224"),
    ),
]


@dataclass
class Row:
    case: ModelCase
    unavailable: str = ""
    times: dict[str, float] | None = None
    trainable: dict[str, int] | None = None
    peaks: dict[str, int] | None = None
    merged: dict[str, float] | None = None
    spread: tuple[float, float] | None = None  # the lowest and highest step ratio of the rounds
    ratio: float | None = None  # the median of the rounds' step ratios

    def step_ratio(self) -> float:
        """ndlowrank's step over PEFT LoRA's: the median of the rounds' ratios (of the median times if unknown)."""
        assert self.times is not None
        return self.ratio if self.ratio is not None else self.times["ndlowrank"] / self.times["peft"]


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _step(model: nn.Module, forward: Forward, device: Device) -> Callable[[], None]:
    params = _trainable(model)

    def step() -> None:
        for p in params:
            p.grad = None
        forward(model).float().square().mean().backward()
        device.sync()

    return step


def _synced(fn: Callable[[], None], device: Device) -> Callable[[], None]:
    def call() -> None:
        fn()
        device.sync()

    return call


def floor_model(model: nn.Module, targets: list[str] | str) -> nn.Module:
    """The frozen ``model`` whose target layers each add a trainable zero scalar to their output.

    The backward then reaches every target layer (its input gradient), which any adapter's
    does too, and computes nothing for the layers themselves: a step of this model is the
    least an adapter method can cost.
    """
    floor = model.requires_grad_(False)
    for name in nlnn.select_targets(floor, targets):
        layer = floor.get_submodule(name)
        layer.register_parameter("floor_zero", nn.Parameter(torch.zeros(())))
        layer.register_forward_hook(lambda module, args, out: out + module.floor_zero)
    return floor


def run_model(case: ModelCase, repeats: int, device: Device | None = None, rounds: int = 1) -> Row:
    """Time ``case`` with PEFT LoRA, ndlowrank and the floor: ``rounds`` separate interleaved measurements.

    The row keeps each contender's median over the rounds and the range of the rounds'
    ndlowrank / PEFT ratios, which shows how far one run can be trusted on a noisy machine.
    """
    from peft import LoraConfig, get_peft_model

    device = device or Device("cpu")
    scale = Scale(device.name)
    try:
        torch.manual_seed(0)
        base, forward = case.build(scale)
    except Exception as error:  # the library is missing or broken here: reported, not fatal
        return Row(case, unavailable=f"{case.library}: {type(error).__name__}: {str(error)[:80]}")
    base.to(device.name).train()
    models: dict[str, nn.Module] = {}
    try:
        models["peft"] = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=RANK, lora_alpha=RANK, target_modules=case.targets)
        )
        models["ndlowrank"] = nlnn.add_adapters(copy.deepcopy(base), case.targets, RANK, seed=0)
    except Exception as error:
        return Row(case, unavailable=f"{type(error).__name__}: {str(error)[:120]}")
    steps = {name: _step(model, forward, device) for name, model in models.items()}
    steps["floor"] = _step(floor_model(copy.deepcopy(base), case.targets), forward, device)
    steps["products"] = _synced(products_step(models["ndlowrank"], forward), device)
    measured = [interleaved_medians(steps, repeats) for _ in range(rounds)]
    times = {name: statistics.median(m[name] for m in measured) for name in steps}
    ratios = [m["ndlowrank"] / m["peft"] for m in measured]
    trainable = {name: sum(p.numel() for p in _trainable(model)) for name, model in models.items()}
    peaks = {name: device.peak_extra_bytes(steps[name]) for name in models}

    merged_model = nlnn.add_adapters(copy.deepcopy(base), case.targets, RANK, seed=0)
    nlnn.merge_adapters(merged_model)
    frozen = copy.deepcopy(base).requires_grad_(False)
    for model in (merged_model, frozen):
        model.eval()

    def inference(model: nn.Module) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                forward(model)
            device.sync()

        return call

    merged = interleaved_medians({"base": inference(frozen), "merged": inference(merged_model)}, repeats)
    row = Row(
        case,
        times=times,
        trainable=trainable,
        peaks=peaks,
        merged=merged,
        spread=(min(ratios), max(ratios)),
        ratio=statistics.median(ratios),
    )
    print(
        f"  step: ndlowrank {times['ndlowrank'] * 1e3:.2f} ms, PEFT LoRA {times['peft'] * 1e3:.2f} ms "
        f"({row.step_ratio():.2f}x), floor {times['floor'] * 1e3:.2f} ms "
        f"(adapter cost {_adapter_cost(times):.2f}x PEFT's, its products alone {_products_cost(times):.2f}x); "
        f"merged forward {merged['merged'] / merged['base']:.2f}x base",
        flush=True,
    )
    return row


def uniform_cost_for(measured: list[dict[str, float]], geomean: float) -> float:
    """The adapter cost ``c`` (a fraction of PEFT LoRA's, the same on every model) whose steps have ``geomean``.

    A model's step is then ``floor + c · (peft - floor)``; the geometric mean of those over
    PEFT LoRA's steps grows with ``c``, so bisection finds it (0 if even the floor is above
    ``geomean``).
    """

    def mean_at(c: float) -> float:
        return statistics.geometric_mean(
            [(t["floor"] + c * (t["peft"] - t["floor"])) / t["peft"] for t in measured]
        )

    low, high = 0.0, 1.0
    if mean_at(low) >= geomean:
        return 0.0
    while mean_at(high) < geomean:
        high *= 2
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_at(middle) < geomean else (low, middle)
    return low


def _ratio_text(ratio: float) -> str:
    """``ratio`` to two decimals, or three where two would round it onto the target it misses ("1.003", not "1.00")."""
    return f"{ratio:.3f}" if ratio > TARGET_VS_PEFT and round(ratio, 2) <= TARGET_VS_PEFT else f"{ratio:.2f}"


def _adapter_cost(times: dict[str, float]) -> float:
    """ndlowrank's step minus the floor, over PEFT LoRA's step minus the floor."""
    return (times["ndlowrank"] - times["floor"]) / (times["peft"] - times["floor"])


def _products_cost(times: dict[str, float]) -> float:
    """ndlowrank's products alone (:mod:`benchmarks._products`), over PEFT LoRA's step minus the floor."""
    return times["products"] / (times["peft"] - times["floor"])


# -- per-call overhead on small layers -------------------------------------------------------


SMALL_LAYERS = [
    ("SE-style Conv2d(64, 16, 1) on a 1×1 map, batch 8", lambda: nn.Conv2d(64, 16, 1), (8, 64, 1, 1)),
    ("Conv2d(16, 16, 3, padding=1) on 8×8, batch 8", lambda: nn.Conv2d(16, 16, 3, padding=1), (8, 16, 8, 8)),
    ("Linear(64, 64), batch 8", lambda: nn.Linear(64, 64), (8, 64)),
]


CALLS = 20  # calls per timing of a small layer, so the timer's resolution does not matter


def layer_step(model: nn.Module, x: torch.Tensor, device: Device) -> Callable[[], None]:
    """One training step of a one-layer ``model`` on ``x``: forward, mean-square loss, backward into ``x`` too."""
    params = _trainable(model)

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        model(x).square().mean().backward()
        device.sync()

    return step


def repeated(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` called ``CALLS`` times, to be timed as one."""

    def call() -> None:
        for _ in range(CALLS):
            fn()

    return call


def run_small(
    repeats: int, device: Device | None = None, rounds: int = 1
) -> list[tuple[str, dict[str, float]]]:
    """Per-call step times of :data:`SMALL_LAYERS`: each contender's median over ``rounds`` interleaved measurements."""
    from peft import LoraConfig, get_peft_model

    device = device or Device("cpu")
    rows = []
    for title, make, shape in SMALL_LAYERS:
        torch.manual_seed(0)
        layer = make().to(device.name)
        x = torch.randn(shape, device=device.name, requires_grad=True)
        models = {
            "frozen": Holder(copy.deepcopy(layer)).requires_grad_(False),
            "peft": get_peft_model(
                Holder(copy.deepcopy(layer)), LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["layer"])
            ),
            "ndlowrank": nlnn.add_adapters(Holder(copy.deepcopy(layer)), ["layer"], RANK, seed=0),
        }

        steps = {name: repeated(layer_step(m, x, device)) for name, m in models.items()}
        measured = [interleaved_medians(steps, repeats) for _ in range(rounds)]
        rows.append((title, {name: statistics.median(m[name] for m in measured) / CALLS for name in steps}))
        print(
            f"  {title}: " + ", ".join(f"{name} {t * 1e6:.0f} us" for name, t in rows[-1][1].items()),
            flush=True,
        )
    return rows


# -- the report ------------------------------------------------------------------------------


def report(
    rows: list[Row],
    small: list[tuple[str, dict[str, float]]],
    repeats: int,
    load: str,
    device: Device | None = None,
    rounds: int = 1,
) -> str:
    device = device or Device("cpu")
    scale = Scale(device.name)
    libraries = versions("ndlowrank", "torch", "peft", "transformers", "diffusers", "torchvision", "timm")
    if device.cuda:
        where = (
            f"GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); host: {machine()}; "
            "float32 with torch's default matmul precision. Peak memory: `torch.cuda.max_memory_allocated()` "
            "during one step minus the memory allocated before it."
        )
        command = "python benchmarks/bench_models.py --device cuda"
    else:
        where = (
            f"Machine: {machine()}; torch threads: {torch.get_num_threads()}. Peak memory as in the adapters "
            "section (torch.profiler's allocator events)."
        )
        command = "python benchmarks/bench_models.py"
    lines = [
        f"## Whole models vs PEFT LoRA ({'GPU' if device.cuda else 'CPU'})",
        "",
        f"Written by `{command}` on {today()}. {where} Load average (1 min) {load}. Libraries: {libraries}.",
        "",
        f"Medians of {repeats} interleaved runs, measured {rounds} time(s) per model: the table gives the median "
        "of those measurements (of the times, and of the step ratios with their range in brackets). A training "
        "step is forward, mean-square loss, backward, "
        f"adapter gradients reset (no optimizer), model in train mode with dropout off. PEFT LoRA r={RANK}, "
        f"lora_alpha={RANK}; ndlowrank `add_adapters(model, targets, {RANK})` (the int rank clipped per mode, "
        "so a 3×3 conv gets (8, 8, 3, 3)), default init, `path='auto'`; both on the same targets of copies of "
        "the same seeded model; the floor is the frozen model whose target layers add a zero parameter to their "
        "output (the least any adapter costs), and the adapter cost is the step minus the floor. *Its products "
        "alone* times the tensor products of ndlowrank's adapters in factorized form by themselves (forward and "
        "gradients on the inputs they get in the step, under `no_grad`, no autograd node or module call: "
        "`benchmarks/_products.py`): the arithmetic of the factorized form, without the fixed cost of running "
        "it. Where `path='auto'` builds `W + ΔW` instead (pointwise convs on large maps) the step's arithmetic "
        "is another, and can be smaller. "
        f"Targets: every model ≤ {TARGET_VS_PEFT}× PEFT LoRA's step, the geometric mean ≤ {TARGET_GEOMEAN}×.",
        "",
        "| model | targets | step vs PEFT LoRA | ndlowrank step (ms) | PEFT LoRA step (ms) | floor (ms) "
        "| adapter cost vs PEFT's | its products alone vs PEFT's cost | trainable: ndlowrank / PEFT "
        "| peak memory vs PEFT | merged forward vs base |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios, measured = [], []
    for row in rows:
        targets = (
            "regex `{}`".format(row.case.targets.replace("|", "\\|"))  # a bar would end the table cell
            if isinstance(row.case.targets, str)
            else ", ".join(f"`{t}`" for t in row.case.targets)
        )
        if row.times is None:
            lines.append(f"| {row.case.title(scale)} | {targets} | not run: {row.unavailable} |" + " – |" * 8)
            continue
        assert row.trainable is not None and row.peaks is not None and row.merged is not None
        ratio = row.step_ratio()
        ratios.append(ratio)
        measured.append(row.times)
        mark = "" if ratio <= TARGET_VS_PEFT else " **(above target)**"
        if row.spread is not None and row.spread[0] != row.spread[1]:
            mark = f" ({row.spread[0]:.2f}–{row.spread[1]:.2f}){mark}"
        lines.append(
            f"| {row.case.title(scale)} | {targets} | {_ratio_text(ratio)}×{mark} | {row.times['ndlowrank'] * 1e3:.2f} "
            f"| {row.times['peft'] * 1e3:.2f} | {row.times['floor'] * 1e3:.2f} | {_adapter_cost(row.times):.2f}× "
            f"| {_products_cost(row.times):.2f}× "
            f"| {row.trainable['ndlowrank']:,} / {row.trainable['peft']:,} "
            f"| {row.peaks['ndlowrank'] / row.peaks['peft']:.2f}× "
            f"| {row.merged['merged'] / row.merged['base']:.2f}× |"
        )
    if ratios:
        geomean = statistics.geometric_mean(ratios)
        verdict = "meets" if geomean <= TARGET_GEOMEAN else "misses"
        floors = statistics.geometric_mean([t["floor"] / t["peft"] for t in measured])
        products = statistics.geometric_mean([(t["floor"] + t["products"]) / t["peft"] for t in measured])
        lines += [
            "",
            f"Geometric mean of the step ratios over the {len(ratios)} models that ran: {geomean:.2f}× "
            f"PEFT LoRA's ({verdict} the ≤ {TARGET_GEOMEAN}× target). An adapter that cost nothing beyond the "
            f"floor would reach {floors:.2f}×; the target asks for adapter costs of about "
            f"{uniform_cost_for(measured, TARGET_GEOMEAN):.2f}× PEFT LoRA's on every model. Adapters that cost "
            f"only their products (floor plus products alone) would reach {products:.2f}×.",
        ]
    lines += [
        "",
        "### Fixed cost per adapted layer",
        "",
        f"Training step of one small layer (the mean of {CALLS} calls per timing, medians of {repeats} interleaved "
        f"runs, the median of {rounds} such measurements); "
        "the extra cost over the frozen layer is what an adapter adds per call.",
        "",
        "| layer | frozen (µs) | PEFT LoRA (µs) | ndlowrank (µs) | extra over frozen: ndlowrank / PEFT |",
        "|---|---|---|---|---|",
    ]
    for title, times in small:
        extra = (times["ndlowrank"] - times["frozen"]) / (times["peft"] - times["frozen"])
        lines.append(
            f"| {title} | {times['frozen'] * 1e6:.0f} | {times['peft'] * 1e6:.0f} "
            f"| {times['ndlowrank'] * 1e6:.0f} | {extra:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats instead of 15")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved runs per contender")
    parser.add_argument(
        "--rounds", type=int, default=None, help="separate measurements per model (default 3, 1 with --quick)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--device", default="cpu", help="'cpu' (default: tiny configurations) or 'cuda' (realistic sizes)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="MODEL",
        help="run only the models whose name contains one of these words (case-insensitive) and print the "
        "table instead of writing RESULTS.md, whose section lists every model",
    )
    args = parser.parse_args(argv)
    device = Device(args.device)
    if device.cuda and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    repeats = args.repeats or (5 if args.quick else 15)
    rounds = args.rounds or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    print(f"{device.name}, torch threads {torch.get_num_threads()}, {repeats} repeats", flush=True)
    load_before = os.getloadavg()[0]
    cases = CASES
    if args.only:
        cases = [case for case in CASES if any(word.lower() in case.name.lower() for word in args.only)]
        if not cases:
            parser.error(
                f"--only {' '.join(args.only)}: no model matches; the models are {[c.name for c in CASES]}"
            )
    rows = []
    for case in cases:
        print(case.title(Scale(device.name)), flush=True)
        rows.append(run_model(case, repeats, device, rounds))
        if rows[-1].unavailable:
            print(f"  not run: {rows[-1].unavailable}", flush=True)
    print("small layers", flush=True)
    small = run_small(repeats, device, rounds)
    section = "bench_models_gpu" if device.cuda else "bench_models"
    text = report(rows, small, repeats, load_window(load_before), device, rounds)
    if args.only:
        print(text)
        return
    write_section(section, text)
    print(f"wrote the {section} section of benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
