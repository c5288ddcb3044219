"""The quality study (``benchmarks/quality``): budgets, inits, counts and a tiny end-to-end run."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("peft")

from torch import nn  # noqa: E402

from benchmarks.quality import conv, report, study, transformer  # noqa: E402
from benchmarks.quality import methods as M  # noqa: E402
from benchmarks.quality.data import fewshot_split  # noqa: E402
from benchmarks.quality.training import count_trainable  # noqa: E402
from ndlowrank import nn as nlnn  # noqa: E402

CASES = {
    "conv": (conv.ConvNet, conv.TARGETS),
    "transformer": (transformer.DigitTransformer, transformer.TARGETS),
}


def _model(case: str) -> tuple[nn.Module, tuple[str, ...], list[tuple[int, ...]]]:
    make, targets = CASES[case]
    torch.manual_seed(0)
    model = make()
    return model, targets, [tuple(model.get_parameter(f"{t}.weight").shape) for t in targets]


def _methods(case: str, shapes, ranks=(1, 4, 16)) -> list[M.Method]:
    spatial = (1, 2, 3) if case == "conv" else (None,)
    lycoris = case == "conv" and M.lycoris_available()
    return M.methods(shapes, ranks, ("zero_core", "orthogonal", "principal"), spatial, lycoris=lycoris)


@pytest.mark.parametrize("case", list(CASES))
def test_counts_are_the_real_trainable_parameters_and_budgets_match(case):
    model, targets, shapes = _model(case)
    head = model.head.weight.numel() + model.head.bias.numel()
    for method in _methods(case, shapes):
        adapted = study.prepare(model, method, targets, seed=0)
        trainable = count_trainable(adapted)
        assert trainable == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        assert all(p.requires_grad for p in adapted.get_submodule(_head_path(adapted)).parameters())
        if method.family == M.HEAD_ONLY:
            assert trainable == head
        elif method.family == M.FULL:
            assert trainable == sum(p.numel() for p in model.parameters())
        else:
            assert method.budget is not None
            budget = sum(M.lora_count(shape, method.budget) for shape in shapes)
            if method.family == M.LORA:
                assert trainable - head == budget
            elif method.family.startswith("ndlowrank"):
                assert method.ranks is not None and method.init is not None
                assert trainable - head == sum(M.tucker_count(s, method.ranks, method.init) for s in shapes)
                assert str(method.ranks) in method.label
                assert abs(trainable - head - budget) <= M.BUDGET_TOLERANCE * budget
            else:
                rank = int(method.label.rsplit("=", 1)[1])
                assert trainable - head == sum(M.locon_tucker_count(s, rank) for s in shapes)


def _head_path(model: nn.Module) -> str:
    return next(name for name, _ in model.named_modules() if name.endswith("head"))


def test_matched_ranks_are_balanced_and_fit_every_target():
    shapes = [(64, 32, 3, 3), (64, 64, 3, 3)]
    for r in (1, 2, 4, 8, 16):
        budget = sum(M.lora_count(s, r) for s in shapes)
        for spatial, init in [(1, "zero_core"), (2, "zero_core"), (3, "zero_core"), (3, "orthogonal")]:
            ranks = M.match_tucker_ranks(shapes, budget, spatial, init)
            assert ranks[2:] == (spatial, spatial)
            assert ranks[0] <= 64 and ranks[1] <= 32
            total = sum(M.tucker_count(s, ranks, init) for s in shapes)
            assert abs(total - budget) <= M.BUDGET_TOLERANCE * budget
    # a linear's (r, r) Tucker delta holds LoRA r plus an r×r core: inside the tolerance
    linears = [(128, 64), (64, 128)]
    assert M.match_tucker_ranks(linears, sum(M.lora_count(s, 4) for s in linears)) == (4, 4)
    with pytest.raises(ValueError, match="spatial rank"):
        M.match_tucker_ranks(shapes, 1000)


@pytest.mark.parametrize("case", list(CASES))
def test_every_adapter_starts_with_the_models_output_unchanged(case):
    model, targets, shapes = _model(case)
    x = fewshot_split(0, 2, 0).train.x
    methods = _methods(case, shapes, ranks=(2,))
    base = study.prepare(model, methods[0], targets, seed=3).eval()  # head only: the same new head
    with torch.no_grad():
        expected = base(x)
        for method in methods[1:]:
            adapted = study.prepare(model, method, targets, seed=3).eval()
            torch.testing.assert_close(adapted(x), expected, atol=1e-5, rtol=1e-5, msg=method.label)


def test_transformer_adapters_are_seen_in_eval_mode_without_gradients():
    """The fused inference kernel of nn.TransformerEncoderLayer would skip wrapped linears."""
    model, targets, shapes = _model("transformer")
    method = next(m for m in _methods("transformer", shapes, ranks=(2,)) if m.family == M.LORA)
    adapted = study.prepare(model, method, targets, seed=0)
    base = study.prepare(model, _methods("transformer", shapes, ranks=(2,))[0], targets, seed=0)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    x = fewshot_split(0, 2, 0).train.x
    adapted.eval(), base.eval()
    with torch.no_grad():
        assert not torch.allclose(adapted(x), base(x), atol=1e-3)


def test_split_is_disjoint_seeded_and_complete():
    a, b = fewshot_split(1, 3, 4), fewshot_split(1, 3, 4)
    assert torch.equal(a.train.x, b.train.x)
    assert len(a.train) == 15 and len(a.val) == 20
    assert torch.bincount(a.train.y).tolist() == [3] * 5
    total = len(a.train) + len(a.val) + len(a.test)
    assert total == 1797 - 901  # every image of digits 5-9, each in one split
    rows = {tuple(x.flatten().tolist()) for x in a.train.x} & {tuple(x.flatten().tolist()) for x in a.test.x}
    assert len(rows) <= 1  # a duplicate image in the data set may appear on both sides, nothing more


def test_tiny_run_end_to_end(tmp_path, monkeypatch):
    from benchmarks import _plots

    monkeypatch.setattr(_plots, "PLOTS", tmp_path)
    model, targets, shapes = _model("conv")
    methods = [
        m
        for m in _methods("conv", shapes, ranks=(1,))
        if m.family in (M.HEAD_ONLY, M.FULL, M.LORA) or m.label.endswith("(3, 4, 3, 3) zero_core")
    ]
    assert len(methods) == 4
    settings = study.Settings(seeds=(0,), lrs=(1e-2,), epochs=1, pretrain_epochs=1)
    result = study.run_case("conv", model, targets, methods, settings)
    assert 0.2 < result.pretrain_accuracy <= 1.0
    assert [o.method for o in result.outcomes] == methods
    for outcome in result.outcomes:
        assert outcome.lr == 1e-2 and len(outcome.test) == 1 and outcome.std == 0.0
        assert 0.0 <= outcome.mean <= 1.0
    assert "| LoRA r=1 | PEFT LoRA | r=1 |" in report.table(result)
    line = report.plot(result, [report.Panel("p", (M.LORA,))], "quality_test", "alt")
    assert line == "![alt](plots/quality_test.png)" and (tmp_path / "quality_test.png").stat().st_size > 0
    assert any("LoRA" in sentence for sentence in report.findings(result, settings.lrs))

    conv.save_pretrained(model, tmp_path / "net.safetensors")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "net.safetensors"))
    assert saved.keys() == model.state_dict().keys()
    kernels = [t for t in saved.values() if t.ndim == 4]
    assert len(kernels) == 3 and all(t.shape[0] >= 32 for t in kernels)
    assert torch.equal(saved["head.weight"], model.head.weight.detach())
    assert not list(tmp_path.glob("*.tmp"))


def _outcome(family: str, label: str, budget: int | None, test: tuple[float, ...], val: float = 0.5):
    method = M.Method(family, label, M._head_only, budget=budget)
    return study.Outcome(method, 100, 1e-2, (val,) * len(test), test)


def test_findings_are_computed_from_the_numbers():
    outcomes = [
        _outcome(M.HEAD_ONLY, "head only", None, (0.5, 0.6)),
        _outcome(M.FULL, "full fine-tune", None, (0.9, 0.9)),
        _outcome(M.LORA, "LoRA r=1", 1, (0.8, 0.9)),
        _outcome("ndlowrank zero_core", "nd a", 1, (0.7, 0.8), val=0.6),
        _outcome("ndlowrank principal", "nd b", 1, (0.6, 0.95), val=0.4),
        _outcome(M.LORA, "LoRA r=4", 4, (0.7, 0.7)),
        _outcome("ndlowrank zero_core", "nd c", 4, (0.8, 0.75)),
        _outcome("ndlowrank principal", "nd d", 4, (0.6, 0.6)),
    ]
    text = " ".join(report.findings(study.CaseResult("x", 1.0, outcomes, 0.0), [1e-3, 1e-2]))
    assert "Head-only reaches 55.0% and full fine-tuning 90.0%" in text
    assert "At LoRA r=1's budget the best mean is LoRA r=1 (85.0%)" in text
    assert "higher mean than 2 of the 2 ndlowrank variants" in text
    # nd a has the best validation accuracy: 10 points behind LoRA on both splits
    assert "nd a, differs from LoRA by -10.0 points" in text and "ahead on 0 of them" in text
    assert "At LoRA r=4's budget the best mean is nd c (77.5%)" in text
    assert "LoRA beats every ndlowrank variant at 1 of 2 budgets" in text
    assert "8 of 8 methods chose the largest learning rate" in text
    assert "smallest learning rate" not in text


def test_spatial_pairs_differ_only_in_holding_the_spatial_factors():
    from benchmarks.quality import spatial

    model, targets, shapes = _model("conv")
    pairs = spatial.pairs(shapes, (1, 4), ("zero_core", "orthogonal"))
    assert len(pairs) == 4
    for held, trained in pairs:
        assert held.label.rsplit(",", 1)[0] == trained.label.rsplit(",", 1)[0]  # the same ranks and init
        a = study.prepare(model, held, targets, seed=1)
        b = study.prepare(model, trained, targets, seed=1)
        for (_, x), (_, y) in zip(nlnn.iter_adapters(a), nlnn.iter_adapters(b), strict=True):
            assert x.delta.fixed_modes == (2, 3) and y.delta.fixed_modes == ()
            assert all(k.requires_grad for k in y.delta.factors)
            torch.testing.assert_close(x.delta_weight(), y.delta_weight())
        spatial_numbers = sum(k.numel() for _, x in nlnn.iter_adapters(a) for k in x.delta.factors[2:])
        assert count_trainable(b) - count_trainable(a) == spatial_numbers


def test_spatial_tiny_run_writes_its_section(tmp_path):
    from benchmarks.quality import run, spatial

    config = run.Config(
        study.Settings(seeds=(0, 1), lrs=(1e-2,), epochs=1, pretrain_epochs=1), (1,), (3,), ("zero_core",)
    )
    results = tmp_path / "RESULTS.md"
    body = spatial.run(config, results)
    rows = [line for line in body.splitlines() if line.startswith("| zero_core")]
    assert len(rows) == 1 and "| r=1 | (3, 4, 3, 3) |" in rows[0] and "of 2)" in rows[0]
    assert "<!-- quality_spatial:start -->" in results.read_text()
