"""One case of the study: pre-train once, then adapt with every method, learning rate and seed."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .data import FewShot, Split, fewshot_split, pretrain_split
from .methods import Method
from .training import accuracy, count_trainable, fit

PRETRAIN_SEED = 0


@dataclass(frozen=True)
class Settings:
    """How a case is run: the same for every method."""

    seeds: tuple[int, ...]
    lrs: tuple[float, ...]
    epochs: int
    batch_size: int = 25
    train_per_class: int = 10
    val_per_class: int = 20
    pretrain_epochs: int = 30
    pretrain_lr: float = 1e-3


@dataclass(frozen=True)
class Outcome:
    """A method's result: its trainable count, the learning rate chosen on validation, test accuracies per seed."""

    method: Method
    trainable: int
    lr: float
    val: tuple[float, ...]
    test: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.test)

    @property
    def std(self) -> float:
        """Sample standard deviation over the seeds (0 for one seed)."""
        return statistics.stdev(self.test) if len(self.test) > 1 else 0.0


@dataclass(frozen=True)
class CaseResult:
    """Everything a case measured."""

    name: str
    pretrain_accuracy: float
    outcomes: list[Outcome]
    seconds: float


def pretrain(model: nn.Module, settings: Settings) -> float:
    """Train ``model`` on 80% of digits 0–4 (seeded with ``PRETRAIN_SEED``); its accuracy on the other 20%."""
    torch.manual_seed(PRETRAIN_SEED)
    data = pretrain_split()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(PRETRAIN_SEED))
    cut = len(data) * 4 // 5
    train, held_out = (Split(data.x[part], data.y[part]) for part in (order[:cut], order[cut:]))
    fit(
        model,
        train,
        lr=settings.pretrain_lr,
        epochs=settings.pretrain_epochs,
        batch_size=32,
        seed=PRETRAIN_SEED,
    )
    return accuracy(model, held_out)


def prepare(pretrained: nn.Module, method: Method, targets: Sequence[str], seed: int) -> nn.Module:
    """A copy of ``pretrained`` with a new head (seeded) and ``method``'s adapters; the head is trainable."""
    model = copy.deepcopy(pretrained)
    torch.manual_seed(seed)
    old = model.get_submodule("head")
    if not isinstance(old, nn.Linear):
        raise TypeError(f"the model's head must be an nn.Linear, got {type(old).__name__}")
    head = model.head = nn.Linear(old.in_features, old.out_features)
    adapted = method.adapt(model, targets, seed)
    head.requires_grad_(True)
    return adapted


def evaluate_method(
    pretrained: nn.Module,
    method: Method,
    targets: Sequence[str],
    tasks: dict[int, FewShot],
    settings: Settings,
) -> Outcome:
    """Train ``method`` at every learning rate and seed; keep the learning rate with the best mean validation accuracy."""
    runs: dict[float, list[tuple[float, float]]] = {}
    counts = set()
    for lr in settings.lrs:
        runs[lr] = []
        for seed, task in tasks.items():
            model = prepare(pretrained, method, targets, seed)
            counts.add(count_trainable(model))
            fit(model, task.train, lr=lr, epochs=settings.epochs, batch_size=settings.batch_size, seed=seed)
            runs[lr].append((accuracy(model, task.val), accuracy(model, task.test)))
    if len(counts) != 1:
        raise RuntimeError(f"{method.label}: the trainable count changed between seeds: {sorted(counts)}")
    best = max(settings.lrs, key=lambda lr: statistics.fmean(v for v, _ in runs[lr]))
    val, test = zip(*runs[best], strict=True)
    return Outcome(method, counts.pop(), best, val, test)


def run_case(
    name: str, model: nn.Module, targets: Sequence[str], methods: Sequence[Method], settings: Settings
) -> CaseResult:
    """Pre-train ``model`` (in place) and evaluate every method on the few-shot task of every seed."""
    start = time.perf_counter()
    pretrain_accuracy = pretrain(model, settings)
    print(f"[{name}] pre-trained: {pretrain_accuracy:.3f} held-out accuracy on digits 0-4", flush=True)
    tasks = {
        seed: fewshot_split(seed, settings.train_per_class, settings.val_per_class) for seed in settings.seeds
    }
    outcomes = []
    for method in methods:
        outcome = evaluate_method(model, method, targets, tasks, settings)
        outcomes.append(outcome)
        print(
            f"[{name}] {method.label:<40} {outcome.trainable:>7,} params  lr {outcome.lr:g}  "
            f"test {outcome.mean:.3f} ± {outcome.std:.3f}  ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    return CaseResult(name, pretrain_accuracy, outcomes, time.perf_counter() - start)
