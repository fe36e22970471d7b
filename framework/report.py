"""A report over run and sweep directories: runs that differ only in their seed form a group;
per group n, mean ± std and min/max, the published number where a preset reproduces one, and
pictures. ``python -m framework.report DIR [DIR ...] [--ignore KEY ...] [--out DIR]``.

Writes ``report.md`` (sorted by mean test top-1), ``report.csv``, ``report_acc.png`` and
``report_curves.png``. Light imports (no torch); matplotlib only when drawing."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from framework.published import PUBLISHED, Published
from framework.resume import flatten

__all__ = ["IGNORED", "METRICS", "Group", "Report", "Run", "build_report", "main", "write_report"]

log = logging.getLogger(__name__)

# Keys that never split a group: the seed, where things are written, how a run was resumed.
IGNORED = ("seed", "paths", "hydra", "ckpt_path", "resume_sweep")
# Overrides of these mean a preset no longer reproduces its published configuration.
PRESET_DEFINING = ("net", "layer", "sampling", "dataset")
# ... except where the data lives and how it is loaded.
PRESET_NEUTRAL = ("dataset.root", "dataset.num_workers", "dataset.pin_memory", "dataset.download")

# (results.json key, column title, scale, format)
METRICS: tuple[tuple[str, str, float, str], ...] = (
    ("test/acc1", "test top-1 %", 100.0, "{:.2f}"),
    ("val/acc1_best", "best val top-1 %", 100.0, "{:.2f}"),
    ("epochs", "epochs", 1.0, "{:.0f}"),
    ("params", "params", 1.0, "{:,.0f}"),
    ("flops", "MFLOPs", 1e-6, "{:.2f}"),
    ("train_time_s", "train time s", 1.0, "{:.1f}"),
    ("step_time_s", "step time ms", 1e3, "{:.2f}"),
)
MAX_CURVE_GROUPS = 10
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class Run:
    """One run directory as the report sees it."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)  # flattened, resolved where possible
    choices: dict[str, str] = field(default_factory=dict)  # config group → option
    overrides: list[str] = field(default_factory=list)
    results: dict[str, Any] | None = None
    problem: str | None = None  # why there are no results (first line)
    unreadable: bool = False

    @property
    def dataset(self) -> str:
        """The dataset option (or its class when no choice was recorded)."""
        return str(self.choices.get("dataset") or self.config.get("dataset._target_", "?"))

    def val_curve(self) -> dict[float, float]:
        """``val/acc1`` by epoch from metrics.csv (empty when there is none)."""
        path = self.path / "metrics.csv"
        if not path.is_file():
            return {}
        curve: dict[float, float] = {}
        try:
            with path.open(newline="") as f:
                for row in csv.DictReader(f):
                    value = _float(row.get("val/acc1"))
                    epoch = _float(row.get("epoch"))
                    if value is not None and epoch is not None:
                        curve[epoch] = value
        except (OSError, csv.Error, UnicodeDecodeError):
            return {}
        return curve


@dataclass
class Group:
    """Runs whose configs differ only in ignored keys (normally: seeds of one configuration)."""

    key: tuple[tuple[str, str], ...]
    runs: list[Run]
    columns: dict[str, str] = field(default_factory=dict)  # the keys that differ between groups
    published: Published | None = None

    @property
    def label(self) -> str:
        """``layer=conv optimizer.lr=0.001`` (the differing keys), or ``all runs``."""
        return " ".join(f"{k}={v}" for k, v in self.columns.items()) or "all runs"

    def values(self, metric: str) -> list[float]:
        """The metric of every run that has it."""
        out = []
        for run in self.runs:
            value = _float((run.results or {}).get(metric))
            if value is not None:
                out.append(value)
        return out

    def stats(self, metric: str) -> dict[str, float] | None:
        """n, mean, std (sample; NaN for one run), min and max; None without values."""
        v = self.values(metric)
        if not v:
            return None
        std = statistics.stdev(v) if len(v) > 1 else math.nan
        return {"n": len(v), "mean": statistics.fmean(v), "std": std, "min": min(v),
                "max": max(v)}


@dataclass
class Report:
    """Everything the outputs are made from."""

    groups: list[Group]
    failed: list[Run]
    unreadable: list[Run]
    warnings: list[str]
    sources: list[Path]


# -------------------------------------------------------------------------------- reading
def _float(value: Any) -> float | None:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "(empty)"


def _load_yaml(path: Path) -> Any:
    """YAML with libyaml's parser where available (Hydra's snapshots of 200 jobs in a second)."""
    return yaml.load(path.read_text(), Loader=_LOADER)


_REFERENCE = re.compile(r"\$\{([\w.]+)\}")


def _resolved(path: Path) -> dict[str, Any]:
    """The run's config, flattened; plain references (``${trainer.max_epochs}``) resolved,
    resolver calls (``${hydra:...}``, ``${launch_dir:}``) kept as written: outside Hydra they
    name paths, which are ignored anyway."""
    tree = _load_yaml(path)
    if not isinstance(tree, dict):
        raise ValueError(f"{path} holds no mapping")
    raw = flatten(tree)

    def resolve(value: Any, depth: int = 0) -> Any:
        if not isinstance(value, str) or "${" not in value or depth > 8:
            return value
        whole = _REFERENCE.fullmatch(value)
        if whole and whole.group(1) in raw:
            return resolve(raw[whole.group(1)], depth + 1)
        return _REFERENCE.sub(
            lambda m: str(resolve(raw[m.group(1)], depth + 1)) if m.group(1) in raw
            else m.group(0),
            value,
        )

    return {k: resolve(v) for k, v in raw.items() if k.split(".")[0] not in IGNORED}


def read_run(path: Path) -> Run:
    """Read one run directory; problems are recorded on the run, never raised."""
    run = Run(path)
    hydra_dir = path / ".hydra"
    try:
        run.config = _resolved(hydra_dir / "config.yaml")
        hydra = _load_yaml(hydra_dir / "hydra.yaml") or {}
        choices = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
        run.choices = {str(k): str(v) for k, v in choices.items() if "/" not in str(k)}
        overrides = hydra_dir / "overrides.yaml"
        run.overrides = [str(o) for o in (_load_yaml(overrides) or [])]
    except FileNotFoundError:
        pass  # a run started without Hydra's snapshot: grouped by what was read
    except (yaml.YAMLError, ValueError, OSError, UnicodeDecodeError) as err:
        run.unreadable, run.problem = True, f"unreadable config ({type(err).__name__}: {err})"
        return run
    results = path / "results.json"
    if results.is_file():
        try:
            data = json.loads(results.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
            run.results = data
        except (ValueError, OSError, UnicodeDecodeError) as err:
            run.unreadable = True
            run.problem = f"unreadable results.json ({_first_line(str(err))})"
    else:
        error = path / "error.txt"
        run.problem = (
            _first_line(error.read_text(errors="replace"))
            if error.is_file()
            else "no results.json (interrupted, or still running)"
        )
    return run


def find_runs(dirs: Iterable[Path]) -> tuple[list[Path], list[str]]:
    """Run directories (those with ``.hydra/config.yaml`` or ``results.json``) under each of
    ``dirs``; also the problems with the arguments themselves."""
    found: list[Path] = []
    problems: list[str] = []
    for d in dirs:
        if not d.is_dir():
            problems.append(f"{d} is not a directory")
            continue
        here = {p.parent.parent for p in d.rglob(".hydra/config.yaml")}
        here |= {p.parent for p in d.rglob("results.json")}
        if not here:
            problems.append(f"{d} holds no runs (no .hydra/config.yaml or results.json below it)")
        found += sorted(here - set(found), key=_natural)
    return found, problems


def _natural(path: Path) -> tuple[Any, ...]:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)


# ------------------------------------------------------------------------------- grouping
def _preset(run: Run) -> Published | None:
    """The published number a run reproduces: its preset has one and nothing that defines the
    preset's network or data was overridden."""
    ref = PUBLISHED.get(run.choices.get("experiment", ""))
    if ref is None:
        return None
    for item in run.overrides:
        key = item.lstrip("+~").partition("=")[0]
        root = key.split(".")[0]
        if root in PRESET_DEFINING and not any(
            key == k or key.startswith(k + ".") for k in PRESET_NEUTRAL
        ):
            return None
    return ref


def _columns(groups: list[Group], choices: list[dict[str, str]]) -> None:
    """Set each group's columns: config groups whose option differs (``layer=conv``), then keys
    that differ between groups not explained by a differing option."""
    configs = [dict(g.key) for g in groups]
    keys = sorted({k for c in configs for k in c})
    varying = [k for k in keys if len({c.get(k, "<unset>") for c in configs}) > 1]
    group_names = sorted({k for c in choices for k in c})
    varying_choice = [n for n in group_names if len({c.get(n) for c in choices}) > 1]
    shown: list[str] = []
    for key in varying:
        root = key.split(".")[0]
        if root in varying_choice:
            # Shown only when it varies among groups with the same option of its config group.
            by_option: dict[str | None, set[str]] = {}
            for c, ch in zip(configs, choices):
                by_option.setdefault(ch.get(root), set()).add(c.get(key, "<unset>"))
            if all(len(v) == 1 for v in by_option.values()):
                continue
        shown.append(key)
    for g, c, ch in zip(groups, configs, choices):
        g.columns = {n: ch.get(n, "-") for n in varying_choice}
        g.columns.update({k: c.get(k, "-") for k in shown})


def build_report(dirs: Sequence[Path], ignore: Sequence[str] = ()) -> Report:
    """Read every run below ``dirs`` and group them."""
    paths, problems = find_runs(dirs)
    runs = [read_run(p) for p in paths]
    ignored = tuple(ignore)
    buckets: dict[tuple[tuple[str, str], ...], list[Run]] = {}
    unreadable = [r for r in runs if r.unreadable]
    failed = [r for r in runs if not r.unreadable and r.results is None]
    for run in runs:
        if run.results is None:
            continue
        key = tuple(
            (k, json.dumps(v, sort_keys=True) if not isinstance(v, str) else v)
            for k, v in sorted(run.config.items())
            if not any(k == i or k.startswith(i + ".") for i in ignored)
        )
        buckets.setdefault(key, []).append(run)
    groups = [Group(key, members) for key, members in buckets.items()]
    choices = [_common_choices(g.runs) for g in groups]
    _columns(groups, choices)
    for g in groups:
        refs = {_preset(r) for r in g.runs}
        g.published = refs.pop() if len(refs) == 1 else None
    groups.sort(key=_sort_key)
    warnings = list(problems)
    datasets = sorted({r.dataset for g in groups for r in g.runs})
    if len(datasets) > 1:
        warnings.append(
            f"runs of {len(datasets)} datasets ({', '.join(datasets)}): accuracies on different "
            "data are not comparable; they are kept in separate groups"
        )
    return Report(groups, failed, unreadable, warnings, list(dirs))


def _common_choices(runs: list[Run]) -> dict[str, str]:
    first = runs[0].choices
    return {k: v for k, v in first.items() if all(r.choices.get(k) == v for r in runs)}


def _sort_key(group: Group) -> tuple[float, str]:
    stats = group.stats("test/acc1")
    return (-stats["mean"] if stats else math.inf, group.label)


# -------------------------------------------------------------------------------- writing
def _cell(stats: dict[str, float] | None, scale: float, fmt: str, spread: int) -> str:
    """mean; with ``spread`` ≥ 1 also ± std, with 2 also [min, max]."""
    if stats is None:
        return "–"
    text = fmt.format(stats["mean"] * scale)
    if spread and stats["n"] > 1:
        text += " ± " + fmt.format(stats["std"] * scale)
        if spread > 1 and stats["min"] != stats["max"]:
            lo, hi = fmt.format(stats["min"] * scale), fmt.format(stats["max"] * scale)
            text += f" [{lo}, {hi}]"
    return text


def _published_cells(group: Group) -> tuple[str, str]:
    ref = group.published
    if ref is None:
        return "", ""
    stats = group.stats(ref.metric)
    diff = "–" if stats is None else f"{stats['mean'] * 100 - ref.top1:+.2f}"
    return f"{ref.top1:.1f}", diff


def markdown(report: Report) -> str:
    """``report.md``: the table sorted by mean test top-1, then failed and unreadable runs."""
    groups = report.groups
    n_runs = sum(len(g.runs) for g in groups)
    lines = [
        "# Report",
        "",
        f"{n_runs} finished runs in {len(groups)} groups from "
        + ", ".join(f"`{s}`" for s in report.sources)
        + ". A group is the runs whose configs differ only in `seed`, paths, `hydra.*`"
        + " and ignored keys; cells are the group's mean ± sample std [min, max].",
        "",
    ]
    lines += [f"> warning: {w}" for w in report.warnings]
    if report.warnings:
        lines.append("")
    columns = list(groups[0].columns) if groups else []
    has_published = any(g.published for g in groups)
    header = [*columns, "n", *(title for _, title, _, _ in METRICS)]
    if has_published:
        header += ["published top-1 %", "ours − published"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        cells = [str(g.columns[c]) for c in columns] + [str(len(g.runs))]
        for i, (metric, _, scale, fmt) in enumerate(METRICS):
            spread = 2 if i < 2 else int(metric.endswith("_s"))
            cells.append(_cell(g.stats(metric), scale, fmt, spread))
        if has_published:
            cells += list(_published_cells(g))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if has_published:
        refs = {g.published for g in groups if g.published}
        lines += [
            "",
            "Published numbers are the original work's (" + "; ".join(
                sorted(f"{r.label}: {r.protocol}" for r in refs)
            ) + "). Ours are the test top-1 of the checkpoint with the best validation top-1"
            " (where a validation number is published, our best validation top-1), so expect"
            " ours at or slightly below the published ones. Only runs of a preset whose"
            " network, layer, sampling and dataset were not overridden get a published number.",
        ]
    if report.failed:
        lines += ["", f"## Failed runs ({len(report.failed)})", ""]
        lines += [f"- `{r.path}`: {r.problem}" for r in report.failed]
    if report.unreadable:
        lines += ["", f"## Unreadable runs ({len(report.unreadable)})", ""]
        lines += [f"- `{r.path}`: {r.problem}" for r in report.unreadable]
    return "\n".join(lines) + "\n"


def write_csv(report: Report, path: Path) -> None:
    """``report.csv``: one row per group, every statistic in its own column."""
    columns = list(report.groups[0].columns) if report.groups else []
    fields = [*columns, "n"]
    for metric, *_ in METRICS:
        fields += [f"{metric} {s}" for s in ("mean", "std", "min", "max")]
    fields += ["published", "published_metric", "published_protocol", "runs"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for g in report.groups:
            row: dict[str, Any] = {c: g.columns[c] for c in columns}
            row["n"] = len(g.runs)
            for metric, *_ in METRICS:
                stats = g.stats(metric) or {}
                for s in ("mean", "std", "min", "max"):
                    value = stats.get(s)
                    row[f"{metric} {s}"] = "" if value is None or math.isnan(value) else value
            if g.published is not None:
                row["published"] = g.published.top1 / 100
                row["published_metric"] = g.published.metric
                row["published_protocol"] = g.published.protocol
            row["runs"] = " ".join(str(r.path) for r in g.runs)
            writer.writerow(row)


def _short(label: str, width: int = 60) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def plot_accuracy(report: Report, path: Path) -> None:
    """``report_acc.png``: mean test top-1 per group (diamond, ± std; no bars, since the axis
    does not start at 0), every run as a dot, the published number as a mark; best on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in report.groups if g.values("test/acc1")][::-1]
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.38 * max(len(groups), 1)), layout="constrained")
    for y, g in enumerate(groups):
        v = [x * 100 for x in g.values("test/acc1")]
        mean = statistics.fmean(v)
        std = statistics.stdev(v) if len(v) > 1 else 0.0
        ax.axhline(y, color="#eeeeee", lw=0.8, zorder=0)
        ax.errorbar(mean, y, xerr=std, fmt="D", ms=7, color="#3182bd", ecolor="#08306b",
                    capsize=4, lw=1.2, zorder=4, label="mean ± std" if y == 0 else None)
        ax.scatter(v, [y] * len(v), s=16, color="#e6550d", alpha=0.8, zorder=5, lw=0,
                   label="one run (seed)" if y == 0 else None)
        if g.published is not None and g.published.metric == "test/acc1":
            ax.plot([g.published.top1] * 2, [y - 0.35, y + 0.35], color="#d62728", lw=2,
                    label="published" if not any(
                        h.get_label() == "published" for h in ax.lines) else None)
    ax.set_yticks(range(len(groups)), [_short(g.label) + f"  (n={len(g.runs)})" for g in groups])
    ax.set_ylim(-0.7, max(len(groups), 1) - 0.3)
    ax.set_xlabel("test top-1 % (mean ± std; dots: runs)")
    marks = [x * 100 for g in groups for x in g.values("test/acc1")]
    marks += [g.published.top1 for g in groups if g.published is not None]
    if marks:
        ax.set_xlim(max(0.0, min(marks) - 5), min(100.0, max(marks) + 3))
        ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Test top-1 by group")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(report: Report, path: Path) -> None:
    """``report_curves.png``: validation top-1 against epoch per group, the mean as a line and
    the min–max band over its runs (the best groups by test top-1 when there are many)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = report.groups[:MAX_CURVE_GROUPS]
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    cmap = plt.get_cmap("tab10")
    for i, g in enumerate(shown):
        curves = [c for c in (r.val_curve() for r in g.runs) if c]
        epochs = sorted({e for c in curves for e in c})
        if not epochs:
            continue
        per_epoch = [[c[e] * 100 for c in curves if e in c] for e in epochs]
        mean = [statistics.fmean(v) for v in per_epoch]
        ax.plot(epochs, mean, color=cmap(i % 10), lw=1.8,
                label=f"{_short(g.label, 50)} (n={len(curves)})", marker="o" if len(epochs) < 3
                else None)
        ax.fill_between(epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch],
                        color=cmap(i % 10), alpha=0.12, lw=0)
    title = "Validation top-1 per group (line: mean, band: min–max over runs)"
    if len(report.groups) > len(shown):
        title += f"\nthe {len(shown)} best of {len(report.groups)} groups by test top-1"
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("val top-1 %")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(
    dirs: Sequence[Path], out: Path, ignore: Sequence[str] = ()
) -> Report | None:
    """Build the report of ``dirs`` and write its four files into ``out``; None (and nothing
    written) when no run has results."""
    report = build_report([Path(d) for d in dirs], ignore)
    for warning in report.warnings:
        log.warning("report: %s", warning)
    for run in report.unreadable:
        log.warning("report: %s: %s", run.path, run.problem)
    if not report.groups:
        return None
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(report))
    write_csv(report, out / "report.csv")
    plot_accuracy(report, out / "report_acc.png")
    plot_curves(report, out / "report_curves.png")
    log.info(
        "Report of %d runs in %d groups: %s",
        sum(len(g.runs) for g in report.groups),
        len(report.groups),
        out / "report.md",
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; exit status 1 only when nothing could be reported."""
    parser = argparse.ArgumentParser(prog="python -m framework.report", description=__doc__)
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                        help="run or sweep directories (searched recursively)")
    parser.add_argument("--ignore", action="append", default=[], metavar="KEY",
                        help="a config key (or group, e.g. optimizer.lr) that does not split "
                        "groups; repeat for several")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the report (default: DIR when one is given, else "
                        "the current directory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out = args.out or (args.dirs[0] if len(args.dirs) == 1 else Path.cwd())
    report = write_report(args.dirs, out, args.ignore)
    if report is None:
        log.error(
            "Nothing to report: no finished run (with a readable results.json) below %s. Give "
            "a run directory or a sweep directory (hydra.sweep.dir) whose jobs have finished.",
            ", ".join(str(d) for d in args.dirs),
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
