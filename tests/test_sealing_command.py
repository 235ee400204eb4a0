"""The `command` sealer: operator executables per task, their failures, timeouts and kills."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Spawner, eventually, until
from sealtools import kinds, miner, run

from sectorfsm.sealing import commp
from sectorfsm.sealing.backends import sectorfile
from sectorfsm.sealing.backends.command import CommandBackend, CommandConfigError
from sectorfsm.sealing.info import SectorInfo
from sectorfsm.sealing.miner import Miner

DAY = 86400.0
FAST = {"retry": {"base": 30.0, "factor": 2.0, "cap": 600.0, "budget": 6}}
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "command_sealer.py"
TASKS = ("AP", "PC1", "PC2", "C1", "C2", "FIN")
SECTOR = 2048


def _options(**commands: list[str]) -> dict[str, Any]:
    """The example sealer for every task (run by this venv's Python), some replaced."""
    example = [sys.executable, str(EXAMPLE)]
    return {"commands": {t: example for t in TASKS} | commands}


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _trace(info: SectorInfo, event: str) -> str:
    return next(e.trace for e in reversed(info.log) if e.kind == f"event;{event}")


def _files(tmp_path: Path, n: int) -> tuple[Path, Path, Path]:
    root, name = tmp_path / "repo" / "storage", f"s-t01000-{n}"
    return root / "unsealed" / name, root / "sealed" / name, root / "cache" / name


def _gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_cc_and_deal_sectors_reach_proving_through_the_example(tmp_path: Path) -> None:
    assert os.access(EXAMPLE, os.X_OK)
    assert EXAMPLE.read_text().startswith("#!/usr/bin/env python3\n")

    async def body() -> None:
        data = os.urandom(900)
        piece = tmp_path / "piece.bin"
        piece.write_bytes(data)
        options = _options(REMOVE=[sys.executable, str(EXAMPLE)])
        async with miner(tmp_path, sealer="command", sealer_options=options) as m:
            assert isinstance(m.sealer.backend, CommandBackend)
            cc = await m.pledge()
            deal = await m.add_piece(commp.piece_cid(piece), 1024, data_path=str(piece))
            info = await m.wait(cc, "Proving", timeout=DAY)
            assert info.comm_d == commp.zero_piece_cid(SECTOR)
            dinfo = await m.wait(deal, "Proving", timeout=DAY)
            pieces = [(p.piece_cid, p.size) for p in dinfo.pieces]
            assert dinfo.comm_d == commp.unsealed_cid(SECTOR, pieces)
            unsealed, sealed, cache = _files(tmp_path, deal)
            raw = unsealed.read_bytes()  # kept for the deal
            assert sectorfile.fr32_unpad(raw[:1024])[:900] == data
            assert sectorfile.read_sealed(sealed, SECTOR)["comm_r"] == dinfo.comm_r
            assert not _files(tmp_path, cc)[0].exists()  # a CC sector's unsealed copy goes
            # No RELEASE_UNSEALED command: the engine deletes the file itself.
            await m.sealer.release_unsealed(m.sealing.ref(dinfo))
            assert not unsealed.exists() and sealed.exists()
            await m.remove(deal)
            await m.wait(deal, "Removed", timeout=DAY)
            assert not unsealed.exists() and not sealed.exists() and not cache.exists()

    run(body)


def test_a_failing_command_puts_the_tail_of_its_stderr_in_the_sector_log(tmp_path: Path) -> None:
    async def body() -> None:
        code = "import sys; sys.stderr.write('x' * 5000 + 'the last words'); sys.exit(3)"
        options = _options(PC1=_python(code))
        async with miner(tmp_path, sealer="command", sealer_options=options, config=FAST) as m:
            n = await m.pledge()
            info = await m.wait(n, "SealPreCommit1Failed", timeout=DAY)
            trace = _trace(info, "SectorSealPreCommit1Failed")
            assert "PC1 command for sector s-t01000-1" in trace
            assert "exited with code 3" in trace and trace.endswith("the last words")
            assert trace.count("x") < 2100  # only the tail

    run(body)


def test_a_command_past_its_timeout_is_killed(tmp_path: Path) -> None:
    async def body() -> None:
        # It would sleep far past the test's timeout: reaching the failed state proves the kill.
        options = _options(PC2=_python("import time; time.sleep(3600)"))
        options["timeouts"] = {"PC2": 0.5}
        async with miner(tmp_path, sealer="command", sealer_options=options, config=FAST) as m:
            n = await m.pledge()
            info = await m.wait(n, "SealPreCommit2Failed", timeout=DAY)
            trace = _trace(info, "SectorSealPreCommit2Failed")
            assert "timed out after 0.5 s and was killed" in trace
            assert m.sealer.backend.running == {}  # type: ignore[attr-defined]

    run(body)


def test_remove_kills_the_running_commands_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    finished = tmp_path / "finished"  # written only if something outlived the kill
    # The background child (a subshell) finishes too if only the leader is killed, even
    # one killed while it was still starting (its children then keep its pipes open).
    script = (
        f"(sleep 60; touch {finished}) & echo $! > {pids}.tmp; echo $$ >> {pids}.tmp; "
        f"mv {pids}.tmp {pids}; wait; touch {finished}"
    )

    async def body() -> None:
        sh = shutil.which("sh")
        assert sh is not None
        options = _options(PC1=[sh, "-c", script])
        # SIGKILL only after an hour: the remove must end the group with its SIGTERM.
        options["kill_grace"] = 3600
        async with miner(tmp_path, sealer="command", sealer_options=options) as m:
            n = await m.pledge()
            await m.wait(n, "PreCommit1", timeout=DAY)
            deadline = time.monotonic() + 120  # a hang guard
            while not pids.exists():
                assert time.monotonic() < deadline, "the PC1 command never started"
                await asyncio.sleep(0.02)
            child, shell = (int(x) for x in pids.read_text().split())
            assert not _gone(child) and not _gone(shell)
            await m.remove(n)
            info = await m.wait(n, "Removed", timeout=DAY)
            assert _gone(shell)  # the leader is reaped before the step ends
            # The group's kill is sent, but a member exits only once the kernel runs it again
            # (later on a loaded machine). Had it not been killed it would touch `finished`
            # before it exits, 60 s from its start.
            await eventually(lambda: _gone(child), f"the PC1 command's child {child} gone")
            assert not finished.exists(), "the PC1 command ran to its end: remove did not kill it"
            assert "SectorPreCommit1" not in kinds(info)
            assert m.sealer.backend.running == {}  # type: ignore[attr-defined]
            assert not _files(tmp_path, n)[0].exists()

    run(body)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("print('not json')", "printed invalid JSON on stdout"),
        ("print('[1, 2]')", "JSON that is not an object"),
        ("print('{\"pc1\": 1}')", "expected 'pc1_out'"),
        ('print(\'{"pc1_out": "zz"}\')', "'pc1_out' that is not hex"),
    ],
)
def test_output_that_is_not_the_expected_json_fails_the_task(
    tmp_path: Path, output: str, message: str
) -> None:
    async def body() -> None:
        options = _options(PC1=_python(output))
        async with miner(tmp_path, sealer="command", sealer_options=options, config=FAST) as m:
            n = await m.pledge()
            info = await m.wait(n, "SealPreCommit1Failed", timeout=DAY)
            assert message in _trace(info, "SectorSealPreCommit1Failed")

    run(body)


def test_missing_or_unrunnable_commands_fail_open_naming_the_task(tmp_path: Path) -> None:
    plain = tmp_path / "plain.sh"
    plain.write_text("#!/bin/sh\necho '{}'\n")
    plain.chmod(0o644)
    cases = [
        ({"commands": {t: ["true"] for t in TASKS if t != "C1"}}, r"no command for task C1"),
        (_options(PC1=[str(tmp_path / "nope")]), r"command for PC1: .*nope does not exist"),
        (_options(FIN=[str(plain)]), r"command for FIN: .*plain\.sh is not executable"),
        (_options(C2=["no-such-sealer-exe"]), r"C2: 'no-such-sealer-exe' is not found on PATH"),
        (_options(XYZ=["true"]), r"unknown task 'XYZ'"),
        ({**_options(), "timeout": 0}, r"timeout must be a positive number"),
        ({**_options(), "bogus": 1}, r"unknown option\(s\) for the command sealer: bogus"),
    ]

    async def body() -> None:
        for options, match in cases:
            with pytest.raises(CommandConfigError, match=match):
                async with Miner.open(
                    tmp_path / "repo", sealer="command", clock="virtual", sealer_options=options
                ):
                    pass
        # The repo was closed cleanly each time: it opens with a good configuration.
        async with miner(tmp_path, sealer="command", sealer_options=_options()) as m:
            assert m.list() is not None

    run(body)


@pytest.mark.parametrize(
    ("case", "message"),
    [("missing", "does not exist"), ("too large", "more than the piece's unpadded size 1016")],
)
def test_bad_piece_file_fails_addpiece_with_the_commands_error(
    tmp_path: Path, case: str, message: str
) -> None:
    async def body() -> None:
        piece = tmp_path / "piece.bin"
        piece.write_bytes(b"p" * 1000)
        cid = commp.piece_cid(piece)
        if case == "missing":
            piece.unlink()
        else:
            piece.write_bytes(b"p" * 1100)
        async with miner(tmp_path, sealer="command", sealer_options=_options(), config=FAST) as m:
            n = await m.add_piece(cid, 1024, data_path=str(piece))
            info = await m.wait(n, "AddPieceFailed", timeout=DAY)
            trace = _trace(info, "SectorAddPieceFailed")
            assert "AP command for sector s-t01000-1" in trace and message in trace

    run(body)


#: PC1 for the kill -9 test: logs `start <pid>`, and on the first attempt leaves a helper
#: process in its group (it inherits the job lock) that logs `helper <pid>`; then waits for
#: the test to write to a FIFO, and only then does the real PC1 and logs `done <pid>`.
PC1_WRAPPER = """\
import os, subprocess, sys
log = os.environ["JOB_LOG"]
first = not os.path.exists(log)
with open(log, "a") as f:
    print("start", os.getpid(), flush=True, file=f)
if first:
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"],
                              close_fds=False)
    with open(log, "a") as f:
        print("helper", helper.pid, flush=True, file=f)
with open(os.environ["JOB_GATE"]) as gate:  # blocks until the test opens it for writing
    gate.read()
sys.argv = [os.environ["EXAMPLE"]]
code = compile(open(os.environ["EXAMPLE"]).read(), os.environ["EXAMPLE"], "exec")
try:
    exec(code, {"__name__": "__main__"})
finally:
    with open(log, "a") as f:
        print("done", os.getpid(), flush=True, file=f)
"""


def _log(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    return [(w, int(p)) for w, p in (line.split() for line in path.read_text().splitlines())]


def test_kill_9_of_the_engine_leaves_no_job_behind_and_never_two_at_once(
    spawn: Spawner, tmp_path: Path
) -> None:
    wrapper, log, gate = tmp_path / "pc1.py", tmp_path / "jobs.log", tmp_path / "gate"
    wrapper.write_text(PC1_WRAPPER)
    os.mkfifo(gate)
    example = [sys.executable, str(EXAMPLE)]
    commands = {t: example for t in TASKS} | {"PC1": [sys.executable, str(wrapper)]}
    env = {"JOB_LOG": str(log), "JOB_GATE": str(gate), "EXAMPLE": str(EXAMPLE)}
    config = tmp_path / "run.toml"
    lines = ['[miner]\nsealer = "command"\nblock_time = 0.1\n[sealer.commands]']
    lines += [f"{t} = {json.dumps(c)}" for t, c in commands.items()]
    lines += ["[sealer.env]", *(f"{k} = {json.dumps(v)}" for k, v in env.items())]
    config.write_text("\n".join(lines) + "\n")
    repo_env = {**os.environ, "SECTORFSM_REPO": str(tmp_path / "repo")}
    run_args = ("-m", "sectorfsm", "run", "--config", config)
    seen: list[int] = []
    try:
        first = spawn.python(*run_args, "--pledge", "1", env=repo_env, name="engine-1")
        [(_, job1), (_, helper)] = until(
            lambda: _log(log)[:2] if len(_log(log)) >= 2 else None,
            "the first PC1 job and its helper",
        )
        seen += [job1, helper]
        first.kill()  # kill -9: no cleanup of any kind
        # The job's own process dies with the engine; its helper still holds the job lock.
        until(lambda: _gone(job1), f"PC1 job {job1} gone after the engine's kill -9")
        assert not _gone(helper)
        second = spawn.python(*run_args, env=repo_env, name="engine-2")
        until(lambda: len(_log(log)) >= 3, "the PC1 job of the restarted engine")
        [*_, (what, job2)] = _log(log)
        seen.append(job2)
        # The new job started only once the old one's whole group was gone.
        assert what == "start" and _gone(helper), _log(log)
        with open(gate, "w") as g:  # let the (only) PC1 job go on
            g.write("go")
        second.wait_for_line(r"sector 1: .*-> Proving\b", anywhere=True)
        assert _log(log) == [("start", job1), ("helper", helper), ("start", job2), ("done", job2)]
        second.interrupt()
        assert second.finish() == 0, second.describe()
    finally:
        for pid in seen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
