"""Building a run's parts from the composed config: datamodule, layer factory, network, module.

The builders turn *our* validation errors (``ValueError`` from ``convnn`` constructors and
backbones, :class:`~models.layer_factory.IncompatibleLayerError`) into :class:`ConfigError` messages
that name the config keys; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from datamodules.base import BaseDataModule
from framework.errors import ConfigError
from models import backbone_for_target
from models.layer_factory import IncompatibleLayerError, LayerFactory
from models.module import ImageClassifier

__all__ = [
    "build_datamodule",
    "build_layer",
    "build_module",
    "build_net",
    "config_keys",
    "net_name",
    "qualify",
]

SCHEDULER_META = ("interval", "monitor")
OPTIMIZER_META = ("mask_lr_ratio",)  # read by the module's parameter groups, not the class
_CONVNN_DIR = str(Path(__file__).resolve().parents[1] / "convnn")


def net_name(cfg: DictConfig) -> str:
    """The network as a user names it (``VGG11``, ``ResNet18``, ``ViT``, ``SimpleNet`` ...)."""
    target = str(cfg.net._target_)
    try:
        return backbone_for_target(target).display_name(cfg.net)
    except KeyError:
        return target.rsplit(".", 1)[-1]


def config_keys(cfg: DictConfig, groups: Iterable[str]) -> dict[str, str]:
    """Keyword name → its config key (``K`` → ``layer.K``) for the given groups, first wins."""
    keys: dict[str, str] = {}
    for group in groups:
        node = cfg.get(group)
        if node is None:
            continue
        for key in node:
            if not str(key).startswith("_") and key != "name":
                keys.setdefault(str(key), f"{group}.{key}")
    return keys


def qualify(message: str, keys: dict[str, str]) -> str:
    """Rewrite ``name=value`` in a constructor's message as ``group.name=value``."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        return f"{keys[name]}=" if name in keys else match.group(0)

    return re.sub(r"(?<![\w.])(\w+)=", sub, message)


def _from_convnn(err: BaseException) -> bool:
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and last.startswith(_CONVNN_DIR)


def _image_size_key(cfg: DictConfig) -> str:
    """The key that sets the images' size: ``dataset.resize`` when set, else the dataset's."""
    d = cfg.dataset
    if d.get("resize") is not None or "image_size" not in d:
        return "dataset.resize"
    return "dataset.image_size"


def user_error(cfg: DictConfig, err: ValueError, where: str = "") -> ConfigError:
    """A constructor's ``ValueError`` as a one-paragraph message naming the config keys."""
    groups = ("layer", "sampling", "net") if _from_convnn(err) else ("net", "layer", "sampling")
    keys = config_keys(cfg, groups)
    keys.setdefault("image_size", _image_size_key(cfg))  # the backbones' input size: from data
    text = qualify(str(err), keys)
    setting = f"net={net_name(cfg)} layer={cfg.layer.name}"
    return ConfigError(f"Invalid configuration ({setting}{where}): {text}.")


def build_datamodule(cfg: DictConfig) -> BaseDataModule:
    """Instantiate the datamodule (touches no data)."""
    try:
        return instantiate(cfg.dataset, seed=cfg.seed)
    except ValueError as err:
        raise ConfigError(
            f"Invalid configuration: dataset={cfg.dataset.name}: "
            f"{qualify(str(err), config_keys(cfg, ['dataset']))}."
        ) from None


def build_layer(cfg: DictConfig) -> LayerFactory:
    """Instantiate the layer factory; its option errors become configuration errors."""
    options = OmegaConf.to_container(cfg.layer, resolve=True)
    assert isinstance(options, dict)
    options.pop("_target_", None)
    name = options.pop("name")
    sampling = options.pop("sampling", None)
    try:
        return LayerFactory(name, sampling=sampling, **options)
    except ValueError as err:
        raise user_error(cfg, err) from None


def build_net(
    cfg: DictConfig, layer: LayerFactory, dims: tuple[int, int, int], classes: int
) -> nn.Module:
    """``instantiate(cfg.net)(layer=..., in_channels=C, num_classes=K, image_size=H)``."""
    c, h, _ = dims
    factory = instantiate(cfg.net, _convert_="all")
    try:
        return factory(layer=layer, in_channels=c, num_classes=classes, image_size=h)
    except IncompatibleLayerError as err:
        raise ConfigError(f"Invalid configuration: {err} (net={net_name(cfg)}).") from None
    except ValueError as err:
        raise user_error(cfg, err) from None


def build_module(cfg: DictConfig, net: nn.Module, num_classes: int) -> ImageClassifier:
    """The LightningModule with optimizer/scheduler factories from the config."""
    sched_cfg = cfg.scheduler
    scheduler = None
    if sched_cfg.get("_target_") is not None:
        resolved = OmegaConf.to_container(sched_cfg, resolve=True)
        assert isinstance(resolved, dict)
        scheduler = instantiate({k: v for k, v in resolved.items() if k not in SCHEDULER_META})
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    assert isinstance(optimizer, dict)
    return ImageClassifier(
        net=net,
        num_classes=num_classes,
        optimizer=instantiate({k: v for k, v in optimizer.items() if k not in OPTIMIZER_META}),
        scheduler=scheduler,
        scheduler_interval=sched_cfg.get("interval", "epoch"),
        scheduler_monitor=sched_cfg.get("monitor"),
        criterion=cfg.criterion,
        label_smoothing=cfg.label_smoothing,
        compile=cfg.compile,
        mask_lr_ratio=float(optimizer.get("mask_lr_ratio", 1.0)),
        compile_mode=cfg.compile_mode,
    )
