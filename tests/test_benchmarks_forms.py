"""The forms benchmark measures what it names: each forced form runs, and auto's pick is read back."""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from benchmarks import bench_forms  # noqa: E402
from benchmarks.bench_adapters import Device, Holder  # noqa: E402
from ndlowrank import nn as nlnn  # noqa: E402

FUNCTIONS = ("FusedTuckerConv", "FactorizedTuckerConv", "FusedTuckerLinear")


def _graph_names(out: torch.Tensor) -> set[str]:
    """The type names of every node in ``out``'s autograd graph."""
    names, todo, seen = set(), [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def _case(title: str) -> bench_forms.LayerCase:
    return next(case for case in bench_forms.CASES if case.title.startswith(title))


@pytest.mark.parametrize(
    "title, expected",
    [
        ("UNet Conv2d(32", ["plain W+ΔW", "FusedTuckerConv", "FactorizedTuckerConv"]),
        (
            "pointwise Conv2d(144",
            ["plain W+ΔW", "FusedTuckerConv", "plain base + branch", "FactorizedTuckerConv"],
        ),
        ("SE Conv2d(96", ["plain W+ΔW", "FusedTuckerLinear"]),
        ("Linear(128, 128)", ["plain W+ΔW", "plain base + branch", "FusedTuckerLinear"]),
        ("UNet attention Linear(64", ["plain W+ΔW", "plain base + branch", "FusedTuckerLinear"]),
    ],
)
def test_every_forced_form_runs_its_own_function_and_the_same_numbers(title, expected):
    case = _case(title)
    torch.manual_seed(0)
    model = nlnn.add_adapters(Holder(case.make()), ["layer"], 4, seed=0)
    adapter = model.layer
    with torch.no_grad():
        for p in adapter.delta.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(case.cpu_input, requires_grad=True)
    forms = bench_forms.forms(adapter, x)
    assert list(forms) == expected
    outputs = []
    for name, force in forms.items():
        force()
        out = model(x)
        functions = {f for f in FUNCTIONS if f"{f}Backward" in _graph_names(out)}
        assert functions == (set() if name.startswith("plain") else {name})
        outputs.append(out)
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "title, form",
    [
        ("UNet attention Linear(64", "plain base + branch"),
        ("Linear(128, 512", "FusedTuckerLinear"),
        ("pointwise Conv2d(1152", "plain base + branch"),
        ("pointwise Conv2d(16, 96", "FactorizedTuckerConv"),
    ],
)
def test_the_factorized_path_takes_its_form_by_the_activations_size(title, form):
    case = _case(title)
    model = nlnn.add_adapters(Holder(case.make()), ["layer"], 8, seed=0, path="factorized")
    x = torch.randn(case.cpu_input, requires_grad=True)
    model(x)
    assert bench_forms.picked(model.layer, x) == form


def test_a_case_runs_and_reports_what_auto_took():
    row = bench_forms.run_case(_case("SE Conv2d(96"), repeats=1, device=Device("cpu"))
    assert row.auto_form in row.form_names
    assert set(row.times) == {"frozen", "PEFT LoRA", "auto", *row.form_names}
    text = bench_forms.report([row], repeats=1, load="0.0 before the run, 0.0 after it", device=Device("cpu"))
    assert "| SE Conv2d(96, 24, 1) | 4×96×1×1 | float32 |" in text
    assert re.search(r"fastest form's on [01] of 1 layers", text)


def test_the_gpu_suite_needs_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench_forms.main(["--device", "cuda"])
