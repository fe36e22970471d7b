"""Model inspection: FLOPs of one forward pass, the text of ``model.txt``, weights-only loading
(``init_from``)."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from framework.checkpoints import LoadedCheckpoint, read_weights_source

__all__ = ["count_flops", "describe_model", "load_weights"]

log = logging.getLogger(__name__)


def count_flops(net: nn.Module, dims: tuple[int, int, int]) -> tuple[int, str]:
    """FLOPs of one forward pass on a single sample (every matmul, ConvNN search included)."""
    was_training = net.training
    net.eval()
    try:
        x = torch.zeros(1, *dims, device=next(net.parameters()).device)
        counter = FlopCounterMode(display=False, depth=3)
        with counter, torch.no_grad():
            net(x)
        lines = []
        for module, ops in sorted(counter.get_flop_counts().items()):
            if module == "Global" or module.count(".") > 2:
                continue
            for op, n in ops.items():
                lines.append(f"  {module:<40} {op!s:<32} {n:>16,}")
        return int(counter.get_total_flops()), "\n".join(lines)
    finally:
        net.train(was_training)


def describe_model(net: nn.Module, dims: tuple[int, int, int]) -> tuple[str, dict[str, int]]:
    """The text of ``model.txt`` and the counts that go into ``results.json``."""
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    flops, table = count_flops(net, dims)
    text = (
        f"{net}\n\n"
        f"input: 1×{'×'.join(map(str, dims))}\n"
        f"parameters: {total:,} (trainable {trainable:,})\n"
        f"FLOPs (one forward, one sample): {flops:,} ({flops / 1e6:.2f} MFLOPs)\n\n"
        f"FLOPs by module:\n{table}\n"
    )
    return text, {"params": total, "params_trainable": trainable, "flops": flops}


def load_weights(module: nn.Module, checkpoint: LoadedCheckpoint | str) -> dict[str, list[str]]:
    """Load weights only (``init_from``, read once at start-up; a path is read here): matching
    keys, shape mismatches re-initialised.

    Returns the missing, unexpected and skipped (shape-mismatched) keys, which are logged.
    """
    if isinstance(checkpoint, str):
        checkpoint = read_weights_source(checkpoint, "init_from")
    path, state = checkpoint.path, checkpoint.state_dict
    own = module.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    usable = {k: v for k, v in state.items() if k not in skipped}
    result = module.load_state_dict(usable, strict=False)
    report = {
        "missing": sorted(k for k in result.missing_keys if k not in skipped),
        "unexpected": sorted(result.unexpected_keys),
        "reinitialised": sorted(skipped),
    }
    log.info("init_from=%s: loaded %d tensors", path, len(usable) - len(report["unexpected"]))
    for kind, keys in report.items():
        if keys:
            log.warning("init_from: %d %s keys: %s", len(keys), kind, ", ".join(keys))
    return report
