"""Adapters on real architectures (tiny configs, random weights): add, train, save, load, merge, remove.

The models come from ``_real_models`` (transformers' GPT-2, LLaMA, BERT and Mixtral, diffusers'
UNet2DConditionModel); torchvision and timm skip with the reason they cannot be imported.
"""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")

import _real_models  # noqa: E402
from torch import nn  # noqa: E402

from ndlowrank import nn as nlnn  # noqa: E402

from _helpers import import_peer  # noqa: E402

TOL = {"rtol": 1e-4, "atol": 1e-5}


def _train_one_step(real: _real_models.RealModel, model: nn.Module) -> None:
    """One SGD step on the adapters (a loss that every output element feeds)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    real(model).float().square().mean().backward()
    assert all(p.grad is not None for p in trainable)
    optimizer.step()


@pytest.mark.parametrize("name", list(_real_models.TRANSFORMERS_AND_DIFFUSERS))
def test_add_train_save_load_merge_remove(name, tmp_path):
    real = _real_models.TRANSFORMERS_AND_DIFFUSERS[name]()
    base = real.model
    with torch.no_grad():
        expected_base = real(base)
    model = nlnn.add_adapters(
        copy.deepcopy(base),
        real.target_modules,
        ranks=4,
        target_parameters=real.target_parameters or None,
        seed=0,
    )
    adapters = dict(nlnn.iter_adapters(model))
    assert len(adapters) >= len(real.target_modules) + len(real.target_parameters)
    assert nlnn.find_bypassed_adapters(model, **real.inputs) == []
    with torch.no_grad():
        torch.testing.assert_close(real(model), expected_base, **TOL)  # ΔW = 0 at the start

    _train_one_step(real, model)
    with torch.no_grad():
        trained = real(model)
    assert not torch.allclose(trained, expected_base, **TOL), "one step changed nothing"

    path = tmp_path / "adapters.safetensors"
    nlnn.save_adapters(model, path)
    loaded = nlnn.load_adapters(copy.deepcopy(base), path)
    with torch.no_grad():
        assert torch.equal(real(loaded), trained)
        original = nlnn.remove_adapters(copy.deepcopy(loaded), merge=False)
        assert torch.equal(real(original), expected_base)
        for key, value in base.state_dict().items():
            assert torch.equal(original.state_dict()[key], value), key

        nlnn.merge_adapters(loaded)
        torch.testing.assert_close(real(loaded), trained, **TOL)
        nlnn.unmerge_adapters(loaded)
        torch.testing.assert_close(real(loaded), trained, **TOL)

        plain = nlnn.remove_adapters(copy.deepcopy(loaded), merge=True)
        assert not list(nlnn.iter_adapters(plain))
        assert plain.state_dict().keys() == base.state_dict().keys()
        torch.testing.assert_close(real(plain), trained, **TOL)


def test_gpt2_conv1d_gets_a_transposed_linear_adapter_with_the_delta_in_the_weight_layout():
    real = _real_models.gpt2()
    model = nlnn.add_adapters(copy.deepcopy(real.model), ["c_attn"], ranks=(3, 5), seed=0, dropout=0.1)
    adapter = model.transformer.h[0].attn.c_attn
    assert isinstance(adapter, nlnn.TransposedLinearAdapter)
    assert adapter.delta.shape == tuple(adapter.weight.shape) == (32, 96)  # (in, out), as Conv1D stores it
    assert (adapter.nf, adapter.nx) == (96, 32)  # Conv1D's own attributes, read through
    every_linear = nlnn.add_adapters(copy.deepcopy(real.model), "all-linear", ranks=2, seed=0)
    assert {type(a) for _, a in nlnn.iter_adapters(every_linear)} == {nlnn.TransposedLinearAdapter}
    x = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapter.delta.core.normal_(generator=torch.Generator().manual_seed(1))
        a0, a1 = (f.detach() for f in adapter.delta.factors)
        reference = x @ (adapter.weight + a0 @ adapter.delta.core @ a1.T) + adapter.base_layer.bias
        adapter.eval()
        for path in ("materialize", "factorized"):
            adapter.path = path
            torch.testing.assert_close(adapter(x), reference, **TOL)


def test_multihead_attention_as_a_target_adapts_its_projection_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True))
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    adapted = nlnn.add_adapters(copy.deepcopy(model), ["0"], ranks=4, seed=0, rank_pattern={"0": 3})
    assert {name: a.ranks for name, a in nlnn.iter_adapters(adapted)} == {
        "0.in_proj_weight": (3, 3),
        "0.out_proj.weight": (3, 3),
    }
    pattern = {"0": 3, "out_proj.weight": 2}  # the parameter's own key wins over its module's
    by_parameter = nlnn.add_adapters(copy.deepcopy(model), ["0"], ranks=4, seed=0, rank_pattern=pattern)
    assert {name: a.ranks for name, a in nlnn.iter_adapters(by_parameter)} == {
        "0.in_proj_weight": (3, 3),
        "0.out_proj.weight": (2, 2),
    }
    separate = nn.Sequential(nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True))
    adapted_separate = nlnn.add_adapters(separate, ["0"], ranks=4, seed=0)
    assert [name for name, _ in nlnn.iter_adapters(adapted_separate)] == [
        "0.q_proj_weight",
        "0.k_proj_weight",
        "0.v_proj_weight",
        "0.out_proj.weight",
    ]
    with torch.no_grad():
        for _, adapter in nlnn.iter_adapters(adapted):
            adapter.delta.core.normal_(generator=torch.Generator().manual_seed(1))
        reference = copy.deepcopy(model)
        for name, adapter in nlnn.iter_adapters(adapted):
            a0, a1 = (f.detach() for f in adapter.delta.factors)
            reference.get_parameter(name).add_(a0 @ adapter.delta.core @ a1.T)
        torch.testing.assert_close(adapted[0](x, x, x)[0], reference[0](x, x, x)[0], **TOL)
    with pytest.raises(ValueError, match="dropout"):
        nlnn.add_adapters(copy.deepcopy(model), ["0"], ranks=4, dropout=0.1)


class _ReadsQkvWeight(nn.Module):
    """timm's BEiT/EVA attention in small: the parent calls ``F.linear`` with its child's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(8))
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = torch.cat((self.q_bias, torch.zeros(16)))
        qkv = nn.functional.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.chunk(3, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)


def test_a_layer_whose_weight_its_parent_reads_gets_a_parameter_adapter_that_trains():
    torch.manual_seed(0)
    model = nn.Sequential(_ReadsQkvWeight())
    adapted = nlnn.add_adapters(copy.deepcopy(model), ["qkv", "proj"], ranks=4, seed=0)
    kinds = {name: type(a).__name__ for name, a in nlnn.iter_adapters(adapted)}
    assert kinds == {"0.proj": "LinearAdapter", "0.qkv.weight": "ParameterAdapter"}
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    adapted(x).square().sum().backward()
    qkv = dict(nlnn.iter_adapters(adapted))["0.qkv.weight"]
    assert qkv.delta.core.grad is not None and qkv.delta.core.grad.abs().sum() > 0
    with torch.no_grad():
        qkv.delta.core.add_(1.0)
        assert not torch.allclose(adapted(x), model(x))


class _ReadsQkvWeightInAHelper(_ReadsQkvWeight):
    """The weight is read in a helper method, which the source check of ``forward`` does not see."""

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.qkv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x).chunk(3, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)


def test_find_bypassed_adapters_reports_an_adapter_whose_weight_is_used_but_that_never_runs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(_ReadsQkvWeightInAHelper(), nn.Dropout(0.5))
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    bypassed = nlnn.add_adapters(copy.deepcopy(model), ["qkv", "proj"], ranks=4, seed=0).train()
    flags = {name: p.requires_grad for name, p in bypassed.named_parameters()}
    assert nlnn.find_bypassed_adapters(bypassed, x) == ["0.qkv"]
    assert all(m.training for m in bypassed.modules())
    assert {name: p.requires_grad for name, p in bypassed.named_parameters()} == flags
    assert all(p.grad is None for p in bypassed.parameters())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nlnn.save_adapters(bypassed, tmp_path / "start.safetensors")  # nothing trained yet: no warning
    optimizer = torch.optim.SGD([p for p in bypassed.parameters() if p.requires_grad], lr=0.1)
    bypassed(x).square().sum().backward()
    optimizer.step()
    with pytest.warns(UserWarning, match=r"adapters \['0.qkv'\] are still at ΔW = 0 while others trained"):
        nlnn.save_adapters(bypassed, tmp_path / "trained.safetensors")

    routed = nlnn.add_adapters(
        copy.deepcopy(model), ["proj"], ranks=4, target_parameters=["qkv.weight"], seed=0
    )
    assert nlnn.find_bypassed_adapters(routed, x) == []
    reads_in_forward = nlnn.add_adapters(nn.Sequential(_ReadsQkvWeight()), ["qkv", "proj"], ranks=4, seed=0)
    assert nlnn.find_bypassed_adapters(reads_in_forward, x) == []  # routed by add_adapters


def test_torchvision_resnet_round_trip(tmp_path):
    models = import_peer("torchvision").models
    torch.manual_seed(0)
    base = models.resnet18(num_classes=4).eval()
    model = nlnn.add_adapters(copy.deepcopy(base), ["conv1", "conv2", "fc"], ranks=4, seed=0)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    nlnn.save_adapters(model, tmp_path / "a.safetensors")
    loaded = nlnn.load_adapters(copy.deepcopy(base), tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_timm_beit_attention_qkv_is_adapted_through_its_weight():
    timm = import_peer("timm")
    torch.manual_seed(0)
    base = timm.create_model("beit_base_patch16_224", pretrained=False, depth=1, embed_dim=32, num_heads=2,
                             img_size=32, patch_size=16, num_classes=3).eval()  # fmt: skip
    model = nlnn.add_adapters(copy.deepcopy(base), ["qkv"], ranks=4, seed=0)
    assert all(isinstance(a, nlnn.ParameterAdapter) for _, a in nlnn.iter_adapters(model))


# -- tied weights (GPT-2's wte and lm_head) -----------------------------------------------------


def _wte_and_lm_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    head = model.lm_head.base_layer if isinstance(model.lm_head, nlnn.TuckerAdapter) else model.lm_head
    return model.transformer.wte.weight, head.weight


@pytest.mark.parametrize("target", ["lm_head", "wte", "parameter"])
def test_an_adapter_on_a_tied_weight_changes_only_its_own_module(target, tmp_path):
    real = _real_models.gpt2()
    base = real.model
    wte, head = _wte_and_lm_head(base)
    assert wte is head
    options = {"target_parameters": ["lm_head.weight"]} if target == "parameter" else {}
    with pytest.warns(UserWarning, match="tied to"):
        model = nlnn.add_adapters(
            copy.deepcopy(base), None if target == "parameter" else [target], ranks=4, seed=0, **options
        )
    _train_one_step(real, model)
    shared = _wte_and_lm_head(model)[0].detach().clone()
    with torch.no_grad():
        trained = real(model)
        with pytest.raises(ValueError, match="tied to"):
            nlnn.merge_adapters(model)
        assert not any(adapter.merged for _, adapter in nlnn.iter_adapters(model))
        assert torch.equal(_wte_and_lm_head(model)[0], shared) and torch.equal(real(model), trained)

        nlnn.save_adapters(model, tmp_path / "tied.safetensors")
        loaded = nlnn.load_adapters(copy.deepcopy(base), tmp_path / "tied.safetensors")
        assert torch.equal(real(loaded), trained)

        plain = nlnn.remove_adapters(model, merge=True)
        wte, head = _wte_and_lm_head(plain)
        assert wte is not head  # untied: the adapted module has its own merged weight
        assert torch.equal(shared, (head if target == "wte" else wte).detach())
        torch.testing.assert_close(real(plain), trained, **TOL)


def test_the_principal_init_on_a_tied_weight_is_refused_and_the_model_is_unchanged(tmp_path):
    real = _real_models.gpt2()
    state = {k: v.clone() for k, v in real.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'lm_head'.*tied to \['transformer.wte.weight'\].*principal"):
        nlnn.add_adapters(real.model, ["c_attn", "lm_head"], ranks=4, init="principal")
    assert not list(nlnn.iter_adapters(real.model))
    for key, value in real.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    untied = _real_models.gpt2(tie_word_embeddings=False)
    with torch.no_grad():
        expected = real(untied.model)
        model = nlnn.add_adapters(untied.model, ["lm_head", "c_attn"], ranks=4, init="principal")  # no tie
        torch.testing.assert_close(real(model), expected, **TOL)
    nlnn.save_adapters(model, tmp_path / "principal.safetensors")
    with pytest.raises(ValueError, match="tied to"):
        nlnn.load_adapters(real.model, tmp_path / "principal.safetensors")
    assert not list(nlnn.iter_adapters(real.model))


# -- a merged model's state_dict ------------------------------------------------------------------


@pytest.mark.parametrize("merged_into", ["fresh", "merged"])
def test_a_merged_models_state_dict_loads_without_applying_the_delta_twice(merged_into):
    real = _real_models.llama()
    base = real.model
    model = nlnn.add_adapters(
        copy.deepcopy(base),
        ["q_proj", "down_proj"],
        ranks=4,
        target_parameters=["embed_tokens.weight"],
        seed=0,
    )
    _train_one_step(real, model)
    with torch.no_grad():
        trained = real(model)
        nlnn.merge_adapters(model)
        state = model.state_dict()
        fresh = nlnn.add_adapters(
            copy.deepcopy(base),
            ["q_proj", "down_proj"],
            ranks=4,
            target_parameters=["embed_tokens.weight"],
            seed=1,
        )
        if merged_into == "merged":
            nlnn.merge_adapters(fresh)
        fresh.load_state_dict(state)
        assert all(adapter.merged for _, adapter in nlnn.iter_adapters(fresh))
        torch.testing.assert_close(real(fresh), trained, **TOL)
        nlnn.unmerge_adapters(fresh)
        torch.testing.assert_close(real(fresh), trained, **TOL)
        # and back: an unmerged state_dict into a merged model
        nlnn.merge_adapters(model)
        model.load_state_dict(fresh.state_dict())
        assert not any(adapter.merged for _, adapter in nlnn.iter_adapters(model))
        torch.testing.assert_close(real(model), trained, **TOL)


def test_a_state_dict_without_the_merged_flag_still_loads_strictly():
    model = nlnn.add_adapters(nn.Sequential(nn.Linear(4, 3)), ["0"], ranks=2, seed=0)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert len(state) == len(model.state_dict()) - 1
    model.load_state_dict(state)
    with pytest.raises(ValueError, match="merged flag"):
        model.load_state_dict({**state, "0._extra_state": torch.tensor(1.0)})


@pytest.mark.filterwarnings("ignore::FutureWarning")  # PEFT calls a deprecated transformers name
def test_gpt2_conv1d_adapter_computes_what_peft_lora_computes_with_the_same_update():
    peft = import_peer("peft")
    real = _real_models.gpt2()
    lora = peft.get_peft_model(
        copy.deepcopy(real.model),
        peft.LoraConfig(target_modules=["c_attn"], r=4, lora_alpha=4, fan_in_fan_out=True),
    )
    ours = nlnn.add_adapters(copy.deepcopy(real.model), ["c_attn"], ranks=4, seed=0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block, adapter in zip(lora.base_model.model.transformer.h, ours.transformer.h, strict=True):
            peft_layer, tucker = block.attn.c_attn, adapter.attn.c_attn
            a = torch.randn(peft_layer.lora_A["default"].weight.shape, generator=gen)  # (r, in)
            b = torch.randn(peft_layer.lora_B["default"].weight.shape, generator=gen)  # (out, r)
            peft_layer.lora_A["default"].weight.copy_(a)
            peft_layer.lora_B["default"].weight.copy_(b)
            # PEFT's ΔW is B A of shape (out, in); ours has Conv1D's layout (in, out): Aᵀ I Bᵀ
            tucker.delta.factors[0].copy_(a.T)
            tucker.delta.core.copy_(torch.eye(4))
            tucker.delta.factors[1].copy_(b)
        expected = real(lora)
        assert not torch.allclose(expected, real(real.model), **TOL)
        torch.testing.assert_close(real(ours), expected, **TOL)
        merged_peft = lora.merge_and_unload()
        merged_ours = nlnn.remove_adapters(ours, merge=True)
        for block_peft, block_ours in zip(merged_peft.transformer.h, merged_ours.transformer.h, strict=True):
            torch.testing.assert_close(block_ours.attn.c_attn.weight, block_peft.attn.c_attn.weight, **TOL)
