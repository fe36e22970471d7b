"""Foundation checks: the package imports and the Hydra entry point composes."""

import subprocess
import sys
from pathlib import Path

import convnn

ROOT = Path(__file__).resolve().parents[1]


def test_convnn_has_version() -> None:
    assert isinstance(convnn.__version__, str) and convnn.__version__.count(".") == 2


def test_main_help_lists_config_groups() -> None:
    out = subprocess.run(
        [sys.executable, "main.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "== Configuration groups ==" in out
    assert "dataset: " in out
    assert "hydra/launcher: local, slurm" in out  # Hydra's listing leaves launchers out
    assert "schema/" not in out  # internal structured-config groups are not options


def test_print_resolved_job_config() -> None:
    """``--cfg job --resolve`` prints the resolved config (no run directory exists yet)."""
    out = subprocess.run(
        [sys.executable, "main.py", "--cfg", "job", "--resolve", "layer.K=5"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    assert "K: 5" in out and "padding: 1" in out and "Traceback" not in out
    assert "None" not in out  # the run directory it would get, not `None/checkpoints`
    assert f"dirpath: {ROOT}/outputs/runs/" in out
