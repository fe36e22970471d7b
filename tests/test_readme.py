"""The README as a test suite: every documented command works as written.

Fast: every ``python main.py`` command of README.md and benchmarks/README.md is composed through
Hydra's compose API (a renamed group, option or key fails here), every benchmark command is
parsed by its script's argument parser, every other command says why it is not run, and every
Python snippet runs, its ``# value`` comments checked. Slow: the commands a newcomer runs first
run for real, from a fresh copy of the repository in a temporary directory, shrunk by the
overrides in :data:`RUN`.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from framework.schemas import register_configs

from .readme_commands import (
    ROOT,
    Command,
    Snippet,
    commands,
    flag_table_overrides,
    hydra_arguments,
    kind,
    snippets,
)

register_configs()

# Appended to every command the slow suite runs: one short epoch.
SHRINK = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
          "trainer.limit_test_batches=1"]
# The commands a newcomer runs first, in README order of use, and what shrinks them. An appended
# override replaces the command's own value of the same key (e.g. a sweep's `seed=0,1,2`).
RUN: dict[str, list[str]] = {
    "python main.py experiment=quickstart": SHRINK,
    "python main.py -m experiment=quickstart layer=conv,branching seed=0,1,2": [*SHRINK, "seed=0"],
    "python main.py experiment=quickstart hydra.run.dir=outputs/my_run": SHRINK,
    "python main.py experiment=quickstart hydra.run.dir=outputs/my_run ckpt_path=last":
        [*SHRINK, "trainer.max_epochs=2"],
    "python main.py experiment=quickstart ckpt_path=outputs/my_run/checkpoints/last.ckpt":
        [*SHRINK, "trainer.max_epochs=3"],
    "python main.py experiment=quickstart init_from=outputs/my_run/checkpoints/last.ckpt "
    "test_only=true": SHRINK,
    "python main.py experiment=quickstart analysis=neighbours test_only=true "
    "init_from=outputs/my_run/checkpoints/last.ckpt": [*SHRINK, "analysis.num_images=2"],
    "python main.py hparams_search=optuna experiment=quickstart hydra.sweeper.n_trials=30":
        [*SHRINK, "hydra.sweeper.n_trials=2"],
}
# What must exist after a command ran (relative to the copy's root), by RUN key.
EXPECT: dict[str, list[str]] = {
    "python main.py experiment=quickstart hydra.run.dir=outputs/my_run ckpt_path=last":
        ["outputs/my_run/results.json", "outputs/my_run/.hydra/attempt-2/config.yaml"],
}

COMMANDS = commands()
MAIN = [c for c in COMMANDS if kind(c) == "main"]
BENCHMARKS = [c for c in COMMANDS if kind(c) == "benchmark"]
SNIPPETS = snippets()


def _ids(items: list[Command] | list[Snippet]) -> list[str]:
    return [f"{c.doc}:{c.line}" for c in items]


def _jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override lists of the jobs to compose: a sweep's values all appear, zipped (job i
    takes value i of every sweep, cycling), not their product."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    sweeps = {
        o.input_line: list(o.sweep_string_iterator()) for o in parsed if o.is_sweep_override()
    }
    if sweeps and not multirun:
        raise AssertionError(f"a sweep ({', '.join(sweeps)}) needs -m")
    n = max((len(v) for v in sweeps.values()), default=1)
    jobs = []
    for i in range(n):
        job = []
        for o in parsed:
            if o.input_line in sweeps:
                values = sweeps[o.input_line]
                job.append(f"{o.get_key_element()}={values[i % len(values)]}")
            else:
                job.append(o.input_line)
        jobs.append(job)
    return jobs


def test_the_readmes_hold_commands() -> None:
    """The extraction finds the documents' commands (an empty list would pass every test)."""
    assert len(MAIN) >= 10 and BENCHMARKS and SNIPPETS
    assert "python main.py experiment=quickstart" in {c.text for c in MAIN}


@pytest.mark.parametrize("command", MAIN, ids=_ids(MAIN))
def test_main_commands_compose(command: Command) -> None:
    """The command's groups, options and keys exist and its values have the schema's types."""
    flags, overrides = hydra_arguments(command.argv)
    multirun = "-m" in flags
    assert not (multirun and any(f.startswith("--cfg") for f in flags)), (
        "Hydra cannot combine --cfg with -m"
    )
    if any(f.startswith("-sc") for f in flags):
        assert {f for f in flags if f.startswith("-sc")} <= {"-sc install=bash",
                                                              "-sc uninstall=bash"}
        return
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "cfg"), version_base="1.3"):
            for job in _jobs(overrides, multirun):
                compose(config_name="config", overrides=job, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def test_flag_table_values_compose() -> None:
    """The original flags' values map to options and keys that exist (`--layer ConvNN` →
    `layer=convnn`): each group choice of a row composes, and each `key.path=value` composes
    alone or with one of the row's choices (`net.variant=original` needs a net that has it)."""
    rows = flag_table_overrides()
    assert ("--layer (ConvNN)", "layer=convnn") in [(f, o) for f, os in rows for o in os]
    GlobalHydra.instance().clear()

    def composes(overrides: list[str]) -> str | None:
        try:
            compose(config_name="config", overrides=overrides)
        except Exception as err:
            return str(err).splitlines()[0]
        return None

    try:
        with initialize_config_dir(config_dir=str(ROOT / "cfg"), version_base="1.3"):
            for flag, overrides in rows:
                choices = [o for o in overrides if "." not in o.split("=")[0]]
                for override in overrides:
                    errors = [composes([override])]
                    if errors[0] and override not in choices:
                        errors += [composes([c, override]) for c in choices]
                    assert None in errors, f"{flag} → {override}: {errors[0]}"
    finally:
        GlobalHydra.instance().clear()


def _script(path: str) -> Any:
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("command", BENCHMARKS, ids=_ids(BENCHMARKS))
def test_benchmark_commands_parse(command: Command) -> None:
    """The script exists and accepts the command's flags and values."""
    module = _script(command.argv[1])
    try:
        module.parse_args(list(command.argv[2:]))
    except SystemExit as exit_:
        raise AssertionError(f"{command.where()}: {command.text} is refused") from exit_


def test_commands_that_are_not_run_say_why() -> None:
    """Every command is composed, parsed, run by the slow suite, or marked `# no-run: <reason>`;
    every command the slow suite runs is in a README as written."""
    texts = {c.text: c for c in COMMANDS}
    missing = [key for key in RUN if key not in texts]
    assert not missing, f"commands the slow suite runs are no longer in a README: {missing}"
    marked_but_run = [texts[key].where() for key in RUN if texts[key].no_run]
    assert not marked_but_run, f"marked no-run but run by the slow suite: {marked_but_run}"
    unchecked = [
        f"{c.where()}: {c.text}"
        for c in COMMANDS
        if kind(c) == "other" and c.text not in RUN and not c.no_run
    ]
    assert not unchecked, (
        "commands no test checks; run them in tests/test_readme.py's RUN or mark them "
        f"`# no-run: <reason>`: {unchecked}"
    )
    listing = [f"{c.where()}: {c.text}  ({c.no_run})" for c in COMMANDS if c.no_run]
    print("Documented commands not run by the tests:\n" + "\n".join(listing))


def _run_checked(source: str, where: str, namespace: dict[str, Any]) -> None:
    """Run ``source`` statement by statement; an expression statement followed by a comment
    holding a Python literal (``x.shape  # (8, 16, 32, 32)``) must evaluate to that literal."""
    lines = source.splitlines()
    for node in ast.parse(source).body:
        line = lines[node.end_lineno - 1] if node.end_lineno else ""
        comment = line.split("#", 1)[1].strip() if "#" in line else ""
        if isinstance(node, ast.Expr) and comment:
            value = eval(compile(ast.Expression(node.value), where, "eval"), namespace)
            try:
                expected = ast.literal_eval(comment)
            except (ValueError, SyntaxError):
                continue
            got = tuple(value) if isinstance(expected, tuple) else value
            assert got == expected, f"{where}, line {node.lineno}: {got!r}, README says {comment}"
        else:
            exec(compile(ast.Module([node], []), where, "exec"), namespace)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=_ids(SNIPPETS))
def test_python_snippets_run(
    snippet: Snippet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snippet runs, and the values its comments state are the values it computes."""
    if snippet.no_run:
        pytest.skip(snippet.no_run)
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        _run_checked(snippet.source, f"{snippet.doc}:{snippet.line}", {"__name__": "__readme__"})


# ---------------------------------------------------------------------------------- slow suite
def _shrunk(argv: tuple[str, ...], extra: list[str]) -> list[str]:
    keys = {e.split("=", 1)[0].lstrip("+~") for e in extra}
    kept = [a for a in argv[2:] if a.startswith("-") or a.split("=", 1)[0].lstrip("+~") not in keys]
    return [sys.executable, "main.py", *kept, *extra]


def _fresh_copy(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", "outputs", "multirun", "data", "__pycache__",
                                    ".pytest_cache", ".ruff_cache", "*.egg-info", ".venv")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


@pytest.mark.slow
def test_newcomer_commands_run_as_written(tmp_path: Path) -> None:
    """The quickstart, a 2-job sweep, the resume pair, resuming into a new directory,
    test_only, the neighbour analysis and a 2-trial Optuna search run from a fresh copy."""
    copy = _fresh_copy(tmp_path / "convnn-lab")
    texts = {c.text: c for c in COMMANDS}
    env = {**os.environ, "CI": "1", "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline"}
    env.pop("PYTHONPATH", None)  # the copy's code, not this checkout's
    for key, extra in RUN.items():
        command = texts[key]
        proc = subprocess.run(_shrunk(command.argv, extra), cwd=copy, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command.where()}: {key}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{command.where()}: {key}\n{proc.stderr[-3000:]}"
        for path in EXPECT.get(key, []):
            assert (copy / path).exists(), f"{command.where()}: {key} did not write {path}"
    summaries = sorted(copy.glob("outputs/multirun/*/*/sweep_summary.csv"))
    assert len(summaries) == 2, summaries  # the sweep and the Optuna search
    for summary in summaries:
        rows = summary.read_text().splitlines()[1:]
        assert len(rows) == 2 and all(",ok," in f",{r}," for r in rows), rows
