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
    assert row.times is not None and set(row.times) == {"ndlowrank", "peft", "floor"}
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
