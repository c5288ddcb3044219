"""Tiny real architectures for the adapter tests: random weights, configs small enough for seconds on a CPU.

Each builder returns a :class:`RealModel`: the model in eval mode (so outputs are
deterministic), its inputs, what to adapt and how to read its output as one tensor. The
peer library is imported through ``_helpers.import_peer``, so a test that uses a builder
skips with the reason where the peer cannot be imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from _helpers import import_peer

VOCAB = 64


@dataclass
class RealModel:
    """A tiny model with what the tests need to adapt it and compare its outputs."""

    model: nn.Module
    inputs: dict[str, Any]
    target_modules: list[str]
    target_parameters: list[str] = field(default_factory=list)
    output: Callable[[Any], torch.Tensor] = lambda out: out

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """``model``'s output on the inputs, as one tensor."""
        return self.output(model(**self.inputs))


def _ids(seed: int, batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(out: Any) -> torch.Tensor:
    return out.logits


def gpt2(*, tie_word_embeddings: bool = True) -> RealModel:
    """GPT-2 with its ``Conv1D`` layers (weights stored ``(in, out)``) and the tied ``wte``/``lm_head``."""
    transformers = import_peer("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie_word_embeddings,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    return RealModel(model, {"input_ids": _ids(1)}, ["c_attn", "c_fc", "c_proj"], output=_logits)


def llama() -> RealModel:
    """LLaMA with grouped-query attention and a gated MLP."""
    transformers = import_peer("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return RealModel(model, {"input_ids": _ids(2)}, targets, output=_logits)


def bert() -> RealModel:
    """BERT for sequence classification (its attention, its feed-forward and its pooler)."""
    transformers = import_peer("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=VOCAB,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config).eval()
    targets = ["query", "key", "value", "dense", "word_embeddings"]
    return RealModel(model, {"input_ids": _ids(3)}, targets, output=_logits)


def mixtral() -> RealModel:
    """Mixtral (mixture of experts): its experts are stacked 3-D parameters, adapted as parameters."""
    transformers = import_peer("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        num_hidden_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=16, num_local_experts=4,
        num_experts_per_tok=2, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(config).eval()
    experts = ["experts.gate_up_proj", "experts.down_proj"]
    return RealModel(model, {"input_ids": _ids(4)}, ["q_proj", "v_proj"], experts, output=_logits)


def unet() -> RealModel:
    """diffusers' UNet2DConditionModel: convolutions, cross-attention projections and time embeddings."""
    diffusers = import_peer("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval()  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    inputs = {
        "sample": torch.randn(2, 4, 8, 8, generator=gen),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=gen),
    }
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "linear_1"]
    return RealModel(model, inputs, targets, output=lambda out: out.sample)


TRANSFORMERS_AND_DIFFUSERS: dict[str, Callable[[], RealModel]] = {
    "gpt2": gpt2,
    "llama": llama,
    "bert": bert,
    "mixtral": mixtral,
    "unet": unet,
}
"""The builders the round-trip tests run on."""
