"""Smoke tests of the whole-model benchmark: it runs on a real architecture and reports what it cannot run."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from benchmarks import bench_models


def _case(name: str) -> bench_models.ModelCase:
    return next(case for case in bench_models.CASES if case.name.startswith(name))


def test_a_real_model_runs_and_both_contenders_train_the_same_targets():
    row = bench_models.run_model(_case("BERT"), repeats=1, rounds=2)
    assert not row.unavailable
    assert row.spread is not None and 0 < row.spread[0] <= row.step_ratio() <= row.spread[1]
    assert row.times is not None and set(row.times) == {"ndlowrank", "peft", "floor", "products"}
    assert row.trainable is not None and min(row.trainable.values()) > 0
    text = bench_models.report([row], [], repeats=1, load="0.0 before the run, 0.0 after it")
    assert "| BERT" in text and "Geometric mean" in text


def test_a_model_that_cannot_be_built_is_reported_not_raised():
    def broken(scale):
        raise RuntimeError("operator torchvision::nms does not exist")

    case = bench_models.ModelCase("broken net", "torchvision", broken, ["conv1"], ("tiny", "big"))
    row = bench_models.run_model(case, repeats=1)
    assert row.times is None and "torchvision: RuntimeError" in row.unavailable
    assert "not run: torchvision: RuntimeError" in bench_models.report([row], [], 1, "")


def test_the_floor_reaches_exactly_the_layers_peft_adapts_and_changes_no_output():
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    case = _case("BERT")
    torch.manual_seed(0)
    model, forward = case.build(bench_models.Scale())
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=case.targets))
    adapted = {
        name.removeprefix("base_model.model.") for name, m in peft.named_modules() if hasattr(m, "lora_A")
    }
    floor = bench_models.floor_model(copy.deepcopy(model), case.targets)
    zeros = {name.removesuffix(".floor_zero") for name, p in floor.named_parameters() if p.requires_grad}
    assert zeros == adapted and len(zeros) == 13  # 2 layers × (query, key, value, 3 dense) + the pooler
    model.eval(), floor.eval()
    torch.testing.assert_close(forward(floor), forward(model))


def test_the_gpu_suite_picks_realistic_sizes_and_needs_cuda(monkeypatch):
    import torch

    cpu, gpu = bench_models.Scale("cpu"), bench_models.Scale("cuda")
    assert (cpu.pick(128, 1024), gpu.pick(128, 1024)) == (128, 1024)
    case = _case("LLaMA")
    assert "hidden 128" in case.title(cpu) and "hidden 1024" in case.title(gpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench_models.main(["--device", "cuda"])


def test_a_regex_target_reaches_the_same_layers_in_peft_and_the_floor_and_keeps_the_table_whole():
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 2))
    regex = r"0|1\.1|2"
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=regex))
    adapted = {
        name.removeprefix("base_model.model.") for name, m in peft.named_modules() if hasattr(m, "lora_A")
    }
    floor = bench_models.floor_model(copy.deepcopy(model), regex)
    zeros = {name.removesuffix(".floor_zero") for name, p in floor.named_parameters() if p.requires_grad}
    assert zeros == adapted == {"0", "1.1", "2"}
    x = torch.randn(3, 4)
    torch.testing.assert_close(floor(x), model(x))

    row = bench_models.Row(
        bench_models.ModelCase("net", "torch", lambda s: None, regex, ("a", "b")), "skipped"
    )
    lines = bench_models.report([row], [], 1, "").splitlines()
    header = next(line for line in lines if line.startswith("| model"))
    line = lines[lines.index(header) + 2]
    cells = re.split(r"(?<!\\)\|", line)  # the bars that are not escaped
    assert r"regex `0\|1\.1\|2`" in line and len(cells) == header.count("|") + 1


def test_only_needs_a_model_name_that_exists(monkeypatch, capsys):
    monkeypatch.setattr(bench_models, "write_section", lambda *args: pytest.fail("--only must not write"))
    with pytest.raises(SystemExit):
        bench_models.main(["--only", "no-such-model"])
    assert "no model matches" in capsys.readouterr().err


def test_the_uniform_adapter_cost_for_a_geometric_mean_solves_it():
    measured = [{"floor": 7.0, "peft": 10.0}, {"floor": 6.0, "peft": 8.0}]
    cost = bench_models.uniform_cost_for(measured, 0.85)
    steps = [(t["floor"] + cost * (t["peft"] - t["floor"])) / t["peft"] for t in measured]
    assert 0 < cost < 1 and abs((steps[0] * steps[1]) ** 0.5 - 0.85) < 1e-9
    assert bench_models.uniform_cost_for(measured, 0.5) == 0.0  # the floors alone are above it
    assert bench_models.uniform_cost_for(measured, 1.0) == pytest.approx(1.0)  # PEFT's own cost


def _layer(name, *args, **kwargs):
    def make():
        from torch import nn

        if name == "Conv1D":
            from transformers.pytorch_utils import Conv1D

            return Conv1D(*args)
        return getattr(nn, name)(*args, **kwargs)

    return make


@pytest.mark.parametrize(
    ("make_layer", "shape", "ranks", "input_needs_grad"),
    [
        pytest.param(_layer("Linear", 6, 5), (3, 4, 6), 2, True, id="Linear"),
        pytest.param(_layer("Conv1D", 5, 6), (2, 3, 6), 2, True, id="transformers Conv1D"),
        pytest.param(_layer("Conv2d", 4, 6, 3, padding=1), (2, 4, 5, 5), (2, 2, 3, 3), True, id="3x3"),
        pytest.param(
            _layer("Conv2d", 4, 6, 3, stride=2, groups=2, padding=1, padding_mode="reflect"),
            (2, 4, 7, 7),
            (2, 2, 3, 3),
            True,
            id="grouped strided reflect",
        ),
        pytest.param(
            _layer("Conv2d", 3, 6, 7, stride=2), (2, 3, 9, 9), (2, 2, 7, 7), False, id="first layer"
        ),
        pytest.param(_layer("Conv2d", 6, 4, 1, stride=2), (2, 6, 5, 5), 2, True, id="pointwise"),
        pytest.param(_layer("Conv2d", 6, 4, 1), (3, 6, 1, 1), 2, True, id="SE"),
        pytest.param(_layer("Conv1d", 4, 5, 3), (4, 6), (2, 2, 3), True, id="unbatched Conv1d"),
        pytest.param(_layer("Conv2d", 4, 6, 3, padding=1), (2, 4, 5, 5), 2, True, id="3x3 spatial rank 2"),
    ],
)
def test_the_products_replay_computes_the_adapters_branch_and_its_gradients(
    make_layer, shape, ranks, input_needs_grad
):
    """What bench_models times as the products alone is the adapter's own arithmetic (checked against its autograd)."""
    import torch

    from benchmarks._products import products_step, replay
    from benchmarks.bench_adapters import Holder
    from ndlowrank import nn as nlnn

    torch.manual_seed(0)
    model = nlnn.add_adapters(Holder(make_layer().double()), ["layer"], ranks, seed=0)
    adapter = model.layer
    delta = adapter.delta
    with torch.no_grad():
        for p in (delta.core, delta.factors[0], delta.factors[1]):
            p.copy_(torch.randn_like(p))  # a delta that is not zero, and factors far from their init
    x = torch.randn(shape, dtype=torch.float64, requires_grad=input_needs_grad)

    got = replay(adapter, x)()
    grad = got["output gradient"]
    assert grad is not None and got["output"] is not None
    branch = adapter(x) - adapter.base_layer(x)
    torch.testing.assert_close(got["output"].reshape(branch.shape), branch)
    branch.backward(grad.reshape(branch.shape))
    a0, a1 = delta.factors[0].grad, delta.factors[1].grad
    out_factor, in_factor = (a1, a0) if isinstance(adapter, nlnn.TransposedLinearAdapter) else (a0, a1)
    torch.testing.assert_close(got["out factor"], out_factor)
    torch.testing.assert_close(got["in factor"], in_factor)
    core = got["core"]
    assert core is not None
    if any(
        k.requires_grad for k in list(delta.factors)[2:]
    ):  # the gradient of the folded core Gs = G ×₂ K₂ ×₃ K₃
        spatial = list(delta.factors)[2:]
        folded = torch.einsum("abij,ki,lj->abkl", delta.core, *spatial)
        torch.testing.assert_close(torch.einsum("abkl,ki,lj->abij", core, *spatial), delta.core.grad)
        assert core.shape == folded.shape
    else:  # held spatial factors (the identity), or none: Gs is the core
        core = core.t() if isinstance(adapter, nlnn.TransposedLinearAdapter) else core
        torch.testing.assert_close(core.reshape(delta.core.shape), delta.core.grad)
    if input_needs_grad:
        assert got["input"] is not None and x.grad is not None
        got_input = got["input"]
        if isinstance(
            adapter, nlnn.ConvAdapter
        ):  # the gradient at the padded input, pulled back through the padding
            prepared = adapter.geometry.prepare(x if x.ndim == adapter.geometry.dims + 2 else x.unsqueeze(0))
            (got_input,) = torch.autograd.grad(prepared, x, got_input.reshape(prepared.shape))
        torch.testing.assert_close(got_input.reshape(x.shape), x.grad)
    else:
        assert got["input"] is None  # a first layer's input gets no gradient, in the step or here

    step = products_step(model, lambda m: m(x))  # records the input in one forward, then replays
    step()


def test_the_products_of_a_layer_without_a_replay_are_refused_by_name():
    import torch

    from benchmarks._products import replay
    from benchmarks.bench_adapters import Holder
    from ndlowrank import nn as nlnn

    model = nlnn.add_adapters(Holder(torch.nn.Embedding(10, 4)), ["layer"], 2, seed=0)
    with pytest.raises(TypeError, match="EmbeddingAdapter"):
        replay(model.layer, torch.tensor([1, 2]))


def test_the_products_step_replays_every_call_of_every_adapter(monkeypatch):
    import torch

    from benchmarks import _products
    from ndlowrank import nn as nlnn

    model = nlnn.add_adapters(
        torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)), ["0", "1"], 2
    )
    replayed = []
    real_replay = _products.replay

    def counted(adapter, x):
        products = real_replay(adapter, x)

        def run():
            replayed.append((adapter, tuple(x.shape)))
            return products()

        return run

    monkeypatch.setattr(_products, "replay", counted)
    first, second = model[0], model[1]

    def forward(m):  # the first layer runs twice, on inputs of two shapes
        return m[1](m[0](m[0](torch.randn(2, 4)))) + m[1](m[0](torch.randn(5, 4))).sum()

    step = _products.products_step(model, forward)
    step()
    assert replayed == [(first, (2, 4)), (first, (2, 4)), (second, (2, 4)), (first, (5, 4)), (second, (5, 4))]


def test_a_ratio_just_above_the_target_does_not_read_as_on_it():
    assert bench_models._ratio_text(1.003) == "1.003"
    assert bench_models._ratio_text(1.0) == "1.00"
    assert bench_models._ratio_text(0.996) == "1.00"  # rounds up onto the target it meets
    assert bench_models._ratio_text(1.04) == "1.04"
