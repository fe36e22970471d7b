"""Checkpoints are data: every file is read once per use with ``weights_only=True``; a file that
would run code on loading is refused (naming it and the opt-in) before any of it runs; damaged
and foreign files share one error."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from framework.checkpoints import read_checkpoint
from framework.errors import ConfigError
from framework.train import run

from ..framework.helpers import TINY, compose_cfg


class _Payload:
    """Unpickling this creates ``marker``: the code a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def _malicious(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint of the TINY network whose unpickling would create ``marker``."""
    src = tmp_path / "src"
    run(compose_cfg(TINY, out=src))
    ckpt = torch.load(src / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    marker = tmp_path / "code-ran"
    ckpt["hyper_parameters"] = {"payload": _Payload(marker)}
    evil = tmp_path / "downloaded.ckpt"
    torch.save(ckpt, evil)
    return evil, marker


@pytest.fixture(scope="module")
def malicious(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _malicious(tmp_path_factory.mktemp("evil"))


@pytest.mark.parametrize(
    "overrides",
    [["init_from={evil}", "test_only=true"], ["init_from={evil}"], ["ckpt_path={evil}"]],
    ids=["init_from-test_only", "init_from-fine-tune", "ckpt_path"],
)
def test_malicious_pickle_is_refused_without_running_it(
    malicious: tuple[Path, Path], tmp_path: Path, overrides: list[str]
) -> None:
    # catches: any start-up read with weights_only=False (the payload would create the marker)
    evil, marker = malicious
    out = tmp_path / "run"
    cfg = compose_cfg([*TINY, *(o.format(evil=evil) for o in overrides)], out=out)
    with pytest.raises(ConfigError) as err:
        run(cfg)
    message = str(err.value)
    key = overrides[0].split("=")[0]
    assert f"{key}={evil} contains Python objects that would run code on loading" in message
    assert "trust_checkpoint=true" in message and "makedirs" in message
    assert not marker.exists()
    assert not (out / "model.txt").exists()


def test_trust_checkpoint_loads_a_trusted_file(malicious: tuple[Path, Path]) -> None:
    # catches: an opt-in that does not reach the reader
    evil, marker = malicious
    loaded = read_checkpoint(evil, "init_from", trust=True)
    assert marker.is_dir() and "state_dict" in loaded.data
    os.rmdir(marker)


@pytest.mark.parametrize("damage", ["truncated", "text", "empty", "list"])
def test_damaged_and_foreign_files_share_one_error(tmp_path: Path, damage: str) -> None:
    # catches: a second error path (a raw torch/pickle exception or another message)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"net.w": torch.ones(2)}}, good)
    bad = tmp_path / "bad.ckpt"
    data = good.read_bytes()
    if damage == "list":
        torch.save([1, 2], bad)
    else:
        bad.write_bytes({"truncated": data[: len(data) // 2], "text": b"not a checkpoint\n",
                         "empty": b""}[damage])
    with pytest.raises(ConfigError) as err:
        read_checkpoint(bad, "ckpt_path")
    assert f"ckpt_path={bad} cannot be read as a checkpoint" in str(err.value)
    assert "truncated or corrupt" in str(err.value)
    assert "Other checkpoints there: good.ckpt." in str(err.value)


def test_each_checkpoint_is_read_once_per_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # catches: a second read of the resumed checkpoint (start-up checks, run ids, Lightning) or
    # of the tested one, and any read without weights_only=True
    common = [*TINY, "scheduler=none"]
    run(compose_cfg(common, out=tmp_path))
    reads: Counter[str] = Counter()
    real = torch.load

    def counting(f, *args, **kwargs):
        reads[Path(f).name if isinstance(f, (str, os.PathLike)) else "<stream>"] += 1
        assert kwargs.get("weights_only") is True
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    results = run(compose_cfg([*common, "trainer.max_epochs=2", "ckpt_path=last"], out=tmp_path))
    tested = Path(results["tested_checkpoint"]).name
    assert reads == Counter({"last.ckpt": 1, tested: 1})
    last = tmp_path / "checkpoints" / "last.ckpt"
    for key in ("ckpt_path", "init_from"):
        reads.clear()
        run(compose_cfg([*common, f"{key}={last}", "test_only=true"], out=tmp_path / key))
        assert reads == Counter({"last.ckpt": 1}), key
