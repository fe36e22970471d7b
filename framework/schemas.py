"""Structured-config schemas in Hydra's ConfigStore: typed keys checked at compose time."""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from dataclasses import dataclass, field, make_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from convnn import LAYERS, SAMPLING_KEYWORDS, ConvNNBase, constructor_keywords, layer_options
from models import BACKBONES

__all__ = [
    "SCHEMAS",
    "RootConf",
    "layer_schema",
    "net_schema",
    "register_configs",
]


# ------------------------------------------------------------------------------------- schemas
def _field_type(annotation: Any) -> Any:
    """An OmegaConf-compatible field type for a constructor annotation (``Any`` if none fits)."""
    if annotation in (int, float, str, bool):
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple, collections.abc.Sequence) and args and args[0] in (int, float, str):
        return list[args[0]]  # type: ignore[valid-type]
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and _field_type(rest[0]) is not Any:
            return _field_type(rest[0]) | None
    return Any


def _default(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return field(default_factory=lambda v=list(value): list(v))
    return value


def schema_from_signature(
    name: str,
    cls: type,
    keywords: dict[str, Any],
    head: list[tuple[str, Any, Any]],
) -> type:
    """A dataclass schema: the ``head`` fields, then ``keywords`` typed by ``cls.__init__``."""
    hints = typing.get_type_hints(cls.__init__)
    fields: list[tuple[str, Any, Any]] = list(head)
    for key, default in keywords.items():
        fields.append((key, _field_type(hints.get(key, Any)), _default(default)))
    return make_dataclass(name, fields)


def layer_schema(name: str) -> type:
    """``layer=<name>``: the factory target, the kind, and the constructors' options."""
    head: list[tuple[str, Any, Any]] = [
        ("_target_", str, "models.layer_factory.LayerFactory"),
        ("name", str, name),
    ]
    if LAYERS[name].uses_sampling:
        head.append(("sampling", Any, "${sampling}"))
    hints: dict[str, Any] = {}
    for cls in LAYERS[name].classes():
        hints.update(typing.get_type_hints(cls.__init__))
    options = layer_options(name)
    fields = head + [
        (k, _field_type(hints.get(k, Any)), _default(v)) for k, v in options.items()
    ]
    return make_dataclass(f"Layer_{name}", fields)


def net_schema(cls: type) -> type:
    """``net=...`` for backbone ``cls``: a partial of ``cls`` with its architecture keywords."""
    keywords = {
        k: p.default
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if k not in _NET_STRUCTURAL and p.default is not p.empty
    }
    head: list[tuple[str, Any, Any]] = [
        ("_target_", str, f"{cls.__module__}.{cls.__qualname__}"),
        ("_partial_", bool, True),
    ]
    return schema_from_signature(f"Net_{cls.__name__}", cls, keywords, head)


# Arguments the framework passes to every backbone (from the data), never set in ``net``.
_NET_STRUCTURAL = frozenset({"self", "layer", "in_channels", "num_classes", "image_size"})

SamplingConf = schema_from_signature(
    "SamplingConf",
    ConvNNBase,
    {k: v for k, v in constructor_keywords(ConvNNBase).items() if k in SAMPLING_KEYWORDS},
    [],
)


@dataclass
class PathsConf:
    """Where things live; ``output_dir`` is the run directory."""

    root_dir: str = "."
    data_dir: str = "data"
    log_dir: str = "outputs"
    output_dir: Any = "."  # None under `--cfg job --resolve` (no run directory yet)


@dataclass
class TrainerConf:
    """The keyword arguments of ``lightning.pytorch.Trainer`` that configs may set."""

    _target_: str = "lightning.pytorch.Trainer"
    default_root_dir: Any = "${paths.output_dir}"
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
    persistent_workers: bool = True  # keep workers across epochs (same batches either way)
    prefetch_factor: Any = None  # batches per worker loaded ahead; null = PyTorch's 2
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
    mask_lr_ratio: float = 1.0  # FlexConv masks' lr ÷ lr (CCNN's optimizer.mask_lr_ratio)


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
    sampling: Any = field(default_factory=SamplingConf)
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
    trust_checkpoint: bool = False
    test_only: bool = False
    compile: bool = False
    compile_mode: str = "default"
    criterion: str = "cross_entropy"
    label_smoothing: float = 0.0
    deterministic: bool = False
    resume_sweep: bool = False  # continue a killed multirun in its hydra.sweep.dir


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
    """Register the schemas: ``config_schema`` and ``schema/<group>/<name>``.

    Layer schemas are ``schema/layer/<kind>``; net schemas ``schema/net/<backbone name>`` (one per
    entry of the backbone registry, ``models.BACKBONES``). Also
    registers the config's resolvers (``${launch_dir:}``, ``${attempt_subdir:}``).
    """
    import framework.rundir  # noqa: F401  (registers the resolvers)

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=RootConf)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
    for name in LAYERS:
        cs.store(group="schema/layer", name=name, node=layer_schema(name))
    for name, backbone in BACKBONES.items():
        cs.store(group="schema/net", name=name, node=net_schema(backbone.cls))
    cs.store(group="schema/sampling", name="sampling", node=SamplingConf)
    from framework.group_schemas import register_group_schemas

    register_group_schemas()  # ema, analysis, logger, callbacks
