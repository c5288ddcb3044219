"""Smoke tests of the whole-model benchmark: it runs on a real architecture and reports what it cannot run."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from benchmarks import bench_models


def _case(name: str) -> bench_models.ModelCase:
    return next(case for case in bench_models.CASES if case.name.startswith(name))


def test_a_real_model_runs_and_both_contenders_train_the_same_targets():
    row = bench_models.run_model(_case("BERT"), repeats=1)
    assert not row.unavailable
    assert row.times is not None and set(row.times) == {"ndlowrank", "peft"}
    assert row.trainable is not None and min(row.trainable.values()) > 0
    text = bench_models.report([row], [], repeats=1, load="0.0 before the run, 0.0 after it")
    assert "| BERT" in text and "Geometric mean" in text


def test_a_model_that_cannot_be_built_is_reported_not_raised():
    def broken():
        raise RuntimeError("operator torchvision::nms does not exist")

    case = bench_models.ModelCase("broken net", "torchvision", broken, ["conv1"])
    row = bench_models.run_model(case, repeats=1)
    assert row.times is None and "torchvision: RuntimeError" in row.unavailable
    assert "not run: torchvision: RuntimeError" in bench_models.report([row], [], 1, "")
