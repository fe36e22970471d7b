"""Loading CCNN's weights: its state-dict layout mapped onto ours (CKConv2d, FlexConv2d)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

__all__ = ["from_ccnn_state_dict"]

# CCNN key (after any prefix) → ours; ``{i}`` is a layer index. 1×1-conv weights are squeezed.
_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(rf"^(?P<prefix>.*?){pattern}$"), repl)
    for pattern, repl in (
        (
            r"Kernel\.filters\.(?P<i>\d+)\.(?P<leaf>mu|gamma|linear\.weight|linear\.bias)",
            "kernel_net.filters.{i}.{leaf}",
        ),
        (r"Kernel\.linears\.(?P<i>\d+)\.(?P<leaf>weight|bias)", "kernel_net.linears.{i}.{leaf}"),
        (r"Kernel\.output_linear\.(?P<leaf>weight|bias)", "kernel_net.output_linear.{leaf}"),
        (r"Kernel\.kernel_net\.(?P<i>\d+)\.(?P<leaf>weight|bias)", "kernel_net.hidden.{i}.{leaf}"),
        (r"mask_width_param", "mask_width"),
        (r"mask_mean_param", "mask_mean"),
        (r"train_length", "grid_side"),
    )
)
# CCNN state that is configuration here (SIREN's fixed ω₀, the mask threshold), or a variant
# CCNN never builds (steerable MAGNet's angles).
_DROPPED = re.compile(
    r"(^|\.)(Kernel\.kernel_net\.\d+\.omega_0|mask_threshold|Kernel\.filters\.\d+\.theta)$"
)


def from_ccnn_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A CCNN ``CKConv``/``FlexConv`` (or ``Separable*``) state dict in our layout.

    Keys may carry any prefix (a whole CCNN network's state dict works); keys that are not a
    continuous layer's pass through unchanged. Load the result with ``strict=True`` into a layer
    built with the same options (``kernel_omega_0`` and ``mask_threshold`` are constructor
    arguments here, not state). SIREN's hidden layers ``kernel_net.0, 2, 4 …`` (a Sequential with
    sines between) become ``kernel_net.hidden.0, 1, 2 …``.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if _DROPPED.search(key):
            continue
        new_key, new_value = key, value
        for pattern, repl in _RENAMES:
            match = pattern.match(key)
            if match is None:
                continue
            parts = match.groupdict()
            prefix = parts.pop("prefix")
            if "kernel_net.hidden" in repl:
                parts["i"] = str(int(parts["i"]) // 2)
            new_key = prefix + repl.format(**parts)
            if new_key.endswith("weight") and "kernel_net" in new_key and value.dim() == 4:
                new_value = value.reshape(value.shape[0], value.shape[1])
            break
        out[new_key] = new_value
    return out
