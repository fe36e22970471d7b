"""Multirun bookkeeping: a Hydra callback that records the sweep's parameters (``sweep.json``),
logs progress after every job, collects every job's overrides and results.json into
``sweep_summary.csv``, prints a table and writes the report at the end; and resuming a sweep
(``resume_sweep=true``): finished jobs are kept, interrupted ones resume from ``last.ckpt``
(light imports: no torch)."""

from __future__ import annotations

import atexit
import csv
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, HydraException
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from framework.errors import ConfigError
from framework.rundir import OFFSET_VARIABLE
from framework.study import is_optuna, prepare_study

__all__ = [
    "SWEEP_FILE",
    "SweepSummary",
    "check_resumable",
    "log_table",
    "resume_sweep_job",
    "summarise_sweep",
    "sweep_record",
]

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
# Keys a resumed sweep may give differently from the first invocation.
RESUME_KEYS = ("resume_sweep",)


class SweepSummary(HydraCallback):
    """Hydra callback for multiruns: after every job, ``sweep_summary.csv`` in the sweep dir is
    rewritten (one row per job: overrides + results.json, or the error), so results survive a
    failing job or an interrupted sweep; at the end a table is printed.

    Hydra's basic sweeper re-raises the first failed job after the whole batch has run, which
    makes the command exit non-zero without losing the other jobs' rows.
    """

    def __init__(self) -> None:
        self._job_start: float | None = None
        self._durations: list[float] = []

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Time the job (for the progress line's ETA)."""
        self._job_start = time.time()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Record a failed job's error in its directory, refresh the summary, log progress."""
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return
        out = Path(config.hydra.runtime.output_dir)
        status = getattr(job_return.status, "name", str(job_return.status))
        if status != "COMPLETED":
            out.mkdir(parents=True, exist_ok=True)
            error = job_return._return_value
            (out / "error.txt").write_text(f"{type(error).__name__}: {error}\n")
            log.error("job #%s failed: %s", config.hydra.job.num, error)
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarise_sweep(sweep_dir)
        ran = self._job_start is not None and not _finished_before(out, self._job_start)
        if ran and self._job_start is not None:
            self._durations.append(time.time() - self._job_start)
        if is_optuna(config):  # trials are numbered on from earlier invocations: count them
            num = sum(r["status"] == "ok" or "no results.json" not in r.get("error", "")
                      for r in rows) - 1
        else:
            num = int(config.hydra.job.num)
        log.info(progress_line(num, status == "COMPLETED", rows, _total_jobs(sweep_dir),
                               self._durations))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check a resumed sweep (exit 1 when it cannot be resumed), record its parameters;
        Hydra skips ``on_multirun_end`` when a job failed: print the table at exit then."""
        self._printed = False
        sweep_dir = Path(config.hydra.sweep.dir)
        record = sweep_record(config)
        resume = bool(config.get("resume_sweep"))
        try:
            if resume:
                done = check_resumable(sweep_dir, record)
                log.info("Resuming the sweep in %s: %d finished jobs are kept", sweep_dir, done)
            os.environ[OFFSET_VARIABLE] = "0"
            if is_optuna(config):
                prepare_study(config, resume)
        except ConfigError as err:  # Hydra turns callback exceptions into warnings
            sys.stderr.write(f"{err}\n")
            raise SystemExit(1) from None
        sweep_dir.mkdir(parents=True, exist_ok=True)
        tmp = sweep_dir / f".{SWEEP_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, sweep_dir / SWEEP_FILE)
        atexit.register(self._print_at_exit, sweep_dir)

    def _print_at_exit(self, sweep_dir: Path) -> None:
        if getattr(self, "_printed", True):
            return
        rows = summarise_sweep(sweep_dir)
        if rows:
            self._print(rows, sweep_dir)
            failed = sum(r["status"] != "ok" for r in rows)
            log.error(
                "%d of %d jobs failed; every job's row (results or error) is in %s",
                failed,
                len(rows),
                sweep_dir / "sweep_summary.csv",
            )

    def _print(self, rows: list[dict[str, Any]], sweep_dir: Path) -> None:
        """The end of every multirun (also one with failed jobs): the table and the report."""
        self._printed = True
        log_table(rows)
        log.info("Sweep summary: %s", sweep_dir / "sweep_summary.csv")
        from framework.report import write_report

        try:
            write_report([sweep_dir], sweep_dir)
        except Exception:  # a broken report must not hide the sweep's own outcome
            log.exception("The report of %s could not be written", sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the final summary and print the table."""
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarise_sweep(sweep_dir)
        if not rows:
            return
        self._print(rows, sweep_dir)
        failed = [r for r in rows if r["status"] != "ok"]
        if failed:
            details = "; ".join(f"#{r['job']} [{r['overrides']}] {r['error']}" for r in failed)
            raise CompactHydraException(
                f"{len(failed)} of {len(rows)} jobs failed (the others' results are in "
                f"{sweep_dir / 'sweep_summary.csv'}): {details}"
            )


def summarise_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """Collect every job directory of a sweep into ``sweep_summary.csv``."""
    rows: list[dict[str, Any]] = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        overrides = OmegaConf.load(overrides_file)
        row: dict[str, Any] = {"job": job_dir.name, "overrides": " ".join(overrides)}
        for item in overrides:
            key, _, value = str(item).partition("=")
            row[key.lstrip("+~")] = value
        results = job_dir / "results.json"
        error = job_dir / "error.txt"
        if results.is_file():
            row["status"] = "ok"
            row.update(json.loads(results.read_text()))
        else:
            row["status"] = "failed"
            row["error"] = error.read_text().strip() if error.is_file() else "no results.json"
        rows.append(row)
    rows.sort(key=lambda r: (len(r["job"]), r["job"]))
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    if rows:
        with (sweep_dir / "sweep_summary.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return rows


def log_table(rows: list[dict[str, Any]]) -> None:
    """Print the sweep table with rich (falls back to the log)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="sweep summary")
    cols = [
        "job",
        "overrides",
        "status",
        "test/acc1",
        "test/acc5",
        "val/acc1_best",
        "epochs",
        "train_time_s",
    ]
    for col in cols:
        table.add_column(col)
    for row in rows:
        cells = []
        for col in cols:
            v = row.get(col, "")
            cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
        table.add_row(*cells)
    # Wide enough for every column: without a terminal rich would cut the table to 80 columns.
    width = Console(width=10_000).measure(table).maximum
    Console(stderr=False, width=max(width, 80)).print(table)


# ---------------------------------------------------------------------------------- progress
def _finished_before(job_dir: Path, since: float) -> bool:
    """The job's results.json predates this job: it was kept from an earlier invocation."""
    try:
        return (job_dir / "results.json").stat().st_mtime < since
    except OSError:
        return False


def _total_jobs(sweep_dir: Path) -> int | None:
    try:
        total = json.loads((sweep_dir / SWEEP_FILE).read_text()).get("total")
    except (OSError, ValueError):
        return None
    return total if isinstance(total, int) else None


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def progress_line(
    num: int, ok: bool, rows: list[dict[str, Any]], total: int | None, durations: list[float]
) -> str:
    """``job 7/24 done (ok), 3 failed so far, ETA 12m 30s`` (ETA: the mean time of the jobs
    this process ran, times the jobs left)."""
    failed = sum(r["status"] != "ok" and "no results.json" not in r.get("error", "")
                 for r in rows)
    line = f"job {num + 1}/{total if total else '?'} done ({'ok' if ok else 'failed'}), " \
        f"{failed} failed so far"
    if total is not None and num + 1 >= total:
        return line + ", sweep complete"
    if total is not None and durations:
        line += f", ETA {_duration(statistics.fmean(durations) * (total - num - 1))}"
    return line


# ------------------------------------------------------------------------------ resume a sweep
def _sweep_overrides(config: DictConfig) -> list[str]:
    """The sweep's parameters: the sweeper's ``params`` and the command-line overrides, minus
    the keys that may change when resuming."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    items = [f"{k}={v}" for k, v in params.items()]
    items += [str(o) for o in config.hydra.overrides.task]
    return [o for o in items if o.lstrip("+~").partition("=")[0] not in RESUME_KEYS]


def _job_list(overrides: list[str]) -> list[list[str]] | None:
    """Every job's overrides in Hydra's order (None where the sweeper is not a grid)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        (jobs,) = BasicSweeper.split_arguments(parsed, None)
    except HydraException:  # search-space syntax, e.g. Optuna's interval(...)
        return None
    return [list(j) for j in jobs]


def sweep_record(config: DictConfig) -> dict[str, Any]:
    """What identifies a sweep's jobs: the sweeper, its parameters and, for a grid, the job
    list (job N is the N-th entry). Saved as ``sweep.json`` in the sweep directory."""
    overrides = _sweep_overrides(config)
    target = str(OmegaConf.select(config, "hydra.sweeper._target_") or "")
    optuna = "optuna" in target.lower()
    jobs = None if optuna else _job_list(overrides)
    n_trials = OmegaConf.select(config, "hydra.sweeper.n_trials")
    total = int(n_trials) if optuna and n_trials is not None else (len(jobs) if jobs else None)
    return {"sweeper": target, "overrides": overrides, "total": total, "jobs": jobs}


def _as_dict(overrides: list[str]) -> dict[str, str]:
    return {o.partition("=")[0]: o.partition("=")[2] for o in overrides}


def check_resumable(sweep_dir: Path, record: dict[str, Any]) -> int:
    """Refuse to resume a directory that is not a sweep, or a sweep whose parameters changed
    (job numbers would then name other jobs); returns how many jobs finished earlier."""
    stored = sweep_dir / SWEEP_FILE
    if not stored.is_file():
        raise ConfigError(
            f"Cannot resume: hydra.sweep.dir={sweep_dir} is not a sweep directory (it has no "
            f"{SWEEP_FILE}, which every sweep writes when it starts). resume_sweep=true continues "
            "a sweep in the directory it wrote: give that directory with hydra.sweep.dir=..., or "
            "drop resume_sweep=true to start a new sweep."
        )
    try:
        old = json.loads(stored.read_text())
    except ValueError as err:
        raise ConfigError(
            f"Cannot resume the sweep in {sweep_dir}: {stored} is unreadable ({err}). Start a "
            "new sweep in another hydra.sweep.dir."
        ) from None
    changes: list[str] = []
    if old.get("sweeper") != record["sweeper"]:
        changes.append(f"hydra.sweeper: {old.get('sweeper')} → {record['sweeper']}")
    a, b = _as_dict(old.get("overrides", [])), _as_dict(record["overrides"])
    for key in [*a, *(k for k in b if k not in a)]:
        if a.get(key) != b.get(key):
            changes.append(f"{key}: {a.get(key, '(not given)')} → {b.get(key, '(not given)')}")
    if not changes and old.get("jobs") != record["jobs"]:
        was, now = ([k for k in d if "," in d[k]] for d in (a, b))
        changes.append(
            f"the order of the swept parameters ({', '.join(was)} → {', '.join(now)}), which "
            "renumbers the jobs"
        )
    if changes:
        raise ConfigError(
            f"Cannot resume the sweep in {sweep_dir}: its parameters changed, so a job number "
            f"would name another job. Differing: {'; '.join(changes)}. Rerun the original "
            f"command (its parameters are in {stored}) with resume_sweep=true, or start a new "
            "sweep in another hydra.sweep.dir."
        )
    return sum(1 for p in sweep_dir.glob("*/results.json"))


def resume_sweep_job(cfg: DictConfig) -> tuple[DictConfig, dict[str, Any] | None]:
    """A job of a resumed sweep (``resume_sweep=true``): ``(cfg, results)`` when it finished
    earlier (nothing is run again), ``cfg`` with ``ckpt_path=last`` when it left a
    ``last.ckpt``, otherwise ``cfg`` unchanged (a fresh start)."""
    if not cfg.get("resume_sweep"):
        return cfg, None
    try:
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        multirun = False
    if not multirun:
        raise ConfigError(
            "Invalid configuration: resume_sweep=true continues a multirun (python main.py -m "
            "... hydra.sweep.dir=<the sweep> resume_sweep=true); to resume a single run, give "
            "ckpt_path=last with its hydra.run.dir."
        )
    run_dir = Path(cfg.paths.output_dir)
    results = run_dir / "results.json"
    if results.is_file():
        try:
            data = json.loads(results.read_text())
        except ValueError:
            data = None
        if isinstance(data, dict):
            log.info("Finished in an earlier invocation, kept: %s", run_dir)
            return cfg, data
    (run_dir / "error.txt").unlink(missing_ok=True)
    if cfg.ckpt_path is None and (run_dir / "checkpoints" / "last.ckpt").is_file():
        log.info("Interrupted earlier, resuming from its last.ckpt: %s", run_dir)
        cfg = cfg.copy()
        cfg.ckpt_path = "last"
    return cfg, None
