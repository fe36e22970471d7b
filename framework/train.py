"""Orchestration behind ``main.py``: build everything from the config, fit/test, write results,
and summarise multirun sweeps."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from framework.analysis import maybe_analyse
from framework.build import build_module
from framework.callbacks import RunIds, build_callbacks, step_time
from framework.checkpoints import LoadedCheckpoint, size_line
from framework.checks import validate
from framework.faults import trainer_kwargs
from framework.inspect import describe_model, load_weights
from framework.jsonio import write_json
from framework.resume import total_train_time
from framework.rundir import check_writable
from models.module import ImageClassifier

__all__ = ["run", "write_json"]

log = logging.getLogger(__name__)
SCHEDULER_META = ("interval", "monitor")


def _checkpoint_ids(checkpoint: LoadedCheckpoint | None) -> dict[str, str]:
    """The logger run ids recorded in the checkpoint being resumed (read once at start-up)."""
    if checkpoint is None:
        return {}
    state = checkpoint.data.get("callbacks", {}).get(RunIds.KEY)
    return dict(state.get("ids", {})) if isinstance(state, dict) else {}


def run_name(cfg: DictConfig) -> str:
    """A readable run name from the command-line overrides (W&B and logs)."""
    try:
        overrides = HydraConfig.get().job.override_dirname
    except ValueError:
        overrides = ""
    return f"{cfg.name}:{overrides}" if overrides else str(cfg.name)


def build_loggers(cfg: DictConfig, run_dir: Path, ids: dict[str, str]) -> list[Logger]:
    """Loggers from ``cfg.logger``; a W&B run keeps its id across resumes."""
    loggers: list[Logger] = []
    for key, lcfg in (cfg.logger or {}).items():
        if lcfg is None or "_target_" not in lcfg:
            continue
        if "Wandb" in str(lcfg._target_):
            id_file = run_dir / "wandb_run_id.txt"
            run_id = lcfg.get("id") or ids.get("wandb")
            if run_id is None and id_file.is_file() and cfg.ckpt_path is not None:
                run_id = id_file.read_text().strip()
            if run_id is None:
                run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
            ids["wandb"] = run_id
            name = lcfg.get("name") or run_name(cfg)
            loggers.append(instantiate(lcfg, id=run_id, name=name))
        else:
            loggers.append(instantiate(lcfg))
        log.debug("logger %s: %s", key, type(loggers[-1]).__name__)
    return loggers


# ----------------------------------------------------------------------------------------- run
def run(cfg: DictConfig) -> dict[str, Any]:
    """validate (build + probe) → data → fit/test → results.json. Returns the results.

    Every start-up check runs before the run directory gets a file of ours.
    """
    startup = validate(cfg)
    datamodule, net, ckpt_path = startup.datamodule, startup.net, startup.ckpt_path
    run_dir = Path(cfg.paths.output_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("Run directory: %s", run_dir)
    if datamodule.download and rank_zero_only.rank == 0:
        datamodule.prepare_data()

    check_writable(run_dir, cfg)  # before anything is written or trained
    text, counts = describe_model(net, datamodule.dims)
    if ckpt_path is None or not (run_dir / "model.txt").is_file():  # a resume keeps it
        (run_dir / "model.txt").write_text(text)
    log.info(
        "Model: %s params, %.2f MFLOPs per sample", f"{counts['params']:,}", counts["flops"] / 1e6
    )
    model = build_module(cfg, net, datamodule.num_classes)
    if startup.init is not None:
        load_weights(model, startup.init)

    ids = _checkpoint_ids(startup.checkpoint)
    loggers = build_loggers(cfg, run_dir, ids)
    callbacks = build_callbacks(cfg, run_dir, ids, has_logger=bool(loggers), title=run_name(cfg))
    if not cfg.test_only:
        log.info(size_line(net, cfg, callbacks))
    kwargs = trainer_kwargs(cfg, preloaded=startup.checkpoint)  # Lightning gets it, not a reread
    startup.checkpoint = startup.init = None
    trainer: pl.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, **kwargs
    )
    weights_only = not cfg.trust_checkpoint
    hparams = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(hparams, dict)
    hparams["run_dir"] = str(run_dir)
    for lg in loggers:
        lg.log_hyperparams(hparams)

    start = time.perf_counter()
    try:
        if not cfg.test_only:
            trainer.fit(
                model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=weights_only
            )
        train_time = total_train_time(trainer, time.perf_counter() - start)
        best_cb = _best_checkpoint(trainer)
        best = best_cb.best_model_path if best_cb is not None else None
        if cfg.test_only and ckpt_path is not None:
            best_cb, best = None, ckpt_path
        test = trainer.test(
            model, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=weights_only
        )
        results = _results(trainer, model, test, counts, train_time, best, run_dir)
        if best_cb is not None and best_cb.best_model_score is not None:
            # the tested checkpoint's own score: one lineage, also across run directories
            results["val/acc1_best"] = float(best_cb.best_model_score)
        if trainer.is_global_zero:
            write_json(run_dir / "results.json", results)
            for lg in loggers:
                lg.log_metrics({k: v for k, v in results.items() if isinstance(v, (int, float))})
        maybe_analyse(cfg, trainer, model, datamodule, loggers, run_dir)
        log.info(
            "test/acc1=%.4f test/acc5=%.4f (%s)",
            results["test/acc1"],
            results["test/acc5"],
            "best checkpoint" if best else "current weights",
        )
        log.info("Run directory: %s", run_dir)
        return results
    finally:
        if any(isinstance(lg, WandbLogger) for lg in loggers):
            import wandb

            wandb.finish()
        _close_process_group()


def _close_process_group() -> None:
    """Destroy a DDP process group Lightning left open: a process exiting with the group alive
    can abort in its C++ teardown ("terminate called without an active exception", exit -6)
    after a successful run, which a scheduler counts as a failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _best_checkpoint(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The callback holding the best checkpoint by the monitored metric (None without one)."""
    if trainer.fast_dev_run:
        return None
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_path:
            return cb
    return None


def _results(
    trainer: pl.Trainer,
    model: ImageClassifier,
    test: list[dict[str, float]],
    counts: dict[str, int],
    train_time: float,
    best: str | None,
    run_dir: Path,
) -> dict[str, Any]:
    metrics = test[0] if test else {}
    best_val = model.val_acc1_best
    return {
        "test/acc1": float(metrics["test/acc1"]),
        "test/acc5": float(metrics["test/acc5"]),
        "test/loss": float(metrics["test/loss"]),
        "val/acc1_best": float(best_val.compute()) if best_val.update_count else None,
        "epochs": int(trainer.current_epoch),
        "global_step": int(trainer.global_step),
        "train_time_s": round(train_time, 3),
        "step_time_s": step_time(trainer),
        "tested_checkpoint": best,
        "run_dir": str(run_dir),
        **counts,
    }
