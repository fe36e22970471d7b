"""Training recipes: the sweep objective, EMA weights, v2 augmentation, MixUp/CutMix, searches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from framework.checks import ConfigError, check_config
from framework.train import run

from .helpers import TINY, compose_cfg


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_main_returns_the_validation_metric_not_a_test_metric(tmp_path: Path) -> None:
    import main

    cfg = compose_cfg([*TINY, "trainer.limit_train_batches=2"], out=tmp_path)
    value = main.main.__wrapped__(cfg)
    results = _results(tmp_path)
    assert results["val/acc1_best"] != results["test/acc1"]  # the check below can tell them apart
    assert math.isclose(value, results["val/acc1_best"])


# ----------------------------------------------------------------------------------------- EMA
def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_ema_weights_are_validated_saved_and_tested(tmp_path: Path) -> None:
    # Updated at step 0 only (every 3rd of the 3 steps): the first update copies the weights,
    # so the average is the weights after the first step, whatever follows. (ema.decay=1.0 used
    # to give this and is now refused: it never moves the average.)
    ema_run = run(
        compose_cfg(
            [*TINY, "ema=on", "ema.decay=0.5", "ema.update_every_n_steps=3"],
            out=tmp_path / "ema",
        ),
    )
    one_step = run(compose_cfg([*TINY, "trainer.limit_train_batches=1"], out=tmp_path / "one"))
    three = run(compose_cfg(TINY, out=tmp_path / "three"))
    ema_ckpt = _ckpt(tmp_path / "ema" / "checkpoints" / "last.ckpt")
    ref = _ckpt(tmp_path / "one" / "checkpoints" / "last.ckpt")["state_dict"]
    assert _max_diff(ema_ckpt["state_dict"], ref) == 0.0
    current = _ckpt(tmp_path / "three" / "checkpoints" / "last.ckpt")["state_dict"]
    assert _max_diff(ema_ckpt["current_model_state"], current) == 0.0
    assert _max_diff(ema_ckpt["state_dict"], current) > 0.0
    for key in ("val/acc1_best", "test/acc1", "test/loss"):
        assert ema_run[key] == one_step[key]
    assert ema_run["test/loss"] != three["test/loss"]


def test_ema_resume_is_exact(tmp_path: Path) -> None:
    common = [*TINY, "trainer.max_epochs=2", "trainer.limit_train_batches=4", "ema=on"]
    common.append("ema.decay=0.5")
    straight, part = tmp_path / "straight", tmp_path / "part"
    run(compose_cfg(common, out=straight))
    run(compose_cfg([*common, "trainer.max_steps=4"], out=part))
    run(compose_cfg([*common, "ckpt_path=last"], out=part))
    a = _ckpt(straight / "checkpoints" / "last.ckpt")
    b = _ckpt(part / "checkpoints" / "last.ckpt")
    assert a["epoch"] == b["epoch"] == 1
    assert _max_diff(a["state_dict"], b["state_dict"]) <= 1e-6
    assert _max_diff(a["current_model_state"], b["current_model_state"]) <= 1e-6
    assert float(a["averaging_state"]["n_averaged"]) == float(b["averaging_state"]["n_averaged"])


def test_bad_ema_decay_is_a_config_error(tmp_path: Path) -> None:
    cfg = compose_cfg([*TINY, "ema=on", "ema.decay=1.5"], out=tmp_path)
    with pytest.raises(ConfigError, match=r"ema\.decay=1\.5"):
        check_config(cfg)


# -------------------------------------------------------------------------------- augmentation
def test_train_transform_has_auto_augment_and_erasing_eval_has_neither() -> None:
    from torchvision.transforms import v2

    from datamodules import DigitsDataModule

    dm = DigitsDataModule(name="digits", auto_augment="trivialaugment", random_erasing=0.3)
    kinds = [type(t) for t in dm.train_transform().transforms]
    assert v2.TrivialAugmentWide in kinds and v2.RandomErasing in kinds
    assert kinds.index(v2.TrivialAugmentWide) < kinds.index(v2.RandomErasing)
    erasing = dm.train_transform().transforms[kinds.index(v2.RandomErasing)]
    assert erasing.p == 0.3
    eval_kinds = [type(t) for t in dm.eval_transform().transforms]
    assert v2.TrivialAugmentWide not in eval_kinds and v2.RandomErasing not in eval_kinds
    dm = DigitsDataModule(name="digits", auto_augment="randaugment")
    assert v2.RandAugment in [type(t) for t in dm.train_transform().transforms]


def test_mixup_cutmix_only_on_training_batches_with_hard_labels_kept() -> None:
    from types import SimpleNamespace

    from datamodules import DigitsDataModule

    torch.manual_seed(0)
    dm = DigitsDataModule(name="digits", mixup_alpha=0.4, cutmix_alpha=1.0)
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    dm.trainer = SimpleNamespace(training=False)
    assert dm.on_after_batch_transfer((x, y), 0) == (x, y)
    dm.trainer = SimpleNamespace(training=True)
    xm, yh, soft = dm.on_after_batch_transfer((x, y), 0)
    assert torch.equal(yh, y) and not torch.equal(xm, x)
    assert soft.shape == (6, 10) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(1), torch.ones(6))
    assert (soft[torch.arange(6), y] > 0).all()


def test_soft_targets_drive_the_loss_and_hard_labels_the_accuracy() -> None:
    from functools import partial

    import torch.nn.functional as F

    from models.module import ImageClassifier

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    module = ImageClassifier(net, 3, partial(torch.optim.SGD, lr=0.1))
    x = torch.randn(4, 1, 2, 2)
    y = torch.tensor([0, 1, 2, 0])
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.2, 0.8], [0.3, 0.3, 0.4], [1.0, 0.0, 0.0]])
    module.log = lambda *a, **k: None
    loss = module._step((x, y, soft), "train")
    logits = net(x)
    torch.testing.assert_close(loss, F.cross_entropy(logits, soft))
    assert not torch.allclose(loss, F.cross_entropy(logits, y))
    acc = float((logits.argmax(1) == y).float().mean())
    assert float(module.train_acc1.compute()) == acc


def test_augmented_resume_is_exact(tmp_path: Path) -> None:
    common = [
        *TINY,
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=4",
        "dataset.auto_augment=randaugment",
        "dataset.random_erasing=0.5",
        "dataset.mixup_alpha=0.4",
        "dataset.cutmix_alpha=1.0",
    ]
    straight, part = tmp_path / "straight", tmp_path / "part"
    run(compose_cfg(common, out=straight))
    run(compose_cfg([*common, "trainer.max_steps=4"], out=part))
    run(compose_cfg([*common, "ckpt_path=last"], out=part))
    a = _ckpt(straight / "checkpoints" / "last.ckpt")["state_dict"]
    b = _ckpt(part / "checkpoints" / "last.ckpt")["state_dict"]
    assert _max_diff(a, b) <= 1e-6
    plain = tmp_path / "plain"
    run(compose_cfg([*TINY, "trainer.max_epochs=2", "trainer.limit_train_batches=4"], out=plain))
    assert _max_diff(a, _ckpt(plain / "checkpoints" / "last.ckpt")["state_dict"]) > 1e-3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dataset.auto_augment=autoaug", "dataset.auto_augment='autoaug'"),
        ("dataset.random_erasing=1.5", "dataset.random_erasing=1.5"),
        ("dataset.mixup_alpha=-1", "dataset.mixup_alpha=-1"),
        ("dataset.cutmix_alpha=-0.5", "dataset.cutmix_alpha=-0.5"),
    ],
)
def test_bad_augmentation_keys_are_config_errors(tmp_path: Path, override: str, message: str):
    import re

    cfg = compose_cfg([*TINY, override], out=tmp_path)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(cfg)


# ---------------------------------------------------------------------- hyper-parameter search
@pytest.mark.parametrize("search", ["optuna", "convnn_optuna"])
def test_hparams_search_configs_compose_and_maximise(search: str) -> None:
    from hydra import compose, initialize_config_dir

    from .helpers import CFG_DIR

    with initialize_config_dir(config_dir=CFG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"hparams_search={search}", "experiment=quickstart"],
            return_hydra_config=True,
        )
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert str(cfg.hydra.mode).endswith("MULTIRUN") and "optimizer.lr" in sweeper.params


@pytest.mark.slow
def test_optuna_sweep_optimises_the_validation_metric(tmp_path: Path) -> None:
    import yaml

    from .helpers import run_main

    args = [*TINY, "hparams_search=optuna", "hydra.sweeper.n_trials=2"]
    proc = run_main([*args, f"hydra.sweep.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())["best_value"]
    jobs = [_results(tmp_path / str(i)) for i in range(2)]
    assert math.isclose(best, max(j["val/acc1_best"] for j in jobs), rel_tol=1e-6)
    assert any(j["val/acc1_best"] != j["test/acc1"] for j in jobs)
