"""scikit-learn's bundled 8×8 digits (1,797 real images, 10 classes): the offline dataset."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision import transforms as T

from datamodules.base import SPLIT_SEED, BaseDataModule
from datamodules.errors import ConfigError

__all__ = ["DigitsDataModule"]


def check_stratified(n: int, fraction: float, classes: int, key: str) -> None:
    """A stratified split of ``n`` samples needs every class on both sides: at least ``classes``
    samples held out (scikit-learn takes ``ceil(fraction·n)``) and as many left."""
    held = math.ceil(fraction * n)
    if held >= classes and n - held >= classes:
        return
    low = math.ceil(classes / n * 1000) / 1000
    high = math.floor((n - classes) / n * 1000) / 1000
    raise ConfigError(
        f"Invalid configuration: {key}={fraction} holds out {held} of {n} images and keeps "
        f"{n - held}; the stratified split needs at least one image per class ({classes}) on "
        f"each side. Use {key} in [{low}, {high}]."
    )


class TensorImages(Dataset):
    """Images held as a float tensor (N, C, H, W) in [0, 1], with a per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Any) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


class DigitsDataModule(BaseDataModule):
    """Bundled digits with a fixed stratified train/test split (``test_split``, seed 0).

    ``val_split`` is then held out of the training part like every other dataset.
    """

    mean = (0.3053,)
    std = (0.3760,)
    native_dims = (1, 8, 8)
    default_num_classes = 10

    def __init__(self, test_split: float = 0.2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.test_split = float(test_split)
        self._arrays: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _to_tensor_steps(self) -> list[Any]:
        return [T.Normalize(self.mean, self.std)]

    def _load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._arrays is None:
            data = load_digits()
            images = (data.images / 16.0).astype(np.float32)
            idx = np.arange(len(images))
            classes = len(np.unique(data.target))
            check_stratified(len(idx), self.test_split, classes, "dataset.test_split")
            tr, te = train_test_split(
                idx, test_size=self.test_split, stratify=data.target, random_state=0
            )
            x = torch.from_numpy(images).unsqueeze(1)
            y = torch.from_numpy(data.target.astype(np.int64))
            self._arrays = {"train": (x[tr], y[tr]), "test": (x[te], y[te])}
        return self._arrays

    def train_val_indices(self, train_set: Dataset) -> tuple[list[int], list[int]]:
        """Stratified validation hold-out with a fixed seed."""
        labels = self._load()["train"][1].numpy()
        idx = np.arange(len(labels))
        if self.val_split <= 0:
            return idx.tolist(), []
        check_stratified(len(idx), self.val_split, len(np.unique(labels)), "dataset.val_split")
        tr, va = train_test_split(
            idx, test_size=self.val_split, stratify=labels, random_state=SPLIT_SEED
        )
        return sorted(tr.tolist()), sorted(va.tolist())

    def build_train(self, transform: Any) -> Dataset:
        """Training part of the fixed split."""
        return TensorImages(*self._load()["train"], transform)

    def build_test(self, transform: Any) -> Dataset:
        """Test part of the fixed split."""
        return TensorImages(*self._load()["test"], transform)
