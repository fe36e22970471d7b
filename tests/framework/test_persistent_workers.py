"""DataLoader workers kept alive across epochs give the same batches, augmentations included, as
workers re-spawned every epoch, and a run resumed at an epoch boundary sees the same batches as
an uninterrupted one; no loader consumes the global RNG."""

from __future__ import annotations

import pytest
import torch

from datamodules.fake import FakeDataModule


def _datamodule(**over: object) -> FakeDataModule:
    kw: dict[str, object] = {
        "name": "fake",
        "train_size": 24,
        "test_size": 8,
        "image_size": 8,
        "batch_size": 8,
        "num_workers": 2,
        "augment": True,
        "noise": 0.5,
        "val_split": 0.25,
        "seed": 3,
    }
    dm = FakeDataModule(**{**kw, **over})  # type: ignore[arg-type]
    dm.setup("fit")
    return dm


def _epochs(dm: FakeDataModule, epochs: range) -> list[torch.Tensor]:
    """Training images of each epoch in ``epochs``, one loader for all (as Lightning does)."""
    loader = dm.train_dataloader()
    out = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        out.append(torch.cat([x for x, _ in loader]))
    return out


def test_persistent_workers_draw_the_same_augmentations() -> None:
    """Catches persistent workers continuing their RNG streams across epochs (epoch 2's
    augmentations would then depend on epoch 1 and differ from a resumed run's)."""
    fresh = _epochs(_datamodule(persistent_workers=False), range(3))
    kept = _epochs(_datamodule(persistent_workers=True), range(3))
    resumed = _epochs(_datamodule(persistent_workers=True), range(2, 3))
    for a, b in zip(fresh, kept, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(resumed[0], kept[2])
    assert not torch.equal(kept[0], kept[1])  # the noise and crops do change per epoch


@pytest.mark.parametrize("persistent", [True, False])
def test_loaders_leave_the_global_rng_alone(persistent: bool) -> None:
    """Catches an eval loader drawing its workers' seed from the global RNG: with persistent
    workers that draw happens once instead of every pass, so a resumed run's dropout and
    sampling streams would differ from an uninterrupted run's."""
    dm = _datamodule(persistent_workers=persistent)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    for loader in (dm.val_dataloader(), dm.train_dataloader()):
        for _ in range(2):
            list(loader)
    assert torch.equal(torch.get_rng_state(), state)


def test_prefetch_factor_reaches_the_loader() -> None:
    """Catches dataset.prefetch_factor being dropped (or passed with num_workers=0, which
    DataLoader refuses)."""
    assert _datamodule(prefetch_factor=4).train_dataloader().prefetch_factor == 4
    loader = _datamodule(num_workers=0, prefetch_factor=4).train_dataloader()
    assert loader.num_workers == 0 and not loader.persistent_workers
