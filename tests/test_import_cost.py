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
