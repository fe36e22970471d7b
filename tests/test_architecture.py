"""The import arrows of docs/architecture.md hold on the source: main → framework →
{models, datamodules} → convnn, and `convnn` is plain PyTorch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN: dict[str, set[str]] = {
    "convnn": {"framework", "models", "datamodules", "hydra", "omegaconf", "lightning", "main"},
    "models": {"framework", "datamodules", "hydra", "omegaconf", "main"},
    "datamodules": {"framework", "models", "hydra", "main"},
    "framework": {"main"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_arrows(package: str) -> None:
    bad = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_nothing_imports_pytorch_lightning() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*.py")
        if ".git" not in p.parts and "pytorch_lightning" in _imports(p)
    ]
    assert offenders == []
