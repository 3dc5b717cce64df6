"""Offline data sets and small models for the experiments.

MNIST-1D (Greydanus 2020) is generated procedurally by ``mnist1d.data.make_dataset`` (its
generator needs no network; only its ``get_dataset`` downloads). scikit-learn's 8x8 digits
ship with scikit-learn. Training labels can be corrupted: a fraction of the training (and
validation) examples get a label drawn uniformly from the *other* classes; test labels are
always clean, so test accuracy measures what was learnt about the true labels.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch
from torch import Tensor, nn


@dataclasses.dataclass
class Split:
    x: Tensor
    y: Tensor  # labels used for training / selection (possibly corrupted)
    y_clean: Tensor  # the true labels

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def flipped(self) -> Tensor:
        return self.y != self.y_clean


@dataclasses.dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple


def _missing(package: str, extra: str = "experiments") -> ImportError:
    return ImportError(f"this experiment needs the '{package}' package: pip install -e \".[{extra}]\" "
                       f"(or pip install {package})")


def _mnist1d_arrays(num_samples: int, seed: int):
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise _missing("mnist1d") from error
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    args.train_split = 1.0  # split here, into train / val / test
    # make_dataset seeds numpy's and random's global generators; leave them as they were
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = data["x"].astype(np.float32)[:, None, :]  # [N, 1, 40]
    return x, data["y"].astype(np.int64)


def _digits_arrays():
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise _missing("scikit-learn") from error
    x, y = load_digits(return_X_y=True)
    x = (x.astype(np.float32) / 16.0 - 0.5) / 0.5
    return x.reshape(-1, 1, 8, 8), y.astype(np.int64)


def corrupt_labels(y: np.ndarray, fraction: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Give ``round(fraction * len(y))`` randomly chosen examples a different, uniformly drawn label."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the label-noise fraction must lie in [0, 1); got {fraction}")
    y = y.copy()
    chosen = rng.choice(len(y), size=int(round(fraction * len(y))), replace=False)
    y[chosen] = (y[chosen] + rng.integers(1, num_classes, size=len(chosen))) % num_classes
    return y


def load(name: str, n_train: int, n_val: int, n_test: int, label_noise: float = 0.0,
         seed: int = 0) -> Dataset:
    """Train / validation / test splits of ``name`` ('mnist1d' or 'digits').

    ``label_noise`` corrupts that fraction of the training and of the validation labels
    (the validation split is noisy too, so model selection never sees a clean label).
    """
    if name == "mnist1d":
        total = n_train + n_val + n_test
        x, y = _mnist1d_arrays(-(-total // 10) * 10, seed)  # it makes num_samples // 10 per class
    elif name == "digits":
        x, y = _digits_arrays()
        order = np.random.default_rng(seed).permutation(len(y))
        x, y = x[order], y[order]
    else:
        raise ValueError(f"unknown data set {name!r}; choose 'mnist1d' or 'digits'")
    if n_train + n_val + n_test > len(y):
        raise ValueError(f"{name} has {len(y)} examples; asked for {n_train} + {n_val} + {n_test}")
    num_classes = int(y.max()) + 1
    rng = np.random.default_rng(seed + 1)
    bounds = np.cumsum([0, n_train, n_val, n_test])
    splits = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        clean = y[lo:hi]
        noisy = corrupt_labels(clean, label_noise, num_classes, rng) if i < 2 else clean
        splits.append(Split(torch.from_numpy(x[lo:hi].copy()), torch.from_numpy(noisy), torch.from_numpy(clean.copy())))
    return Dataset(name, *splits, num_classes=num_classes, input_shape=tuple(x.shape[1:]))


def make_model(dataset: Dataset, width: int = 32) -> nn.Module:
    """A small convolutional net with BatchNorm (so SAM's BN handling matters)."""
    k = dataset.num_classes
    if len(dataset.input_shape) == 2:  # MNIST-1D: [1, 40]
        return nn.Sequential(
            nn.Conv1d(1, width, 5, padding=2, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Conv1d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm1d(2 * width), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * width * (dataset.input_shape[1] // 4), k))
    return nn.Sequential(  # digits: [1, 8, 8]
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * width * 16, k))
