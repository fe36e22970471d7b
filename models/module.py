"""The LightningModule that trains any backbone as an image classifier."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["COMPILE_MODES", "CRITERIA", "LOGGED_METRICS", "ImageClassifier", "param_groups"]

log = logging.getLogger(__name__)

CRITERIA = ("cross_entropy", "mse")
#: ``torch.compile`` modes (``compile_mode``); ``reduce-overhead`` uses CUDA graphs on a GPU.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: Every metric the module logs (what a scheduler or checkpoint may monitor).
LOGGED_METRICS: tuple[str, ...] = (
    *(f"{stage}/{name}" for stage in ("train", "val") for name in ("loss", "acc1", "acc5")),
    "val/acc1_best",
)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def param_groups(
    model: nn.Module, weight_decay: float, lr: float | None = None, mask_lr_ratio: float = 1.0
) -> list[dict[str, Any]]:
    """Optimizer groups: weight decay on weights, none on biases and normalisation layers, and
    the continuous layers' mask parameters (``mask_parameters()``) at ``lr · mask_lr_ratio``."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    mask: list[nn.Parameter] = []
    for module in model.modules():
        for p in getattr(module, "mask_parameters", list)():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                mask.append(p)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, _NORMS) or p.ndim <= 1 or name.endswith("bias"):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if mask:
        group: dict[str, Any] = {"params": mask, "weight_decay": 0.0}
        if mask_lr_ratio != 1.0:
            if lr is None:
                raise ValueError(f"mask_lr_ratio={mask_lr_ratio} needs the optimizer's lr")
            group["lr"] = lr * mask_lr_ratio
        groups.append(group)
    return groups


class ImageClassifier(pl.LightningModule):
    """Wraps a backbone with a criterion, optimizer/scheduler factories and top-1/top-5 metrics.

    Args:
        net: the backbone, (B, C, H, W) → (B, num_classes).
        num_classes: number of classes (for metrics and one-hot MSE targets).
        optimizer: ``functools.partial``-like factory taking the parameter groups.
        scheduler: factory taking the optimizer (and optionally ``total_steps`` /
            ``steps_per_epoch``), or ``None``.
        scheduler_interval: ``"epoch"`` or ``"step"``.
        scheduler_monitor: metric for plateau-style schedulers.
        criterion: ``cross_entropy`` or ``mse`` (on one-hot targets).
        label_smoothing: label smoothing of the cross-entropy.
        compile: compile the backbone with ``torch.compile`` (state-dict keys unchanged).
        mask_lr_ratio: learning rate of the continuous layers' Gaussian masks relative to the
            optimizer's (CCNN's ``optimizer.mask_lr_ratio``).
        compile_mode: ``torch.compile``'s ``mode``: ``default``, or ``reduce-overhead`` (CUDA
            graphs: fewer kernel launches per step on a GPU), ``max-autotune``,
            ``max-autotune-no-cudagraphs``.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str | None = None,
        criterion: str = "cross_entropy",
        label_smoothing: float = 0.0,
        compile: bool = False,
        mask_lr_ratio: float = 1.0,
        compile_mode: str = "default",
    ) -> None:
        super().__init__()
        if criterion not in CRITERIA:
            raise ValueError(f"criterion={criterion!r} is not one of {CRITERIA}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode={compile_mode!r} is not one of {COMPILE_MODES}")
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net
        if compile:
            self.net.compile(mode=compile_mode)
        self.num_classes = int(num_classes)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        self.criterion = criterion
        self.label_smoothing = float(label_smoothing)
        self.mask_lr_ratio = float(mask_lr_ratio)
        top5 = min(5, self.num_classes)
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_loss", MeanMetric())
            setattr(
                self, f"{stage}_acc1", MulticlassAccuracy(num_classes, top_k=1, average="micro")
            )
            setattr(
                self, f"{stage}_acc5", MulticlassAccuracy(num_classes, top_k=top5, average="micro")
            )
        self.val_acc1_best = MaxMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the backbone."""
        return self.net(x)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (with label smoothing) or MSE against one-hot targets; float
        ``target`` rows are soft targets (MixUp/CutMix)."""
        if self.criterion == "mse":
            onehot = target if target.is_floating_point() else F.one_hot(target, self.num_classes)
            onehot = onehot.to(logits.dtype)
            return F.mse_loss(logits, onehot)
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch[0], batch[1]  # a third entry: soft targets for the loss (MixUp/CutMix)
        logits = self(x)
        loss = self.loss(logits, batch[2] if len(batch) > 2 else y)
        preds = logits.detach().float()
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=y.numel())
        getattr(self, f"{stage}_acc1").update(preds, y)
        getattr(self, f"{stage}_acc5").update(preds, y)
        for name in ("loss", "acc1", "acc5"):
            metric = getattr(self, f"{stage}_{name}")
            self.log(
                f"{stage}/{name}", metric, on_epoch=True, on_step=False, prog_bar=name != "acc5"
            )
        return loss

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        """One optimisation step's loss."""
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Accumulate validation metrics."""
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Accumulate test metrics."""
        self._step(batch, "test")

    def on_fit_start(self) -> None:
        """Run the network's data stage (e.g. the patch dictionary of ``net=patch_knn``) once,
        before the first step: on rank 0 from the unaugmented training split, its result
        broadcast to every rank. Its result lives in the network's buffers, so a resumed run
        (restored before this hook) or a test never recomputes it."""
        if not getattr(self.net, "needs_data_stage", False):
            return
        state = None
        if self.trainer.is_global_zero:
            loader = self.trainer.datamodule.unaugmented_train_dataloader()
            progress = self.trainer.progress_bar_callback is not None
            state = self.net.data_stage(loader, len(loader.dataset), progress=progress)
        state = self.trainer.strategy.broadcast(state, src=0)
        self.net.load_data_stage({k: v.to(self.device) for k, v in state.items()})

    def on_validation_epoch_end(self) -> None:
        """Track the best validation top-1 (sanity checks excluded)."""
        if self.trainer.sanity_checking:
            return
        self.val_acc1_best.update(self.val_acc1.compute())
        self.log("val/acc1_best", self.val_acc1_best.compute(), prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the best validation accuracy across resumes."""
        if self.val_acc1_best.update_count:
            checkpoint["val_acc1_best"] = float(self.val_acc1_best.compute())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the best validation accuracy."""
        if "val_acc1_best" in checkpoint:
            self.val_acc1_best.reset()
            self.val_acc1_best.update(torch.tensor(checkpoint["val_acc1_best"]))

    def configure_optimizers(self) -> Any:
        """Optimizer over decay/no-decay groups, plus the scheduler if configured."""
        keywords = getattr(self.optimizer_factory, "keywords", {})
        weight_decay = float(keywords.get("weight_decay", 0.0))
        lr = keywords.get("lr")
        groups = param_groups(self.net, weight_decay, lr, self.mask_lr_ratio)
        optimizer = self.optimizer_factory(params=groups)
        if self.scheduler_factory is None:
            return optimizer
        kwargs = _schedule_lengths(self.scheduler_factory, self.trainer)
        scheduler = self.scheduler_factory(optimizer, **kwargs)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.scheduler_interval}
        if self.scheduler_monitor:
            config["monitor"] = self.scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}


def _accepts(factory: Callable[..., Any]) -> Iterable[str]:
    func = getattr(factory, "func", factory)
    try:
        return inspect.signature(func).parameters
    except (TypeError, ValueError):
        return ()


def _schedule_lengths(factory: Callable[..., Any], trainer: pl.Trainer) -> dict[str, int]:
    """``total_steps``/``steps_per_epoch`` for schedulers that ask for them."""
    params = _accepts(factory)
    out: dict[str, int] = {}
    if "total_steps" in params and "total_steps" not in getattr(factory, "keywords", {}):
        out["total_steps"] = int(trainer.estimated_stepping_batches)
    if "steps_per_epoch" in params:
        epochs = max(1, int(trainer.max_epochs or 1))
        out["steps_per_epoch"] = max(1, int(trainer.estimated_stepping_batches) // epochs)
    return out
