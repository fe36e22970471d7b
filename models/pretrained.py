"""Trained networks as shared files: ``config.json`` (backbone, its options, layer and sampling,
class count, input shape) + ``model.safetensors`` (the backbone's tensors), written by
``python -m framework.export``. Loading needs only PyTorch, safetensors and this package — no
Lightning, Hydra or OmegaConf — and never unpickles anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from models.layer_factory import LayerFactory
from models.registry import BACKBONES, create_backbone

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "WEIGHTS_FILE",
    "build_from_config",
    "check_state",
    "from_pretrained",
    "read_config",
    "read_weights",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "convnn-lab/1"


def read_config(directory: str | Path) -> dict[str, Any]:
    """``directory/config.json``, checked for the keys :func:`build_from_config` needs."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist: {directory} is not an exported network (write one with "
            "`python -m framework.export RUN_DIR OUT_DIR`)"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON ({err})") from None
    needed = ("format", "backbone", "net", "layer", "num_classes", "input_shape")
    missing = [k for k in needed if not isinstance(config, dict) or k not in config]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; it was not written by the exporter")
    if config["format"] != FORMAT:
        raise ValueError(f"{path} has format {config['format']!r}; this version reads {FORMAT!r}")
    if config["backbone"] not in BACKBONES:
        raise ValueError(
            f"{path}: backbone={config['backbone']!r} is not registered here; registered: "
            f"{', '.join(sorted(BACKBONES))}"
        )
    return config


def build_from_config(config: dict[str, Any]) -> nn.Module:
    """The untrained network that ``config`` (a ``config.json``) describes."""
    layer = dict(config["layer"])
    name = layer.pop("name")
    sampling = layer.pop("sampling", None)
    channels, size, _ = config["input_shape"]
    return create_backbone(
        config["backbone"],
        layer=LayerFactory(name, sampling=sampling, **layer),
        in_channels=int(channels),
        num_classes=int(config["num_classes"]),
        image_size=int(size),
        **config["net"],
    )


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (on the CPU)."""
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path} cannot be read as safetensors ({err}); it is truncated or not a "
            "safetensors file"
        ) from None


def check_state(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor of ``net`` present in ``state`` with its shape, and nothing else."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = [f"{k} (missing)" for k in missing] + [f"{k} (extra)" for k in extra] + shaped
    if problems:
        shown = "; ".join(problems[:5]) + ("; …" if len(problems) > 5 else "")
        raise ValueError(
            f"{source} does not fit the network its config.json describes: {len(problems)} "
            f"tensors differ ({shown})"
        )


def from_pretrained(directory: str | Path) -> nn.Module:
    """The exported network in ``directory`` (``config.json`` + ``model.safetensors``), built
    through the backbone registry, loaded strictly, in eval mode. ``ValueError`` for a bad
    directory, config or weights file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory of an exported network")
    config = read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{weights} does not exist: {directory} has no weights")
    net = build_from_config(config)
    state = read_weights(weights)
    check_state(net, state, str(weights))
    net.load_state_dict(state, strict=True)
    return net.eval()
