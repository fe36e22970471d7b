"""LightningDataModules: digits (offline), CIFAR-10/100, ImageNet (ImageFolder), FakeData."""

from datamodules.base import BaseDataModule, DataError
from datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from datamodules.digits import DigitsDataModule
from datamodules.fake import FakeDataModule
from datamodules.imagenet import ImageNetDataModule

__all__ = [
    "BaseDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DataError",
    "DigitsDataModule",
    "FakeDataModule",
    "ImageNetDataModule",
]
