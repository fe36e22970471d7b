"""Start-up validation: everything a user can set is checked before any data, logger, run-directory
file or checkpoint is touched.

:func:`check_config` runs the value checks that need no model (ranges, choices, metrics, files).
:func:`validate` then builds the network and runs a one-sample shape probe, so every layer sees
its real input size: a layer that does not fit its stage fails here, with the config keys named,
instead of at the first training step. Only our own validation errors become :class:`ConfigError`;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from convnn import ConvNNBase
from datamodules.base import BaseDataModule
from framework.build import (
    build_datamodule,
    build_layer,
    build_module,
    build_net,
    net_name,
    user_error,
)
from framework.callbacks import RunIds, build_callbacks
from framework.checkpoints import (
    LoadedCheckpoint,
    read_checkpoint,
    read_weights_source,
    unreadable,
)
from framework.construct import Batches, build_trainer, check_data, check_optimization, in_multirun
from framework.errors import ConfigError
from framework.faults import trainer_kwargs
from framework.lifecycle import completed
from framework.loggers import build_loggers, run_name
from framework.resume import check_resume
from framework.rules import check_effect, check_network_effect, check_numbers, check_ranges
from framework.sizing import SizeEstimate, activation_bytes, check_size, meta_count
from models.layer_factory import LayerFactory
from models.module import COMPILE_MODES, CRITERIA, LOGGED_METRICS, ImageClassifier

__all__ = [
    "ConfigError",
    "Startup",
    "check_checkpoint",
    "check_config",
    "probe",
    "resolve_ckpt_path",
    "validate",
    "world_size",
]

log = logging.getLogger(__name__)

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
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
SEED_MAX = 2**32 - 1  # numpy's seed range, which seed_everything must fit


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"Invalid configuration: {key}={value!r} — {allowed}.")


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not (isinstance(value, float) and math.isnan(value))
    )


def _int(node: Any, key: str, prefix: str, low: int | None = None, high: int | None = None) -> int:
    value = node[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"{prefix}{key}", value, "expected an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"≥ {low}" if high is None else f"in [{low}, {high}]"
        raise _fail(f"{prefix}{key}", value, f"must be an integer {bounds}")
    return value


def _number(
    node: Any,
    key: str,
    prefix: str,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    value = node[key]
    if not _is_number(value):
        raise _fail(f"{prefix}{key}", value, "expected a number")
    ok = (low < value if low_open else low <= value) and (
        value < high if high_open else value <= high
    )
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise _fail(f"{prefix}{key}", value, f"must be in {left}{low}, {high}{right}")
    return float(value)


def _choice(node: Any, key: str, prefix: str, choices: tuple[str, ...]) -> str:
    value = node[key]
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
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.device_count() * nodes
    return nodes


# ------------------------------------------------------------------------------ value checks
def _check_dataset(d: Any) -> int:
    p = "dataset."
    batch = _int(d, "batch_size", p, 1)
    _int(d, "num_workers", p, 0)
    if d.get("prefetch_factor") is not None:
        _int(d, "prefetch_factor", p, 1)
    if d.resize is not None:
        _int(d, "resize", p, 1)
    _number(d, "noise", p, 0.0, math.inf)
    val = d.val_split
    if not _is_number(val) or not 0 < val < 1:
        raise _fail(
            "dataset.val_split",
            val,
            "must be in (0, 1): model selection needs a validation hold-out and never uses the "
            "test set",
        )
    if "test_split" in d:
        _number(d, "test_split", p, 0.0, 1.0, low_open=True, high_open=True)
        if d.val_split + d.test_split >= 1:
            raise ConfigError(
                f"Invalid configuration: dataset.val_split={d.val_split} + dataset.test_split="
                f"{d.test_split} leaves no training data; keep their sum below 1."
            )
    if "num_classes" in d:
        _int(d, "num_classes", p, 2)
    for key in ("train_size", "test_size", "channels", "image_size"):
        if key in d:
            _int(d, key, p, 1)
    return batch


def _check_optimizer(o: Any) -> None:
    p = "optimizer."
    if not _is_number(o.lr) or o.lr <= 0:
        raise _fail("optimizer.lr", o.lr, "must be a positive number")
    _number(o, "weight_decay", p, 0.0, math.inf)
    if "mask_lr_ratio" in o:
        _number(o, "mask_lr_ratio", p, 0.0, math.inf, low_open=True, high_open=True)
    if "betas" in o:
        betas = list(o.betas)
        if len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas):
            raise _fail("optimizer.betas", betas, "must be two numbers in [0, 1)")
    if "eps" in o:
        _number(o, "eps", p, 0.0, math.inf, low_open=True)
    if "momentum" in o:
        if o.nesterov and (o.momentum <= 0 or o.dampening != 0):
            raise ConfigError(
                f"Invalid configuration: optimizer.nesterov=true needs optimizer.momentum > 0 "
                f"and optimizer.dampening=0 (got {o.momentum} and {o.dampening})."
            )


def _check_scheduler(s: Any) -> None:
    p = "scheduler."
    _choice(s, "interval", p, ("epoch", "step"))
    if "step_size" in s:
        _int(s, "step_size", p, 1)
    if "gamma" in s:
        _number(s, "gamma", p, 0.0, math.inf, low_open=True)
    if "T_max" in s:
        _int(s, "T_max", p, 1)
    if "eta_min" in s:
        _number(s, "eta_min", p, 0.0, math.inf)
    if "warmup_epochs" in s:
        _number(s, "warmup_epochs", p, 0.0, math.inf)
    if "min_lr_ratio" in s:
        _number(s, "min_lr_ratio", p, 0.0, 1.0)
    if "factor" in s:
        _number(s, "factor", p, 0.0, 1.0, low_open=True, high_open=True)
    if "patience" in s:
        _int(s, "patience", p, 0)
    if "mode" in s:
        mode = _choice(s, "mode", p, ("min", "max"))
        monitor = s.monitor
        if monitor not in LOGGED_METRICS:
            raise _fail(
                "scheduler.monitor",
                monitor,
                f"must be a metric the module logs: {', '.join(LOGGED_METRICS)}",
            )
        wanted = "min" if str(monitor).endswith("loss") else "max"
        if mode != wanted:
            raise ConfigError(
                f"Invalid configuration: scheduler.mode={mode!r} with scheduler.monitor="
                f"{monitor!r} would reduce the lr while the metric improves; use mode={wanted}."
            )
    elif s.get("monitor") is not None and s.monitor not in LOGGED_METRICS:
        raise _fail("scheduler.monitor", s.monitor, f"must be one of {', '.join(LOGGED_METRICS)}")


def _check_trainer(t: Any, batch: int) -> None:
    p = "trainer."
    _choice(t, "precision", p, PRECISIONS)
    _choice(t, "accelerator", p, ACCELERATORS)
    if t.max_epochs != -1:
        _int(t, "max_epochs", p, 1)
    _int(t, "num_nodes", p, 1)
    _int(t, "accumulate_grad_batches", p, 1)
    _int(t, "check_val_every_n_epoch", p, 1)
    _int(t, "log_every_n_steps", p, 1)
    if t.gradient_clip_val is not None:
        _number(t, "gradient_clip_val", p, 0.0, math.inf)
    _choice(t, "gradient_clip_algorithm", p, ("norm", "value"))
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        value = t[key]
        if value is None:
            continue
        if isinstance(value, bool) or not (
            (isinstance(value, int) and value >= 0)
            or (isinstance(value, float) and 0.0 <= value <= 1.0)
        ):
            raise _fail(
                f"trainer.{key}", value, "must be a batch count ≥ 0 or a fraction in [0.0, 1.0]"
            )
    devices = t.devices
    if (isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices)) and not len(devices):
        raise _fail("trainer.devices", [], "must list at least one device (or be ≥ 1 or 'auto')")
    if isinstance(devices, int) and not isinstance(devices, bool) and devices < 1 and devices != -1:
        raise _fail("trainer.devices", devices, "must be ≥ 1, -1 (all), 'auto' or a list")
    world = world_size(t)
    if batch % world:
        raise ConfigError(
            f"Invalid configuration: dataset.batch_size={batch} is the global batch size and "
            f"must be divisible by the world size {world} (trainer.devices × "
            f"trainer.num_nodes); use a multiple of {world}."
        )


def _check_wandb(cfg: DictConfig) -> None:
    """An online W&B logger needs credentials; without them wandb would prompt or crash later."""
    for lcfg in (cfg.logger or {}).values():
        if lcfg is None or "Wandb" not in str(lcfg.get("_target_", "")):
            continue
        offline = bool(lcfg.get("offline", False)) or os.environ.get("WANDB_MODE") in (
            "offline",
            "disabled",
            "dryrun",
        )
        if offline or os.environ.get("WANDB_API_KEY"):
            return
        netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
            return
        raise ConfigError(
            "Invalid configuration: logger=wandb is online but no W&B credentials were found "
            "(WANDB_API_KEY unset, no api.wandb.ai entry in ~/.netrc). Run `wandb login`, set "
            "WANDB_API_KEY, or log offline with logger.wandb.offline=true (sync later with "
            "`wandb sync`)."
        )


def _check_unknown_keys(node: Any, prefix: str = "") -> None:
    """Keys a schema does not declare (``+typo=...`` bypasses Hydra's struct check) are errors."""
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        known = {f.name for f in dataclasses.fields(schema)}
        for key in node:
            if key not in known:
                raise ConfigError(
                    f"Invalid configuration: {prefix}{key} is not a key of "
                    f"{prefix.rstrip('.') or 'the root config'}; valid keys are "
                    f"{', '.join(sorted(k for k in known if not k.startswith('_')))}."
                )
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            _check_unknown_keys(child, f"{prefix}{key}.")


def check_config(cfg: DictConfig) -> None:
    """Value checks on the composed config that need no model (ranges, choices, files)."""
    _check_unknown_keys(cfg)
    check_numbers(cfg)  # every float finite, every int within 64 bits
    _int(cfg, "seed", "", 0, SEED_MAX)
    _choice(cfg, "criterion", "", CRITERIA)
    _choice(cfg, "compile_mode", "", COMPILE_MODES)
    _number(cfg, "label_smoothing", "", 0.0, 1.0, high_open=True)
    batch = _check_dataset(cfg.dataset)
    _check_optimizer(cfg.optimizer)
    _check_scheduler(cfg.scheduler)
    _check_trainer(cfg.trainer, batch)
    _check_wandb(cfg)

    resolve_ckpt_path(cfg.ckpt_path, Path(cfg.paths.output_dir))
    if cfg.init_from is None or not Path(str(cfg.init_from)).is_dir():  # or an exported network
        _check_path(cfg.init_from, "init_from")
    if cfg.test_only and cfg.init_from is None and cfg.ckpt_path is None:
        raise _fail("test_only", True, "needs weights to evaluate: set init_from=PATH")
    if cfg.ckpt_path is not None and cfg.init_from is not None:
        raise ConfigError(
            "Invalid configuration: ckpt_path and init_from are both set — ckpt_path resumes "
            "a run (weights, optimizer, epoch), init_from only loads weights; choose one."
        )
    _check_recipes(cfg)
    check_ranges(cfg)  # rates and bounds declared in framework.rules.RANGES
    check_effect(cfg, in_multirun())  # options the composed config would ignore


# ------------------------------------------------------------------------ recipe checks
ANALYSES = ("none", "neighbours")
AUTO_AUGMENTS = (None, "randaugment", "trivialaugment")


def _check_recipes(cfg: DictConfig) -> None:
    """``analysis``, ``ema`` and the dataset augmentation keys."""
    a = cfg.get("analysis")
    if a:
        name = a.get("name", "none")
        if name not in ANALYSES:
            raise _fail("analysis.name", name, f"allowed values are {', '.join(ANALYSES)}")
        if name == "neighbours":
            _int(a, "num_images", "analysis.", 1)
            _int(a, "num_queries", "analysis.", 1)
            _int(a, "seed", "analysis.", 0)

    e = cfg.get("ema")
    if e and e.get("enabled", False):
        _int(e, "update_every_n_steps", "ema.", 1)
        if e.get("update_starting_at_step") is not None:
            _int(e, "update_starting_at_step", "ema.", 0)

    d = cfg.dataset
    aa = d.get("auto_augment")
    if aa not in AUTO_AUGMENTS:
        allowed = "allowed values are null, randaugment, trivialaugment"
        raise _fail("dataset.auto_augment", aa, allowed)
    bounds = (("random_erasing", 1.0), ("mixup_alpha", math.inf), ("cutmix_alpha", math.inf))
    for key, high in bounds:
        if d.get(key) is not None:
            _number(d, key, "dataset.", 0.0, high)


def _check_path(value: Any, key: str) -> None:
    if value is not None and not Path(str(value)).is_file():
        raise _fail(key, value, "no such file; give the path of an existing checkpoint")


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


# --------------------------------------------------------------------------------- the probe
def _shape(x: Any) -> str:
    return "×".join(map(str, x.shape[1:])) if isinstance(x, Tensor) else type(x).__name__


def probe(net: nn.Module, dims: tuple[int, int, int], cfg: DictConfig) -> dict[str, tuple]:
    """Run one sample through ``net`` (eval, no grad); a layer that rejects its input size raises
    :class:`ConfigError` naming the module path, its input shape and the config keys.

    Returns the input shape each ConvNN layer saw (module path → shape without the batch).
    """
    stack: list[tuple[str, nn.Module, Any]] = []
    seen: dict[str, tuple] = {}
    handles = []

    def pre(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            stack.append((name, module, x))
            if isinstance(module, ConvNNBase) and isinstance(x, Tensor):
                seen[name] = tuple(x.shape[1:])

        return hook

    def post(module: nn.Module, args: tuple, out: Any) -> None:
        stack.pop()

    for name, module in net.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(pre(name)))
            handles.append(module.register_forward_hook(post))
    was_training = net.training
    net.eval()
    x = torch.randn(1, *dims, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            net(x)
    except ValueError as err:
        where = ""
        if stack:
            name, module, inp = stack[-1]
            where = f"; in `{name}` ({type(module).__name__}) on a {_shape(inp)} input"
        raise user_error(cfg, err, where) from None
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    return seen


def _warn_sampling_fallback(net: nn.Module, seen: dict[str, tuple], cfg: DictConfig) -> None:
    """``sampling.num_samples`` at least the tokens of a layer means ``all`` there: say so once."""
    for name, module in net.named_modules():
        if not isinstance(module, ConvNNBase) or name not in seen:
            continue
        kind = module.sampling_type
        spatial = [s + 2 * module.padding for s in seen[name][1:]]
        if module.unshuffle_before:
            spatial = [s // module.shuffle_scale for s in seen[name][1:]]
            spatial = [s + 2 * module.padding for s in spatial]
        tokens = math.prod(spatial)
        n = module.num_samples
        if (kind == "random" and n >= tokens) or (kind == "spatial" and n >= min(spatial)):
            log.warning(
                "sampling.num_samples=%d covers every candidate of `%s` (%s map, %d tokens): "
                "sampling=%s behaves like sampling=all there.",
                n,
                name,
                "×".join(map(str, spatial)),
                tokens,
                kind,
            )


# -------------------------------------------------------------------------------- checkpoints
def check_checkpoint(
    checkpoint: LoadedCheckpoint, net: nn.Module, name: str, *, strict: bool
) -> None:
    """Check that the checkpoint read at start-up holds weights for ``net`` (network ``name``).

    ``strict``: every tensor of the module must be present with the same shape (resume,
    ``test_only``); otherwise at least one must match (``init_from`` fine-tuning).
    """
    key, path = checkpoint.key, checkpoint.path
    state = checkpoint.state_dict
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise unreadable(key, path, "it holds no state dict of tensors")
    own = {f"net.{k}": v for k, v in net.state_dict().items()}
    missing = [k for k in own if k not in state]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    matching = len(own) - len(missing) - len(mismatched)
    if (strict and (missing or mismatched)) or matching == 0:
        bad = [f"{k} (missing)" for k in missing] + [
            f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched
        ]
        shown = "; ".join(bad[:5]) + ("; …" if len(bad) > 5 else "")
        raise ConfigError(
            f"Invalid configuration: {key}={path} was written for another network than "
            f"net={name} with this layer config: {len(bad) or len(own)} weights differ "
            f"({shown or 'no weight matches'}). Use the net/layer overrides of the run that "
            "wrote it."
        )


# --------------------------------------------------------------------------------- start-up
@dataclass
class Startup:
    """What validation built and checked, reused by the run (nothing is built twice)."""

    datamodule: BaseDataModule
    layer: LayerFactory
    net: nn.Module
    ckpt_path: str | None
    checkpoint: LoadedCheckpoint | None = None  # ckpt_path, read once
    init: LoadedCheckpoint | None = None  # init_from, read once
    trainer: pl.Trainer | None = None
    module: ImageClassifier | None = None
    batches: Batches | None = None
    size: SizeEstimate | None = None
    loggers: list[Logger] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)
    #: Why a resumed run is already complete (``None``: it trains).
    complete: str | None = None


CONTINUOUS_LAYERS = ("ckconv", "flexconv")


def _check_kernel(cfg: DictConfig, dims: tuple[int, int, int]) -> None:
    """A kernel wider than ``2·max(H, W) − 1`` has weights that only ever see zero padding,
    on every map of the network (no map is larger than the input). Continuous kernels
    (ckconv, flexconv) are exempt: their size costs no parameters, and CCNN's 33 is their
    default on every dataset."""
    if cfg.layer.get("name") in CONTINUOUS_LAYERS:
        return
    k = cfg.layer.get("kernel_size")
    largest = max(dims[1:])
    if isinstance(k, int) and k > 2 * largest - 1:
        raise ConfigError(
            f"Invalid configuration: layer.kernel_size={k} is larger than any map it convolves "
            f"(the input is {dims[1]}×{dims[2]}): weights beyond {2 * largest - 1}×"
            f"{2 * largest - 1} only ever multiply zero padding. Use layer.kernel_size ≤ "
            f"{2 * largest - 1}."
        )


def _run_ids(checkpoint: LoadedCheckpoint | None) -> dict[str, str]:
    """Logger run ids stored in the checkpoint being resumed (the W&B run it continues)."""
    if checkpoint is None:
        return {}
    state = checkpoint.data.get("callbacks", {}).get(RunIds.KEY)
    return dict(state.get("ids", {})) if isinstance(state, dict) else {}


def validate(cfg: DictConfig) -> Startup:
    """All start-up checks, in order of cost: values; the checkpoint to resume; the Trainer with
    its loggers and callbacks (constructed, nothing written); the data splits; the network
    (counted on the meta device, then built and probed); the optimizer and scheduler; the
    weights to load. What is built here is what the run uses.

    Seeds before the network is built, so its initial weights are the seed's.
    """
    check_config(cfg)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, Path(cfg.paths.output_dir))
    trust = bool(cfg.trust_checkpoint)
    checkpoint = init = None
    complete = None
    if ckpt_path is not None:
        checkpoint = read_checkpoint(ckpt_path, "ckpt_path", trust=trust)
        check_resume(cfg, checkpoint)  # the same run's config
        if not cfg.test_only:
            complete = completed(checkpoint.data, cfg)
    datamodule = build_datamodule(cfg)
    layer = build_layer(cfg)
    datamodule.check_available()
    run_dir = Path(cfg.paths.output_dir).resolve()
    ids = _run_ids(checkpoint)
    loggers = build_loggers(cfg, run_dir, ids)
    callbacks = build_callbacks(
        cfg, run_dir, ids, has_logger=bool(loggers), title=run_name(cfg)
    )
    # Lightning gets the start-up checkpoint from the checkpoint IO, not by reading it again
    trainer = build_trainer(
        cfg, logger=loggers or False, callbacks=callbacks, **trainer_kwargs(cfg, checkpoint)
    )
    batches = check_data(cfg, datamodule, trainer, train=complete is None and not cfg.test_only)
    dims, classes = datamodule.dims, datamodule.num_classes
    _check_kernel(cfg, dims)
    device = trainer.strategy.root_device
    params = meta_count(lambda: build_net(cfg, layer, dims, classes))
    if params is not None:
        check_size(cfg, params, device)  # before the weights take any memory
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    net = build_net(cfg, layer, dims, classes)
    seen = probe(net, dims, cfg)
    _warn_sampling_fallback(net, seen, cfg)
    check_network_effect(cfg, net, in_multirun())
    per_device = max(1, datamodule.batch_size // max(1, trainer.world_size))
    params = sum(p.numel() for p in net.parameters())
    size = check_size(cfg, params, device, activation_bytes(net, dims), per_device)
    log.info("Size: %s", size.describe())
    module = build_module(cfg, net, classes)
    check_optimization(module, cfg, None if cfg.test_only else batches)
    name = net_name(cfg)
    if checkpoint is not None:
        check_checkpoint(checkpoint, net, name, strict=True)
    if cfg.init_from is not None:
        init = read_weights_source(str(cfg.init_from), "init_from", trust=trust)
        check_checkpoint(init, net, name, strict=bool(cfg.test_only))
    log.info("Config checked: %s built and probed on a %s input", name, dims)
    return Startup(
        datamodule=datamodule,
        layer=layer,
        net=net,
        ckpt_path=ckpt_path,
        checkpoint=checkpoint,
        init=init,
        trainer=trainer,
        module=module,
        batches=batches,
        size=size,
        loggers=loggers,
        ids=ids,
        complete=complete,
    )
