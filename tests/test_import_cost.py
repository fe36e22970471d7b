"""`import convnn` stays cheap: it must not pull in torch._dynamo (≈1 s and 150 MiB)."""

from __future__ import annotations

import subprocess
import sys


def test_import_convnn_does_not_import_dynamo() -> None:
    code = (
        "import sys, torch; before = 'torch._dynamo' in sys.modules; import convnn; "
        "print(before, 'torch._dynamo' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


def test_import_models_needs_neither_lightning_nor_hydra() -> None:
    # catches: the LightningModule (models.module) or a framework import made eager in
    # models/__init__.py, which would break models.from_pretrained outside the framework
    code = (
        "import sys, models; models.from_pretrained; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', "
        "'pytorch_lightning', 'hydra', 'omegaconf', 'torchmetrics', 'framework'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
