"""The resume rule is an allow-list: exactly the listed keys may change between the attempts of a
run; every other key — including one a later schema adds — is refused with the keys listed."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from convnn import LAYERS
from framework.resume import ALLOWED, REFUSED, config_diff, flatten, matches
from framework.schemas import SCHEMAS, RootConf, layer_schema, net_schema
from models import BACKBONES

CFG = Path(__file__).resolve().parents[2] / "cfg"
# Groups typed ``Any`` in the root schema: their keys come from their option files.
FILE_GROUPS = ("logger", "callbacks", "analysis", "ema")


def _fields(schema: type, prefix: str) -> set[str]:
    return {f"{prefix}.{f.name}" for f in dataclasses.fields(schema)}


def schema_keys() -> set[str]:
    """Every key a composed config can hold, from the schemas and the option files."""
    keys: set[str] = set()
    nested = {f.name: f.default_factory for f in dataclasses.fields(RootConf)
              if f.default_factory is not dataclasses.MISSING}
    for f in dataclasses.fields(RootConf):
        factory = nested.get(f.name)
        if factory is not None and dataclasses.is_dataclass(factory):
            keys |= _fields(factory, f.name)
        elif f.name not in {*SCHEMAS, "net", "layer", *FILE_GROUPS}:
            keys.add(f.name)
    for group, schemas in SCHEMAS.items():
        for schema in schemas.values():
            keys |= _fields(schema, group)
    for name in LAYERS:
        keys |= _fields(layer_schema(name), "layer")
    for backbone in BACKBONES.values():
        keys |= _fields(net_schema(backbone.cls), "net")
    for group in FILE_GROUPS:
        for option in (CFG / group).glob("*.yaml"):
            tree = OmegaConf.to_container(OmegaConf.load(option))
            tree = {k: v for k, v in (tree or {}).items() if k != "defaults"}
            keys |= {f"{group}.{k}" for k in flatten(tree)}
    return keys


def _listed(key: str, entries: tuple[str, ...]) -> bool:
    return any(matches(key, e) for e in entries)


def test_every_schema_key_is_classified_for_resume() -> None:
    # catches: a new config key that nobody decided about (it would be refused silently)
    keys = schema_keys()
    assert {"trainer.precision", "ema.decay", "compile", "dataset.batch_size"} <= keys
    unclassified = sorted(k for k in keys if not _listed(k, ALLOWED) and not _listed(k, REFUSED))
    assert unclassified == [], "add these to ALLOWED or REFUSED in framework/resume.py"


CHANGES: list[tuple[str, Any, Any, bool]] = [
    ("trainer.max_epochs", 1, 3, True),
    ("trainer.max_steps", -1, 10, True),
    ("dataset.num_workers", 2, 0, True),
    ("dataset.root", "/a", "/b", True),
    ("dataset.pin_memory", False, True, True),
    ("logger.csv.save_dir", "/a", "/b", True),
    ("analysis.name", "none", "neighbours", True),
    ("name", "a", "b", True),
    ("trainer.limit_val_batches", 2, 4, True),
    ("callbacks.checkpoint.dirpath", "/a/checkpoints", "/b/checkpoints", True),
    ("callbacks.progress._target_", "a", "b", True),
    ("ema.decay", 0.999, 0.99, False),
    ("ema.enabled", False, True, False),
    ("compile", False, True, False),
    ("trainer.precision", "32-true", "bf16-mixed", False),
    ("trainer.limit_train_batches", 3, 4, False),
    ("callbacks.checkpoint.monitor", "val/acc1", "val/loss", False),
    ("dataset.batch_size", 32, 64, False),
    ("layer.K", 9, 5, False),
    ("a_key_no_list_knows", 1, 2, False),
]


@pytest.mark.parametrize(("key", "old", "new", "allowed"), CHANGES, ids=[c[0] for c in CHANGES])
def test_exactly_the_listed_keys_may_change(key: str, old: Any, new: Any, allowed: bool) -> None:
    # catches: a deny-list (an unlisted key passing) or a listed key refused
    def tree(value: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
        return out

    refused, ok = config_diff(tree(old), tree(new))
    assert (ok, refused) == (([key], []) if allowed else ([], [key]))


def test_scheduler_horizon_follows_max_epochs() -> None:
    # catches: the documented T_max = max_epochs exception lost with the allow-list
    old = {"trainer": {"max_epochs": 2}, "scheduler": {"T_max": 2}}
    new = {"trainer": {"max_epochs": 4}, "scheduler": {"T_max": 4}}
    assert config_diff(old, new) == ([], ["scheduler.T_max", "trainer.max_epochs"])
    new["scheduler"]["T_max"] = 5
    assert config_diff(old, new)[0] == ["scheduler.T_max"]
