"""Exported networks (``python -m framework.export``): config.json + model.safetensors +
README.md, loaded by ``models.from_pretrained`` without Lightning or Hydra, and by ``init_from``
for fine-tuning and ``test_only``; bad exports and bad inputs exit 1 with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from framework.errors import ConfigError
from framework.export import export
from framework.train import run
from models import from_pretrained

from .helpers import ROOT, TINY, compose_cfg

BASE = [*TINY, "scheduler=none", "trainer.max_epochs=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished TINY run and its export."""
    base = tmp_path_factory.mktemp("export")
    run_dir = base / "run"
    run(compose_cfg(BASE, out=run_dir))
    return run_dir, export(run_dir, base / "exported")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_export_writes_config_weights_and_readme(trained: tuple[Path, Path]) -> None:
    # catches: a config.json that cannot rebuild the network, or a README without the metrics
    run_dir, out = trained
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == "SimpleNet" and config["num_classes"] == 10
    assert config["input_shape"] == [1, 8, 8] and config["layer"]["name"] == "conv"
    assert config["net"] == {"num_layers": 2, "channels": [8, 16], "dropout": 0.0}
    results = json.loads((run_dir / "results.json").read_text())
    readme = (out / "README.md").read_text()
    assert f"test/acc1: {results['test/acc1']}" in readme
    assert Path(results["tested_checkpoint"]).name in readme
    best = torch.load(results["tested_checkpoint"], map_location="cpu", weights_only=True)
    tensors = load_file(out / "model.safetensors")
    assert tensors.keys() == {k[4:] for k in best["state_dict"]}
    assert all(torch.equal(tensors[k[4:]], v) for k, v in best["state_dict"].items())


def test_from_pretrained_in_a_fresh_interpreter_without_lightning_or_hydra(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    # catches: `import models` pulling in Lightning/Hydra/OmegaConf (e.g. the LightningModule
    # imported eagerly), or loaded weights that differ from the tested checkpoint's
    run_dir, out = trained
    logits_file = tmp_path / "logits.safetensors"
    code = (
        "import sys, torch, models; from safetensors.torch import save_file; "
        f"net = models.from_pretrained({str(out)!r}); "
        "x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)); "
        f"save_file({{'y': net(x).detach()}}, {str(logits_file)!r}); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'hydra', 'omegaconf', 'torchmetrics')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
    from framework.build import build_datamodule, build_layer, build_net

    cfg = compose_cfg(BASE)
    dm = build_datamodule(cfg)
    net = build_net(cfg, build_layer(cfg), dm.dims, dm.num_classes)
    tested = json.loads((run_dir / "results.json").read_text())["tested_checkpoint"]
    state = torch.load(tested, map_location="cpu", weights_only=True)["state_dict"]
    net.load_state_dict({k[4:]: v for k, v in state.items()})
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net.eval()(x)
    assert torch.equal(load_file(logits_file)["y"], expected)


def test_init_from_an_export_reproduces_the_test_metrics_and_fine_tunes(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    # catches: init_from not accepting an export (folder or file), or loading it partially
    run_dir, out = trained
    expected = json.loads((run_dir / "results.json").read_text())["test/acc1"]
    results = run(compose_cfg([*BASE, f"init_from={out}", "test_only=true"], out=tmp_path / "a"))
    assert results["test/acc1"] == expected and results["epochs"] == 0
    weights = out / "model.safetensors"
    results = run(compose_cfg([*BASE, f"init_from={weights}", "trainer.max_epochs=1"],
                              out=tmp_path / "b"))
    assert results["epochs"] == 1


def _broken(out: Path, tmp_path: Path, damage: str) -> Path:
    bad = _copy(out, tmp_path / damage)
    tensors = load_file(bad / "model.safetensors")
    config = json.loads((bad / "config.json").read_text())
    if damage == "no_weights":
        (bad / "model.safetensors").unlink()
    elif damage == "truncated":
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "other_net":
        config["backbone"] = "ViT"
        config["net"] = {"depth": 1, "dim": 16, "mlp_dim": 16, "patch_size": 4}
        config["layer"] = {"name": "attention"}
    elif damage == "other_classes":
        config["num_classes"] = 5
    elif damage in ("missing", "extra", "shape"):
        key = next(iter(tensors))
        if damage == "missing":
            del tensors[key]
        elif damage == "extra":
            tensors["surplus.weight"] = torch.zeros(1)
        else:
            tensors[key] = torch.zeros(1)
        save_file(tensors, str(bad / "model.safetensors"))
    (bad / "config.json").write_text(json.dumps(config))
    return bad


DAMAGES = {
    "no_weights": "model.safetensors does not exist",
    "truncated": "cannot be read as safetensors",
    "other_net": "does not fit the network its config.json describes",
    "other_classes": "head.weight (10, 16) vs (5, 16)",
    "missing": "(missing)",
    "extra": "surplus.weight (extra)",
    "shape": "(1,) vs",
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_from_pretrained_refuses_a_broken_export(
    trained: tuple[Path, Path], tmp_path: Path, damage: str
) -> None:
    # catches: a non-strict load (missing/extra/mis-shaped tensors) or a raw library error
    bad = _broken(trained[1], tmp_path, damage)
    with pytest.raises(ValueError) as err:
        from_pretrained(bad)
    assert DAMAGES[damage] in str(err.value)


@pytest.mark.parametrize("damage", ["no_weights", "truncated", "missing"])
def test_init_from_refuses_a_broken_export(
    trained: tuple[Path, Path], tmp_path: Path, damage: str
) -> None:
    # catches: init_from turning a bad export into a traceback, or silently loading part of it
    bad = _broken(trained[1], tmp_path, damage)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="init_from="):
        run(compose_cfg([*BASE, f"init_from={bad}", "test_only=true"], out=out))
    assert not (out / "model.txt").exists()


def _malicious_run(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``run_dir`` whose last.ckpt would create a marker when unpickled."""
    copy = tmp_path / "run"
    (copy / "checkpoints").mkdir(parents=True)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    marker = tmp_path / "code-ran"
    ckpt["hyper_parameters"] = {"x": _Payload(marker)}
    torch.save(ckpt, copy / "checkpoints" / "last.ckpt")
    return copy, marker


def test_export_refuses_a_checkpoint_that_would_run_code(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    # catches: the exporter unpickling arbitrary objects, or writing into a used OUT_DIR
    run_dir, _ = trained
    copy, marker = _malicious_run(run_dir, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="contains Python objects that would run code"):
        export(copy, out, "last")
    assert not marker.exists() and not out.exists()
    with pytest.raises(ConfigError, match="exists and is not an empty directory"):
        export(run_dir, run_dir)


@pytest.mark.slow
def test_export_cli_exits_1_with_one_paragraph(trained: tuple[Path, Path], tmp_path: Path) -> None:
    # catches: a traceback instead of exit 1 and the message from the command line
    copy, marker = _malicious_run(trained[0], tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "framework.export", str(copy), "--ckpt", "last", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 1
    assert "contains Python objects that would run code on loading" in proc.stderr
    assert str(copy / "checkpoints" / "last.ckpt") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists() and not out.exists()


class _Payload:
    """Unpickling this creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))
