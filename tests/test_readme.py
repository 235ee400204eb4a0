"""Every command and program in README.md runs as written.

The fenced ```bash, ```python and ```toml blocks are extracted in order and run section by
section (each `## ` or `### ` section in its own temp dir, with SECTORFSM_REPO pointing into it):

- a ```python block runs as a program, a ```bash block runs under `bash -eu -o pipefail`;
- a block right after `<!-- file: NAME -->` is written to NAME, for the blocks after it;
- a block right after `<!-- not run: REASON -->` is illustrative only, and says why.

`pip install ... && ` in front of a command is dropped: the suite runs in the environment it
installed (`.ci/run` runs the Quickstart's install on a fresh venv). Any other block, other
than the generated mermaid statechart, must be marked, so nothing in the README goes untried.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sectorfsm.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNABLE = {"bash", "python", "toml"}
#: Languages shown but never run: the statechart block is checked by test_readme_and_cli.py.
SHOWN = {"mermaid"}
_FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```$", re.M | re.S)
_MARK = re.compile(r"<!--\s*(not run|file):\s*(.*?)\s*-->")
_INSTALL = re.compile(r"^pip install [^&\n]*&& ", re.M)
#: What each section's blocks must print (besides exiting 0).
EXPECTED = {
    "Quickstart": ["all 3 sector(s) are Proving"],
    "The `sectors` CLI": [
        "Created CC sector: 2",
        "WaitingForEngine",
        "all 3 sector(s) are Proving",
        "Removed",
        "wrote svg statechart to lifecycle.svg",
    ],
    "Cluster certificates": [
        "created CA certs/ca.pem",
        "kept the existing CA certs/ca.pem",
        "created fin-box.pem and fin-box.key",
        "c2-box.key",
    ],
    "Embedding: `sectorfsm.Miner`": ["Proving 1 True"],
    "Monitoring": [
        "metrics: http://127.0.0.1:",
        "all 2 sector(s) are Proving",
        'sectorfsm_sectors{state="Proving"} 1.0',
    ],
    "Capacity planning": [
        "summary written to report/summary.json",
        "report written to report/report.html",
        "the GPU of gpu-box is the bottleneck",
        "add-worker gpu-box / balanced:",
        "report.html\nsummary.json",
    ],
    "The engine (`sectorfsm.fsm`)": ["Order(state='Done', paid=10)"],
    "The scheduler (`sectorfsm.sched`)": [
        "PC1 s-t01000-2 {'pc1-box': 'needs 56 GiB RAM",
        "['PC1 output of sector 1', 'PC1 output of sector 2']",
    ],
}


@dataclass(frozen=True, slots=True)
class Block:
    """One fenced block of the README."""

    section: str
    lang: str
    body: str
    line: int
    #: `not run` or `file` from the marker right before the block, and its argument.
    mark: str | None
    arg: str

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang} block in {self.section!r})"


def readme_blocks(text: str | None = None) -> list[Block]:
    """The README's fenced blocks, each with its `##`/`###` section and its marker."""
    text = README.read_text(encoding="utf-8") if text is None else text
    out = []
    for m in _FENCE.finditer(text):
        head = text[: m.start()]
        sections = re.findall(r"^###? (.+)$", head, re.M)
        before = head.rstrip("\n").rsplit("\n", 1)[-1].strip()
        mark = _MARK.fullmatch(before)
        out.append(
            Block(
                section=sections[-1] if sections else "",
                lang=m[1],
                body=m[2],
                line=head.count("\n") + 1,
                mark=mark[1] if mark else None,
                arg=mark[2] if mark else "",
            )
        )
    return out


def _sections() -> list[str]:
    seen: list[str] = []
    for b in readme_blocks():
        if b.lang in RUNNABLE and b.mark != "not run" and b.section not in seen:
            seen.append(b.section)
    return seen


def test_every_block_is_run_or_says_why_not() -> None:
    blocks = readme_blocks()
    assert len(blocks) >= 8
    for b in blocks:
        if b.mark == "not run":
            assert b.arg, f"{b}: `not run` needs a reason"
        elif b.mark == "file":
            assert b.arg and not Path(b.arg).is_absolute() and ".." not in Path(b.arg).parts, b
        elif b.lang not in SHOWN:
            assert b.lang in RUNNABLE, f"{b}: mark it `<!-- not run: why -->` or make it runnable"
            assert b.lang != "toml", f"{b}: a config is run through a file: `<!-- file: NAME -->`"
    # Every section with something to run is run by test_readme_section (and checked there).
    assert set(_sections()) == {*EXPECTED, "The config file"}


def test_extractor_sees_markers_and_sections() -> None:
    text = (
        "## A\n\n<!-- not run: shown only -->\n```bash\necho hi\n```\n\n"
        "## B\n<!-- file: x.toml -->\n```toml\n[miner]\n```\n```python\nprint(1)\n```\n"
    )
    a, b, c = readme_blocks(text)
    assert (a.section, a.lang, a.mark, a.arg) == ("A", "bash", "not run", "shown only")
    assert a.body == "echo hi\n"
    assert (b.section, b.mark, b.arg, b.line) == ("B", "file", "x.toml", 10)
    assert (c.lang, c.mark, c.body) == ("python", None, "print(1)\n")


def _env(work: Path) -> dict[str, str]:
    # `sectors` is the console script installed next to this interpreter.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "SECTORFSM_REPO": str(work / "repo"), "PATH": path, "COLUMNS": "200"}


def _run(block: Block, work: Path) -> str:
    if block.lang == "python":
        cmd = [sys.executable, "-c", block.body]
    else:
        script = _INSTALL.sub("", block.body)
        assert not re.search(r"^\s*pip ", script, re.M), f"{block}: the test cannot run pip"
        cmd = ["bash", "-eu", "-o", "pipefail", "-c", script]
    proc = subprocess.run(
        cmd, cwd=work, env=_env(work), capture_output=True, text=True, timeout=240
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{block} failed (exit {proc.returncode}):\n{output}"
    assert "Traceback" not in output, f"{block}:\n{output}"
    return output


@pytest.mark.parametrize("section", _sections())
def test_readme_section(section: str, tmp_path: Path) -> None:
    blocks = [b for b in readme_blocks() if b.section == section and b.lang in RUNNABLE]
    ran = []
    output = ""
    for block in blocks:
        if block.mark == "not run":
            continue
        if block.mark == "file":
            (tmp_path / block.arg).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / block.arg).write_text(block.body, encoding="utf-8")
        else:
            output += _run(block, tmp_path)
        ran.append(block)
    assert ran == [b for b in blocks if b.mark != "not run"]
    for text in EXPECTED.get(section, []):
        assert text in output, f"{section}: {text!r} not printed:\n{output}"
    if section == "The config file":
        # The relative storage path resolves against the config file, as the README says.
        assert any((tmp_path / "sectors-storage").rglob("*")), output
        assert "all 1 sector(s) are Proving" in output


def test_the_synopsis_names_real_commands_and_options() -> None:
    [synopsis] = [
        b for b in readme_blocks() if b.mark == "not run" and b.body.startswith("sectors ")
    ]
    for line in synopsis.body.splitlines():
        words = shlex.split(line.split("#", 1)[0].replace("[", " ").replace("]", " "))
        assert words[0] == "sectors", line
        # The command path: `status`, or `quarantine list` (lower-case words before the rest).
        path = list(itertools.takewhile(lambda w: re.fullmatch(r"[a-z][a-z-]*", w), words[1:]))
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (line, result.output)
        for flag in (w for w in words[1 + len(path) :] if w.startswith("--")):
            assert flag in result.output, f"{line}: {flag} is not an option of {path}"
