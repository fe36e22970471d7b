"""Concurrent jobs in one run directory: the second is refused, stale locks are taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from framework.rundir import (
    LOCK_NAME,
    RunDirLock,
    RunDirLockedError,
    _attempt_resolver,
    attempt_subdir,
)

from ..framework.helpers import ROOT, TINY, main_cmd, run_main


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run_dir: Path, pid: int, host: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "start": None,
              "since": "earlier", "command": "main.py (other job)"}
    (run_dir / LOCK_NAME).write_text(json.dumps(record))


def test_lock_refuses_a_live_owner_and_names_it(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, sleeper.pid)
        with pytest.raises(RunDirLockedError) as err:
            RunDirLock(tmp_path).acquire()
        assert f"pid {sleeper.pid}" in str(err.value) and str(tmp_path) in str(err.value)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_on_another_host_is_never_taken_over(tmp_path: Path) -> None:
    _write_lock(tmp_path, _dead_pid(), host="some-other-node")
    with pytest.raises(RunDirLockedError, match="some-other-node"):
        RunDirLock(tmp_path).acquire()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    _write_lock(tmp_path, _dead_pid())
    lock = RunDirLock(tmp_path)
    assert lock.acquire() is True
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert lock.acquire() is False  # re-entrant for its owner
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_unreadable_old_lock_is_taken_over(tmp_path: Path) -> None:
    lock_file = tmp_path / LOCK_NAME
    lock_file.write_text("{not json")
    os.utime(lock_file, (time.time() - 60, time.time() - 60))
    assert RunDirLock(tmp_path).acquire() is True
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()


def test_attempt_subdirs_never_reuse_a_folder(tmp_path: Path) -> None:
    assert attempt_subdir(tmp_path) == ".hydra"
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("a: 1\n")
    assert attempt_subdir(tmp_path) == ".hydra/attempt-2"
    (tmp_path / ".hydra" / "attempt-2").mkdir()
    assert attempt_subdir(tmp_path) == ".hydra/attempt-3"


def test_attempt_folder_is_chosen_once_per_job(tmp_path: Path) -> None:
    """Hydra reads hydra.output_subdir again after writing config.yaml into it: the answer must
    not move on to the next attempt then."""
    assert _attempt_resolver(str(tmp_path)) == ".hydra"
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("a: 1\n")
    assert _attempt_resolver(str(tmp_path)) == ".hydra"
    other = tmp_path / "other"
    (other / ".hydra").mkdir(parents=True)
    (other / ".hydra" / "config.yaml").write_text("a: 1\n")
    assert _attempt_resolver(str(other)) == ".hydra/attempt-2"


def test_second_job_in_a_busy_run_dir_is_refused(tmp_path: Path) -> None:
    """A re-run while the first job trains exits 1 naming the owner; the first job's config
    snapshot and outputs are untouched."""
    args = [*TINY, "trainer.max_epochs=500", "scheduler=none", f"hydra.run.dir={tmp_path}"]
    first = subprocess.Popen(main_cmd(*args), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "CI": "1"})
    try:
        deadline = time.time() + 120
        last = tmp_path / "checkpoints" / "last.ckpt"
        while not last.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert last.exists(), "the first job never saved a checkpoint"
        config = (tmp_path / ".hydra" / "config.yaml").read_text()
        second = run_main([*args[:-1], "seed=7", args[-1]])
        assert second.returncode == 1
        assert f"Run directory {tmp_path} is in use by pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None, "the first job must keep running"
        assert (tmp_path / ".hydra" / "config.yaml").read_text() == config
        assert not (tmp_path / ".hydra" / "attempt-2").exists()
    finally:
        first.kill()
        first.wait()


def test_stale_lock_is_taken_over_by_a_cli_run(tmp_path: Path) -> None:
    _write_lock(tmp_path, _dead_pid())
    proc = run_main(["experiment=quickstart", "debug=fdr", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stale lock" in proc.stdout + proc.stderr
    assert (tmp_path / "results.json").is_file()
    assert not (tmp_path / LOCK_NAME).exists()  # released at the end


def test_ctrl_c_releases_the_lock(tmp_path: Path) -> None:
    args = [*TINY, "trainer.max_epochs=500", "scheduler=none", f"hydra.run.dir={tmp_path}"]
    job = subprocess.Popen(main_cmd(*args), cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env={**os.environ, "CI": "1"})
    try:
        deadline = time.time() + 120
        while not (tmp_path / "checkpoints" / "last.ckpt").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert (tmp_path / LOCK_NAME).is_file()
        job.send_signal(signal.SIGINT)
        job.wait(timeout=60)
    finally:
        job.kill()
        job.wait()
    assert job.returncode != 0
    assert not (tmp_path / LOCK_NAME).exists()
