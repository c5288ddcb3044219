"""The linear case: a small ``nn.TransformerEncoder`` whose feed-forward linears are adapted."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

ROWS = 8

#: The feed-forward linears of both encoder layers. Attention is left out: ``nn.MultiheadAttention``
#: calls ``out_proj`` through ``F.multi_head_attention_forward``, which bypasses any module wrapper.
TARGETS = tuple(f"encoder.layers.{i}.linear{j}" for i in range(2) for j in (1, 2))


@contextmanager
def _without_fastpath() -> Iterator[None]:
    """Turn off the fused inference kernel of ``nn.TransformerEncoderLayer`` while inside.

    In eval mode without gradients that kernel reads ``linear1.weight`` and ``linear2.weight``
    directly, so a linear wrapped in a module (a LoRA layer) would be silently ignored. ndlowrank
    does not need this (``add_adapters`` gives these linears parameter adapters, which the kernel
    sees), but the peers do, and every method runs the same forward.
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class DigitTransformer(nn.Module):
    """Each 8×8 image as 8 row tokens: linear embedding + learned positions, 2 encoder layers, mean pool, head.

    Parameters
    ----------
    classes : int, default 5
        Outputs of the head.
    d_model, heads, ffn, layers : int
        Width, attention heads, feed-forward width and depth of the encoder (no dropout).
    """

    def __init__(self, classes: int = 5, d_model: int = 64, heads: int = 4, ffn: int = 128, layers: int = 2):
        super().__init__()
        self.embed = nn.Linear(ROWS, d_model)
        self.position = nn.Parameter(0.02 * torch.randn(ROWS, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, ffn, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of ``(n, 1, 8, 8)`` images."""
        tokens = self.embed(x.flatten(1, 2)) + self.position
        with _without_fastpath():
            hidden = self.encoder(tokens)
        return self.head(hidden.mean(dim=1))
