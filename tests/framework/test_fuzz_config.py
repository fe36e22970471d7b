"""Fuzzing the config space: how we know the start-up contract holds beyond the written cases.

Each draw takes a composed configuration (one of :data:`PRESETS`), sets one to three of its keys
(from the net, layer, sampling, optimizer, scheduler, dataset, trainer, ema and analysis groups,
as the schemas compose them) to boundary, out-of-range, wrong-type, non-finite or huge values,
and checks the invariant: composing and ``validate()`` either pass, or raise a user error whose
message names one of the keys that were set. Any other exception is a bug.

``FUZZ_EXAMPLES=2000 python -m pytest tests/framework/test_fuzz_config.py -k in_process`` runs
the long search by hand; the default suite runs a fixed-seed sample.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from datamodules.errors import UserError
from framework.checks import validate

from .helpers import ROOT, compose_cfg

BASE = [
    "dataset=digits",
    "trainer=cpu",
    "logger=none",
    "trainer.max_epochs=2",
    "dataset.batch_size=32",
]
SIMPLE = ["net.num_layers=2", "net.channels=[8,16]"]
FAKE = ["dataset=fake", "dataset.train_size=32", "dataset.test_size=8", "dataset.batch_size=8",
        "dataset.image_size=16"]
#: Composed starting points: every option of the fuzzed groups that has keys of its own.
PRESETS: list[list[str]] = [
    *(
        [*SIMPLE, *p]
        for p in (
            [],
            ["layer=conv"],
            ["layer=convnn_attn"],
            ["layer=branching"],
            ["sampling=random", "sampling.num_samples=16"],
            ["sampling=spatial", "sampling.num_samples=4"],
            ["optimizer=sgd"],
            ["optimizer=adam"],
            ["scheduler=cosine"],
            ["scheduler=step"],
            ["scheduler=plateau"],
            ["scheduler=warmup_cosine", "scheduler.warmup_epochs=1"],
            ["ema=on", "ema.decay=0.9"],
            ["analysis=neighbours"],
            ["layer=ckconv"],
            ["layer=flexconv"],
            ["layer=vig"],
            FAKE,
        )
    ),
    [*FAKE, "net=vit_tiny", "net.dim=32", "net.depth=1", "net.mlp_dim=32",
     "net.patch_size=4", "layer=attention"],
    ["net=ccnn", "net.no_hidden=8", "net.no_blocks=1", "layer=ckconv"],
    ["net=vig_ti", "net.dim=16", "net.depth=1", "net.head_dim=16", "net.stem_stride=1"],
    ["net=patch_knn", "net.k=4", "net.n_clusters=8", "net.n_patches=64", "net.patch_size=3",
     "net.pool_size=2", "net.pool_stride=2", "net.bottleneck=4", "net.kmeans_iters=2"],
]
#: "" is the top level (seed, criterion, compile_mode, ...); callbacks are fuzzed one level down.
GROUPS = ("", "net", "layer", "sampling", "optimizer", "scheduler", "dataset", "trainer", "ema",
          "analysis", "callbacks")
# Keys that name places or are interpolations, not values to fuzz.
SKIP = {"dataset.root", "dataset.download", "trainer.default_root_dir", "trainer.deterministic",
        "scheduler.T_max", "trainer.enable_model_summary", "dataset.num_workers"}
VALUES: dict[str, list[str]] = {
    "int": ["0", "-1", "1", "-5", "2", "3", "7", "100", "99999999999999999999999", "1.5",
            "abc", "nan", "inf", "true", "null", "[]"],
    "float": ["0.0", "-0.5", "1.0", "0.5", "1e-12", "2.0", "100.0", "1e308", "nan", "inf",
              "-inf", "abc", "null", "[1]", "1"],
    "bool": ["true", "false", "maybe", "2", "null"],
    "str": ["''", "zzz", "1", "null", "NA", "all", "none"],
    "list": ["[]", "[0]", "[-1]", "[abc]", "[1e309,1]", "[0.9,0.999,0.5]", "null"],
    "none": ["0", "1", "-1", "0.5", "abc", "inf", "[]"],
}


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list"
    return "none"


@cache
def fuzz_keys(preset: int) -> tuple[tuple[str, str], ...]:
    """(key, kind) of every fuzzable leaf of the composed preset, from the schemas' types."""
    cfg = compose_cfg([*BASE, *PRESETS[preset]])
    tree = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(tree, dict)
    keys = []

    def leaves(node: dict[str, Any], prefix: str, depth: int) -> None:
        for key, value in node.items():
            full = f"{prefix}{key}"
            if str(key).startswith("_") or key == "name" or full in SKIP:
                continue
            if isinstance(value, dict):
                if depth > 0:
                    leaves(value, f"{full}.", depth - 1)
                continue
            if isinstance(value, str) and "${" in value:
                continue
            keys.append((full, _kind(value)))

    for group in GROUPS:
        if group == "":
            leaves({k: v for k, v in tree.items() if not isinstance(v, dict)}, "", 0)
            continue
        node = tree.get(group)
        if isinstance(node, dict):
            leaves(node, f"{group}.", 1 if group == "callbacks" else 0)
    return tuple(keys)


@st.composite
def draws(draw: st.DrawFn) -> tuple[int, dict[str, str]]:
    """A preset and one to three of its keys with bad or boundary values."""
    preset = draw(st.integers(0, len(PRESETS) - 1))
    keys = fuzz_keys(preset)
    chosen = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique_by=lambda k: k[0]))
    return preset, {key: draw(st.sampled_from(VALUES[kind])) for key, kind in chosen}


@cache
def _composed(preset: int, out: Path) -> DictConfig:
    return compose_cfg([*BASE, *PRESETS[preset]], out=out)


def _apply(preset: int, values: dict[str, str], out: Path) -> DictConfig:
    """The preset composed once, then the drawn overrides parsed by Hydra's override grammar and
    merged into a copy (typed nodes convert or refuse the value, as in a compose)."""
    cfg = copy.deepcopy(_composed(preset, out))
    for override in _PARSER.parse_overrides([f"{k}={v}" for k, v in values.items()]):
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
    return cfg


def check(preset: int, values: dict[str, str], out: Path) -> str:
    """The invariant for one draw; returns ``pass``, ``compose`` or ``refused``."""
    try:
        cfg = _apply(preset, values, out)
    except (HydraException, OmegaConfBaseException) as err:
        text = str(err)
        assert any(k in text or k.rsplit(".", 1)[-1] in text for k in values), (values, text)
        return "compose"
    try:
        validate(cfg)
    except UserError as err:
        assert any(k in str(err) for k in values), (PRESETS[preset], values, str(err))
        return "refused"
    return "pass"


_PARSER = OverridesParser.create()
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(draw=draws())
def test_fuzzed_configs_pass_or_name_the_key_in_process(draw: Any, tmp_path: Path) -> None:
    preset, values = draw
    check(preset, values, tmp_path / "run")


# --------------------------------------------------------------------------- end to end
#: Draws run through main.py with debug=fdr: refused ones must leave no run file behind.
END_TO_END: dict[str, list[str]] = {
    "lr_nan": ["optimizer.lr=nan"],
    "epochs_zero_and_clip": ["trainer.max_epochs=0", "trainer.gradient_clip_val=-1"],
    "k_huge": ["layer.K=99999999999999999999999"],
    "sgd_momentum": ["optimizer=sgd", "optimizer.momentum=1.5"],
    "fine": ["layer=conv", "optimizer.lr=0.01"],
    "devices_text": ["trainer.devices=abc"],
}


def test_fdr_end_to_end_draws_write_nothing_on_refusal(tmp_path: Path) -> None:
    spec = {
        name: {"args": [*BASE, *SIMPLE, "debug=fdr", *o, f"hydra.run.dir={tmp_path / name}"]}
        for name, o in END_TO_END.items()
    }
    spec_file, out_file = tmp_path / "spec.json", tmp_path / "out.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline"}
    subprocess.run([sys.executable, "-m", "tests.framework.jobs", str(spec_file), str(out_file)],
                   cwd=ROOT, check=True, timeout=600, env=env)
    results = json.loads(out_file.read_text())
    for name, overrides in END_TO_END.items():
        rc, output = results[name]["rc"], results[name]["output"]
        run_dir = tmp_path / name
        assert "Traceback" not in output, (name, output)
        if name == "fine":
            assert rc == 0, output
            assert (run_dir / "results.json").is_file()
            continue
        assert rc == 1, (name, output)
        keys = [o.split("=", 1)[0] for o in overrides if "=" in o]
        assert any(k in output for k in keys), (name, output)
        for leftover in ("model.txt", "metrics.csv", "checkpoints", "results.json"):
            assert not (run_dir / leftover).exists(), (name, leftover)
