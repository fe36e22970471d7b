"""Run many ``main.py`` invocations in one interpreter (torch is imported once) and report each.

``python -m tests.framework.jobs JOBS.json OUT.json``: JOBS maps a job name to
``{"args": [...], "env": {...}, "offline": bool}``; OUT gets ``{name: {"rc", "output"}}`` where
``rc`` is the exit status ``main.py`` would have had and ``output`` its stdout + stderr. Used by
the bad-configuration matrix, which would otherwise start ~100 interpreters.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[2]


def _no_network(*args: Any, **kwargs: Any) -> Any:
    raise urllib.error.URLError("network is unreachable (test)")


def run_job(main: Any, args: list[str], env: dict[str, str], offline: bool) -> dict[str, Any]:
    """One ``main.py ARGS`` run: exit status and everything it printed."""
    from hydra.core.global_hydra import GlobalHydra

    buffer = io.StringIO()
    saved_env = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if v is not None})
    for key in [k for k, v in env.items() if v is None]:
        os.environ.pop(key, None)
    sys.argv = ["main.py", *args]
    rc = 0
    patch = mock.patch.object(urllib.request, "urlopen", _no_network) if offline else None
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            if patch is not None:
                patch.start()
            main()
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            rc = 1
        finally:
            if patch is not None:
                patch.stop()
            os.environ.clear()
            os.environ.update(saved_env)
            GlobalHydra.instance().clear()
            logging.shutdown()
            for handler in list(logging.getLogger().handlers):
                logging.getLogger().removeHandler(handler)
    return {"rc": rc, "output": buffer.getvalue()}


def main_cli() -> None:
    """Entry point: read the spec, run every job, write the outcomes."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    from main import main

    # Hydra resolves config_path from the task's file only when it runs as a script.
    main.__wrapped__.__module__ = "__main__"
    results = {
        name: run_job(main, job["args"], job.get("env", {}), job.get("offline", False))
        for name, job in spec.items()
    }
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    main_cli()
