"""ImageNet datamodule: torchvision.io decoding and transforms.v2 on uint8 tensors, checked
against the previous PIL pipeline, odd files, and seeded augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

from datamodules import ImageNetDataModule
from datamodules.imagenet import read_rgb

from .helpers import write_tiny_imagefolder

# Eval output of the tensor pipeline against the PIL one, normalised units: measured max
# 0.01751 (one uint8 level / 255 / std 0.224: the two antialiased resizes round differently by
# at most one level) on the JPEGs below, at crop sizes 32, 64 and 224. A swapped channel, a
# missing scale or other normalisation constants are off by far more.
MAX_ABS = 0.02
MEAN_ABS = 0.002


def _jpeg_tree(root: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """``root/{train,val}/class{0,1}/*.jpg``: smooth colour fields (like photos), quality 90."""
    rng = np.random.default_rng(1)
    paths = []
    for split in ("train", "val"):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
                img.save(folder / f"{i}.jpg", quality=90)
                paths.append(folder / f"{i}.jpg")
    return paths


def _pil_eval(dm: ImageNetDataModule) -> T.Compose:
    """The datamodule's previous eval pipeline (PIL image → tensor)."""
    size = dm.dims[1]
    return T.Compose(
        [
            T.Resize(round(size * 256 / 224), antialias=True),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(dm.mean, dm.std),
        ]
    )


@pytest.mark.parametrize("size", [32, 64])
def test_eval_output_matches_the_pil_pipeline(tmp_path: Path, size: int) -> None:
    _jpeg_tree(tmp_path, [(48, 40), (40, 48), (100, 75), (300, 260)])
    dm = ImageNetDataModule(name="imagenet", root=str(tmp_path), num_classes=2, resize=size)
    dm.setup("test")
    old = _pil_eval(dm)
    for i, (path, _) in enumerate(dm.test_set.samples):
        x, _ = dm.test_set[i]
        with open(path, "rb") as f:
            ref = old(Image.open(f).convert("RGB"))
        assert x.dtype == torch.float32 and x.shape == (3, size, size) == ref.shape
        diff = (x - ref).abs()
        assert float(diff.max()) <= MAX_ABS, path
        assert float(diff.mean()) <= MEAN_ABS, path
    # the decoded pixels themselves are PIL's (both decode with libjpeg)
    path = dm.test_set.samples[0][0]
    with open(path, "rb") as f:
        pil = torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(read_rgb(path), pil)


def test_grayscale_cmyk_palette_rgba_png_and_bmp_load_as_rgb(tmp_path: Path) -> None:
    """Odd files in the tree: torchvision.io converts them to RGB; a BMP (which torchvision
    cannot decode) goes through PIL. Each is what PIL's ``convert("RGB")`` gives."""
    write_tiny_imagefolder(tmp_path, classes=2, per_class=2)
    rng = np.random.default_rng(2)
    folder = tmp_path / "val" / "class0"
    gray = rng.integers(0, 256, (30, 20), dtype=np.uint8)
    rgb = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (30, 20, 4), dtype=np.uint8)
    Image.fromarray(gray).save(folder / "gray.jpg", quality=95)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    Image.fromarray(gray).convert("P").save(folder / "palette.png")
    Image.fromarray(rgba).save(folder / "rgba.png")
    Image.fromarray(gray).save(folder / "gray.png")
    Image.fromarray(rgb).save(folder / "rgb.bmp")
    dm = ImageNetDataModule(name="imagenet", root=str(tmp_path), num_classes=2, resize=32)
    dm.setup("test")
    odd = [p for p, _ in dm.test_set.samples if Path(p).stem in ("gray", "cmyk", "palette",
                                                                 "rgba", "rgb")]
    assert len(odd) == 6
    for path in odd:
        img = read_rgb(path)
        assert img.dtype == torch.uint8 and img.shape == (3, 30, 20), path
        with open(path, "rb") as f:
            pil = torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
        # CMYK → RGB: equal here (0 measured); allow a rounding step between decoder builds
        tol = 2 if path.endswith("cmyk.jpg") else 0
        assert int((img.int() - pil.int()).abs().max()) <= tol, path
        x, _ = dm.test_set[[p for p, _ in dm.test_set.samples].index(path)]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
    gray_img = read_rgb(str(folder / "gray.png"))
    assert torch.equal(gray_img[0], torch.from_numpy(gray))
    assert torch.equal(gray_img[0], gray_img[1]) and torch.equal(gray_img[0], gray_img[2])


@pytest.mark.parametrize(
    ("auto_augment", "random_erasing"), [(None, 0.0), ("randaugment", 0.5), ("trivialaugment", 0.5)]
)
def test_seeded_augmentation_is_reproducible(
    tmp_path: Path, auto_augment: str | None, random_erasing: float
) -> None:
    """Same (seed, epoch, index) → the same tensor whatever the global RNG; another epoch →
    another crop. Auto-augment runs on uint8 before the float conversion, erasing after."""
    write_tiny_imagefolder(tmp_path, classes=2, per_class=6)
    kwargs = {"name": "imagenet", "root": str(tmp_path), "num_classes": 2, "resize": 32,
              "augment": True, "seed": 7, "val_split": 0.25, "batch_size": 4,
              "auto_augment": auto_augment, "random_erasing": random_erasing}
    dm = ImageNetDataModule(**kwargs)
    kinds = [type(t) for t in dm.train_transform().transforms]
    assert kinds.index(v2.RandomResizedCrop) < kinds.index(v2.ToDtype)
    if auto_augment:
        aa = v2.RandAugment if auto_augment == "randaugment" else v2.TrivialAugmentWide
        assert kinds.index(aa) < kinds.index(v2.ToDtype) < kinds.index(v2.RandomErasing)
    dm.setup("fit")
    train = dm.train_set
    torch.manual_seed(0)
    a = [train[i][0] for i in range(4)]
    torch.manual_seed(1)
    b = [train[i][0] for i in range(4)]
    assert all(x.dtype == torch.float32 and x.shape == (3, 32, 32) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])  # images differ (and so do their crops)
    train.set_epoch(1)
    c = [train[i][0] for i in range(4)]
    assert all(not torch.equal(x, y) for x, y in zip(a, c))
    # another datamodule with the same seed, through the loader with workers: the same batch
    other = ImageNetDataModule(**kwargs, num_workers=2, persistent_workers=False)
    other.setup("fit")
    first = next(iter(dm.train_dataloader()))[0]
    assert torch.equal(next(iter(other.train_dataloader()))[0], first)


def test_unaugmented_train_loader_is_the_eval_transform(tmp_path: Path) -> None:
    """net=patch_knn's data stage: the training split, eval transform, fixed order."""
    write_tiny_imagefolder(tmp_path, classes=2, per_class=4)
    dm = ImageNetDataModule(name="imagenet", root=str(tmp_path), num_classes=2, resize=32,
                            augment=True, noise=1.0, val_split=0.25, batch_size=3)
    dm.setup("fit")
    x, _ = next(iter(dm.unaugmented_train_dataloader()))
    folder = dm.train_eval_set.dataset
    paths = [folder.samples[i][0] for i in dm.train_eval_set.indices[:3]]
    ref = torch.stack([dm.eval_transform()(read_rgb(p)) for p in paths])
    assert torch.equal(x, ref)
    pil = _pil_eval(dm)
    old = []
    for p in paths:
        with open(p, "rb") as f:
            old.append(pil(Image.open(f).convert("RGB")))
    assert float((x - torch.stack(old)).abs().max()) <= MAX_ABS
