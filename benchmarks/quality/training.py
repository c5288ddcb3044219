"""The one training loop every method shares, and the measurements taken on a model."""

from __future__ import annotations

import torch
from torch import nn

from .data import Split


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that require a gradient (each shared tensor once)."""
    seen: set[int] = set()
    params = []
    for parameter in model.parameters():
        if parameter.requires_grad and id(parameter) not in seen:
            seen.add(id(parameter))
            params.append(parameter)
    return params


def count_trainable(model: nn.Module) -> int:
    """Number of trainable scalars of ``model``."""
    return sum(p.numel() for p in trainable_parameters(model))


def fit(model: nn.Module, data: Split, *, lr: float, epochs: int, batch_size: int, seed: int) -> None:
    """Train the trainable parameters of ``model`` on ``data`` with AdamW and cross-entropy.

    The batches are shuffled by a generator seeded with ``seed``; the weight decay is AdamW's
    default (0.01), the learning rate constant.
    """
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for batch in order.split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(data.x[batch]), data.y[batch]).backward()
            optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: Split, batch_size: int = 512) -> float:
    """Fraction of ``data`` that ``model`` (in eval mode) classifies correctly."""
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        logits = model(data.x[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == data.y[start : start + batch_size]).sum())
    return correct / len(data)
