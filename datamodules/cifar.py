"""CIFAR-10 / CIFAR-100 through torchvision (real pickle format, optional download)."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import Dataset
from torchvision import datasets

from datamodules.base import BaseDataModule, DataError

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule"]


class CIFAR10DataModule(BaseDataModule):
    """CIFAR-10: 50,000 train / 10,000 test images, 3×32×32, 10 classes."""

    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    native_dims = (3, 32, 32)
    default_num_classes = 10
    dataset_cls: ClassVar[type] = datasets.CIFAR10
    folder = "cifar-10-batches-py"
    files: tuple[str, ...] = (
        "batches.meta",
        *(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
    )

    def check_available(self) -> None:
        """Missing files with ``download=false`` → a message naming the path and layout."""
        if self.download:
            return
        base = Path(self.root) / self.folder
        missing = [f for f in self.files if not (base / f).is_file()]
        if missing:
            raise DataError(
                f"dataset={self.name}: data not found at {base} (missing {', '.join(missing)}) "
                f"and dataset.download=false. Expected layout: {self.root}/{self.folder}/"
                f"{{{','.join(self.files)}}} (the python-pickle CIFAR archive, extracted). "
                f"Set dataset.root to the folder that contains {self.folder}/, "
                "or dataset.download=true to fetch it."
            )

    def prepare_data(self) -> None:
        """Download once (rank 0) when allowed."""
        if not self.download:
            return
        try:
            self.dataset_cls(self.root, train=True, download=True)
            self.dataset_cls(self.root, train=False, download=True)
        except (urllib.error.URLError, OSError) as err:
            raise DataError(
                f"dataset.download=true but fetching {self.name} into {self.root} failed: {err}. "
                f"Without network access, copy the extracted {self.folder}/ folder into "
                f"{self.root} (dataset.root) and set dataset.download=false."
            ) from None

    def _read(self, train: bool, transform: Any) -> Dataset:
        """torchvision's reader (with its integrity check); unreadable files → DataError."""
        try:
            return self.dataset_cls(self.root, train=train, download=False, transform=transform)
        except (RuntimeError, EOFError, pickle.UnpicklingError, OSError, ValueError) as err:
            base = Path(self.root) / self.folder
            raise DataError(
                f"dataset={self.name}: the files in {base} fail torchvision's integrity check or "
                f"cannot be read ({type(err).__name__}: {err}); they may be truncated by an "
                "interrupted download or copy. Replace the folder with a fresh copy of the "
                "extracted archive (dataset.root), or set dataset.download=true to fetch it again."
            ) from None

    def build_train(self, transform: Any) -> Dataset:
        """The official training batches."""
        return self._read(True, transform)

    def build_test(self, transform: Any) -> Dataset:
        """The official test batch."""
        return self._read(False, transform)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100: like CIFAR-10 with 100 fine classes."""

    mean = (0.5071, 0.4867, 0.4408)
    std = (0.2675, 0.2565, 0.2761)
    default_num_classes = 100
    dataset_cls: ClassVar[type] = datasets.CIFAR100
    folder = "cifar-100-python"
    files = ("meta", "train", "test")
