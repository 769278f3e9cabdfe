"""Every command in a code block that the README or a docs/ page marks `<!-- cpu-checked -->` (the line before the
block) parses: `areal-async train` and `sft` compose their config (`--cfg`: the typed schema rejects an unknown key or
a bad value), `plan`, `config` and `simulate` (two steps) run: they need no GPU and no weights, the other subcommands and the
scripts take their arguments up to an appended `--help`."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from areal_async.run.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- cpu-checked -->"
RUN_WHOLE = {"plan", "simulate", "config"}  # cheap and GPU-free: run as written
COMPOSE_ONLY = {"train", "sft"}


def marked_commands(page: Path) -> list[str]:
    """The commands of the code blocks right after a marker: continuation lines joined, comments and blank lines
    dropped, `a && b` split into its commands."""
    lines = page.read_text(encoding="utf-8").splitlines()
    commands = []
    for index, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        assert index + 1 < len(lines) and lines[index + 1].startswith("```"), f"{page.name}:{index + 1}: marker without a block"
        joined = ""
        for body in lines[index + 2 :]:
            if body.startswith("```"):
                break
            joined += body[:-1] + " " if body.endswith("\\") else body + "\n"
        for command in joined.splitlines():
            words = shlex.split(command, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(shlex.join(words[:cut]))
                words = words[cut + 1 :]
    return commands


CASES = [(page, command) for page in PAGES for command in marked_commands(page)]


def test_pages_mark_commands():
    pages = {page.name for page, _ in CASES}
    assert {"README.md", "getting-started.md", "evaluation.md", "recipes.md"} <= pages, pages


def run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = cli_main(argv)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    return code or 0, out.getvalue()


@pytest.mark.parametrize("page,command", CASES, ids=[f"{p.name}: {c[:60]}" for p, c in CASES])
def test_command_parses(page: Path, command: str, tmp_path: Path):
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # PYTHONPATH=$PWD and the like
        words.pop(0)
    program, args = words[0], words[1:]
    if program.endswith("areal-async"):
        subcommand = args[0]
        if subcommand in COMPOSE_ONLY:
            code, out = run_cli([*args, "--cfg"])
        elif subcommand in RUN_WHOLE:
            if subcommand == "simulate":  # the whole path on the checked-in reports, for two steps
                args = [*args, "--steps", "2", "--out", str(tmp_path / "simulate.json")]
            code, out = run_cli(args)
        else:
            code, out = run_cli([*args, "--help"])
        assert code == 0, f"{page.name}: `{command}` exited {code}:\n{out[-2000:]}"
    elif Path(program).name.startswith("python") and args and args[0].endswith(".py"):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        result = subprocess.run([sys.executable, *args, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, f"{page.name}: `{command} --help` failed:\n{result.stderr[-2000:]}"
    else:
        pytest.fail(f"{page.name}: `{command}`: no rule checks a command of `{program}`; leave its block unmarked")
