"""Random images of any shape (torchvision ``FakeData``) for smoke tests and benchmarks."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset
from torchvision import datasets

from datamodules.base import BaseDataModule

__all__ = ["FakeDataModule"]


class FakeDataModule(BaseDataModule):
    """FakeData with CIFAR-10-like defaults (3×32×32, 10 classes); images are deterministic
    per index, train and test use disjoint offsets."""

    size_key = "dataset.train_size"

    def __init__(
        self,
        channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
        train_size: int = 512,
        test_size: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.native_dims = (int(channels), int(image_size), int(image_size))
        self.mean = (0.5,) * int(channels)
        self.std = (0.25,) * int(channels)
        self._num_classes = int(num_classes)
        self.train_size = int(train_size)
        self.test_size = int(test_size)

    @property
    def num_classes(self) -> int:
        """Number of classes of the fake labels."""
        return self._num_classes

    def _fake(self, size: int, offset: int, transform: Any) -> Dataset:
        return datasets.FakeData(
            size=size,
            image_size=self.native_dims,
            num_classes=self._num_classes,
            transform=transform,
            random_offset=offset,
        )

    def build_train(self, transform: Any) -> Dataset:
        """``train_size`` images (offset 0)."""
        return self._fake(self.train_size, 0, transform)

    def build_test(self, transform: Any) -> Dataset:
        """``test_size`` images at an offset past the training images."""
        return self._fake(self.test_size, self.train_size, transform)
