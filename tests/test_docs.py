"""Every command in README.md and docs/*.md is one the project accepts: each `romebert ...` line parses with
the real command-line parser (every flag and value checked, nothing run), each `python benchmarks/...`
answers `--help`, and each Python snippet compiles."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from romebert.cli.parser import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _blocks(kind: str) -> list[tuple[str, str]]:
    return [(page.name, m.group(2)) for page in PAGES for m in FENCE.finditer(page.read_text()) if m.group(1) == kind]


def _shell_lines() -> list[tuple[str, str]]:
    out = []
    for page, block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                out.extend((page, part.strip()) for part in line.split("&&"))
    return out


def _romebert_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page, line in _shell_lines():
        words = shlex.split(line)
        for i, w in enumerate(words):
            if w == "romebert" and (i == 0 or words[i - 1] == "-m" or "=" in words[i - 1]):
                found.append((page, words[i + 1 :]))
                break
    return found


COMMANDS = _romebert_commands()
BENCHMARKS = sorted({(page, line.split()[1]) for page, line in _shell_lines() if line.startswith("python benchmarks/")})


def test_the_pages_hold_commands():
    assert len(COMMANDS) > 25 and {c[1][0] for c in COMMANDS} >= {"train", "run", "evaluate", "sweep", "predict",
                                                                  "export", "serve", "compare"}  # fmt: skip


@pytest.mark.parametrize("page,args", COMMANDS, ids=[f"{p}: {' '.join(a)[:60]}" for p, a in COMMANDS])
def test_every_documented_command_parses(page, args):
    try:
        build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{page}: `romebert {' '.join(args)}` does not parse ({exc.code})")


@pytest.mark.parametrize("page,script", BENCHMARKS)
def test_every_documented_benchmark_answers_help(page, script):
    done = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{page}: {script} --help failed: {done.stderr[-500:]}"


@pytest.mark.parametrize("page,code", _blocks("python"))
def test_every_python_snippet_compiles(page, code):
    compile(code, page, "exec")
