"""``ndlowrank demo``: pre-train a small conv net, adapt it to a new task with Tucker adapters.

Everything runs on the CPU in well under a minute with data generated here: 16×16 images
of bars at random places (task A, pre-training: which of 4 orientations) and of small
shapes (task B, adaptation: square, ring, plus or cross). Task B needs new spatial
features, so adapting the convolutions beats retraining the head alone.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run_demo"]

SIZE = 16


def _stamp(kind: str, rng: np.random.Generator) -> np.ndarray:
    """One 16×16 image of a shape ``kind`` at a random place, with noise."""
    image = np.zeros((SIZE, SIZE), dtype=np.float32)
    r, c = rng.integers(3, SIZE - 4, size=2)
    if kind == "horizontal":
        image[r, max(0, c - 3) : c + 4] = 1.0
    elif kind == "vertical":
        image[max(0, r - 3) : r + 4, c] = 1.0
    elif kind in ("diagonal", "antidiagonal"):
        for k in range(-3, 4):
            image[r + k, c + (k if kind == "diagonal" else -k)] = 1.0
    elif kind == "square":
        image[r - 2 : r + 3, c - 2 : c + 3] = 1.0
    elif kind == "ring":
        image[r - 2 : r + 3, c - 2 : c + 3] = 1.0
        image[r - 1 : r + 2, c - 1 : c + 2] = 0.0
    elif kind == "plus":
        image[r, c - 2 : c + 3] = 1.0
        image[r - 2 : r + 3, c] = 1.0
    elif kind == "cross":
        for k in range(-2, 3):
            image[r + k, c + k] = image[r + k, c - k] = 1.0
    return image + 0.3 * rng.standard_normal((SIZE, SIZE)).astype(np.float32)


TASKS = {
    "A": ("horizontal", "vertical", "diagonal", "antidiagonal"),
    "B": ("square", "ring", "plus", "cross"),
}


def make_task(task: str, count: int, seed: int) -> tuple[Any, Any]:
    """``count`` images of a task and their labels, as torch tensors."""
    import torch

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=count)
    images = np.stack([_stamp(TASKS[task][label], rng) for label in labels])[:, None]
    return torch.from_numpy(images), torch.from_numpy(labels)


def _network() -> Any:
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 4),
    )


def _train(model: Any, data: tuple[Any, Any], *, epochs: int, lr: float, desc: str, quiet: bool) -> None:
    import torch
    from tqdm.auto import tqdm

    images, labels = data
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    generator = torch.Generator().manual_seed(0)
    batches = [(start, start + 64) for start in range(0, len(images), 64)]
    model.train()
    with tqdm(total=epochs * len(batches), desc=desc, file=sys.stderr, disable=quiet, leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for start, stop in batches:
                index = order[start:stop]
                loss = torch.nn.functional.cross_entropy(model(images[index]), labels[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")


def _accuracy(model: Any, data: tuple[Any, Any]) -> float:
    import torch

    images, labels = data
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def run_demo(output: str | Path, *, quiet: bool = False) -> list[tuple[str, int, float]]:
    """Run the demo, print its table, save the adapters to ``output`` and return the table rows."""
    import copy

    import torch

    from . import nn as nlnn

    torch.manual_seed(0)
    start = time.perf_counter()
    train_a, test_a = make_task("A", 3000, seed=1), make_task("A", 1000, seed=2)
    train_b, test_b = make_task("B", 1500, seed=3), make_task("B", 1000, seed=4)

    pretrained = _network()
    _train(pretrained, train_a, epochs=4, lr=3e-3, desc="pre-train on task A", quiet=quiet)
    rows = [
        (
            "pre-trained on A, tested on A",
            sum(p.numel() for p in pretrained.parameters()),
            _accuracy(pretrained, test_a),
        )
    ]

    torch.manual_seed(1)
    head_only = copy.deepcopy(pretrained)
    head_only[-1].reset_parameters()
    for parameter in head_only[:-1].parameters():
        parameter.requires_grad_(False)
    _train(head_only, train_b, epochs=8, lr=1e-2, desc="task B: head only", quiet=quiet)
    trainable = sum(p.numel() for p in head_only.parameters() if p.requires_grad)
    rows.append(("task B: new head only", trainable, _accuracy(head_only, test_b)))

    torch.manual_seed(1)
    full = copy.deepcopy(pretrained)
    full[-1].reset_parameters()
    _train(full, train_b, epochs=8, lr=3e-3, desc="task B: full fine-tune", quiet=quiet)
    rows.append(
        ("task B: full fine-tune", sum(p.numel() for p in full.parameters()), _accuracy(full, test_b))
    )

    torch.manual_seed(1)
    adapted = copy.deepcopy(pretrained)
    adapted[-1].reset_parameters()
    # the paper's init and scale (zero core, scale 4); an int rank is clipped per mode; the new
    # head is trained in full and saved with the adapters
    head = str(len(adapted) - 1)
    nlnn.add_adapters(
        adapted, ["0", "2", "4"], ranks=8, init="zero_core", scale=4.0, seed=0, modules_to_save=[head]
    )
    _train(adapted, train_b, epochs=8, lr=1e-2, desc="task B: Tucker adapters + head", quiet=quiet)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    rows.append(("task B: Tucker adapters (rank 8) + new head", trainable, _accuracy(adapted, test_b)))

    nlnn.save_adapters(adapted, output)
    width = max(len(name) for name, _, _ in rows)
    print(f"{'model':<{width}}  {'trainable':>9}  {'accuracy':>8}")
    for name, count, accuracy in rows:
        print(f"{name:<{width}}  {count:>9,}  {accuracy:>8.1%}")
    print(
        f"\nThe adapters and the new head were saved to {output}.\n"
        f"Done in {time.perf_counter() - start:.0f} s. Next: docs/adapters.md, benchmarks/RESULTS.md."
    )
    return rows
