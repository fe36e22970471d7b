"""``python -m framework.export RUN_DIR [--ckpt best|last] OUT_DIR``: a trained network as the
files people share — ``config.json`` + ``model.safetensors`` + ``README.md`` — loadable with
``models.from_pretrained(OUT_DIR)`` (no Lightning, Hydra or pickle) or ``init_from=OUT_DIR``."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from framework.build import build_datamodule
from framework.checkpoints import read_checkpoint
from framework.errors import ConfigError, UserError
from framework.jsonio import dumps_strict
from framework.resume import stored_config
from models import backbone_for_target
from models.pretrained import (
    CONFIG_FILE,
    FORMAT,
    WEIGHTS_FILE,
    build_from_config,
    check_state,
)

__all__ = ["export", "main", "pretrained_config"]

log = logging.getLogger(__name__)
PREFIX = "net."  # the backbone's keys inside the LightningModule's state dict


def _fail(message: str) -> ConfigError:
    return ConfigError(f"Cannot export: {message}.")


def _checkpoint_path(run_dir: Path, which: str) -> Path:
    """``best``: the checkpoint the run tested (results.json), else the one best-*.ckpt;
    ``last``: checkpoints/last.ckpt."""
    folder = run_dir / "checkpoints"
    if which == "last":
        path = folder / "last.ckpt"
        if not path.is_file():
            raise _fail(f"{path} does not exist (was RUN_DIR a training run?)")
        return path
    results = run_dir / "results.json"
    if results.is_file():
        tested = json.loads(results.read_text()).get("tested_checkpoint")
        if tested and Path(tested).is_file():
            return Path(tested)
    best = sorted(folder.glob("best*.ckpt"))
    if len(best) != 1:
        found = ", ".join(p.name for p in best) or "none"
        raise _fail(
            f"{run_dir} has no single best checkpoint in checkpoints/ (found: {found}); give "
            "--ckpt last, or export the run directory that wrote it"
        )
    return best[0]


def _run_config(run_dir: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """The run config stored in the checkpoint, or else in checkpoints/last.ckpt (a weights-only
    best checkpoint keeps no callback state)."""
    config = stored_config(ckpt)
    if config is None and (run_dir / "checkpoints" / "last.ckpt").is_file():
        last = read_checkpoint(run_dir / "checkpoints" / "last.ckpt", "RUN_DIR")
        config = stored_config(last.data)
    if config is None:
        raise _fail(f"no checkpoint of {run_dir} stores the run config")
    return config


def pretrained_config(run: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` for a run config (as stored in checkpoints): backbone, net options, layer
    and sampling, class count, input shape, versions."""
    cfg = OmegaConf.create(run)
    net = {k: v for k, v in run["net"].items() if not str(k).startswith("_")}
    layer = {k: v for k, v in run["layer"].items() if not str(k).startswith("_")}
    try:
        backbone = backbone_for_target(str(run["net"]["_target_"])).name
        datamodule = build_datamodule(cfg)
        dims, classes = datamodule.dims, datamodule.num_classes
    except (KeyError, ValueError) as err:
        raise _fail(f"the run's config does not describe a registered network ({err})") from None
    versions = {"torch": torch.__version__, "safetensors": safetensors.__version__}
    try:
        versions["convnn-lab"] = importlib.metadata.version("convnn-lab")
    except importlib.metadata.PackageNotFoundError:
        pass
    return {
        "format": FORMAT,
        "backbone": backbone,
        "net": net,
        "layer": layer,
        "num_classes": int(classes),
        "input_shape": [int(d) for d in dims],
        "ema": bool((run.get("ema") or {}).get("enabled", False)),
        "versions": versions,
    }


def _readme(config: dict[str, Any], run_dir: Path, ckpt: Path) -> str:
    results = run_dir / "results.json"
    metrics = json.loads(results.read_text()) if results.is_file() else {}
    tested = metrics.get("tested_checkpoint")
    lines = [
        f"# {config['backbone']} with layer={config['layer']['name']}",
        "",
        f"Exported from `{run_dir}` (checkpoint `{ckpt.name}`"
        + (", EMA weights" if config["ema"] else "")
        + ").",
        f"Input {'×'.join(map(str, config['input_shape']))}, {config['num_classes']} classes.",
        "",
    ]
    if metrics and tested and Path(tested).resolve() == ckpt.resolve():
        lines += ["Test metrics of this checkpoint (results.json):", ""]
        lines += [f"- {k}: {metrics[k]}" for k in ("test/acc1", "test/acc5", "test/loss")
                  if k in metrics]
    else:
        lines.append("No test metrics of this checkpoint in the run's results.json.")
    lines += [
        "",
        "Load it with `models.from_pretrained(\"<this folder>\")` (PyTorch + safetensors only), or",
        "fine-tune / evaluate it with `python main.py init_from=<this folder> ...`.",
        "",
    ]
    return "\n".join(lines)


def export(run_dir: str | Path, out_dir: str | Path, which: str = "best") -> Path:
    """Write ``out_dir`` from ``run_dir``'s ``which`` checkpoint; :class:`ConfigError` (nothing
    written) when something does not fit."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise _fail(f"RUN_DIR {run_dir} is not a directory")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise _fail(f"OUT_DIR {out_dir} exists and is not an empty directory; choose a new one")
    path = _checkpoint_path(run_dir, which)
    ckpt = read_checkpoint(path, f"--ckpt {which}")
    config = pretrained_config(_run_config(run_dir, ckpt.data))
    state = {
        k[len(PREFIX):]: v.detach().contiguous().clone()
        for k, v in ckpt.state_dict.items()
        if isinstance(v, torch.Tensor) and k.startswith(PREFIX)
    }
    try:
        net = build_from_config(config)
        check_state(net, state, str(path))
    except ValueError as err:
        raise _fail(str(err)) from None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / CONFIG_FILE).write_text(dumps_strict(config))
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "README.md").write_text(_readme(config, run_dir, path))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%d tensors) to %s", path, len(state), out_dir)
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    """The command line; a user error exits 1 with its one-paragraph message."""
    parser = argparse.ArgumentParser(prog="python -m framework.export", description=__doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (hydra.run.dir)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="a new directory to write")
    parser.add_argument("--ckpt", choices=("best", "last"), default="best",
                        help="the checkpoint to export (default: the best, which the run tested)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export(args.run_dir, args.out_dir, args.ckpt)
    except UserError as err:
        raise SystemExit(str(err)) from None


if __name__ == "__main__":
    main()
