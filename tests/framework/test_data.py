"""Datamodules: shapes without touching data, splits, loaders, generated CIFAR/ImageFolder files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datamodules import (
    CIFAR10DataModule,
    DataError,
    DigitsDataModule,
    FakeDataModule,
    ImageNetDataModule,
)
from datamodules.base import EpochSeededSampler, EvalShardSampler

from .helpers import write_tiny_cifar, write_tiny_imagefolder


def _batch(dm, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    dm.setup("fit" if split in ("train", "val") else "test")
    loader = getattr(dm, f"{split}_dataloader")()
    return next(iter(loader))


def test_digits_shapes_splits_and_resize() -> None:
    dm = DigitsDataModule(name="digits", batch_size=16, val_split=0.1)
    assert dm.dims == (1, 8, 8) and dm.num_classes == 10
    dm.setup("fit")
    dm.setup("test")
    n_train, n_val, n_test = len(dm.train_set), len(dm.val_set), len(dm.test_set)
    assert n_train + n_val + n_test == 1797
    assert abs(n_test - 360) <= 1 and abs(n_val - 144) <= 1
    x, y = _batch(dm)
    assert x.shape == (16, 1, 8, 8) and y.dtype == torch.int64
    big = DigitsDataModule(name="digits", batch_size=4, resize=16)
    assert big.dims == (1, 16, 16)
    assert _batch(big)[0].shape == (4, 1, 16, 16)
    # the split is fixed: independent of the run seed
    other = DigitsDataModule(name="digits", batch_size=16, val_split=0.1, seed=5)
    other.setup("fit")
    assert other.val_set.indices == dm.val_set.indices


def test_val_split_uses_eval_transform_and_noise_is_train_only() -> None:
    dm = DigitsDataModule(name="digits", batch_size=8, noise=5.0, augment=True)
    dm.setup("fit")
    val_tf = dm.val_set.dataset.transform
    train_tf = dm.train_set.dataset.transform
    assert "GaussianNoise" in repr(train_tf) and "GaussianNoise" not in repr(val_tf)
    assert "RandomCrop" in repr(train_tf) and "RandomCrop" not in repr(val_tf)
    assert _batch(dm, "train")[0].std() > 2.0
    assert _batch(dm, "val")[0].std() < 2.0


def test_train_order_depends_only_on_seed_and_epoch() -> None:
    data = list(range(50))
    a, b = EpochSeededSampler(data, seed=3), EpochSeededSampler(data, seed=3)
    a.set_epoch(4)
    list(b)  # consuming epoch 0 first must not change epoch 4
    b.set_epoch(4)
    assert list(a) == list(b)
    b.set_epoch(5)
    assert list(a) != list(b)
    c = EpochSeededSampler(data, seed=4)
    c.set_epoch(4)
    assert list(c) != list(a)


def test_ddp_shards_train_evenly_and_evaluate_every_image_once() -> None:
    """Two processes: training shards split the (seed, epoch) permutation, padded to equal
    length; evaluation shards are disjoint, unpadded and cover every image once (361 images)."""
    data = list(range(361))
    whole = EpochSeededSampler(data, seed=3)
    whole.set_epoch(2)
    train = [EpochSeededSampler(data, seed=3, rank=r, num_replicas=2) for r in (0, 1)]
    for s in train:
        s.set_epoch(2)
    shards = [list(s) for s in train]
    assert [len(x) for x in shards] == [len(s) for s in train] == [181, 181]
    interleaved = [i for pair in zip(*shards) for i in pair]
    order = list(whole)
    assert interleaved[:361] == order and interleaved[361] == order[0]
    evals = [list(EvalShardSampler(data, rank=r, num_replicas=2)) for r in (0, 1)]
    assert [len(e) for e in evals] == [len(EvalShardSampler(data, r, 2)) for r in (0, 1)]
    assert sorted(evals[0] + evals[1]) == data and not set(evals[0]) & set(evals[1])


def test_fake_defaults_mimic_cifar10() -> None:
    dm = FakeDataModule(name="fake", batch_size=8, train_size=40, test_size=8)
    assert dm.dims == (3, 32, 32) and dm.num_classes == 10
    x, y = _batch(dm)
    assert x.shape == (8, 3, 32, 32) and int(y.max()) < 10
    assert _batch(dm, "test")[0].shape == (8, 3, 32, 32)


def test_cifar10_from_generated_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import cifar

    write_tiny_cifar(tmp_path)
    # Only torchvision's md5 check of the official files is bypassed (existence is still
    # checked); reading and parsing the pickles is torchvision's real code.
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    dm = CIFAR10DataModule(name="cifar10", root=str(tmp_path), batch_size=10, val_split=0.2,
                           augment=True)
    assert dm.dims == (3, 32, 32) and dm.num_classes == 10
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (48, 12, 20)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (10, 3, 32, 32) and y.shape == (10,)
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 2


def test_cifar_missing_names_path_and_layout(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(name="cifar10", root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"nowhere/cifar-10-batches-py .*Expected layout"):
        dm.check_available()


def test_imagefolder_tree(tmp_path: Path) -> None:
    write_tiny_imagefolder(tmp_path, classes=3, per_class=6)
    dm = ImageNetDataModule(name="imagenet", root=str(tmp_path), num_classes=3, resize=32,
                            batch_size=4, val_split=0.25, augment=True)
    assert dm.dims == (3, 32, 32) and dm.num_classes == 3
    x, y = _batch(dm)
    assert x.shape == (4, 3, 32, 32) and int(y.max()) < 3
    assert len(dm.val_set) == 4 and len(dm.train_set) == 14
    assert _batch(dm, "test")[0].shape == (4, 3, 32, 32)
    wrong = ImageNetDataModule(name="imagenet", root=str(tmp_path), num_classes=5, resize=32)
    with pytest.raises(DataError, match=r"dataset\.num_classes=3"):
        wrong.setup("fit")
    with pytest.raises(DataError, match=r"Expected layout"):
        ImageNetDataModule(name="imagenet", root=str(tmp_path / "x")).check_available()


def test_batch_size_is_divided_by_world_size() -> None:
    class _Trainer:
        world_size = 4

    dm = DigitsDataModule(name="digits", batch_size=64)
    dm.trainer = _Trainer()  # type: ignore[assignment]
    assert dm.per_device_batch_size == 16
    dm.batch_size = 30
    with pytest.raises(DataError, match="not divisible"):
        _ = dm.per_device_batch_size
