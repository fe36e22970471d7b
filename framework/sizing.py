"""Size sanity before a network is materialised: count its parameters on the meta device,
estimate the training memory, and refuse what cannot fit one device.

Estimate: parameters × 4 copies (weights, gradients, AdamW's two moments) × 4 bytes, plus one
sample's activations (every module's output in a forward pass) × the per-device batch size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from convnn import LAYERS, layer_options
from framework.errors import ConfigError

__all__ = ["LIMIT", "SizeEstimate", "activation_bytes", "check_size", "device_memory", "meta_count"]

log = logging.getLogger(__name__)

LIMIT = 0.8  # of one device's memory
BYTES_PER_PARAMETER = 4 * 4  # fp32 weights, gradients, AdamW exp_avg and exp_avg_sq


def meta_count(build: Callable[[], nn.Module]) -> int | None:
    """Parameters of ``build()`` built on the meta device (no memory); ``None`` if the network
    cannot be built there."""
    try:
        with torch.device("meta"):
            net = build()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return sum(p.numel() for p in net.parameters())


def device_memory(device: torch.device) -> tuple[int, str]:
    """Total memory of one device of ``device``'s kind: (bytes, description)."""
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return int(props.total_memory), f"GPU memory of {props.name}"
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages), "RAM"


def activation_bytes(net: nn.Module, dims: tuple[int, int, int]) -> int:
    """Bytes of every module output of a one-sample forward (no grad): what training keeps per
    sample for the backward pass, roughly."""
    total = 0

    def hook(module: nn.Module, args: tuple, out: object) -> None:
        nonlocal total
        if isinstance(out, Tensor):
            total += out.numel() * out.element_size()

    handles = [m.register_forward_hook(hook) for m in net.modules() if not list(m.children())]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, *dims))
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    return total


@dataclass(frozen=True)
class SizeEstimate:
    """Parameters, bytes for them and for a batch's activations, and the device's memory."""

    params: int
    param_bytes: int
    activation_bytes: int
    memory: int
    memory_name: str

    @property
    def total(self) -> int:
        """Estimated training memory in bytes."""
        return self.param_bytes + self.activation_bytes

    def describe(self) -> str:
        """One line for the log and for refusals."""
        return (
            f"{self.params:,} parameters; estimated training memory {_size(self.total)} "
            f"({_size(self.param_bytes)} weights, gradients and optimizer state + "
            f"{_size(self.activation_bytes)} activations) of {self.memory / 2**30:.1f} GiB "
            f"{self.memory_name}"
        )


def _size(n: float) -> str:
    """Bytes in GiB, or in MiB below 1 GiB (a small run's estimate is not ``0.00 GiB``)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _layer_keys(cfg: DictConfig) -> list[str]:
    """``layer.*`` keys whose value differs from the constructor default, then ``net``."""
    name = str(cfg.layer.name)
    defaults = layer_options(name) if name in LAYERS else {}
    keys = [
        f"layer.{k}={cfg.layer[k]!r}"
        for k in cfg.layer
        if k in defaults and cfg.layer[k] != defaults[k] and k != "padding"
    ]
    return [*keys, f"net={str(cfg.net._target_).rsplit('.', 1)[-1]} (net.*)"]


def check_size(
    cfg: DictConfig,
    params: int,
    device: torch.device,
    per_sample: int = 0,
    batch: int = 1,
) -> SizeEstimate:
    """Refuse an estimate above :data:`LIMIT` of one device's memory, naming the keys behind
    the larger part (the network's keys for parameters, ``dataset.batch_size`` for activations)."""
    memory, name = device_memory(device)
    estimate = SizeEstimate(params, params * BYTES_PER_PARAMETER, per_sample * batch, memory, name)
    if estimate.total <= LIMIT * memory:
        return estimate
    if estimate.param_bytes >= estimate.activation_bytes:
        keys = ", ".join(_layer_keys(cfg))
    else:
        keys = f"dataset.batch_size={cfg.dataset.batch_size}"
        if cfg.dataset.get("resize") is not None:
            keys += f", dataset.resize={cfg.dataset.resize}"
    raise ConfigError(
        f"Invalid configuration: {keys} — the model does not fit: {estimate.describe()}, above "
        f"{LIMIT:.0%} of one device. Make the network smaller (or the batch), or run on a device "
        "with more memory."
    )
