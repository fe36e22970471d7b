"""Structured-config schemas in Hydra's ConfigStore: typed keys checked at compose time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

__all__ = ["SCHEMAS", "RootConf", "register_configs"]


# ------------------------------------------------------------------------------------- schemas
@dataclass
class SamplingConf:
    """Candidate selection of ConvNN layers (SPEC §1.2)."""

    type: str = "all"
    num_samples: int = -1
    sample_padding: int = 0
    eval_mode: str = "fixed"


@dataclass
class PathsConf:
    """Where things live; ``output_dir`` is the run directory."""

    root_dir: str = "."
    data_dir: str = "data"
    log_dir: str = "outputs"
    output_dir: str = "."


@dataclass
class TrainerConf:
    """The keyword arguments of ``lightning.pytorch.Trainer`` that configs may set."""

    _target_: str = "lightning.pytorch.Trainer"
    default_root_dir: str = "${paths.output_dir}"
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: str = "32-true"
    max_epochs: int = 10
    min_epochs: Any = None
    max_steps: int = -1
    max_time: Any = None
    gradient_clip_val: Any = None
    gradient_clip_algorithm: str = "norm"
    accumulate_grad_batches: int = 1
    check_val_every_n_epoch: int = 1
    val_check_interval: Any = None
    log_every_n_steps: int = 10
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    num_sanity_val_steps: Any = None
    fast_dev_run: Any = False
    overfit_batches: Any = 0.0
    deterministic: Any = "${deterministic}"
    benchmark: Any = None
    profiler: Any = None
    sync_batchnorm: bool = False
    detect_anomaly: bool = False
    enable_model_summary: bool = True
    enable_checkpointing: bool = True
    use_distributed_sampler: bool = True


@dataclass
class DatasetConf:
    """Keys shared by every dataset, so presets can set them whatever ``dataset=`` is."""

    _target_: str = MISSING
    name: str = MISSING
    root: str = "${paths.data_dir}"
    download: bool = False
    batch_size: int = 128
    num_workers: int = 2
    pin_memory: bool = False
    resize: Any = None
    augment: bool = False
    noise: float = 0.0
    val_split: float = 0.1
    auto_augment: Any = None  # randaugment | trivialaugment | null
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0


@dataclass
class DigitsConf(DatasetConf):
    """scikit-learn digits: plus the fixed test fraction."""

    test_split: float = 0.2


@dataclass
class FakeConf(DatasetConf):
    """FakeData: plus the shapes to fake."""

    channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    train_size: int = 512
    test_size: int = 128


@dataclass
class ImageNetConf(DatasetConf):
    """ImageFolder: plus the class count (checked against the folders)."""

    num_classes: int = 1000


@dataclass
class OptimizerConf:
    """Common optimizer keys (a ``functools.partial`` taking the parameter groups)."""

    _target_: str = MISSING
    _partial_: bool = True
    _convert_: str = "all"
    lr: float = 1e-3
    weight_decay: float = 0.0


@dataclass
class AdamConf(OptimizerConf):
    """Adam / AdamW."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class SGDConf(OptimizerConf):
    """SGD with (Nesterov) momentum."""

    momentum: float = 0.9
    dampening: float = 0.0
    nesterov: bool = False


@dataclass
class SchedulerConf:
    """Common scheduler keys; ``interval`` and ``monitor`` go to Lightning, not the class."""

    _target_: Any = None
    _partial_: bool = True
    interval: str = "epoch"
    monitor: Any = None


@dataclass
class StepConf(SchedulerConf):
    """StepLR."""

    step_size: int = 30
    gamma: float = 0.1


@dataclass
class CosineConf(SchedulerConf):
    """CosineAnnealingLR over ``T_max`` epochs."""

    T_max: int = MISSING
    eta_min: float = 0.0


@dataclass
class PlateauConf(SchedulerConf):
    """ReduceLROnPlateau on validation accuracy."""

    mode: str = "max"
    factor: float = 0.1
    patience: int = 10
    min_lr: float = 0.0


@dataclass
class WarmupCosineConf(SchedulerConf):
    """Per-step linear warm-up then cosine."""

    warmup_epochs: float = 5.0
    min_lr_ratio: float = 0.0


@dataclass
class RootConf:
    """The top level. Groups whose options differ in keys are typed by their own schemas."""

    net: Any = MISSING
    layer: Any = MISSING
    sampling: SamplingConf = field(default_factory=SamplingConf)
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    dataset: Any = MISSING
    trainer: TrainerConf = field(default_factory=TrainerConf)
    logger: Any = None
    callbacks: Any = None
    analysis: Any = None
    ema: Any = None
    paths: PathsConf = field(default_factory=PathsConf)
    name: str = "convnn"
    seed: int = 0
    ckpt_path: Any = None
    init_from: Any = None
    test_only: bool = False
    compile: bool = False
    criterion: str = "cross_entropy"
    label_smoothing: float = 0.0
    deterministic: bool = False


SCHEMAS: dict[str, dict[str, type]] = {
    "dataset": {
        "common": DatasetConf,
        "digits": DigitsConf,
        "fake": FakeConf,
        "imagenet": ImageNetConf,
    },
    "optimizer": {"adam": AdamConf, "sgd": SGDConf},
    "scheduler": {
        "none": SchedulerConf,
        "step": StepConf,
        "cosine": CosineConf,
        "plateau": PlateauConf,
        "warmup_cosine": WarmupCosineConf,
    },
}


def register_configs() -> None:
    """Register the schemas: ``config_schema`` and ``schema/<group>/<name>``."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=RootConf)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=node)



