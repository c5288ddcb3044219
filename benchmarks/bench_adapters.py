"""Tucker adapters vs PEFT LoRA (and LyCORIS LoCon), side by side in one process.

Run ``python benchmarks/bench_adapters.py`` (``--quick`` for fewer repeats; ``--device cuda``
for the GPU suite). One *training step* is the forward of the adapted layer plus the backward
of ``⟨out, G⟩`` for a fixed random ``G`` (``out.backward(G)``), with the input requiring a
gradient, the base layer frozen, the adapter gradients reset to ``None`` before each step and
no optimizer. Contenders, all on copies of the same seeded base layer:

- the frozen base layer itself (the floor);
- PEFT LoRA r=16 (``get_peft_model`` on a one-layer wrapper, ``lora_alpha=16``);
- LyCORIS LoCon r=16 (with ``use_tucker=True`` on convolutions), in its default weight-rebuild
  mode and with ``bypass_mode=True`` (on the convolutions only in the GPU suite);
- ndlowrank ``add_adapters`` with ranks (16, 16, 3, 3) / (16, 16), ``path="auto"``, plus
  ``path="factorized"`` and ``path="materialize"`` for transparency.

It also times the forward of a merged ndlowrank model (``merge_adapters``) under
``torch.no_grad`` against the base model, and measures the peak memory of a training step:
on CPU by replaying the CPU allocator's allocation and free events recorded by
``torch.profiler`` (``profile_memory=True``), on CUDA with ``torch.cuda.max_memory_allocated``;
the bytes saved for backward (``saved_tensors_hooks``) are reported beside it.

The CPU tables go to the ``bench_adapters`` section of ``benchmarks/RESULTS.md``, the GPU ones
to ``bench_adapters_gpu``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import interleaved_medians, load_window, machine, today, versions, write_section
from benchmarks._plots import figure, save
from ndlowrank import nn as nlnn
from ndlowrank.nn._conv import factorized_branch

MiB = 2**20
WARMUP = 2  # extra untimed calls of every contender before interleaved_medians' own warm-up


@dataclass
class Case:
    """One layer to adapt, with the issue's targets for it."""

    title: str
    make_layer: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    ranks: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    lycoris: bool = False
    # ndlowrank auto's step time over the frozen layer's / over PEFT LoRA's; None: no target
    vs_frozen: float | None = None
    vs_peft: float | None = None
    merged: float | None = 1.1  # merged forward over the base model's forward
    memory_vs_peft: float | None = None  # peak step memory over PEFT LoRA's
    memory_note: str = ""


def cpu_cases() -> list[Case]:
    return [
        Case(
            "Conv2d(64, 64, 3, padding=1), input 8×64×32×32, float32",
            lambda: nn.Conv2d(64, 64, 3, padding=1),
            (8, 64, 32, 32),
            (16, 16, 3, 3),
            lycoris=True,
            vs_frozen=1.4,
            vs_peft=0.8,
            memory_vs_peft=1.0,
            memory_note="(the GPU suite's target, shown for reference)",
        ),
        Case(
            "Linear(1024, 1024), input 512×1024, float32",
            lambda: nn.Linear(1024, 1024),
            (512, 1024),
            (16, 16),
            lycoris=True,
            vs_peft=1.1,
        ),
    ]


def gpu_cases() -> list[Case]:
    cases = []
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        cases.append(
            Case(
                f"Conv2d(256, 256, 3, padding=1), input 64×256×56×56, {name}",
                lambda: nn.Conv2d(256, 256, 3, padding=1),
                (64, 256, 56, 56),
                (16, 16, 3, 3),
                dtype=dtype,
                lycoris=True,
                vs_frozen=1.5,
                vs_peft=0.75,
                memory_vs_peft=1.0,
            )
        )
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        cases.append(
            Case(
                f"Linear(4096, 4096), input 4096×4096, {name}",
                lambda: nn.Linear(4096, 4096),
                (4096, 4096),
                (16, 16),
                dtype=dtype,
                vs_peft=1.05,
            )
        )
    return cases


class Holder(nn.Module):
    """A one-layer model, so that PEFT and ``add_adapters`` can target ``"layer"`` by name."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


# -- the device: synchronisation and peak memory ---------------------------------------------


class Device:
    def __init__(self, name: str) -> None:
        self.name = name
        self.cuda = name.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def peak_extra_bytes(self, step: Callable[[], Any]) -> int:
        """Peak bytes allocated during ``step`` beyond what was allocated when it started."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - start
        return cpu_peak_extra_bytes(step)


def cpu_peak_extra_bytes(step: Callable[[], Any]) -> int:
    """Peak of the running sum of the CPU allocator's events recorded by ``torch.profiler``.

    With ``profile_memory=True`` every allocation and free of torch's CPU allocator is an
    event with a signed size and a timestamp; summing them in time order gives the bytes
    held above the level at the start, whose maximum is the step's peak extra memory.
    (tracemalloc cannot see these allocations.)
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def saved_for_backward_bytes(forward: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``forward()``.

    Storages of ``exclude`` (the input and the parameters, which exist anyway) are left out.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without a plain storage
            ptr, nbytes = id(tensor), tensor.numel() * tensor.element_size()
        if ptr not in skip and nbytes:
            storages[ptr] = nbytes
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    del out
    return sum(storages.values())


# -- contenders ------------------------------------------------------------------------------


@dataclass
class Contender:
    key: str
    label: str
    model: nn.Module | None = None
    unavailable: str = ""  # why it could not be built
    params: list[nn.Parameter] = field(default_factory=list)

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)


class ConvFloor(nn.Module):
    """The floor of a conv adapter's step: the frozen layer's forward and input gradient plus the factor gradients.

    The adapter's branch runs on a detached input, so the backward computes the gradients of
    the factors and the core but no input gradient through the branch; the input gradient
    comes from the frozen layer alone. No path can do less.
    """

    def __init__(self, adapter: nlnn.ConvAdapter) -> None:
        super().__init__()
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter = self.adapter
        a0, a1 = list(adapter.delta.factors)[:2]
        prepared = adapter.geometry.prepare(x.detach())
        branch = factorized_branch(prepared, adapter.geometry, a0, a1, adapter.spatial_core())
        return adapter.base_layer(x) + branch


def _frozen_copy(layer: nn.Module) -> nn.Module:
    return copy.deepcopy(layer).requires_grad_(False)


def _lycoris(layer: nn.Module, bypass: bool, rank: int = 16) -> nn.Module:
    from lycoris.modules.locon import LoConModule

    module = LoConModule(
        "layer",
        _frozen_copy(layer),
        lora_dim=rank,
        alpha=rank,
        use_tucker=isinstance(layer, nn.Conv2d),
        bypass_mode=bypass or None,
    )
    if isinstance(layer, nn.Conv2d) and not module.tucker:
        raise RuntimeError("LoConModule did not build its Tucker form")
    return module.to(device=layer.weight.device)


def build_contenders(case: Case, layer: nn.Module, x: torch.Tensor) -> list[Contender]:
    from peft import LoraConfig, get_peft_model

    contenders = [Contender("frozen", "frozen base layer", _frozen_copy(layer))]
    peft_model = get_peft_model(
        Holder(copy.deepcopy(layer)), LoraConfig(r=16, lora_alpha=16, target_modules=["layer"])
    )
    contenders.append(Contender("peft", "PEFT LoRA r16", peft_model))
    if case.lycoris:
        name = "LyCORIS LoCon-Tucker r16" if isinstance(layer, nn.Conv2d) else "LyCORIS LoCon r16"
        for bypass, suffix in ((False, "default (weight rebuild)"), (True, "bypass_mode=True")):
            key = "lycoris-bypass" if bypass else "lycoris"
            try:
                contenders.append(Contender(key, f"{name}, {suffix}", _lycoris(layer, bypass)))
            except Exception as exc:  # reported in the table, not fatal
                contenders.append(
                    Contender(key, f"{name}, {suffix}", unavailable=f"{type(exc).__name__}: {exc}")
                )
    for path in nlnn.PATHS:
        model = nlnn.add_adapters(Holder(copy.deepcopy(layer)), ["layer"], case.ranks, path=path, seed=0)
        label = f"ndlowrank {case.ranks}, path={path!r}"
        if path == "auto":
            with torch.enable_grad():
                label += f" (→ {model.layer.chosen_path(x)})"
        contenders.append(Contender(f"nl-{path}", label, model))
    if isinstance(layer, nn.modules.conv._ConvNd):
        model = nlnn.add_adapters(Holder(copy.deepcopy(layer)), ["layer"], case.ranks, seed=0)
        label = "floor: frozen layer's step + the adapter's factor gradients"
        contenders.append(Contender("floor", label, ConvFloor(model.layer)))
    for contender in contenders:
        if contender.model is not None:
            contender.params = [p for p in contender.model.parameters() if p.requires_grad]
    return contenders


def make_step(contender: Contender, x: torch.Tensor, grad: torch.Tensor, device: Device):
    model, params = contender.model, contender.params
    assert model is not None

    def clear() -> None:
        x.grad = None
        for p in params:
            p.grad = None

    def step() -> None:
        clear()
        model(x).backward(grad)
        device.sync()

    return step, clear


# -- the suite -------------------------------------------------------------------------------


@dataclass
class CaseResult:
    case: Case
    contenders: list[Contender]
    times: dict[str, float]
    peaks: dict[str, int]
    saved: dict[str, int]
    merged: dict[str, float]
    merge_error: float


def run_case(case: Case, device: Device, repeats: int) -> CaseResult:
    torch.manual_seed(0)
    layer = case.make_layer().to(device=device.name, dtype=case.dtype)
    x = torch.randn(case.input_shape, device=device.name, dtype=case.dtype, requires_grad=True)
    contenders = build_contenders(case, layer, x)
    with torch.no_grad():
        grad = torch.randn_like(contenders[0].model(x))  # type: ignore[misc]
    ready = [c for c in contenders if c.model is not None]
    steps = {c.key: make_step(c, x, grad, device) for c in ready}
    for step, _ in steps.values():
        for _ in range(WARMUP):
            step()
    times = interleaved_medians({key: step for key, (step, _) in steps.items()}, repeats)
    for c in contenders:
        shown = f"{times[c.key] * 1e3:8.2f} ms" if c.key in times else f"not available ({c.unavailable})"
        print(f"  step  {c.label:<58} {shown}", flush=True)

    peaks, saved = {}, {}
    for c in ready:
        step, clear = steps[c.key]
        clear()
        peaks[c.key] = device.peak_extra_bytes(step)
        clear()
        saved[c.key] = saved_for_backward_bytes(lambda m=c.model: m(x), [x, *c.model.parameters()])
    print(
        "  peak memory of a step (MiB): "
        + ", ".join(f"{c.key} {peaks[c.key] / MiB:.1f}" for c in ready)
        + "; saved for backward (MiB): "
        + ", ".join(f"{c.key} {saved[c.key] / MiB:.1f}" for c in ready),
        flush=True,
    )
    merged, merge_error = run_merged(case, layer, contenders, x, device, repeats)
    return CaseResult(case, contenders, times, peaks, saved, merged, merge_error)


def run_merged(
    case: Case, layer: nn.Module, contenders: list[Contender], x: torch.Tensor, device: Device, repeats: int
) -> tuple[dict[str, float], float]:
    """Forward under no_grad: the base model vs ndlowrank after merge_adapters (and PEFT merged)."""
    x = x.detach()
    base = Holder(_frozen_copy(layer))
    adapted = nlnn.add_adapters(Holder(copy.deepcopy(layer)), ["layer"], case.ranks, seed=0)
    with torch.no_grad():  # a non-zero delta, so that merging changes the weight
        adapted.layer.delta.core.normal_(0.0, 0.02)
        expected = adapted(x)
    nlnn.merge_adapters(adapted)
    peft_model = next(c.model for c in contenders if c.key == "peft")
    peft_model.base_model.merge_adapter()  # type: ignore[union-attr]

    def forward(model: nn.Module) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                model(x)
            device.sync()

        return call

    calls = {"base": forward(base), "nl-merged": forward(adapted), "peft-merged": forward(peft_model)}  # type: ignore[arg-type]
    for call in calls.values():
        for _ in range(WARMUP):
            call()
    times = interleaved_medians(calls, repeats)
    with torch.no_grad():
        error = float((adapted(x).float() - expected.float()).abs().max() / expected.float().abs().max())
    print(
        f"  merged forward: base {times['base'] * 1e3:.2f} ms, ndlowrank merged {times['nl-merged'] * 1e3:.2f} ms "
        f"({times['nl-merged'] / times['base']:.2f}x), PEFT merged {times['peft-merged'] * 1e3:.2f} ms; "
        f"merged vs unmerged output: {error:.1e} relative",
        flush=True,
    )
    return times, error


# -- the report ------------------------------------------------------------------------------


def _mark(value: float, target: float | None) -> str:
    if target is None:
        return ""
    return f"{'yes' if value <= target else '**no**'} (≤ {target}×)"


def _case_tables(result: CaseResult) -> list[str]:
    case, times = result.case, result.times
    frozen, peft = times["frozen"], times["peft"]
    lines = [
        f"### {case.title}",
        "",
        "| contender | trainable params | step (ms) | vs frozen | vs PEFT LoRA |",
        "|---|---|---|---|---|",
    ]
    for c in result.contenders:
        if c.key not in times:
            lines.append(f"| {c.label} | – | not available: {c.unavailable} | – | – |")
            continue
        t = times[c.key]
        label = f"**{c.label}**" if c.key == "nl-auto" else c.label
        lines.append(f"| {label} | {c.trainable:,} | {t * 1e3:.2f} | {t / frozen:.2f}× | {t / peft:.2f}× |")
    auto = times["nl-auto"]
    checks = []
    if case.vs_peft is not None:
        checks.append(f"ndlowrank (auto) vs PEFT LoRA {auto / peft:.2f}×: {_mark(auto / peft, case.vs_peft)}")
    if case.vs_frozen is not None:
        checks.append(f"vs frozen {auto / frozen:.2f}×: {_mark(auto / frozen, case.vs_frozen)}")
    if "floor" in times:
        floor = times["floor"]
        paths = ", ".join(
            f"{path} {times[f'nl-{path}'] / floor:.2f}×" for path in nlnn.PATHS[1:] if f"nl-{path}" in times
        )
        checks.append(f"the floor is {floor / frozen:.2f}× the frozen layer's step; over the floor: {paths}")
    merged = result.merged["nl-merged"] / result.merged["base"]
    checks.append(
        f"merged forward (no_grad) vs the base model {merged:.2f}× "
        f"({result.merged['nl-merged'] * 1e3:.2f} ms vs {result.merged['base'] * 1e3:.2f} ms; "
        f"PEFT merged {result.merged['peft-merged'] * 1e3:.2f} ms): {_mark(merged, case.merged)}"
    )
    lines += ["", "Targets: " + "; ".join(checks) + "."]

    peft_peak = result.peaks["peft"]
    lines += [
        "",
        "| contender | peak extra memory of a step (MiB) | vs PEFT LoRA | saved for backward (MiB) |",
        "|---|---|---|---|",
    ]
    for c in result.contenders:
        if c.key in result.peaks:
            lines.append(
                f"| {c.label} | {result.peaks[c.key] / MiB:.2f} | {result.peaks[c.key] / peft_peak:.2f}× "
                f"| {result.saved[c.key] / MiB:.2f} |"
            )
    if case.memory_vs_peft is not None:
        ratio = result.peaks["nl-auto"] / peft_peak
        lines += [
            "",
            f"Memory: ndlowrank (auto) peak {ratio:.2f}× PEFT LoRA's: "
            f"{_mark(ratio, case.memory_vs_peft)} {case.memory_note}".rstrip()
            + ".",
        ]
    return lines


SHORT_LABELS = {
    "frozen": "frozen layer",
    "peft": "PEFT LoRA r16",
    "lycoris": "LyCORIS (rebuild)",
    "lycoris-bypass": "LyCORIS (bypass)",
    "nl-auto": "ndlowrank auto",
    "nl-materialize": "ndlowrank materialize",
    "nl-factorized": "ndlowrank factorized",
    "floor": "floor (frozen + factor gradients)",
}


def plot_results(results: list[CaseResult], name: str, title: str) -> str:
    """Two panels: step time and peak step memory of every contender, relative to PEFT LoRA's."""
    fig, (time_ax, memory_ax) = figure(ncols=2, width=5.5, height=1.4 + 1.1 * len(results))
    keys = [k for k in SHORT_LABELS if any(k in r.times for r in results)]
    height = 0.8 / len(keys)
    for ax, metric in ((time_ax, "times"), (memory_ax, "peaks")):
        for k, key in enumerate(keys):
            cases = [i for i, r in enumerate(results) if key in getattr(r, metric)]
            ratios = [getattr(results[i], metric)[key] / getattr(results[i], metric)["peft"] for i in cases]
            positions = [i + (k - (len(keys) - 1) / 2) * height for i in cases]
            bars = ax.barh(positions, ratios, height=height, label=SHORT_LABELS[key])
            ax.bar_label(bars, labels=[f"{v:.2f}" for v in ratios], padding=2, fontsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(
            range(len(results)), [r.case.title.replace(", input", "\ninput") for r in results], fontsize=7
        )
        ax.invert_yaxis()
    time_ax.set_xlabel("training-step time / PEFT LoRA's")
    memory_ax.set_xlabel("peak extra memory of a step / PEFT LoRA's")
    memory_ax.set_yticks(range(len(results)), [""] * len(results))
    memory_ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"{title} (lower is better)")
    return save(fig, name, title)


def report(
    results: list[CaseResult], device: Device, repeats: int, heading: str, command: str, load: str
) -> str:
    if device.cuda:
        where = (
            f"GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); host: {machine()}. "
            f"cudnn.benchmark={torch.backends.cudnn.benchmark}, cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
            f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32} (torch's defaults)."
        )
        memory = (
            "Peak memory: `torch.cuda.max_memory_allocated()` during one step minus the memory allocated "
            "when it started (gradients cleared first)."
        )
    else:
        where = (
            f"Machine: {machine()}; torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}); "
            f"load average (1 min) {load}."
        )
        memory = (
            "Peak memory: one step under `torch.profiler.profile(profile_memory=True)`; the CPU allocator's "
            "allocation and free events are summed in time order and the maximum of that running sum above "
            "the start is the peak extra memory (gradients cleared first; tracemalloc cannot see torch's "
            "allocations). 'Saved for backward' sums the distinct storages autograd keeps from forward to "
            "backward (`torch.autograd.graph.saved_tensors_hooks`), leaving out the input and the parameters."
        )
    lines = [
        heading,
        "",
        f"Written by `{command}` on {today()}. {where} "
        f"Libraries: {versions('ndlowrank', 'torch', 'peft', 'lycoris-lora')}.",
        "",
        f"Medians of {repeats} interleaved runs after warm-up. One training step = forward + backward of "
        "⟨out, G⟩ for a fixed random G (`out.backward(G)`), the input requiring a gradient, the base layer "
        "frozen, adapter gradients reset to None before each step, no optimizer. Ratios are step times over "
        "the frozen layer's and over PEFT LoRA's (lower is better); the targets apply to ndlowrank with "
        "`path='auto'`. PEFT LoRA: r=16, lora_alpha=16, its default init and dtype handling; ndlowrank: "
        "`add_adapters(..., path=...)` with its default init (zero core) and scale 1. Merged rows time the "
        "forward under `torch.no_grad()` of the one-layer model after `merge_adapters` against the same model "
        "without adapters.",
        memory,
    ]
    for result in results:
        lines += ["", *_case_tables(result)]
    name = "bench_adapters_gpu" if device.cuda else "bench_adapters"
    lines += ["", plot_results(results, name, heading.removeprefix("## "))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="7 repeats instead of 15")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved runs per contender")
    parser.add_argument("--device", default="cpu", help="'cpu' (default) or 'cuda' for the GPU suite")
    args = parser.parse_args(argv)
    repeats = args.repeats or (7 if args.quick else 15)
    device = Device(args.device)
    if device.cuda and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    if device.cuda:
        cases, section, heading = gpu_cases(), "bench_adapters_gpu", "## Adapters vs PEFT LoRA (GPU)"
    else:
        cases, section, heading = cpu_cases(), "bench_adapters", "## Adapters vs PEFT LoRA (CPU)"
    print(f"{device.name}, torch threads {torch.get_num_threads()}, {repeats} repeats", flush=True)
    load_before = os.getloadavg()[0]
    results = []
    for case in cases:
        print(case.title, flush=True)
        results.append(run_case(case, device, repeats))
    command = "python benchmarks/bench_adapters.py" + (" --device cuda" if device.cuda else "")
    load = load_window(load_before)
    write_section(section, report(results, device, repeats, heading, command, load))
    print(f"wrote the {section} section of benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
