"""The conv case: a small conv net whose 3×3 kernels are adapted in 4-D (Tucker) or flattened (LoRA)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

PRETRAINED = Path(__file__).with_name("pretrained_convnet.safetensors")

#: The convolutions the adapters go on: 32→64 and 64→64 channels, 3×3. The first convolution
#: (one input channel, 288 weights) stays frozen for every adapter method.
TARGETS = ("features.2", "features.5")


class ConvNet(nn.Module):
    """Conv 1→32 → conv 32→64 → max pool → conv 64→64 (3×3, padding 1, ReLU) → global average pool → linear head.

    Parameters
    ----------
    classes : int, default 5
        Outputs of the head.
    """

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of ``(n, 1, 8, 8)`` images."""
        return self.head(self.features(x))


def save_pretrained(model: ConvNet, path: Path = PRETRAINED) -> None:
    """Write ``model``'s state dict to a safetensors file, through a temporary file and a rename."""
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"model": "benchmarks.quality.conv.ConvNet", "data": "digits 0-4"})
    os.replace(tmp, path)
