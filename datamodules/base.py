"""Shared machinery of every datamodule: common options, transforms, the validation split, and
loaders whose order depends only on (seed, epoch)."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    get_worker_info,
)
from torch.utils.data._utils.worker import _generate_state
from torchvision import transforms as T

from datamodules.augment import BatchMixer, auto_augment_steps, random_erasing_steps
from datamodules.errors import ConfigError, DataError

__all__ = [
    "BaseDataModule",
    "DataError",
    "EpochSeededSampler",
    "EvalShardSampler",
    "GaussianNoise",
    "ResumableLoader",
    "SeededTransforms",
    "split_indices",
]

log = logging.getLogger(__name__)

# Fixed seed of the train/validation split: model selection uses the same held-out images for
# every run seed, and never the test set.
SPLIT_SEED = 0


class GaussianNoise(torch.nn.Module):
    """Adds N(0, std²) noise to a tensor image (applied after normalisation, train only)."""

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` plus fresh Gaussian noise."""
        return x + torch.randn_like(x) * self.std

    def extra_repr(self) -> str:
        return f"std={self.std}"


class EpochSeededSampler(RandomSampler):
    """A shuffling sampler whose permutation depends only on (seed, epoch).

    The permutation is drawn from a fresh generator on every ``iter``; :attr:`generator` is
    reseeded per epoch too and handed to the DataLoader for worker seeds. So a resumed run sees
    exactly the batches an uninterrupted run would have seen. With ``num_replicas`` > 1 (DDP)
    process ``rank`` takes every ``num_replicas``-th index of the permutation, padded with its
    first indices to a multiple of ``num_replicas`` (every process must run the same number of
    optimizer steps).
    """

    def __init__(
        self, data_source: Sequence[Any], seed: int, rank: int = 0, num_replicas: int = 1
    ) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = int(seed)
        self.rank = int(rank)
        self.num_replicas = int(num_replicas)
        self._resume: tuple[int, int] | None = None
        self.set_epoch(0)

    def _epoch_seed(self) -> int:
        return self.seed * 1_000_003 + self.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (Lightning calls this before every epoch); a
        dataset with ``set_epoch`` (:class:`SeededTransforms`) follows."""
        self.epoch = int(epoch)
        self.generator.manual_seed(self._epoch_seed())
        if hasattr(self.data_source, "set_epoch"):
            self.data_source.set_epoch(self.epoch)

    def resume_at(self, epoch: int, samples: int) -> None:
        """The next iteration over ``epoch`` starts after its first ``samples`` indices."""
        self._resume = (int(epoch), int(samples))

    def __len__(self) -> int:
        return -(-len(self.data_source) // self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        perm = torch.randperm(
            len(self.data_source), generator=torch.Generator().manual_seed(self._epoch_seed())
        ).tolist()
        if self.num_replicas > 1:
            total = len(self) * self.num_replicas
            padded = (perm * (-(-total // max(len(perm), 1))))[:total]
            perm = padded[self.rank :: self.num_replicas]
        if self._resume is not None and self._resume[0] == self.epoch:
            perm = perm[self._resume[1] :]
        self._resume = None
        return iter(perm)

    def worker_base_seed(self) -> int:
        """The base seed a fresh DataLoader iterator draws from :attr:`generator` this epoch
        (its workers use ``base + worker_id``)."""
        gen = torch.Generator().manual_seed(self._epoch_seed())
        return int(torch.empty((), dtype=torch.int64).random_(generator=gen).item())


class EvalShardSampler(SequentialSampler):
    """Process ``rank``'s share of an evaluation set: indices ``rank, rank + R, …`` in order.

    Shards are not padded (they differ by at most one image), so under DDP every image is
    evaluated exactly once and the metrics, which sum the true counts over processes, equal a
    single process's. Strided shards keep ``limit_*_batches`` meaning the first global batches.
    """

    def __init__(self, data_source: Sequence[Any], rank: int = 0, num_replicas: int = 1) -> None:
        super().__init__(data_source)
        self.rank = int(rank)
        self.num_replicas = int(num_replicas)

    def __len__(self) -> int:
        return len(range(self.rank, len(self.data_source), self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.data_source), self.num_replicas))


class _SeedTagged(torch.utils.data.Sampler):
    """Yields ``(base_seed, epoch, index)``: the epoch's worker base seed and the epoch travel
    with every index (a training sampler's per-epoch seed; ``base_seed`` and epoch 0 for
    evaluation), so persistent workers' copies of the dataset follow the epoch."""

    def __init__(self, sampler: EpochSeededSampler | EvalShardSampler, base_seed: int) -> None:
        self.sampler, self.base_seed = sampler, base_seed

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.sampler, EpochSeededSampler):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        if isinstance(self.sampler, EpochSeededSampler):
            seed, epoch = self.sampler.worker_base_seed(), self.sampler.epoch
        else:
            seed, epoch = self.base_seed, 0
        return ((seed, epoch, i) for i in self.sampler)


class _Reseeding(Dataset):
    """A worker's view of ``dataset`` that, when an index arrives with a new base seed (a new
    epoch), reseeds the worker's RNGs exactly as PyTorch seeds a fresh worker. Persistent
    workers then draw the same augmentations as workers re-spawned every epoch, so keeping
    them alive changes no number and a resumed run stays exact."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._base_seed: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        base_seed, epoch, index = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        info = get_worker_info()
        if info is not None and base_seed != self._base_seed:
            self._base_seed = base_seed
            seed = base_seed + info.id
            random.seed(seed)
            torch.manual_seed(seed)
            np.random.seed(_generate_state(base_seed, info.id))  # noqa: NPY002 (as PyTorch does)
        return self.dataset[index]


class SeededTransforms(Subset):
    """The training subset whose random transforms draw from a generator seeded by (seed,
    epoch, index), not from the global one: an image's augmentation does not depend on which
    batches came before it, on the number of workers or on a resume in the middle of an epoch."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], seed: int) -> None:
        super().__init__(dataset, indices)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentations of ``epoch``."""
        self.epoch = int(epoch)

    def __getitem__(self, idx: int) -> Any:  # type: ignore[override]
        seed = (self.seed * 1_000_003 + self.epoch) * 2_654_435_761 + int(idx)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed % 2**63)
            return super().__getitem__(idx)

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """Each sample with its own seeded draw (the DataLoader's batched fetch)."""
        return [self[i] for i in indices]


class ResumableLoader(DataLoader):
    """The training loader, with its position in the epoch as state: Lightning stores the
    ``state_dict`` of such loaders in checkpoints, so a run stopped in the middle of an epoch
    resumes with the batches it had not trained on (``position``: batches trained so far)."""

    position: Any = None

    def _epoch_sampler(self) -> EpochSeededSampler | None:
        sampler = self.sampler
        if isinstance(sampler, _SeedTagged):
            sampler = sampler.sampler
        return sampler if isinstance(sampler, EpochSeededSampler) else None

    def state_dict(self) -> dict[str, int]:
        """The epoch and the batches of it already trained."""
        sampler = self._epoch_sampler()
        if sampler is None or self.position is None:
            return {}
        return {"epoch": sampler.epoch, "batches": int(self.position())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Skip the batches of ``state["epoch"]`` already trained (this process's shard)."""
        sampler = self._epoch_sampler()
        if state and sampler is not None:
            batch = self.batch_size or 1
            sampler.resume_at(state["epoch"], state["batches"] * batch)


def split_indices(n: int, val_split: float) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into (train, val) with the fixed generator (``val_split``: fraction)."""
    n_val = round(n * val_split)
    if val_split > 0 and n_val == 0:
        n_val = 1
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


class BaseDataModule(pl.LightningDataModule):
    """Common options of every dataset.

    Args:
        name: dataset name (for messages and logs).
        root: where the files live (or are downloaded to).
        download: fetch missing files; when false, missing data is an error naming the layout.
        batch_size: the global batch size, divided by the world size.
        num_workers: DataLoader worker processes per device.
        pin_memory: pin host memory for faster GPU transfer.
        persistent_workers: keep the workers alive across epochs and validation passes
            (with ``num_workers > 0``); the batches and augmentations are the same either way.
        prefetch_factor: batches each worker loads ahead (``None``: PyTorch's default, 2).
        resize: resize images to ``resize``×``resize`` (``None`` keeps the native size).
        augment: random crop (padding 4) + horizontal flip on the training set.
        noise: std of Gaussian noise added after normalisation (train only).
        val_split: fraction of the training set held out for validation (eval transform).
        seed: seed of the training order (with the epoch number).
        auto_augment: ``randaugment`` | ``trivialaugment`` | ``None`` (train only).
        random_erasing: probability of erasing a random rectangle (train only).
        mixup_alpha, cutmix_alpha: Beta(α, α) of MixUp / CutMix on training batches (0 = off).
    """

    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    native_dims: tuple[int, int, int] = (3, 32, 32)
    default_num_classes: int = 10
    #: The config key that sets the training set's size, if one does (named in size errors).
    size_key: str | None = None

    def __init__(
        self,
        name: str,
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        prefetch_factor: int | None = None,
        resize: int | None = None,
        augment: bool = False,
        noise: float = 0.0,
        val_split: float = 0.1,
        seed: int = 0,
        auto_augment: str | None = None,
        random_erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
    ) -> None:
        super().__init__()
        self.name = name
        self.root = str(root)
        self.download = bool(download)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.prefetch_factor = None if prefetch_factor is None else int(prefetch_factor)
        self.resize = None if resize is None else int(resize)
        self.augment = bool(augment)
        self.noise = float(noise)
        self.val_split = float(val_split)
        self.seed = int(seed)
        self.auto_augment = auto_augment
        self.random_erasing = float(random_erasing)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self._mixer: BatchMixer | None = None
        self.train_set: Dataset | None = None
        self.train_eval_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # --------------------------------------------------------------- shapes
    @property
    def num_classes(self) -> int:
        """Number of classes (known without touching data)."""
        return self.default_num_classes

    @property
    def dims(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the network sees, after ``resize``."""
        c, h, w = self.native_dims
        if self.resize is not None:
            return (c, self.resize, self.resize)
        return (c, h, w)

    # ------------------------------------------------------------ transforms
    def train_transform(self) -> T.Compose:
        """Resize → [crop + flip] → [auto-augment] → tensor → normalise → [erasing] → [noise]."""
        steps: list[Any] = self._resize_steps()
        if self.augment:
            steps += [T.RandomCrop(self.dims[1:], padding=4), T.RandomHorizontalFlip()]
        steps += auto_augment_steps(self.auto_augment)
        steps += self._to_tensor_steps()
        steps += random_erasing_steps(self.random_erasing)
        if self.noise > 0:
            steps.append(GaussianNoise(self.noise))
        return T.Compose(steps)

    def eval_transform(self) -> T.Compose:
        """Resize → tensor → normalise."""
        return T.Compose(self._resize_steps() + self._to_tensor_steps())

    def _resize_steps(self) -> list[Any]:
        if self.resize is None:
            return []
        return [T.Resize((self.resize, self.resize), antialias=True)]

    def _to_tensor_steps(self) -> list[Any]:
        return [T.ToTensor(), T.Normalize(self.mean, self.std)]

    # ------------------------------------------------------------ data hooks
    def check_available(self) -> None:
        """Raise :class:`DataError` when the data is missing and cannot be downloaded."""

    def build_train(self, transform: Any) -> Dataset:
        """The full training set with ``transform``."""
        raise NotImplementedError

    def build_test(self, transform: Any) -> Dataset:
        """The test set with ``transform``."""
        raise NotImplementedError

    def train_val_indices(self, train_set: Dataset) -> tuple[list[int], list[int]]:
        """Indices of the training set kept for training and held out for validation."""
        return split_indices(len(train_set), self.val_split)

    def setup(self, stage: str | None = None) -> None:
        """Build the splits; the test set only for ``stage == "test"``."""
        self.check_available()
        if stage in (None, "fit", "validate") and self.train_set is None:
            full_train = self.build_train(self.train_transform())
            full_eval = self.build_train(self.eval_transform())
            train_idx, val_idx = self.train_val_indices(full_train)
            self._check_split(len(full_train), len(train_idx), len(val_idx))
            self.train_set = SeededTransforms(full_train, train_idx, self.seed)
            self.train_eval_set = Subset(full_eval, train_idx)
            self.val_set = Subset(full_eval, val_idx)
        if stage in (None, "test") and self.test_set is None:
            self.test_set = self.build_test(self.eval_transform())

    def _check_split(self, total: int, n_train: int, n_val: int) -> None:
        """Both parts of the train/validation split must hold at least one image."""
        if n_train and n_val:
            return
        size = f" ({self.size_key}={total})" if self.size_key else ""
        raise ConfigError(
            f"Invalid configuration: dataset.val_split={self.val_split} splits the {total} "
            f"training images of dataset={self.name}{size} into {n_train} for training and "
            f"{n_val} for validation; each part needs at least one image. Use more images or "
            "another dataset.val_split."
        )

    def split_sizes(self) -> dict[str, int]:
        """Images per split after :meth:`setup` (``train``, ``val``, ``test``)."""
        sets = {"train": self.train_set, "val": self.val_set, "test": self.test_set}
        return {k: len(v) for k, v in sets.items() if v is not None}  # type: ignore[arg-type]

    # ------------------------------------------------------------- loaders
    @property
    def per_device_batch_size(self) -> int:
        """The global batch size divided by the world size."""
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world:
            raise DataError(
                f"dataset.batch_size={self.batch_size} is not divisible by the world size "
                f"{world}; use a multiple of {world}"
            )
        return self.batch_size // world

    def _shard(self) -> tuple[int, int]:
        """(rank, world size) of this process; the loaders shard the data themselves
        (``trainer.use_distributed_sampler`` is off) so evaluation never pads."""
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise DataError(f"{self.name}: setup() has not built this split")
        rank, world = self._shard()
        sampler: Any
        if train and not (self.trainer is not None and self.trainer.overfit_batches):
            sampler = EpochSeededSampler(dataset, self.seed, rank, world)
        else:  # evaluation, or overfit_batches (a fixed order: the same batches every epoch)
            sampler = EvalShardSampler(dataset, rank, world)
        # eval loaders draw their workers' base seed from a private generator: the global RNG
        # (restored on resume) is never consumed by a loader, persistent or not
        if isinstance(sampler, EpochSeededSampler):
            generator = sampler.generator
        else:
            generator = torch.Generator()
        workers: dict[str, Any] = {}
        if self.num_workers > 0:
            workers = {
                "persistent_workers": self.persistent_workers,
                "prefetch_factor": self.prefetch_factor,
            }
            # eval passes: one fixed base seed (eval transforms draw nothing random today)
            sampler = _SeedTagged(sampler, self.seed)
            dataset = _Reseeding(dataset)
        loader = (ResumableLoader if train else DataLoader)(
            dataset,
            batch_size=self.per_device_batch_size,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=False,
            **workers,
        )
        trainer = self.trainer
        if train and trainer is not None:
            loader.position = lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return loader

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """MixUp/CutMix training batches: ``(x, y)`` → ``(x_mixed, y, soft_targets)``."""
        if (self.mixup_alpha or self.cutmix_alpha) and self.trainer and self.trainer.training:
            if self._mixer is None:
                self._mixer = BatchMixer(self.num_classes, self.mixup_alpha, self.cutmix_alpha)
            return self._mixer(*batch)
        return batch

    def train_dataloader(self) -> DataLoader:
        """Shuffled in an order fixed by (seed, epoch)."""
        return self._loader(self.train_set, train=True)

    def unaugmented_train_dataloader(self) -> DataLoader:
        """The training split with the eval transform (no augmentation, noise or mixing), in a
        fixed order, on this process only: for data stages that precede training (a patch
        dictionary)."""
        return self._loader(self.train_eval_set, train=False)

    def val_dataloader(self) -> DataLoader:
        """Held-out part of the training set, eval transform, fixed order."""
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        """The test set, eval transform, fixed order."""
        return self._loader(self.test_set, train=False)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, root={self.root!r}, dims={self.dims}, "
            f"num_classes={self.num_classes}, batch_size={self.batch_size})"
        )
