"""benchmarks/bench_models.py command line: precision defaults and bad values."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_models


@pytest.mark.parametrize(
    ("flags", "expected"), [([], ["fp32"]), (["avx512_bf16"], ["fp32", "bf16"])]
)
def test_bf16_runs_by_default_only_with_native_kernels(
    monkeypatch: pytest.MonkeyPatch, flags: list[str], expected: list[str]
) -> None:
    """Emulated bf16 made a default CPU run take hours (a VGG11 step ~90 s instead of ~2 s)."""
    monkeypatch.setattr(bench_models, "cpu_bf16_flags", lambda: flags)
    assert bench_models.parse_args([]).precisions == expected
    forced = bench_models.parse_args(["--precisions", "fp32,bf16"]).precisions
    assert forced == ["fp32", "bf16"]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--layers", "conv,convn"], r"--layers='conv,convn': \['convn'\]; choose from .*'convnn'"),
        (["--models", "vgg16"], r"--models='vgg16'.*'vgg11', 'resnet18', 'vit_tiny'"),
        (["--precisions", "fp16"], r"--precisions='fp16'.*'fp32', 'bf16'"),
        (["--models", ","], r"--models=',': empty"),
    ],
)
def test_bad_values_are_refused_naming_the_choices(
    capsys: pytest.CaptureFixture[str], argv: list[str], match: str
) -> None:
    with pytest.raises(SystemExit):
        bench_models.parse_args(argv)
    assert re.search(match, capsys.readouterr().err)
