"""Start-up validation: cross-field and range checks on the composed config.

:func:`check_config` runs once, before any data is touched, and raises :class:`ConfigError` with a
one-paragraph message naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hydra.errors import CompactHydraException
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "ConfigError",
    "check_config",
    "check_layer_fits",
    "resolve_ckpt_path",
    "world_size",
]


class ConfigError(CompactHydraException, ValueError):
    """Invalid configuration; Hydra prints only the message (no traceback) and exits with 1."""


# ---------------------------------------------------------------------------------- validation
MAGNITUDE_TYPES = ("cosine", "similarity", "euclidean", "distance", "matmul", "dot")
SIMILARITY_TYPES = ("Col", "Loc", "Loc_Col")
AGGREGATION_TYPES = ("Col", "Loc_Col")
SHUFFLE_PATTERNS = ("NA", "B", "A", "BA")
CONVOLUTION_TYPES = ("standard", "depthwise", "depthwise-separable")
SAMPLING_TYPES = ("all", "random", "spatial")
EVAL_MODES = ("fixed", "random")
PRECISIONS = (
    "32-true",
    "32",
    "16-mixed",
    "16",
    "bf16-mixed",
    "bf16",
    "64-true",
    "64",
    "16-true",
    "bf16-true",
    "transformer-engine",
    "transformer-engine-float16",
)
CRITERIA = ("cross_entropy", "mse")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"Invalid configuration: {key}={value!r} — {allowed}.")


def _int(cfg: Any, key: str, prefix: str, low: int | None = None) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"{prefix}{key}", value, "expected an integer")
    if low is not None and value < low:
        raise _fail(f"{prefix}{key}", value, f"must be an integer ≥ {low}")
    return value


def _number(cfg: Any, key: str, prefix: str, low: float, high: float, closed: bool = True) -> float:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(f"{prefix}{key}", value, "expected a number")
    ok = low <= value <= high if closed else low <= value < high
    if not ok or math.isnan(value):
        bracket = "]" if closed else ")"
        raise _fail(f"{prefix}{key}", value, f"must be in [{low}, {high}{bracket}")
    return float(value)


def _choice(cfg: Any, key: str, prefix: str, choices: tuple[str, ...]) -> str:
    value = cfg[key]
    if value not in choices:
        raise _fail(f"{prefix}{key}", value, f"allowed values are {', '.join(choices)}")
    return value


def world_size(trainer: Any) -> int:
    """Processes the trainer config asks for (devices × nodes), without starting anything."""
    devices = trainer.devices
    nodes = int(trainer.num_nodes)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices) * nodes
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    accelerator = str(trainer.accelerator)
    if accelerator in ("gpu", "cuda", "auto"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count() * nodes
    return nodes


def _check_layer(layer: Any, sampling: Any) -> None:
    p = "layer."
    opts = set(layer.keys())
    if "K" in opts:
        _int(layer, "K", p, 1)
    if "magnitude_type" in opts:
        _choice(layer, "magnitude_type", p, MAGNITUDE_TYPES)
    if "similarity_type" in opts:
        _choice(layer, "similarity_type", p, SIMILARITY_TYPES)
    if "aggregation_type" in opts:
        _choice(layer, "aggregation_type", p, AGGREGATION_TYPES)
    if "lambda_param" in opts:
        _number(layer, "lambda_param", p, 0.0, 1.0)
    if "shuffle_pattern" in opts:
        _choice(layer, "shuffle_pattern", p, SHUFFLE_PATTERNS)
    if "shuffle_scale" in opts:
        _int(layer, "shuffle_scale", p, 1)
    if "padding" in opts:
        _int(layer, "padding", p, 0)
    if "kernel_size" in opts:
        k = _int(layer, "kernel_size", p, 1)
        if k % 2 == 0:
            raise _fail("layer.kernel_size", k, "must be odd so the layer keeps H×W")
    if "branch_ratio" in opts:
        _number(layer, "branch_ratio", p, 0.0, 1.0)
    if "num_heads" in opts:
        _int(layer, "num_heads", p, 1)
    if "attention_dropout" in opts:
        _number(layer, "attention_dropout", p, 0.0, 1.0, closed=False)
    if "convolution_type" in opts:
        _choice(layer, "convolution_type", p, CONVOLUTION_TYPES)
    if "window_size" in opts:
        _int(layer, "window_size", p, 1)
    if "stride" in opts:
        _int(layer, "stride", p, 1)
    uses_sampling = "sampling" in opts
    if not uses_sampling:
        return
    s = "sampling."
    kind = _choice(sampling, "type", s, SAMPLING_TYPES)
    _choice(sampling, "eval_mode", s, EVAL_MODES)
    _int(sampling, "sample_padding", s, 0)
    k = int(layer.K)
    if kind == "random":
        m = _int(sampling, "num_samples", s, 1)
        if k - 1 > m:
            raise ConfigError(
                f"Invalid configuration: sampling.num_samples={m} with layer.K={k} — random "
                f"sampling must draw at least K−1={k - 1} candidates (self is slot 0); raise "
                f"sampling.num_samples to ≥ {k - 1} or lower layer.K."
            )
    elif kind == "spatial":
        n = _int(sampling, "num_samples", s, 1)
        if k - 1 > n * n:
            raise ConfigError(
                f"Invalid configuration: sampling.num_samples={n} with layer.K={k} — the spatial "
                f"grid has {n}×{n}={n * n} candidates but K−1={k - 1} are needed; raise "
                "sampling.num_samples or lower layer.K."
            )


def _check_path(value: Any, key: str) -> None:
    if value is not None and not Path(str(value)).is_file():
        raise _fail(key, value, "no such file; give the path of an existing checkpoint")


def check_config(cfg: DictConfig) -> None:
    """Cross-field and range checks on the composed config (no data, no model)."""
    _int(cfg, "seed", "", 0)
    _choice(cfg, "criterion", "", CRITERIA)
    _number(cfg, "label_smoothing", "", 0.0, 1.0, closed=False)
    _check_layer(cfg.layer, cfg.sampling)

    d = cfg.dataset
    batch = _int(d, "batch_size", "dataset.", 1)
    _int(d, "num_workers", "dataset.", 0)
    if d.resize is not None:
        _int(d, "resize", "dataset.", 1)
    _number(d, "noise", "dataset.", 0.0, math.inf)
    val = _number(d, "val_split", "dataset.", 0.0, 1.0, closed=False)
    if val <= 0:
        raise _fail(
            "dataset.val_split",
            val,
            "must be in (0, 1): model selection needs a "
            "validation hold-out and never uses the test set",
        )

    o = cfg.optimizer
    if o.lr is None or not isinstance(o.lr, (int, float)) or o.lr <= 0:
        raise _fail("optimizer.lr", o.lr, "must be a positive number")
    if o.weight_decay < 0:
        raise _fail("optimizer.weight_decay", o.weight_decay, "must be ≥ 0")
    if cfg.scheduler.get("interval") not in ("epoch", "step"):
        raise _fail("scheduler.interval", cfg.scheduler.get("interval"), "use epoch or step")

    t = cfg.trainer
    _choice(t, "precision", "trainer.", PRECISIONS)
    _choice(t, "accelerator", "trainer.", ACCELERATORS)
    if t.max_epochs != -1:
        _int(t, "max_epochs", "trainer.", 1)
    _int(t, "num_nodes", "trainer.", 1)
    if t.gradient_clip_val is not None and float(t.gradient_clip_val) < 0:
        raise _fail("trainer.gradient_clip_val", t.gradient_clip_val, "must be ≥ 0 or null")
    world = world_size(t)
    if batch % world:
        raise ConfigError(
            f"Invalid configuration: dataset.batch_size={batch} is the global batch size and "
            f"must be divisible by the world size {world} (trainer.devices × "
            f"trainer.num_nodes); use a multiple of {world}."
        )

    resolve_ckpt_path(cfg.ckpt_path, Path(cfg.paths.output_dir))
    _check_path(cfg.init_from, "init_from")
    if cfg.test_only and cfg.init_from is None and cfg.ckpt_path is None:
        raise _fail("test_only", True, "needs weights to evaluate: set init_from=PATH")
    if cfg.ckpt_path is not None and cfg.init_from is not None:
        raise ConfigError(
            "Invalid configuration: ckpt_path and init_from are both set — ckpt_path resumes "
            "a run (weights, optimizer, epoch), init_from only loads weights; choose one."
        )

    from framework.recipe_checks import check_recipes

    check_recipes(cfg)


def check_layer_fits(net_target: str, layer: Any, dims: tuple[int, int, int]) -> None:
    """The backbone's ``LAYER_ROLE`` must be one the layer can fill, and K ≤ tokens."""
    from models.layer_factory import IncompatibleLayerError

    cls = get_class(net_target)
    role = getattr(cls, "LAYER_ROLE", None)
    if role not in ("2d", "tokens"):
        raise ConfigError(
            f"Invalid configuration: net._target_={net_target} has LAYER_ROLE={role!r}; "
            "backbones must declare LAYER_ROLE = '2d' or 'tokens'."
        )
    try:
        if role == "2d" and not layer.supports_2d:
            layer.conv2d(1, 1)
        if role == "tokens" and not layer.supports_tokens:
            layer.token_mixer(1)
    except IncompatibleLayerError as err:
        raise ConfigError(f"Invalid configuration: {err} (net={cls.__name__}).") from None
    opts = layer.options
    if role == "2d" and layer.sampling.get("type") == "all" and "K" in opts:
        pad = int(opts.get("padding", 0))
        scale = (
            int(opts.get("shuffle_scale", 1)) if opts.get("shuffle_pattern") in ("B", "BA") else 1
        )
        tokens = (dims[1] + 2 * pad) * (dims[2] + 2 * pad) // (scale * scale)
        if int(opts["K"]) > tokens:
            raise ConfigError(
                f"Invalid configuration: layer.K={opts['K']} exceeds the {tokens} candidate "
                f"tokens of a {dims[1]}×{dims[2]} input (padding {pad}); use layer.K ≤ {tokens}."
            )


def resolve_ckpt_path(ckpt_path: Any, run_dir: Path) -> str | None:
    """``last`` → ``<run dir>/checkpoints/last.ckpt``; fails loudly when it is missing."""
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        path = run_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise ConfigError(
                f"Invalid configuration: ckpt_path='last' but {path} does not exist, so there is "
                "nothing to resume (a fresh start would be silent data loss). Set "
                "hydra.run.dir to the directory of the run to resume, or drop ckpt_path."
            )
        return str(path)
    _check_path(ckpt_path, "ckpt_path")
    return str(ckpt_path)
