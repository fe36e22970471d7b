"""Orchestration behind ``main.py``: build everything from the config, fit/test, write results,
and summarise multirun sweeps."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from framework.analysis import maybe_analyse
from framework.callbacks import step_time
from framework.checkpoints import size_line
from framework.checks import validate
from framework.inspect import describe_model, load_weights
from framework.jsonio import write_json
from framework.lifecycle import GracefulStop, exit_on_sigterm
from framework.loggers import write_run_ids
from framework.resume import total_train_time
from framework.rundir import check_writable
from models.module import ImageClassifier

__all__ = ["run", "write_json"]

log = logging.getLogger(__name__)
SCHEDULER_META = ("interval", "monitor")


# ----------------------------------------------------------------------------------------- run
def _stored_results(run_dir: Path) -> dict[str, Any]:
    """``results.json`` of a finished run (``val/acc1_best`` unknown without one)."""
    path = run_dir / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {"val/acc1_best": None}


def run(cfg: DictConfig) -> dict[str, Any]:
    """validate (build everything, check, probe) → data → fit/test → results.json. Returns the
    results.

    Every start-up check runs before the run directory gets a file of ours; what validation
    built (data splits, network, module, loggers, callbacks, Trainer) is what runs.
    """
    startup = validate(cfg)
    run_dir = Path(cfg.paths.output_dir).resolve()
    if startup.complete is not None:
        log.info(
            "ckpt_path=%s: run already complete (%s); nothing to do. Raise trainer.max_epochs "
            "to train on.",
            cfg.ckpt_path,
            startup.complete,
        )
        return _stored_results(run_dir)
    datamodule, net, ckpt_path = startup.datamodule, startup.net, startup.ckpt_path
    trainer, model, loggers = startup.trainer, startup.module, startup.loggers
    assert trainer is not None and model is not None
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("Run directory: %s", run_dir)
    check_writable(run_dir, cfg)  # before anything is downloaded, written or trained
    if datamodule.download and rank_zero_only.rank == 0:
        datamodule.prepare_data()

    text, counts = describe_model(net, datamodule.dims)
    if ckpt_path is None or not (run_dir / "model.txt").is_file():  # a resume keeps it
        (run_dir / "model.txt").write_text(text)
    log.info(
        "Model: %s params, %.2f MFLOPs per sample", f"{counts['params']:,}", counts["flops"] / 1e6
    )
    if startup.init is not None:
        load_weights(model, startup.init)
    write_run_ids(run_dir, startup.ids)
    if not cfg.test_only:
        log.info(size_line(net, cfg, trainer.callbacks))
    startup.checkpoint = startup.init = None  # the checkpoint IO holds what Lightning needs
    weights_only = not cfg.trust_checkpoint
    hparams = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(hparams, dict)
    hparams["run_dir"] = str(run_dir)
    for lg in loggers:
        lg.log_hyperparams(hparams)

    stop = next(cb for cb in trainer.callbacks if isinstance(cb, GracefulStop))
    start = time.perf_counter()
    try:
        with exit_on_sigterm(stop):
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
                model,
                datamodule=datamodule,
                ckpt_path=best,
                verbose=False,
                weights_only=weights_only,
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
        for lg in loggers:  # TensorBoard's writer thread would flush after run() returned
            if isinstance(lg, TensorBoardLogger):
                lg.finalize("success")
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
