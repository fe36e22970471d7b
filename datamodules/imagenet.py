"""ImageNet (or any ImageFolder tree) from ``root/train`` and ``root/val``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from datamodules.base import BaseDataModule, DataError, GaussianNoise

__all__ = ["ImageNetDataModule"]


def _has_image(folder: Path) -> bool:
    """Whether ``folder`` (recursively) holds a file ImageFolder would load."""
    return any(
        p.is_file() and has_file_allowed_extension(p.name, IMG_EXTENSIONS)
        for p in folder.rglob("*")
    )


class ImageNetDataModule(BaseDataModule):
    """ImageFolder data: ``root/train/<class>/*`` for training (and the validation hold-out),
    ``root/val/<class>/*`` as the test set.

    ``resize`` is the crop size (default 224). Train: RandomResizedCrop + flip when ``augment``;
    eval: resize to 256/224 of the crop, centre crop.
    """

    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)
    native_dims = (3, 224, 224)

    def __init__(self, num_classes: int = 1000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._num_classes = int(num_classes)

    @property
    def num_classes(self) -> int:
        """Number of classes, from the config (checked against the folders at setup)."""
        return self._num_classes

    def train_transform(self) -> T.Compose:
        """RandomResizedCrop + flip (if ``augment``) → tensor → normalise → [noise]."""
        if not self.augment:
            steps: list[Any] = [*self.eval_transform().transforms]
        else:
            steps = [
                T.RandomResizedCrop(self.dims[1], antialias=True),
                T.RandomHorizontalFlip(),
                *self._to_tensor_steps(),
            ]
        if self.noise > 0:
            steps.append(GaussianNoise(self.noise))
        return T.Compose(steps)

    def eval_transform(self) -> T.Compose:
        """Resize the short side to 256/224 of the crop, centre crop."""
        size = self.dims[1]
        return T.Compose(
            [
                T.Resize(round(size * 256 / 224), antialias=True),
                T.CenterCrop(size),
                *self._to_tensor_steps(),
            ]
        )

    def check_available(self) -> None:
        """Both split folders must exist and contain class folders."""
        for split in ("train", "val"):
            path = Path(self.root) / split
            if not path.is_dir() or not any(p.is_dir() for p in path.iterdir()):
                raise DataError(
                    f"dataset={self.name}: no class folders found at {path}. Expected layout: "
                    f"{self.root}/train/<class>/<image> and {self.root}/val/<class>/<image> "
                    "(torchvision ImageFolder). Set dataset.root to the folder holding train/ "
                    "and val/ (ImageNet cannot be downloaded automatically)."
                )

    def _folder(self, split: str, transform: Any) -> Dataset:
        path = Path(self.root) / split
        try:
            ds = datasets.ImageFolder(str(path), transform=transform)
        except FileNotFoundError as err:  # a class folder without a single image
            empty = sorted(p.name for p in path.iterdir() if p.is_dir() and not _has_image(p))
            raise DataError(
                f"dataset.root={self.root}: {len(empty)} class folder(s) under {path} hold no "
                f"image ({', '.join(empty[:5]) or err}); every class needs at least one image "
                f"with an extension of {', '.join(IMG_EXTENSIONS)}. Remove the empty folders or "
                "fill them."
            ) from None
        if len(ds.classes) != self.num_classes:
            raise DataError(
                f"dataset.num_classes={self.num_classes} but {Path(self.root) / split} has "
                f"{len(ds.classes)} class folders; set dataset.num_classes={len(ds.classes)}"
            )
        return ds

    def build_train(self, transform: Any) -> Dataset:
        """``root/train``."""
        return self._folder("train", transform)

    def build_test(self, transform: Any) -> Dataset:
        """``root/val`` (ImageNet's labelled evaluation set)."""
        return self._folder("val", transform)
