"""The start-up contract beyond the enumerated matrix: bad inputs that used to give a traceback,
a late refusal (after ``model.txt`` or an epoch) or a silent acceptance now exit 1 with a
message naming the key, before any run file other than Hydra's ``.hydra/`` and ``main.log``.

Every case runs through the real ``main.py`` in one helper interpreter
(``tests/framework/jobs.py``), like ``test_bad_configs.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framework.checks import validate
from framework.errors import ConfigError

from .helpers import ROOT, compose_cfg, write_tiny_cifar, write_tiny_imagefolder

BASE = ["dataset=digits", "trainer=cpu", "logger=none", "trainer.max_epochs=1"]
FAKE = ["dataset=fake", "dataset.batch_size=4", "dataset.train_size=16", "dataset.test_size=8"]
#: What a refused run may leave in its run directory (Hydra's own files and our lock).
ALLOWED = {".hydra", "main.log", "run.lock"}

# name: (overrides, text the message must contain)
CASES: dict[str, tuple[list[str], str]] = {
    # used to end in a traceback
    "k_huge": (["layer.K=99999999999999999999999"], "layer.K=99999999999999999999999"),
    "val_split_tiny": (["dataset.val_split=0.0001"], "dataset.val_split=0.0001"),
    "fake_one_image": (["dataset=fake", "dataset.train_size=1"], "dataset.train_size=1"),
    "val_check_interval": (["trainer.val_check_interval=1000"], "trainer.val_check_interval=1000"),
    "run_dir_is_file": (["hydra.run.dir={file}"], "is a file"),
    "run_dir_under_file": (["hydra.run.dir={file}/run"], "is a file"),
    "cifar_truncated": (
        ["dataset=cifar10", "dataset.root={cifar}", "dataset.download=false"],
        "integrity check",
    ),
    "imagefolder_empty_class": (
        ["dataset=imagenet", "dataset.root={empty_class}", "dataset.num_classes=3",
         "dataset.resize=16", "dataset.batch_size=4"],
        "class2",
    ),
    "limit_test_zero": (["trainer.limit_test_batches=0"], "trainer.limit_test_batches=0"),
    # used to be refused late (after model.txt or an epoch), naming only `trainer`
    "strategy": (["trainer.strategy=foo"], "trainer.strategy='foo'"),
    "devices_text": (["trainer.devices=abc"], "trainer.devices='abc'"),
    "max_steps_negative": (["trainer.max_steps=-5"], "trainer.max_steps=-5"),
    "profiler": (["trainer.profiler=foo"], "trainer.profiler='foo'"),
    "max_time": (["trainer.max_time=abc"], "trainer.max_time='abc'"),
    "transformer_engine": (
        ["trainer.precision=transformer-engine"], "trainer.precision='transformer-engine'"
    ),
    "nonfinite_patience": (
        ["callbacks.stop_on_nonfinite.patience=-1"], "callbacks.stop_on_nonfinite.patience=-1"
    ),
    "lr_inf": (["optimizer.lr=inf"], "optimizer.lr=inf"),
    "weight_decay_inf": (["optimizer.weight_decay=inf"], "optimizer.weight_decay=inf"),
    "noise_inf": (["dataset.noise=inf"], "dataset.noise=inf"),
    "fp16_on_cpu": (["trainer.precision=16-true"], "trainer.precision='16-true'"),
    "imagenet_class_count": (
        ["dataset=imagenet", "dataset.root={imagefolder}", "dataset.num_classes=1000",
         "dataset.resize=16", "dataset.batch_size=4"],
        "dataset.num_classes=1000",
    ),
    # used to be accepted silently
    "eps_inf": (["optimizer.eps=inf"], "optimizer.eps=inf"),
    "momentum_five": (["optimizer=sgd", "optimizer.momentum=5"], "optimizer.momentum=5"),
    "eta_min_above_lr": (
        ["scheduler=cosine", "scheduler.eta_min=0.1"], "scheduler.eta_min=0.1"
    ),
    "min_lr_negative": (["scheduler=plateau", "scheduler.min_lr=-1"], "scheduler.min_lr=-1"),
    "accumulate_huge": (
        ["trainer.accumulate_grad_batches=100000"], "trainer.accumulate_grad_batches=100000"
    ),
    "max_steps_zero": (["trainer.max_steps=0"], "trainer.max_steps=0"),
    "limit_train_zero": (["trainer.limit_train_batches=0"], "trainer.limit_train_batches=0"),
    "val_every_above_epochs": (
        ["trainer.check_val_every_n_epoch=5"], "trainer.check_val_every_n_epoch=5"
    ),
    "mixup_inf": (["dataset.mixup_alpha=inf"], "dataset.mixup_alpha=inf"),
    "ema_decay_one": (["ema=on", "ema.decay=1.0"], "ema.decay=1.0"),
    "kernel_huge": (["layer=conv", "layer.kernel_size=99"], "layer.kernel_size=99"),
    "analysis_without_convnn": (["layer=conv", "analysis=neighbours"], "analysis=neighbours"),
    "num_samples_negative": (["sampling.num_samples=-5"], "sampling.num_samples=-5"),
    # options without effect in a single run
    "sampling_on_conv": (["layer=conv", "sampling=random"], "sampling.sampling_type='random'"),
    "shuffle_scale_without_pattern": (["layer.shuffle_scale=2"], "layer.shuffle_scale=2"),
    "num_samples_with_all": (["sampling.num_samples=16"], "sampling.num_samples=16"),
    # found by the fuzz test (tests/framework/test_fuzz_config.py)
    "fuzz_devices_empty": (["trainer.devices=[]"], "trainer.devices=[]"),
    "fuzz_max_time_number": (["trainer.max_time=0.5"], "trainer.max_time=0.5"),
    "fuzz_ema_enabled_not_bool": (["ema.enabled=maybe"], "ema.enabled"),
    "fuzz_ema_enabled_without_options": (["ema.enabled=true", "ema.decay=1.0"], "ema.decay=1.0"),
    "fuzz_checkpointing_off_with_checkpoints": (
        ["trainer.enable_checkpointing=false"], "trainer.enable_checkpointing=False"
    ),
    "fuzz_channels_huge": ([*FAKE, "dataset.channels=99999999999999999999999"], "dataset.channels"),
    "fuzz_huge_epochs_named_at_source": (
        ["scheduler=cosine", "trainer.max_epochs=99999999999999999999999"],
        "trainer.max_epochs=99999999999999999999999",
    ),
    "fuzz_resize_below_patch": (
        [*FAKE, "net=vit_tiny", "net.depth=1", "layer=attention", "dataset.resize=1"],
        "dataset.resize=1",
    ),
    "fuzz_float32_overflow": (
        ["net.num_layers=2", "net.channels=[8,16]", "layer=flexconv",
         "layer.mask_init_value=1e308"],
        "layer.mask_init_value=1e+308",
    ),
    "fuzz_all_with_spatial_count": (
        ["sampling=spatial", "sampling.num_samples=4", "sampling.sampling_type=all"],
        "sampling.sampling_type='all'",
    ),
}
if not torch.cuda.is_available():
    CASES["gpu_without_gpu"] = (["trainer.accelerator=gpu"], "trainer.accelerator='gpu'")


def _inputs(base: Path) -> dict[str, str]:
    """A file in the way, truncated CIFAR files, ImageFolder trees (2 classes; one class empty)."""
    file = base / "a-file"
    file.write_text("not a folder\n")
    cifar = base / "cifar"
    folder = write_tiny_cifar(cifar)
    batch = folder / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:100])
    imagefolder = write_tiny_imagefolder(base / "imagefolder", classes=2, per_class=4)
    empty = write_tiny_imagefolder(base / "empty_class", classes=3, per_class=4)
    for image in (empty / "train" / "class2").iterdir():
        image.unlink()
    return {
        "file": str(file),
        "cifar": str(cifar),
        "imagefolder": str(imagefolder),
        "empty_class": str(empty),
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    base = tmp_path_factory.mktemp("contract")
    files = _inputs(base)
    spec = {}
    for name, (overrides, _) in CASES.items():
        args = [*BASE, f"hydra.run.dir={base / name}", *(o.format(**files) for o in overrides)]
        spec[name] = {"args": args}
    spec_file, out_file = base / "spec.json", base / "out.json"
    spec_file.write_text(json.dumps(spec))
    env = {"HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline", "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [sys.executable, "-m", "tests.framework.jobs", str(spec_file), str(out_file)],
        cwd=ROOT, check=True, timeout=600, env={**os.environ, **env},
    )
    results = json.loads(out_file.read_text())
    for name in results:
        run_dir = next(a for a in spec[name]["args"] if a.startswith("hydra.run.dir="))
        results[name]["run_dir"] = run_dir.split("=", 1)[1]
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_1_before_any_run_file(name: str, outcomes: dict[str, dict]) -> None:
    result = outcomes[name]
    output = result["output"]
    assert result["rc"] == 1, output
    assert "Traceback" not in output, output
    assert CASES[name][1] in output, output
    run_dir = Path(result["run_dir"])
    if run_dir.is_dir():
        assert {p.name for p in run_dir.iterdir()} <= ALLOWED, output



# ------------------------------------------------------------------------------- in process
def test_option_without_effect_is_warned_once_in_a_multirun(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from framework.errors import ConfigError
    from framework.rules import _WARNED, check_effect

    from .helpers import compose_cfg

    cfg = compose_cfg([*BASE, "layer=conv", "sampling=random"])
    with pytest.raises(ConfigError, match=r"sampling\.sampling_type=.random.*has no effect"):
        check_effect(cfg, multirun=False)
    _WARNED.clear()
    with caplog.at_level("WARNING"):
        check_effect(cfg, multirun=True)
        check_effect(cfg, multirun=True)
    assert caplog.text.count("has no effect with layer=conv") == 1


def test_a_debug_preset_cut_warns_instead_of_refusing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from framework import construct
    from framework.checks import validate
    from framework.errors import ConfigError

    from .helpers import compose_cfg

    cfg = compose_cfg([*BASE, "trainer.check_val_every_n_epoch=5"], out=tmp_path)
    with pytest.raises(ConfigError, match=r"trainer\.check_val_every_n_epoch=5"):
        validate(cfg)
    monkeypatch.setattr(construct, "in_debug_preset", lambda: True)
    with caplog.at_level("WARNING"):
        validate(cfg)
    assert "a debug preset shortens this run" in caplog.text


def test_size_estimate_is_logged_and_refusal_names_the_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from framework import sizing
    from framework.checks import validate
    from framework.errors import ConfigError

    from .helpers import compose_cfg

    cfg = compose_cfg([*BASE, "layer=conv", "layer.kernel_size=5"], out=tmp_path)
    with caplog.at_level("INFO"):
        startup = validate(cfg)
    params = sum(p.numel() for p in startup.net.parameters())
    assert f"Size: {params:,} parameters" in caplog.text
    assert startup.size is not None and startup.size.param_bytes == 16 * params
    # a device with room for the activations but not for the parameters' training state
    monkeypatch.setattr(sizing, "device_memory", lambda device: (16 * params, "RAM"))
    with pytest.raises(ConfigError, match=r"layer.kernel_size=5, net=SimpleNet"):
        validate(cfg)
    # a device the parameters' training state fits (with 1 % to spare) but not a batch's
    # activations
    big = compose_cfg([*BASE, "layer=conv", "dataset.batch_size=1024"], out=tmp_path)
    room = int(16 * params / sizing.LIMIT * 1.01)
    monkeypatch.setattr(sizing, "device_memory", lambda device: (room, "RAM"))
    with pytest.raises(ConfigError, match=r"^Invalid configuration: dataset.batch_size=1024 — "):
        validate(big)


def test_continuous_kernels_keep_their_default_size_on_small_maps(tmp_path: Path) -> None:
    """CCNN's 33-wide continuous kernel on 8×8 digits costs no parameters: not refused, while
    the same width of a discrete kernel is (the fuzz found the default refused)."""
    small = [*BASE, "net.num_layers=2", "net.channels=[8,16]"]
    validate(compose_cfg([*small, "layer=ckconv"], out=tmp_path / "ck"))
    with pytest.raises(ConfigError, match=r"layer.kernel_size=33 is larger than any map"):
        validate(compose_cfg([*small, "layer=conv", "layer.kernel_size=33"], out=tmp_path / "c"))
