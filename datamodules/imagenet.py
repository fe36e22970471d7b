"""ImageNet (or any ImageFolder tree) from ``root/train`` and ``root/val``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from datamodules.augment import auto_augment_steps, random_erasing_steps
from datamodules.base import BaseDataModule, DataError, GaussianNoise

__all__ = ["ImageNetDataModule", "read_rgb"]


def read_rgb(path: str) -> torch.Tensor:
    """The image at ``path`` as a uint8 RGB (3, H, W) tensor (torchvision.io; PIL if it fails)."""
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (TorchCodec)
            warnings.simplefilter("ignore", DeprecationWarning)
            img = decode_image(read_file(path), mode=ImageReadMode.RGB)
    except RuntimeError:  # a format or JPEG flavour torchvision cannot decode (BMP, TIFF, …)
        with open(path, "rb") as f:
            return F.pil_to_tensor(Image.open(f).convert("RGB"))
    if img.dtype != torch.uint8:  # 16-bit PNG
        img = F.to_dtype(img, torch.uint8, scale=True)
    return img


def _has_image(folder: Path) -> bool:
    """Whether ``folder`` (recursively) holds a file ImageFolder would load."""
    return any(
        p.is_file() and has_file_allowed_extension(p.name, IMG_EXTENSIONS)
        for p in folder.rglob("*")
    )


class ImageNetDataModule(BaseDataModule):
    """ImageFolder data: ``root/train/<class>/*`` for training (and the validation hold-out),
    ``root/val/<class>/*`` as the test set.

    ``resize`` is the crop size (default 224). Files are decoded by torchvision.io into uint8
    tensors (:func:`read_rgb`) and transformed as such by ``transforms.v2``. Train:
    RandomResizedCrop + flip when ``augment``; eval: resize to 256/224 of the crop, centre crop.
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

    def train_transform(self) -> v2.Compose:
        """RandomResizedCrop + flip (if ``augment``; else the eval geometry) → [auto-augment] on
        uint8 → float → normalise → [erasing] → [noise]."""
        if self.augment:
            size = self.dims[1]
            steps: list[Any] = [
                v2.RandomResizedCrop(size, antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        else:
            steps = self._eval_geometry()
        steps += auto_augment_steps(self.auto_augment)
        steps += self._to_tensor_steps()
        steps += random_erasing_steps(self.random_erasing)
        if self.noise > 0:
            steps.append(GaussianNoise(self.noise))
        return v2.Compose(steps)

    def eval_transform(self) -> v2.Compose:
        """Resize the short side to 256/224 of the crop, centre crop, float, normalise."""
        return v2.Compose(self._eval_geometry() + self._to_tensor_steps())

    def _eval_geometry(self) -> list[Any]:
        size = self.dims[1]
        return [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]

    def _to_tensor_steps(self) -> list[Any]:
        return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

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
            ds = datasets.ImageFolder(str(path), transform=transform, loader=read_rgb)
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
