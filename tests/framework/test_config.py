"""Config composition for every group option, schemas, and start-up validation errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from framework.checks import ConfigError, check_config, validate

from .helpers import CFG_DIR, ROOT, compose_cfg, main_cmd

GROUPS = ["net", "layer", "sampling", "optimizer", "scheduler", "dataset", "trainer", "logger",
          "callbacks", "paths", "experiment", "debug"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CFG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g in GROUPS for o in _options(g)]
)
def test_every_group_option_composes(group: str, option: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"{group}={option}"], out=tmp_path)
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    assert container["paths"]["output_dir"] == str(tmp_path)
    for key in ("net", "layer", "optimizer", "scheduler", "dataset", "trainer"):
        assert key in container


def test_defaults_and_top_level_keys(tmp_path: Path) -> None:
    cfg = compose_cfg([], out=tmp_path)
    assert cfg.layer.name == "convnn" and cfg.dataset.name == "cifar10"
    assert cfg.net._target_ == "models.simple.SimpleNet" and cfg.net._partial_ is True
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.optimizer._partial_ is True
    assert cfg.seed == 0 and cfg.ckpt_path is None and cfg.init_from is None
    assert cfg.test_only is False and cfg.compile is False and cfg.deterministic is False
    assert cfg.criterion == "cross_entropy" and cfg.label_smoothing == 0.0
    assert cfg.trainer.deterministic is False
    assert get_class(cfg.net._target_).LAYER_ROLE == "2d"


def test_defaults_are_the_original_main_py_defaults(tmp_path: Path) -> None:
    """Every key mapped from an original flag defaults to that flag's default."""
    cfg = compose_cfg([], out=tmp_path)
    layer = cfg.layer
    assert (layer.K, layer.padding, layer.magnitude_type) == (9, 1, "cosine")
    assert (layer.similarity_type, layer.aggregation_type) == ("Col", "Col")
    assert layer.lambda_param == 0.5
    assert layer.shuffle_pattern == "NA"
    assert cfg.sampling.sampling_type == "all" and cfg.sampling.num_samples == -1
    assert cfg.sampling.sample_padding == 0
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 1e-6
    assert cfg.scheduler._target_ is None  # --scheduler none
    assert cfg.trainer.max_epochs == 150 and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.trainer.precision == "32-true" and cfg.compile is False
    assert cfg.dataset.batch_size == 256 and cfg.dataset.augment is False
    assert compose_cfg(["scheduler=step"], out=tmp_path).scheduler.step_size == 20
    assert compose_cfg(["scheduler=step"], out=tmp_path).scheduler.gamma == 0.1
    sgd = compose_cfg(["optimizer=sgd"], out=tmp_path).optimizer
    assert sgd.momentum == 0.9 and sgd.lr == 1e-4
    for name in ("convnn_attn", "branching", "branching_attn"):
        assert compose_cfg([f"layer={name}"], out=tmp_path).layer.padding == 1


def test_layer_keys_and_defaults_come_from_the_constructors(tmp_path: Path) -> None:
    """A layer's config keys are exactly its constructors' keywords (one source of truth)."""
    import convnn

    for name in convnn.LAYERS:
        layer = compose_cfg([f"layer={name}"], out=tmp_path).layer
        keys = set(layer) - {"_target_", "name", "sampling"}
        assert keys == set(convnn.layer_options(name)), name
    cfg = compose_cfg(["layer=convnn"], out=tmp_path)
    assert set(cfg.sampling) == set(convnn.SAMPLING_KEYWORDS)
    assert cfg.layer.lambda_param == convnn.layer_options("convnn")["lambda_param"]


@pytest.mark.parametrize("name", _options("dataset"))
def test_every_dataset_shares_the_common_keys(name: str, tmp_path: Path) -> None:
    over = ["dataset.resize=16", "dataset.augment=true", "dataset.batch_size=8",
            "dataset.val_split=0.2", "dataset.noise=0.1", "dataset.pin_memory=false",
            "dataset.num_workers=0", "dataset.download=false", "dataset.root=/x"]
    cfg = compose_cfg([f"dataset={name}", *over], out=tmp_path)
    assert cfg.dataset.resize == 16 and cfg.dataset.batch_size == 8
    dm = instantiate(cfg.dataset, seed=0)
    assert dm.dims[1:] == (16, 16)
    assert dm.num_classes >= 10 or name == "imagenet"


def test_schema_rejects_unknown_keys_and_bad_types(tmp_path: Path) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_cfg(["dataset=fake", "dataset.resise=3"], out=tmp_path)
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["trainer.max_epochs=ten"], out=tmp_path)
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["seed=zero"], out=tmp_path)


def test_experiment_preset_keys_work_with_fake_data(tmp_path: Path) -> None:
    cfg = compose_cfg(["experiment=quickstart", "dataset=fake"], out=tmp_path)
    assert cfg.dataset.name == "fake" and cfg.dataset.batch_size == 64


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["dataset.batch_size=0"], "dataset.batch_size=0"),
        (["dataset.val_split=0"], "dataset.val_split=0"),
        (["trainer.devices=3", "trainer.accelerator=cpu", "dataset.batch_size=64"],
         "world size 3"),
        (["trainer.precision=8-mixed"], "trainer.precision='8-mixed'"),
        (["criterion=hinge"], "criterion='hinge'"),
        (["test_only=true"], "test_only"),
        (["init_from=/nope.ckpt"], "init_from='/nope.ckpt'"),
    ],
)
def test_check_config_messages(overrides: list[str], needle: str, tmp_path: Path) -> None:
    cfg = compose_cfg(["dataset=digits", *overrides], out=tmp_path)
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert needle in str(err.value)


def test_probe_names_the_stage_where_k_does_not_fit(tmp_path: Path) -> None:
    """K is checked against every stage's real map, not only the input (VGG's last is 2×2)."""
    cfg = compose_cfg(["net=vgg11", "layer=convnn", "layer.padding=0", "dataset=fake"],
                      out=tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    assert "layer.K=9 is too large" in text and "layer.padding=0" in text
    assert "`features.22` (Conv2dNN) on a 512×2×2 input" in text
    validate(compose_cfg(["net=vgg11", "layer=convnn", "dataset=fake"], out=tmp_path))


def test_incompatible_layer_names_the_layers_that_fit(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"layer=kvt cannot be used in a CNN.*'conv'"):
        validate(compose_cfg(["layer=kvt", "dataset=fake"], out=tmp_path))


# ---------------------------------------------------------- error exits of the real entry point
ERRORS = {
    "typo_key": (["optimizer.lrr=0.1"], "optimizer.lrr"),
    "lr_not_a_number": (["optimizer.lr=abc"], "optimizer.lr"),
    "k_zero": (["layer=convnn", "layer.K=0"], "layer.K=0"),
    "magnitude": (["layer=convnn", "layer.magnitude_type=manhattan"], "manhattan"),
    "random_too_few": (["layer=convnn", "sampling=random", "sampling.num_samples=3"],
                       "sampling.num_samples=3"),
    "batch_zero": (["dataset.batch_size=0"], "dataset.batch_size=0"),
    "missing_root": (["dataset=cifar10", "dataset.root=/definitely/missing"],
                     "/definitely/missing/cifar-10-batches-py"),
    "missing_ckpt": (["ckpt_path=/no/such/file.ckpt"], "ckpt_path='/no/such/file.ckpt'"),
    "last_missing": (["ckpt_path=last"], "last.ckpt does not exist"),
    "incompatible": (["layer=kvt"], "layers that fit are"),
}


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """Start every bad command at once (they exit within seconds) and collect the outcomes."""
    base = tmp_path_factory.mktemp("errors")
    procs = {}
    for name, (overrides, _) in ERRORS.items():
        args = ["dataset=digits", "trainer=cpu", *overrides, f"hydra.run.dir={base / name}"]
        procs[name] = subprocess.Popen(
            main_cmd(*args), cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
    return {name: (p.wait(timeout=300), p.communicate()[0]) for name, p in procs.items()}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_input_exits_cleanly(name: str, error_runs: dict[str, tuple[int, str]]) -> None:
    rc, output = error_runs[name]
    assert rc != 0, output
    assert ERRORS[name][1] in output, output
    assert "Traceback" not in output, output


@pytest.mark.parametrize("launcher", ["slurm", "local"])
def test_submitit_launchers_follow_the_trainer(launcher: str, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CFG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"hydra/launcher={launcher}", "trainer=ddp", "trainer.devices=4",
                       "trainer.num_nodes=3", f"paths.output_dir={tmp_path}"],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.hydra_submitit_launcher")
    assert cfg.hydra.launcher.nodes == 3
    if launcher == "slurm":
        assert cfg.hydra.launcher.tasks_per_node == 4 and cfg.hydra.launcher.gpus_per_node == 4
