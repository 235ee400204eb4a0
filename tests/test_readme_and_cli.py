"""The README's statechart and Quickstart, and the CLI entry points, work as documented.

`test_readme.py` runs every block of the README; this file covers what the blocks do not:
the help output, `sectors run` edge cases in a real process, and the daemon's own views.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from conftest import HANG_GUARD

ROOT = Path(__file__).resolve().parents[1]


def test_readme_statechart_is_current() -> None:
    text = (ROOT / "README.md").read_text()
    embedded = text.split("<!-- statechart:begin -->\n```mermaid\n", 1)[1].split("```\n<!--", 1)[0]
    assert embedded == (ROOT / "statecharts" / "lifecycle.mmd").read_text()


def test_quickstart_commands_are_the_documented_ones() -> None:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quick, re.S)
    assert commands == [
        "pip install -e . && sectors run --pledge 3 --until-proving",
        "pip install -e '.[test]' && pytest",
    ]
    assert "pip install -e '.[test]' && pytest" in (ROOT / ".ci" / "run").read_text()


def test_python_m_and_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sectorfsm", "--version"],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )
    assert out.returncode == 0 and out.stdout.startswith("sectorfsm ")


def test_demo_resumes_from_its_repo(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "120"}
    cmd = [sys.executable, "-m", "sectorfsm", "demo", "--repo", str(tmp_path / "r")]
    first = subprocess.run(
        [*cmd, "-n", "30"], capture_output=True, text=True, env=env, timeout=HANG_GUARD
    )
    assert first.returncode == 0, first.stderr
    assert re.search(r"Proving\s*│\s*30", first.stdout), first.stdout
    second = subprocess.run(
        [*cmd, "-n", "45"], capture_output=True, text=True, env=env, timeout=HANG_GUARD
    )
    assert second.returncode == 0, second.stderr
    assert re.search(r"Proving\s*│\s*45", second.stdout), second.stdout


def test_demo_bad_input_is_a_clear_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sectorfsm", "demo", "--machines", "zero"],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--machines" in out.stderr


def test_help_shows_flags_as_flags_and_no_stale_text() -> None:
    from typer.testing import CliRunner

    from sectorfsm.cli.app import app

    for args in ([], ["list"], ["run"], ["status"], ["demo"], ["statechart"]):
        out = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"}).output
        assert "--help" in out and "<bool>" not in out, (args, out)
        assert "--repo" in out, args
    demo = CliRunner().invoke(app, ["demo", "--help"], env={"COLUMNS": "200"}).output
    assert "not built yet" not in demo and "sectors run" in demo


def _sectors(*args: str, repo: Path, **kw: object) -> subprocess.Popen[str]:
    env = {**os.environ, "SECTORFSM_REPO": str(repo), "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-m", "sectorfsm", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,  # type: ignore[call-overload]
    )


def test_until_proving_with_nothing_to_wait_for_exits_at_once(tmp_path: Path) -> None:
    config = tmp_path / "sim.toml"
    config.write_text('[miner]\nsealer = "sim"\n')
    proc = _sectors("run", "--config", str(config), "--until-proving", repo=tmp_path / "repo")
    try:
        out, _ = proc.communicate(timeout=HANG_GUARD)
    finally:
        proc.kill()
    assert proc.returncode == 1, out
    assert "--until-proving has nothing to wait for: this repo has no sectors" in out


class _Output:
    """A process's stdout, read line by line by one thread, the only reader of the pipe.

    (A second reader, such as `communicate()`, would get an arbitrary share of the lines.)
    """

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def until(self, wanted: str, timeout: float = HANG_GUARD) -> str:
        """Output up to the first line containing `wanted` (the process keeps running)."""
        seen = ""
        while True:
            line = self.lines.get(timeout=timeout)  # a hang guard: the line normally comes soon
            if line is None:
                code = self.proc.wait()
                raise AssertionError(f"exited ({code}) without printing {wanted!r}:\n{seen}")
            seen += line
            if wanted in line:
                return seen

    def rest(self, timeout: float = HANG_GUARD) -> str:
        """Everything else it prints, once its output ends."""
        text = ""
        while (line := self.lines.get(timeout=timeout)) is not None:
            text += line
        return text


def test_run_prints_a_refusal_that_holds_every_sector(tmp_path: Path) -> None:
    # myScheduler's reading of a policy file: PreCommit1Max left out is 0, PC1 disabled.
    (tmp_path / "myscheduler.json").write_text('{"AddPieceMax": null}')
    config = tmp_path / "sectors.toml"
    config.write_text(
        '[miner]\nsealer = "sim"\nblock_time = 0.1\n'
        '[[workers]]\nname = "box"\ncpus = 2\nmemory = "8GiB"\npolicy = "myscheduler.json"\n'
        '[[workers.paths]]\nid = "scratch"\npath = "storage"\ncapacity = "1GiB"\n'
        "seal = true\nstore = true\n"
    )
    proc = _sectors("run", "--config", str(config), "--pledge", "2", repo=tmp_path / "repo")
    try:
        out = _Output(proc)
        seen = out.until("no worker can run PC1")
        assert "scheduler: no worker can run PC1: box: PC1 disabled on this worker" in seen
        assert "(2 task(s) waiting)" in seen
        proc.send_signal(signal.SIGINT)
        rest = out.rest()
        assert proc.wait(timeout=HANG_GUARD) == 0
    finally:
        proc.kill()
    assert (seen + rest).count("no worker can run PC1") == 1  # said once, not every tick


def test_refusals_are_reported_once_and_when_they_change() -> None:
    from sectorfsm.cli.run import RefusalWatch

    def snap(reason: str | None, running: bool = False) -> dict[str, object]:
        diag = (
            [] if reason is None else [{"task": "PC1", "sector": "s-1", "reasons": {"w": reason}}]
        )
        jobs = [{"worker": "w"}] if running else []
        return {"diag": diag, "jobs": jobs}

    watch = RefusalWatch()
    said = [
        watch.update(s)
        for s in (
            snap("PC1 disabled"),  # first sight: could be the instant between two jobs
            snap("PC1 disabled"),
            snap("PC1 disabled"),
            snap("needs 56 GiB RAM"),
            snap("needs 56 GiB RAM"),
            snap("needs 56 GiB RAM", running=True),  # something runs: not every sector is held
            snap("could take it now"),
            snap(None),
        )
    ]
    assert said == [
        None,
        "scheduler: no worker can run PC1: w: PC1 disabled (1 task(s) waiting)",
        None,
        None,
        "scheduler: no worker can run PC1: w: needs 56 GiB RAM (1 task(s) waiting)",
        "scheduler: tasks are being placed again",
        None,
        None,
    ]
