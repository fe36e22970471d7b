"""Multirun summaries: a Hydra callback that collects every job's overrides and results.json
into ``sweep_summary.csv`` and prints a table (light imports: no torch)."""

from __future__ import annotations

import atexit
import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

__all__ = ["SweepSummary", "log_table", "summarise_sweep"]

log = logging.getLogger(__name__)


class SweepSummary(HydraCallback):
    """Hydra callback for multiruns: after every job, ``sweep_summary.csv`` in the sweep dir is
    rewritten (one row per job: overrides + results.json, or the error), so results survive a
    failing job or an interrupted sweep; at the end a table is printed.

    Hydra's basic sweeper re-raises the first failed job after the whole batch has run, which
    makes the command exit non-zero without losing the other jobs' rows.
    """

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Record a failed job's error in its directory and refresh the summary."""
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return
        status = getattr(job_return.status, "name", str(job_return.status))
        if status != "COMPLETED":
            out = Path(config.hydra.runtime.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            error = job_return._return_value
            (out / "error.txt").write_text(f"{type(error).__name__}: {error}\n")
            log.error("job #%s failed: %s", config.hydra.job.num, error)
        summarise_sweep(Path(config.hydra.sweep.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Hydra skips ``on_multirun_end`` when a job failed: print the table at exit then."""
        self._printed = False
        sweep_dir = Path(config.hydra.sweep.dir)
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
        self._printed = True
        log_table(rows)
        log.info("Sweep summary: %s", sweep_dir / "sweep_summary.csv")

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
