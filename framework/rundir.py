"""The run directory as a resource: a lock against concurrent jobs, one config snapshot per
attempt, and start-up checks that the outputs can be written (light imports: no torch)."""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from framework.errors import ConfigError

__all__ = [
    "LOCK_NAME",
    "OFFSET_VARIABLE",
    "RunDirGuard",
    "RunDirLock",
    "RunDirLockedError",
    "attempt_subdir",
    "check_writable",
    "is_rank_zero",
    "job_subdir",
    "locked_run_dir",
]

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


class RunDirLockedError(ConfigError):
    """Another live job holds the run directory; exits 1 without a traceback."""


def is_rank_zero() -> bool:
    """True unless the environment marks this process as a non-zero distributed rank.

    Lightning's DDP launcher starts ranks ≥ 1 with ``LOCAL_RANK`` set; torchrun and SLURM set
    ``RANK``/``SLURM_PROCID`` in every process."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "0")
        if value.strip().isdigit() and int(value) != 0:
            return False
    ntasks = os.environ.get("SLURM_NTASKS", "1")
    if ntasks.isdigit() and int(ntasks) > 1 and os.environ.get("SLURM_PROCID", "0") != "0":
        return False
    return True


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (detects a pid reused by another process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunDirLock:
    """``<run dir>/run.lock``: created exclusively, holding the owner's pid, host, process start
    time and command line. A lock whose owner is a dead process on this host is stale and is
    taken over; a live owner (or one on another host) makes :meth:`acquire` refuse."""

    run_dir: Path

    @property
    def path(self) -> Path:
        """The lock file."""
        return self.run_dir / LOCK_NAME

    def _record(self) -> dict[str, Any]:
        pid = os.getpid()
        return {
            "pid": pid,
            "host": socket.gethostname(),
            "start": _process_start(pid),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }

    def owner(self) -> dict[str, Any] | None:
        """The lock file's record, ``{}`` when unreadable, ``None`` when there is no lock."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            record = json.loads(text)
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def is_stale(self, record: dict[str, Any]) -> bool:
        """Owner on this host and no longer running (or its pid now names another process)."""
        if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
            return False
        pid = record["pid"]
        if not _pid_alive(pid):
            return True
        start = record.get("start")
        return start is not None and _process_start(pid) not in (None, start)

    def held_by_me(self) -> bool:
        """Whether this process owns the lock."""
        record = self.owner() or {}
        return record.get("pid") == os.getpid() and record.get("host") == socket.gethostname()

    def acquire(self) -> bool:
        """Take the lock (True), or find it already ours (False); a stale lock is taken over,
        a live owner's raises :class:`RunDirLockedError`; a path that cannot be a folder (a
        file, or under one) raises :class:`ConfigError`."""
        self._make_dir()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                record = self.owner()
                if record is None:
                    continue  # released in the meantime
                if record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
                    return False
                if not record and time.time() - self._mtime() < 2.0:
                    time.sleep(0.5)  # the owner may be writing its record right now
                    continue
                if not record or self.is_stale(record):
                    self._take_over(record)
                    continue
                raise self._refusal(record) from None
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
                f.write("\n")
            return True
        raise self._refusal(self.owner() or {})

    def _make_dir(self) -> None:
        blocker = next((p for p in (self.run_dir, *self.run_dir.parents) if p.is_file()), None)
        try:
            if blocker is not None:
                raise NotADirectoryError(errno.ENOTDIR, f"{blocker} is a file")
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            where = f"{blocker} is a file" if blocker is not None else (err.strerror or str(err))
            raise ConfigError(
                f"Invalid configuration: hydra.run.dir={self.run_dir} cannot be a run directory "
                f"({where}). Choose another directory with hydra.run.dir=..., or move the file "
                "out of the way."
            ) from None

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _take_over(self, record: dict[str, Any]) -> None:
        """Remove a stale lock (renamed first, so two jobs cannot both remove a fresh one)."""
        aside = self.path.with_name(f".{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except ValueError:
            moved = {}
        if moved != record:  # someone else took over meanwhile and we moved their fresh lock
            os.replace(aside, self.path)
            return
        aside.unlink()
        if record:
            log.warning(
                "Took over the stale lock of %s: pid %s on %s is no longer running.",
                self.run_dir,
                record.get("pid"),
                record.get("host"),
            )

    def _refusal(self, record: dict[str, Any]) -> RunDirLockedError:
        who = (
            f"pid {record.get('pid')} on host {record.get('host')} (since {record.get('since')}: "
            f"{record.get('command')})"
            if record
            else "an unknown job (the lock file is unreadable)"
        )
        return RunDirLockedError(
            f"Run directory {self.run_dir} is in use by {who}. Two jobs in one run directory "
            "would overwrite each other's checkpoints and results. Wait for that job to finish, "
            "choose another directory with hydra.run.dir=..., or, if that job is gone (e.g. its "
            f"machine crashed), delete {self.path} and retry."
        )

    def release(self) -> None:
        """Remove the lock if this process owns it."""
        if self.held_by_me():
            self.path.unlink(missing_ok=True)


_ATTEMPTS: dict[tuple[str, str], str] = {}


def _attempt_resolver(output_dir: str, subdir: str = ".hydra") -> str | None:
    """``${attempt_subdir:<job dir>}``: this job's config folder, fixed once per process (Hydra
    reads ``hydra.output_subdir`` again after writing into it); none on ranks ≥ 1 (rank 0
    saves the config)."""
    if not is_rank_zero():
        return None
    key = (str(Path(output_dir).resolve()), subdir)
    if key not in _ATTEMPTS:
        _ATTEMPTS[key] = attempt_subdir(Path(key[0]), subdir)
    return _ATTEMPTS[key]


def _launch_dir() -> str:
    """The directory the command was started from. Unlike ``${hydra:runtime.cwd}`` it resolves
    before Hydra's job config exists (the multirun launcher reads ``hydra.sweep.dir`` then);
    jobs never change directory (``hydra.job.chdir: false``), so both agree inside a job."""
    return os.getcwd()


# The number of the first job (Optuna: trial) of this invocation; set by the sweep callback
# before any job starts. An environment variable reaches the jobs of every launcher.
OFFSET_VARIABLE = "CONVNN_SWEEP_JOB_OFFSET"


def job_subdir(job_num: Any) -> str:
    """``${job_subdir:${hydra.job.num}}``: a job's folder in its sweep: the job number of a
    grid sweep, the trial number in an Optuna study (which continues across invocations)."""
    return str(int(job_num) + int(os.environ.get(OFFSET_VARIABLE, "0")))


def _job_dir(runtime_dir: str | None, run_dir: str) -> str:
    """``${job_dir:${hydra:runtime.output_dir},${hydra:run.dir}}``: the job's directory; before
    a job exists (``--cfg job --resolve``, ``--help``) the run directory it would get."""
    return run_dir if runtime_dir is None else runtime_dir


if not OmegaConf.has_resolver("attempt_subdir"):
    OmegaConf.register_new_resolver("attempt_subdir", _attempt_resolver)
if not OmegaConf.has_resolver("launch_dir"):
    OmegaConf.register_new_resolver("launch_dir", _launch_dir)
if not OmegaConf.has_resolver("job_subdir"):
    OmegaConf.register_new_resolver("job_subdir", job_subdir)
if not OmegaConf.has_resolver("job_dir"):
    OmegaConf.register_new_resolver("job_dir", _job_dir)


def attempt_subdir(run_dir: Path, subdir: str = ".hydra") -> str:
    """Where Hydra should save this attempt's config: ``.hydra`` the first time, then
    ``.hydra/attempt-2``, ``.hydra/attempt-3``, … so earlier configs are never overwritten."""
    base = run_dir / subdir
    if not (base / "config.yaml").exists():
        return subdir
    n = 2
    while (base / f"attempt-{n}").exists():
        n += 1
    return f"{subdir}/attempt-{n}"


class RunDirGuard(HydraCallback):
    """Hydra callback of single runs: lock ``hydra.run.dir`` before Hydra writes anything into
    it (``hydra.output_subdir`` then picks the attempt's config folder, see
    :func:`attempt_subdir`). Hydra turns callback exceptions into warnings, so a refusal exits
    here.

    Only the rank-0 process locks (DDP ranks ≥ 1 re-run ``main.py`` in the same directory)."""

    def __init__(self) -> None:
        self._lock: RunDirLock | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Lock the run directory (exit 1 when taken) and choose the attempt's config folder."""
        if not is_rank_zero():
            return
        HydraConfig.instance().set_config(config)
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir"))).resolve()
        lock = RunDirLock(run_dir)
        try:
            lock.acquire()
        except ConfigError as err:  # taken by a live job, or not a folder
            sys.stderr.write(f"{err}\n")
            raise SystemExit(1) from None
        self._lock = lock
        atexit.register(lock.release)  # also after Ctrl-C, which ends the run with SystemExit

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Release the lock (the job may have failed)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None


@contextmanager
def locked_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock for a job (re-entrant: a single run already holds it from
    :class:`RunDirGuard`; multirun jobs take it here). Ranks ≥ 1 do not lock."""
    lock = RunDirLock(run_dir.resolve())
    acquired = is_rank_zero() and lock.acquire()
    try:
        yield
    finally:
        if acquired:
            lock.release()


def check_writable(run_dir: Path, cfg: DictConfig) -> None:
    """Fail at start-up, not after training, when an output cannot be written: every file the
    run writes must not be a directory, and every folder it writes into must accept a file."""
    files = [run_dir / "results.json", run_dir / "metrics.csv", run_dir / "model.txt"]
    folders = {run_dir}
    for c in (cfg.get("callbacks") or {}).values():
        if isinstance(c, DictConfig) and "dirpath" in c:  # checkpoint callbacks, by their key
            folders.add(Path(str(c.get("dirpath") or run_dir / "checkpoints")))
    for path in files:
        if path.is_dir():
            raise ConfigError(
                f"Cannot write {path}: a directory of that name is in the way. Move or delete "
                "it, or use another run directory (hydra.run.dir=...)."
            )
    for folder in sorted(folders):
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        probe = existing / f".write-test-{os.getpid()}"
        try:
            if not existing.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file")
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise ConfigError(
                f"Cannot write into {folder} ({err.strerror or err}): checkpoints and results "
                "would be lost after training. Fix the folder's permissions or free space, or "
                "use another run directory (hydra.run.dir=...)."
            ) from None
