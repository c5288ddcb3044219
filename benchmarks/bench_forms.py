"""Does ``path="auto"`` pick the fastest form? Every form of an adapter's training step, side by side.

Run ``python benchmarks/bench_forms.py`` (``--quick`` for fewer repeats; ``--device cuda`` for
the GPU's layer sizes, which writes the ``bench_forms_gpu`` section; ``--dtypes float32
bfloat16`` for both). An adapter's call takes one of several *forms*, all computing the same
numbers:

- a convolution: ``conv(x, W + ΔW)`` with plain autograd (``plain W+ΔW``), the same through
  :class:`~ndlowrank.nn._conv.FusedTuckerConv` (the ``materialize`` path either way), or the
  factorized branch as :class:`~ndlowrank.nn._conv.FactorizedTuckerConv` or, for an
  ungrouped pointwise conv, as the base layer plus two 1×…×1 convolutions with plain autograd
  (``plain base + branch``; ``factorized`` either way);
- a pointwise convolution on a 1×…×1 map (an SE block's): ``F.linear(x, W + ΔW)`` with plain
  autograd, or :class:`~ndlowrank.nn._linear.FusedTuckerLinear`;
- a linear layer: ``F.linear(x, W + ΔW)`` (``materialize``), or the base layer plus the
  branch ``(x (G A1ᵀ)ᵀ) A0ᵀ`` with plain autograd (``plain base + branch``) or as
  ``FusedTuckerLinear`` (``factorized`` either way).

``path="auto"`` chooses among them by the cost rules in :mod:`ndlowrank.nn.layers`
(``_FUNCTION_STEP_OVERHEAD``, ``_PLAIN_DISCOUNT``, ``_LINEAR_NODE_OVERHEAD``,
``_LINEAR_NODE_ACTIVATIONS``, ``_POINTWISE_NODE_ACTIVATIONS``, ``_COMPOSITE_STEP_OVERHEAD``), fitted on one CPU
thread. This benchmark times a training step (forward, mean-square loss, backward into the
input and the adapter, gradients reset) of each form, forced, and of ``auto`` itself, next to
the frozen layer and PEFT LoRA at the same rank, on the layer shapes of the models in
``bench_models.py``; the table says which form ``auto`` took and how far it is from the fastest.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import interleaved_medians, load_window, machine, today, versions, write_section
from benchmarks.bench_adapters import Device, Holder
from benchmarks.bench_models import CALLS, layer_step, repeated
from ndlowrank import nn as nlnn
from ndlowrank.nn.layers import COMPOSITE, LINEAR_NODE, PLAIN_MERGE

RANK = 8
NEAR = 1.05  # auto within 5% of the fastest form counts as picking it (the machine's noise)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class LayerCase:
    """A layer as one of the benchmarked models has it, and the input it gets there."""

    title: str
    make: Callable[[], nn.Module]
    cpu_input: tuple[int, ...]
    gpu_input: tuple[int, ...]


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> Callable[[], nn.Module]:
    return lambda: nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


CASES = [
    LayerCase("UNet Conv2d(32, 32, 3)", _conv(32, 32, 3), (2, 32, 16, 16), (2, 320, 64, 64)),
    LayerCase("UNet Conv2d(64, 64, 3)", _conv(64, 64, 3), (2, 64, 8, 8), (2, 640, 32, 32)),
    LayerCase("resnet18 Conv2d(64, 64, 3)", _conv(64, 64, 3), (4, 64, 16, 16), (32, 64, 56, 56)),
    LayerCase("resnet18 Conv2d(128, 128, 3)", _conv(128, 128, 3), (4, 128, 8, 8), (32, 128, 28, 28)),
    LayerCase("resnet18 Conv2d(256, 256, 3)", _conv(256, 256, 3), (4, 256, 4, 4), (32, 256, 14, 14)),
    LayerCase("resnet18 Conv2d(512, 512, 3)", _conv(512, 512, 3), (4, 512, 2, 2), (32, 512, 7, 7)),
    LayerCase("pointwise Conv2d(16, 96, 1)", _conv(16, 96, 1), (4, 16, 32, 32), (32, 16, 112, 112)),
    LayerCase("pointwise Conv2d(144, 24, 1)", _conv(144, 24, 1), (4, 144, 16, 16), (32, 144, 56, 56)),
    LayerCase("pointwise Conv2d(240, 40, 1)", _conv(240, 40, 1), (4, 240, 8, 8), (32, 240, 28, 28)),
    LayerCase("pointwise Conv2d(576, 96, 1)", _conv(576, 96, 1), (4, 576, 2, 2), (32, 576, 7, 7)),
    LayerCase("pointwise Conv2d(672, 112, 1)", _conv(672, 112, 1), (4, 672, 4, 4), (32, 672, 14, 14)),
    LayerCase("pointwise Conv2d(1152, 192, 1)", _conv(1152, 192, 1), (4, 1152, 2, 2), (32, 1152, 7, 7)),
    LayerCase("SE Conv2d(96, 24, 1)", lambda: nn.Conv2d(96, 24, 1), (4, 96, 1, 1), (32, 96, 1, 1)),
    LayerCase("SE Conv2d(576, 144, 1)", lambda: nn.Conv2d(576, 144, 1), (4, 576, 1, 1), (32, 576, 1, 1)),
    LayerCase("UNet attention Linear(64, 64)", lambda: nn.Linear(64, 64), (128, 64), (8192, 640)),
    LayerCase("Linear(128, 128)", lambda: nn.Linear(128, 128), (256, 128), (2048, 1024)),
    LayerCase("Linear(128, 512)", lambda: nn.Linear(128, 512), (256, 128), (2048, 4096)),
]


def forms(adapter: nlnn.TuckerAdapter, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    """The forms ``adapter``'s call can take on ``x``, each as a function that forces it."""

    def force(path: str, plain: bool = False, composite: bool = False) -> Callable[[], None]:
        def apply() -> None:
            adapter.path = path  # and the per-shape choices the cost rules would make, made here
            adapter._fix_forms(x.shape, {PLAIN_MERGE: plain, LINEAR_NODE: not plain, COMPOSITE: composite})

        return apply

    if isinstance(adapter, nlnn.ConvAdapter):
        if adapter._is_linear_on(x):
            return {"plain W+ΔW": force("materialize", plain=True), "FusedTuckerLinear": force("materialize")}
        found = {"plain W+ΔW": force("materialize", plain=True), "FusedTuckerConv": force("materialize")}
        if adapter.geometry.pointwise and adapter.geometry.groups == 1:
            found["plain base + branch"] = force("factorized", composite=True)
        return found | {"FactorizedTuckerConv": force("factorized")}
    return {
        "plain W+ΔW": force("materialize"),
        "plain base + branch": force("factorized", plain=True),
        "FusedTuckerLinear": force("factorized"),
    }


def picked(adapter: nlnn.TuckerAdapter, x: torch.Tensor) -> str:
    """The form ``path="auto"`` took on ``x`` (after a call)."""
    path = adapter.chosen_path(x)

    def took(rule: str) -> bool:
        return adapter._form_choices[adapter._form_key(x.shape, rule)]

    if isinstance(adapter, nlnn.ConvAdapter):
        if adapter._is_linear_on(x):
            return "FusedTuckerLinear" if took(LINEAR_NODE) else "plain W+ΔW"
        if path == "factorized":
            return "plain base + branch" if adapter._composes(tuple(x.shape)) else "FactorizedTuckerConv"
        return "plain W+ΔW" if took(PLAIN_MERGE) else "FusedTuckerConv"
    if path == "materialize":
        return "plain W+ΔW"
    return "FusedTuckerLinear" if took(LINEAR_NODE) else "plain base + branch"


def _adapter(model: nn.Module) -> nlnn.TuckerAdapter:
    layer = model.get_submodule("layer")
    assert isinstance(layer, nlnn.TuckerAdapter)
    return layer


@dataclass
class Row:
    case: LayerCase
    dtype: torch.dtype
    shape: tuple[int, ...]
    times: dict[str, float]  # per step: "frozen", "PEFT LoRA", "auto" and every form
    form_names: list[str]
    auto_form: str


def run_case(case: LayerCase, repeats: int, device: Device, dtype: torch.dtype = torch.float32) -> Row:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    layer = case.make().to(device.name, dtype)
    shape = case.gpu_input if device.cuda else case.cpu_input
    x = torch.randn(shape, device=device.name, dtype=dtype, requires_grad=True)
    peft = get_peft_model(
        Holder(copy.deepcopy(layer)), LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["layer"])
    )
    auto = nlnn.add_adapters(Holder(copy.deepcopy(layer)), ["layer"], RANK, seed=0)
    models = {"frozen": Holder(copy.deepcopy(layer)).requires_grad_(False), "PEFT LoRA": peft, "auto": auto}
    names = list(forms(_adapter(auto), x))
    for name in names:
        models[name] = nlnn.add_adapters(Holder(copy.deepcopy(layer)), ["layer"], RANK, seed=0)
        forms(_adapter(models[name]), x)[name]()
    steps = {name: repeated(layer_step(model, x, device)) for name, model in models.items()}
    times = {name: t / CALLS for name, t in interleaved_medians(steps, repeats).items()}
    row = Row(case, dtype, shape, times, names, picked(_adapter(auto), x))
    fastest = min(names, key=times.__getitem__)
    print(
        f"  {case.title} on {'×'.join(map(str, shape))} ({_name(dtype)}): "
        + ", ".join(f"{name} {t * 1e6:.0f} us" for name, t in times.items())
        + f"; auto took {row.auto_form}, fastest {fastest}",
        flush=True,
    )
    return row


def report(rows: list[Row], repeats: int, load: str, device: Device) -> str:
    libraries = versions("ndlowrank", "torch", "peft")
    if device.cuda:
        where = f"GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); host: {machine()}"
        command = "python benchmarks/bench_forms.py --device cuda"
    else:
        where = f"Machine: {machine()}; torch threads: {torch.get_num_threads()}"
        command = "python benchmarks/bench_forms.py"
    lines = [
        f"## Which form `path='auto'` takes ({'GPU' if device.cuda else 'CPU'})",
        "",
        f"Written by `{command}` on {today()}. {where}. Load average (1 min) {load}. Libraries: {libraries}.",
        "",
        f"One training step (forward, mean-square loss, backward into the input and the adapter) at rank {RANK} "
        f"(PEFT LoRA r={RANK}, lora_alpha={RANK}), in µs: the mean of {CALLS} steps per timing, medians "
        f"of {repeats} interleaved timings. Each form is forced on its own copy of the adapter; *auto* is an "
        "adapter left to its cost rules. *auto / fastest* compares auto's step with the fastest form's, and "
        "*extra vs PEFT* the fastest form's cost above the frozen layer with PEFT LoRA's.",
        "",
        "| layer | input | dtype | frozen | PEFT LoRA | forms (µs) | auto took | auto / fastest "
        "| fastest: extra vs PEFT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    regrets = []
    for row in rows:
        t = row.times
        fastest = min(row.form_names, key=t.__getitem__)
        regret = t["auto"] / t[fastest]
        regrets.append(regret)
        extra = (t[fastest] - t["frozen"]) / (t["PEFT LoRA"] - t["frozen"])
        cells = "; ".join(
            f"**{name} {t[name] * 1e6:.0f}**" if name == fastest else f"{name} {t[name] * 1e6:.0f}"
            for name in row.form_names
        )
        lines.append(
            f"| {row.case.title} | {'×'.join(map(str, row.shape))} | {_name(row.dtype)} | {t['frozen'] * 1e6:.0f} "
            f"| {t['PEFT LoRA'] * 1e6:.0f} | {cells} | {row.auto_form} | {regret:.2f}× | {extra:.2f}× |"
        )
    near = sum(regret <= NEAR for regret in regrets)
    lines += [
        "",
        f"auto's step was within {round((NEAR - 1) * 100)}% of the fastest form's on {near} of {len(rows)} layers; "
        f"geometric mean of auto / fastest: {statistics.geometric_mean(regrets):.2f}×, worst "
        f"{max(regrets):.2f}×.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats instead of 15")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timings per contender")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--device", default="cpu", help="'cpu' (default) or 'cuda' (the GPU's layer sizes)")
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32"], choices=sorted(DTYPES), help="parameter and input dtypes"
    )
    args = parser.parse_args(argv)
    device = Device(args.device)
    if device.cuda and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    repeats = args.repeats or (5 if args.quick else 15)
    torch.set_num_threads(args.threads)
    print(f"{device.name}, torch threads {torch.get_num_threads()}, {repeats} repeats", flush=True)
    load_before = os.getloadavg()[0]
    rows = [run_case(case, repeats, device, DTYPES[name]) for name in args.dtypes for case in CASES]
    section = "bench_forms_gpu" if device.cuda else "bench_forms"
    write_section(section, report(rows, repeats, load_window(load_before), device))
    print(f"wrote the {section} section of benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
