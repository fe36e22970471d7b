"""The bad-configuration matrix: every case exits 1 with a one-paragraph message naming the key,
no traceback, and before the run directory gets ``model.txt`` (nothing expensive was built).

All cases run through the real ``main.py`` entry point in one helper interpreter
(``tests/framework/jobs.py``) so that torch is imported once, not once per case.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import ROOT

BASE = ["dataset=digits", "trainer=cpu", "logger=none", "trainer.max_epochs=1"]
FAKE = ["dataset=fake", "dataset.batch_size=4", "dataset.train_size=16", "dataset.test_size=8"]

# name: (overrides, text the message must contain)
CASES: dict[str, tuple[list[str], str]] = {
    # typed schemas, at compose time
    "k_not_int": (["layer.K=abc"], "layer.K"),
    "typo_key": (["optimizer.lrr=0.1"], "optimizer.lrr"),
    "lr_not_number": (["optimizer.lr=abc"], "optimizer.lr"),
    "plus_optimizer_key": (["+optimizer.foo=1"], "foo"),
    "plus_root_key": (["+learning_rate=1"], "learning_rate"),
    "plus_layer_key": (["+layer.kernel=3"], "kernel"),
    "net_dim_not_int": (["net=vit_tiny", "net.dim=abc"], "net.dim"),
    "num_samples_not_int": (["sampling.num_samples=x"], "sampling.num_samples"),
    "dataset_typo": (["dataset.resise=3"], "resise"),
    "epochs_not_int": (["trainer.max_epochs=ten"], "trainer.max_epochs"),
    "seed_not_int": (["seed=zero"], "seed"),
    "padding_float": (["layer.padding=1.5"], "layer.padding"),
    "channels_not_ints": (["net.channels=[a,b]"], "net.channels"),
    "unknown_layer": (["layer=nope"], "nope"),
    "old_sampling_key": (["sampling.type=random"], "sampling.type"),
    # values
    "seed_negative": (["seed=-1"], "seed=-1"),
    "seed_too_large": (["seed=4294967296"], "seed=4294967296"),
    "criterion": (["criterion=hinge"], "criterion='hinge'"),
    "label_smoothing": (["label_smoothing=1.0"], "label_smoothing=1.0"),
    "batch_zero": (["dataset.batch_size=0"], "dataset.batch_size=0"),
    "val_split_zero": (["dataset.val_split=0"], "dataset.val_split=0"),
    "val_split_large": (["dataset.val_split=1.5"], "dataset.val_split=1.5"),
    "test_split_zero": (["dataset.test_split=0"], "dataset.test_split=0"),
    "test_split_one": (["dataset.test_split=1.0"], "dataset.test_split=1.0"),
    "splits_sum": (["dataset.test_split=0.5", "dataset.val_split=0.6"], "dataset.val_split=0.6"),
    "num_classes_one": ([*FAKE, "dataset.num_classes=1"], "dataset.num_classes=1"),
    "train_size_zero": ([*FAKE, "dataset.train_size=0"], "dataset.train_size=0"),
    "workers_negative": (["dataset.num_workers=-1"], "dataset.num_workers=-1"),
    "noise_negative": (["dataset.noise=-0.1"], "dataset.noise=-0.1"),
    "resize_zero": (["dataset.resize=0"], "dataset.resize=0"),
    "lr_zero": (["optimizer.lr=0"], "optimizer.lr=0"),
    "weight_decay_negative": (["optimizer.weight_decay=-1"], "optimizer.weight_decay=-1"),
    "betas_above_one": (["optimizer.betas=[2.0,0.999]"], "optimizer.betas=[2.0, 0.999]"),
    "betas_one_value": (["optimizer.betas=[0.9]"], "optimizer.betas=[0.9]"),
    "eps_zero": (["optimizer.eps=0"], "optimizer.eps=0"),
    "momentum_negative": (["optimizer=sgd", "optimizer.momentum=-0.5"], "optimizer.momentum"),
    "nesterov_no_momentum": (
        ["optimizer=sgd", "optimizer.nesterov=true", "optimizer.momentum=0"],
        "optimizer.nesterov",
    ),
    "step_size_zero": (["scheduler=step", "scheduler.step_size=0"], "scheduler.step_size=0"),
    "gamma_zero": (["scheduler=step", "scheduler.gamma=0"], "scheduler.gamma=0"),
    "warmup_negative": (
        ["scheduler=warmup_cosine", "scheduler.warmup_epochs=-1"],
        "scheduler.warmup_epochs=-1",
    ),
    "min_lr_ratio": (
        ["scheduler=warmup_cosine", "scheduler.min_lr_ratio=1.5"],
        "scheduler.min_lr_ratio=1.5",
    ),
    "plateau_monitor": (["scheduler=plateau", "scheduler.monitor=val/acc"], "scheduler.monitor"),
    "plateau_mode": (["scheduler=plateau", "scheduler.monitor=val/loss"], "scheduler.mode"),
    "plateau_factor": (["scheduler=plateau", "scheduler.factor=1.0"], "scheduler.factor=1.0"),
    "interval": (["scheduler.interval=batch"], "scheduler.interval='batch'"),
    "t_max_zero": (["scheduler=cosine", "scheduler.T_max=0"], "scheduler.T_max=0"),
    "accumulate_zero": (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches"),
    "clip_not_number": (["trainer.gradient_clip_val=abc"], "trainer.gradient_clip_val='abc'"),
    "clip_negative": (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1"),
    "precision": (["trainer.precision=8-mixed"], "trainer.precision='8-mixed'"),
    "accelerator": (["trainer.accelerator=quantum"], "trainer.accelerator='quantum'"),
    "epochs_zero": (["trainer.max_epochs=0"], "trainer.max_epochs=0"),
    "world_size": (["trainer.devices=3", "dataset.batch_size=64"], "world size 3"),
    "devices_zero": (["trainer.devices=0"], "trainer.devices=0"),
    "limit_fraction": (["trainer.limit_train_batches=1.5"], "trainer.limit_train_batches=1.5"),
    "log_every_zero": (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0"),
    # layers, checked by building them
    "k_zero": (["layer=convnn", "layer.K=0"], "layer.K=0"),
    "magnitude": (["layer=convnn", "layer.magnitude_type=manhattan"], "layer.magnitude_type"),
    "similarity": (["layer=convnn", "layer.similarity_type=Pos"], "layer.similarity_type"),
    "aggregation": (["layer=convnn", "layer.aggregation_type=Loc"], "layer.aggregation_type"),
    "lambda": (["layer=convnn", "layer.lambda_param=2"], "layer.lambda_param=2"),
    "padding_negative": (["layer=convnn", "layer.padding=-1"], "layer.padding=-1"),
    "shuffle_pattern": (["layer=convnn", "layer.shuffle_pattern=X"], "layer.shuffle_pattern"),
    "shuffle_scale_zero": (["layer=convnn", "layer.shuffle_scale=0"], "layer.shuffle_scale=0"),
    "shuffle_not_divisible": (
        ["layer=convnn", "layer.shuffle_pattern=BA", "layer.shuffle_scale=3"],
        "layer.shuffle_scale=3",
    ),
    "random_too_few": (
        ["layer=convnn", "sampling=random", "sampling.num_samples=3"],
        "sampling.num_samples=3",
    ),
    "spatial_zero": (["layer=convnn", "sampling=spatial", "sampling.num_samples=0"],
                     "sampling.num_samples=0"),
    "sampling_type": (["layer=convnn", "sampling.sampling_type=grid"], "sampling.sampling_type"),
    "eval_sampling": (["layer=convnn", "sampling.eval_sampling=sometimes"],
                      "sampling.eval_sampling"),
    "sample_padding": (
        ["layer=convnn", "sampling=spatial", "sampling.num_samples=3",
         "sampling.sample_padding=5"],
        "sampling.sample_padding=5",
    ),
    "heads_not_dividing": (["layer=convnn_attn", "layer.num_heads=3"], "layer.num_heads=3"),
    "convolution_type": (["layer=convnn_attn", "layer.convolution_type=grouped"],
                         "layer.convolution_type"),
    "attention_dropout": (["layer=convnn_attn", "layer.attention_dropout=1.0"],
                          "layer.attention_dropout=1.0"),
    "branch_ratio": (["layer=branching", "layer.branch_ratio=1.5"], "layer.branch_ratio=1.5"),
    "branch_ratio_empty": (["layer=branching", "layer.branch_ratio=0.01"],
                           "layer.branch_ratio=0.01"),
    "kernel_even": (["layer=conv", "layer.kernel_size=4"], "layer.kernel_size=4"),
    "incompatible": (["layer=kvt"], "layers that fit are"),
    "ccnn_same_on_even_map": (["layer=flexconv", "layer.kernel_size=same"],
                              "layer.kernel_size='same' takes the map width 8"),
    "ccnn_kernel_even": (["layer=ckconv", "layer.kernel_size=4"], "layer.kernel_size=4"),
    "ccnn_mask_threshold": (["layer=flexconv", "layer.mask_threshold=1.5"],
                            "layer.mask_threshold=1.5"),
    "ccnn_kernel_layers": (["layer=ckconv", "layer.kernel_no_layers=0"],
                           "layer.kernel_no_layers=0"),
    "mask_lr_ratio_zero": (["optimizer.mask_lr_ratio=0"], "optimizer.mask_lr_ratio=0"),
    "k_too_large_at_stage": (
        ["net=vgg11", "layer=convnn", "layer.padding=0", *FAKE], "layer.K=9 is too large"
    ),
    "k_too_large_input": (["layer=convnn", "layer.K=101"], "layer.K=101"),
    # networks
    "vit_dim_zero": (["net=vit_tiny", "net.dim=0", *FAKE], "net.dim=0"),
    "vit_patch": (["net=vit_tiny", "net.patch_size=5", *FAKE], "net.patch_size=5"),
    "vit_depth_zero": (["net=vit_tiny", "net.depth=0", *FAKE], "net.depth=0"),
    "vit_mlp_zero": (["net=vit_tiny", "net.mlp_dim=0", *FAKE], "net.mlp_dim=0"),
    "vgg_depth": (["net=vgg11", "net.depth=12", *FAKE], "net.depth=12"),
    "vgg_head": (["net=vgg11", "net.head=x", *FAKE], "net.head='x'"),
    "resnet_stem": (["net=resnet18", "net.stem=x", *FAKE], "net.stem='x'"),
    "resnet_variant": (["net=resnet34", "net.variant=x", *FAKE], "net.variant='x'"),
    "simple_layers": (["net.num_layers=9"], "net.num_layers=9"),
    "simple_dropout": (["net.dropout=1.5"], "net.dropout=1.5"),
    "simple_width_zero": (["net.channels=[0,8]", "net.num_layers=2"], "net.channels"),
    "ccnn_downsampling": (["net=ccnn", "net.downsampling=[7]"], "net.downsampling=[7]"),
    "convnext_norm": (["net=convnext_mini", "net.layer_norm=x", *FAKE], "net.layer_norm='x'"),
    "window_zero": (["net=vit_tiny", "layer=local_attention", "layer.window_size=0", *FAKE],
                    "layer.window_size=0"),
    "sparse_pattern": (["net=vit_tiny", "layer=sparse_attention", "layer.pattern=zigzag", *FAKE],
                       "layer.pattern='zigzag'"),
    # the kNN peers (digits: 8×8 maps)
    "vig_r_not_dividing": (["layer=vig", "layer.kernel_size=4", "layer.r=3"], "layer.r=3"),
    "vig_k_too_large": (["layer=vig", "layer.kernel_size=65"], "layer.kernel_size=65"),
    "vig_conv": (["layer=vig", "layer.conv=gat"], "layer.conv='gat'"),
    "vig_ti_grid": (["net=vig_ti", *FAKE, "net.stem_stride=16"], "net.k=9"),
    "patch_knn_k_gt_dictionary": (["net=patch_knn", "net.k=2000"], "net.k=2000"),
    "patch_knn_clusters_gt_patches": (["net=patch_knn", "net.n_patches=100"],
                                      "net.n_clusters=1024"),
    "patch_knn_whitening": (["net=patch_knn", "net.whitening=pcaa"], "net.whitening='pcaa'"),
    # checkpoints and data
    "ckpt_missing": (["ckpt_path=/no/such/file.ckpt"], "ckpt_path='/no/such/file.ckpt'"),
    "ckpt_last_missing": (["ckpt_path=last"], "last.ckpt does not exist"),
    "init_missing": (["init_from=/nope.ckpt"], "init_from='/nope.ckpt'"),
    "test_only_no_weights": (["test_only=true"], "test_only"),
    "ckpt_and_init": (["ckpt_path={good}", "init_from={good}"], "ckpt_path and init_from"),
    "init_truncated": (["init_from={truncated}"], "init_from="),
    "init_not_checkpoint": (["init_from={text}"], "init_from="),
    "ckpt_other_network": (["ckpt_path={other}"], "ckpt_path="),
    "test_only_other_network": (["test_only=true", "init_from={other}"], "init_from="),
    "init_export_dir_without_weights": (["init_from={folder}"], "without model.safetensors"),
    # a checkpoint whose unpickling would run code: refused before any of it runs
    "ckpt_malicious": (["ckpt_path={evil}"], "trust_checkpoint=true"),
    "init_malicious": (["init_from={evil}"], "trust_checkpoint=true"),
    "test_only_malicious": (["test_only=true", "init_from={evil}"], "trust_checkpoint=true"),
    "data_missing": (["dataset=cifar10", "dataset.root=/definitely/missing"],
                     "/definitely/missing/cifar-10-batches-py"),
    "download_offline": (["dataset=cifar10", "dataset.root={data}", "dataset.download=true"],
                         "dataset.download=true"),
    "wandb_no_credentials": (["logger=wandb", "logger.wandb.offline=false"], "wandb login"),
}
ENV: dict[str, dict[str, str | None]] = {
    "wandb_no_credentials": {"WANDB_MODE": None, "WANDB_API_KEY": None, "NETRC": "/nonexistent"},
}
OFFLINE = {"download_offline"}


def _checkpoints(base: Path) -> dict[str, str]:
    """A checkpoint of the default test network, one of another network, broken files."""
    from models.layer_factory import LayerFactory
    from models.resnet import ResNet
    from models.simple import SimpleNet

    good = SimpleNet(LayerFactory("conv"), in_channels=1, num_classes=10)
    other = ResNet(LayerFactory("conv"), in_channels=1, num_classes=10, base_width=4)
    paths = {}
    for name, net in (("good", good), ("other", other)):
        paths[name] = base / f"{name}.ckpt"
        torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}},
                   paths[name])
    data = paths["good"].read_bytes()
    paths["truncated"] = base / "truncated.ckpt"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["text"] = base / "notes.ckpt"
    paths["text"].write_text("not a checkpoint\n")
    paths["data"] = base / "data"
    paths["folder"] = base / "not-an-export"
    paths["folder"].mkdir()
    paths["evil"] = base / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(base / "code-ran")}, paths["evil"])
    return {k: str(v) for k, v in paths.items()}


class _Payload:
    """Unpickling this creates a folder: the code a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.makedirs, (str(self.marker),))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    base = tmp_path_factory.mktemp("bad")
    files = _checkpoints(base)
    spec = {}
    for name, (overrides, _) in CASES.items():
        args = [*BASE, *(o.format(**files) for o in overrides), f"hydra.run.dir={base / name}"]
        spec[name] = {"args": args, "env": ENV.get(name, {}), "offline": name in OFFLINE}
    spec_file, out_file = base / "spec.json", base / "out.json"
    spec_file.write_text(json.dumps(spec))
    env = {"HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline", "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [sys.executable, "-m", "tests.framework.jobs", str(spec_file), str(out_file)],
        cwd=ROOT, check=True, timeout=600, env={**__import__("os").environ, **env},
    )
    results = json.loads(out_file.read_text())
    for name in results:
        results[name]["run_dir"] = str(base / name)
    results["_code_ran"] = (base / "code-ran").exists()
    return results


def test_no_malicious_checkpoint_ran_code(outcomes: dict[str, dict]) -> None:
    # catches: a read with weights_only=False anywhere before the refusal
    assert outcomes["_code_ran"] is False


def test_matrix_is_large_enough() -> None:
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", list(CASES))
def test_bad_configuration_exits_cleanly(name: str, outcomes: dict[str, dict]) -> None:
    result = outcomes[name]
    output = result["output"]
    assert result["rc"] == 1, output
    assert "Traceback" not in output, output
    assert CASES[name][1] in output, output
    assert not (Path(result["run_dir"]) / "model.txt").exists(), output
