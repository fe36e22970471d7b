"""The README's commands and snippets, extracted for the tests (``tests/test_readme.py``).

Every fenced ``bash``/``sh``/``shell`` block of :data:`DOCS` is split into commands (``\\``
continuations joined, ``&&`` chains split, comments dropped). A comment ``# no-run: <reason>``
at the end of a command's line, or on the line before it, marks a command that the tests do not
run for real (it needs a GPU, SLURM, a network, a W&B account, ``pip install`` or pytest);
``main.py`` and benchmark commands are still checked without running. A ``python`` block whose
first line is ``# no-run: <reason>`` is not executed.

``python -m tests.readme_commands`` lists every command with what the tests do with it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DOCS",
    "ROOT",
    "Command",
    "Snippet",
    "commands",
    "flag_table_overrides",
    "hydra_arguments",
    "kind",
    "snippets",
]

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "benchmarks/README.md")
SHELL = {"bash", "sh", "shell"}
FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
NO_RUN = re.compile(r"#\s*no-run:\s*(.*?)\s*$")
# Hydra's own flags: those that take a value, and those that do not.
HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--shell-completion", "-sc",
                     "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                     "--info", "-i", "--experimental-rerun"}
HYDRA_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--resolve", "--run", "-r",
               "--multirun", "-m"}


@dataclass(frozen=True)
class Command:
    """One shell command of a document."""

    doc: str
    line: int
    argv: tuple[str, ...]
    no_run: str | None = None

    @property
    def text(self) -> str:
        """The command as one line (how :data:`tests.test_readme.RUN` names it)."""
        return shlex.join(self.argv)

    def where(self) -> str:
        """``README.md:123``."""
        return f"{self.doc}:{self.line}"


@dataclass(frozen=True)
class Snippet:
    """One fenced ``python`` block."""

    doc: str
    line: int
    source: str
    no_run: str | None = None


def _blocks(doc: str) -> list[tuple[str, int, list[str]]]:
    """(language, line of the first content line, lines) of every fenced block."""
    blocks: list[tuple[str, int, list[str]]] = []
    lang: str | None = None
    start, body = 0, []
    for number, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
        match = FENCE.match(line.strip())
        if lang is None and match:
            lang, start, body = match.group(1).lower(), number + 1, []
        elif lang is not None and line.strip() == "```":
            blocks.append((lang, start, body))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def _split_chain(tokens: list[str]) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    for token in tokens:
        if token in ("&&", ";", "||"):
            parts.append([])
        else:
            parts[-1].append(token)
    return [p for p in parts if p]


def commands(docs: tuple[str, ...] = DOCS) -> list[Command]:
    """Every shell command of ``docs``, in document order."""
    found: list[Command] = []
    for doc in docs:
        for lang, start, body in _blocks(doc):
            if lang not in SHELL:
                continue
            pending: str | None = None  # a `# no-run:` line applies to the next command
            i = 0
            while i < len(body):
                first = i
                line = body[i]
                while line.rstrip().endswith("\\") and i + 1 < len(body):
                    i += 1
                    line = line.rstrip()[:-1] + " " + body[i].strip()
                i += 1
                stripped = line.strip()
                marker = NO_RUN.search(stripped)
                if stripped.startswith("#") or not stripped:
                    pending = marker.group(1) if marker else pending
                    continue
                tokens = shlex.split(stripped, comments=True)
                reason = marker.group(1) if marker else pending
                pending = None
                for argv in _split_chain(tokens):
                    found.append(Command(doc, start + first, tuple(argv), reason))
    return found


def snippets(docs: tuple[str, ...] = DOCS) -> list[Snippet]:
    """Every fenced ``python`` block of ``docs``."""
    found: list[Snippet] = []
    for doc in docs:
        for lang, start, body in _blocks(doc):
            if lang != "python":
                continue
            marker = NO_RUN.match(body[0].strip()) if body else None
            found.append(Snippet(doc, start, "\n".join(body), marker.group(1) if marker else None))
    return found


def flag_table_overrides(doc: str = "README.md") -> list[tuple[str, list[str]]]:
    """(original flag, overrides) for every row of the "Original flags" table: ``group=`` with
    ``A → `a` `` pairs or ``(`a`, `b`: same names)`` lists, and complete ``key=value`` tokens."""
    text = (ROOT / doc).read_text()
    start = text.index("## Original flags")
    table = text[start : text.find("\n## ", start + 1)]
    rows: list[tuple[str, list[str]]] = []
    for row in table.splitlines():
        cells = row.split("|")
        if len(cells) < 4 or not cells[1].strip().startswith("`--"):
            continue
        flag, ours = cells[1].strip().replace("`", ""), cells[2]
        found = re.findall(r"`([\w./]+=[\w.-]+)`", ours)
        prefix = re.search(r"`([\w./]+)=`", ours)
        if prefix is not None:
            values = re.findall(r"→ `([^`]+)`", ours)
            for same in re.findall(r"\(([^()]*): same names\)", ours):
                values += re.findall(r"`([^`]+)`", same)
            found += [f"{prefix.group(1)}={v}" for v in values]
        if found:
            rows.append((flag, found))
    return rows


def kind(command: Command) -> str:
    """``main`` (composed through Hydra), ``benchmark`` (parsed by its script's argument
    parser) or ``other`` (needs a ``# no-run:`` reason unless the slow suite runs it)."""
    argv = command.argv
    if len(argv) >= 2 and argv[0] == "python" and argv[1] == "main.py":
        return "main"
    if len(argv) >= 2 and argv[0] == "python" and re.fullmatch(r"benchmarks/\w+\.py", argv[1]):
        return "benchmark"
    return "other"


def hydra_arguments(argv: tuple[str, ...]) -> tuple[set[str], list[str]]:
    """A ``main.py`` command's Hydra flags and its overrides."""
    flags: set[str] = set()
    overrides: list[str] = []
    rest = iter(argv[2:])
    for arg in rest:
        if arg in HYDRA_VALUE_FLAGS:
            flags.add(f"{arg} {next(rest, '')}")
        elif arg in HYDRA_FLAGS:
            flags.add({"--multirun": "-m", "-h": "--help"}.get(arg, arg))
        elif arg.startswith("-"):
            raise ValueError(f"unknown main.py flag {arg!r}")
        else:
            overrides.append(arg)
    return flags, overrides


if __name__ == "__main__":
    for c in commands():
        what = f"no-run: {c.no_run}" if c.no_run else kind(c)
        print(f"{c.where():28} {what:40} {c.text}")
    for s in snippets():
        print(f"{s.doc}:{s.line:<18} {'no-run: ' + s.no_run if s.no_run else 'python snippet'}")
