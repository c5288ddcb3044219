"""The data: scikit-learn's bundled 8×8 digits, split into a pre-training and a few-shot task."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
ADAPT_CLASSES = (5, 6, 7, 8, 9)


@dataclass(frozen=True)
class Split:
    """Images ``x`` of shape ``(n, 1, 8, 8)`` in ``[0, 1]`` and labels ``y`` in ``0..4``."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class FewShot:
    """The adaptation task for one seed: a few training and validation images per class, the rest for test."""

    train: Split
    val: Split
    test: Split


@cache
def _digits(classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The digits of ``classes`` as float32 images in ``[0, 1]`` and labels renumbered ``0..len-1``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.isin(digits.target, classes)
    images = (digits.images[keep] / 16.0).astype(np.float32)[:, None]
    labels = np.searchsorted(np.asarray(classes), digits.target[keep])
    return images, labels


def _split(images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> Split:
    return Split(torch.from_numpy(images[index]), torch.from_numpy(labels[index]).long())


def pretrain_split() -> Split:
    """Every image of digits 0–4 (about 900), labelled 0–4."""
    images, labels = _digits(PRETRAIN_CLASSES)
    return _split(images, labels, np.arange(len(labels)))


def fewshot_split(seed: int, train_per_class: int, val_per_class: int) -> FewShot:
    """Digits 5–9 (labelled 0–4): ``train_per_class`` and ``val_per_class`` random images of each class.

    Every remaining image of digits 5–9 is in the test split. ``seed`` picks the images.
    """
    images, labels = _digits(ADAPT_CLASSES)
    rng = np.random.default_rng(seed)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for label in range(len(ADAPT_CLASSES)):
        index = rng.permutation(np.flatnonzero(labels == label))
        bounds = (train_per_class, train_per_class + val_per_class)
        for part, chunk in zip(parts, np.split(index, bounds), strict=True):
            part.append(chunk)
    train, val, test = (np.sort(np.concatenate(part)) for part in parts)
    return FewShot(*(_split(images, labels, index) for index in (train, val, test)))
