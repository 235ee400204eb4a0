"""The job registry's warm spawner: job children are forked, not started as fresh interpreters.

Each child is forked by one long-lived spawner per table (its own session, dying with the
spawner, which dies with the worker); a spawner that dies takes its running children with it
and the next job gets a new one; without a spawner a job still runs, as a fresh interpreter.
Job functions are `os` functions (what the child sees) and tests/jobfuncs.py's `gate`.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import dask.config
import pytest
from conftest import HANG_GUARD, Spawner, until

from sectorfsm.sealing.backends.dask import jobs, spawner
from sectorfsm.sealing.backends.dask.jobrecord import (
    JobCancelled,
    JobFailed,
    JobRecord,
    JobState,
    encode_spec,
)
from sectorfsm.sealing.backends.dask.pool import PoolConfig
from sectorfsm.sealing.backends.dask.table import JobTable, pool_config

TESTS = Path(__file__).resolve().parent
SPAWNER = b"sectorfsm.sealing.backends.dask.spawner"


def parent_of(pid: int) -> int:
    """The parent pid of `pid` (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:")))


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_children_are_forked_by_one_warm_spawner_in_their_own_session(tmp_path: Path) -> None:
    table = JobTable(tmp_path / "jobs")
    try:
        first = table.run("AP-s1-a1", "os:getppid", [])
        second = table.run("AP-s2-a1", "os:getppid", [])
        session = table.run("AP-s3-a1", "os:getsid", [0])
        assert first == second != os.getpid()  # one spawner forked both, not the worker
        assert parent_of(first) == os.getpid()  # the spawner is the worker's child
        pids = {r.job_id: r.pid for r in table.records()}
        assert session == pids["AP-s3-a1"]  # its own session, so a kill reaches its group
    finally:
        table.close()
    until(lambda: not alive(first) or None, "the spawner ending with its table")


def children_of(pid: int) -> set[int]:
    """The processes whose parent is `pid`."""
    return {
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and parent_of(int(entry.name)) == pid
    }


def spawners_of(pid: int) -> set[int]:
    """The job spawner processes whose parent is `pid`."""
    found = set()
    for child in children_of(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if SPAWNER in cmdline:
            found.add(child)
    return found


def test_a_table_opened_on_a_worker_has_its_spawner_before_any_job(tmp_path: Path) -> None:
    # The spawner of an earlier test's table may still be on its way out (a closed table
    # does not wait for it): only spawners started here count.
    before = spawners_of(os.getpid())
    with jobs.hold_jobs():
        table = jobs.open_table(tmp_path, "box/1")
        assert table.root == tmp_path / "box_1"
        warm = table.spawner_pid()
        assert warm is not None
        assert spawners_of(os.getpid()) - before == {warm}  # started with the table
        assert jobs.open_table(tmp_path, "box/1") is table  # the same table, no second spawner
        assert spawners_of(os.getpid()) - before == {warm}
        assert table.run("AP-s1-a1", "os:getppid", []) == warm  # the first job is a fork
    until(lambda: not alive(warm) or None, "the spawner ending with hold_jobs")


def test_sectors_worker_starts_its_spawner_before_the_first_job(
    spawn: Spawner, tmp_path: Path
) -> None:
    from test_dask_worker import connect, free_port, joined, scheduler, setup_files, worker

    box = setup_files(tmp_path)
    sched, address = scheduler(spawn, free_port())
    proc = worker(spawn, "--scheduler", address, "--config", "worker.toml", cwd=box)
    address_of_worker, _ = joined(sched, "from-file")
    (warm,) = spawners_of(proc.pid)  # right after it joined, before any job
    with connect(address) as client:
        fut = jobs.submit(client, address_of_worker, "AP-s1-a1", "os:getppid", [])
        assert fut.result(timeout=HANG_GUARD) == warm  # the first job is forked by it
        # Dask's sampling profiler would only watch task threads wait for their children.
        profiling = client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
        assert profiling == {address_of_worker: False}
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.finish() == 0
    until(lambda: not alive(warm) or None, "the spawner ending with the worker")


def test_a_dead_spawner_takes_its_children_and_the_next_job_gets_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    table = JobTable(tmp_path / "jobs")
    count = tmp_path / "count"
    errors: list[BaseException] = []

    def gated() -> None:
        try:
            table.run("PC1-s1-a1", "jobfuncs:gate", [str(count), str(tmp_path / "never"), 1])
        except JobFailed as exc:
            errors.append(exc)

    thread = threading.Thread(target=gated)
    try:
        thread.start()
        started = until(
            lambda: (count.exists() and count.read_text().split()) or None, "the job's child"
        )
        child = int(started[0])
        old = parent_of(child)
        assert old not in (0, os.getpid())  # the spawner, never the test itself
        os.kill(old, signal.SIGKILL)
        thread.join(HANG_GUARD)
        assert [str(e) for e in errors] == ["job PC1-s1-a1 failed (killed by SIGKILL): no output"]
        until(lambda: not alive(child) or None, "the child dying with its spawner")
        assert table.run("AP-s2-a1", "os:getppid", []) not in (old, os.getpid())
    finally:
        table.close()
        thread.join(HANG_GUARD)


def test_without_a_spawner_the_job_runs_in_a_fresh_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spawner, "_MODULE", "sectorfsm.no_such_spawner")
    table = JobTable(tmp_path / "jobs")
    try:
        assert table.run("AP-s1-a1", "os:getppid", []) == os.getpid()
        with pytest.raises(JobFailed, match=r"failed \(exit code 1\): ValueError: invalid literal"):
            table.run("AP-s2-a1", "builtins:int", ["bad"])
    finally:
        table.close()


def test_a_spawned_job_gets_its_spec_by_pipe_and_no_thread_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent))
    table = JobTable(tmp_path / "jobs")
    count, go = tmp_path / "count", tmp_path / "go"
    gated = [str(count), str(go), 3]
    try:
        assert table.run("AP-s1-a1", "jobfuncs:add", [str(count), 1, 2]) == 3
        assert not (tmp_path / "jobs" / "AP-s1-a1" / "spec").exists()  # the child read no file
        # Compared as sets: a thread an earlier test left may end meanwhile.
        before = set(threading.enumerate())
        running = [
            threading.Thread(target=table.run, args=(f"PC1-s{n}-a1", "jobfuncs:gate", gated))
            for n in range(4)
        ]
        for t in running:
            t.start()
        until(lambda: len(count.read_text().split()) == 5 or None, "four gated jobs running")
        # One thread per waiting caller, none per child: the table's reader reports the ends.
        assert set(threading.enumerate()) - before == set(running)
        assert not [t for t in threading.enumerate() if t.name.startswith("job-PC1")]
        go.touch()
        for t in running:
            t.join(HANG_GUARD)
        assert {r.state for r in table.records()} == {JobState.DONE}
    finally:
        table.close()


def test_a_running_record_with_a_complete_result_is_done_after_a_restart(tmp_path: Path) -> None:
    # A done record may be lost with the machine: the child's result file (checksummed) decides.
    table = JobTable(tmp_path / "jobs")
    try:
        assert table.run("AP-s1-a1", "builtins:abs", [-4]) == 4
        (record,) = table.records()
        record.state = JobState.RUNNING
        # As if the done record was lost.
        (tmp_path / "jobs" / "AP-s1-a1.record").write_bytes(record.encode())
    finally:
        table.close()
    again = JobTable(tmp_path / "jobs")
    try:
        again.recover()
        assert [r.state for r in again.records()] == [JobState.DONE]
        assert again.run("AP-s1-a1", "builtins:abs", [-4]) == 4  # answered, not re-run
    finally:
        again.close()


# ---------------------------------------------------------------------- the warm child pool


def pooled(tmp_path: Path, **settings: int) -> JobTable:
    """A table whose spawner keeps warm children as `settings` say (tests/ on their path)."""
    return JobTable(tmp_path / "jobs", PoolConfig(**settings))


@pytest.fixture
def on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spawner (started by the test's table) imports job functions from tests/."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))


@pytest.mark.usefixtures("on_path")
def test_successive_jobs_run_in_one_warm_child_after_their_record_is_written(
    tmp_path: Path,
) -> None:
    table = pooled(tmp_path, size=2)
    try:
        first, record = table.run("AP-s1-a1", "poolfuncs:own_record", [])
        second, _ = table.run("AP-s2-a1", "poolfuncs:own_record", [])
        assert first == second  # no fork for the second job
        assert table.run("AP-s3-a1", "os:getsid", [0]) == first  # its own session
        assert parent_of(first) not in (0, os.getpid())  # a child of the spawner
        # The job found its record on disk, running, before it did anything.
        assert JobRecord.decode(record).state is JobState.RUNNING
        assert {r.pid for r in table.records()} == {first}
    finally:
        table.close()
    until(lambda: not alive(first) or None, "the warm child ending with its table")


@pytest.mark.usefixtures("on_path")
def test_what_a_job_changes_in_its_process_is_put_back_for_the_next(tmp_path: Path) -> None:
    table = pooled(tmp_path, size=1)
    try:
        pid = table.run("AP-s1-a1", "poolfuncs:dirty", [])
        assert table.run("AP-s2-a1", "poolfuncs:state", []) == [
            pid,  # the same child
            os.getcwd(),
            None,  # the environment variable the last job set is gone
            os.umask(os.umask(0o022)),
            True,  # SIGTERM kills again
            False,  # sys.path as before
            True,  # stdout as before
        ]
    finally:
        table.close()


@pytest.mark.usefixtures("on_path")
def test_a_child_left_with_a_thread_or_a_process_of_its_job_is_retired(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    table = pooled(tmp_path, size=1)
    left = 0
    try:
        threaded = table.run("AP-s1-a1", "poolfuncs:leave_thread", [])
        assert table.run("AP-s2-a1", "os:getpid", []) != threaded
        assert f"job child {threaded} retired: its job left 1 thread(s) running" in (
            capfd.readouterr().err
        )
        until(lambda: not alive(threaded) or None, "the retired child exiting")
        forked, left = table.run("AP-s3-a1", "poolfuncs:leave_process", [])
        assert table.run("AP-s4-a1", "os:getpid", []) != forked
        assert f"job child {forked} retired: its job left process(es) {left} running" in (
            capfd.readouterr().err
        )
    finally:
        table.close()
        if left:
            os.kill(left, signal.SIGKILL)


def test_a_child_is_replaced_after_max_jobs_or_past_max_rss(tmp_path: Path) -> None:
    table = pooled(tmp_path / "jobs", size=1, max_jobs=2)
    try:
        pids = [table.run(f"AP-s{n}-a1", "os:getpid", []) for n in range(1, 5)]
        assert pids[0] == pids[1] != pids[2] == pids[3]
    finally:
        table.close()
    small = pooled(tmp_path / "small", size=1, max_rss_mib=1)  # every child is past it
    try:
        pids = [small.run(f"AP-s{n}-a1", "os:getpid", []) for n in range(1, 4)]
        assert len(set(pids)) == 3
    finally:
        small.close()


def test_with_size_zero_every_job_gets_a_fresh_fork(tmp_path: Path) -> None:
    table = pooled(tmp_path, size=0)
    try:
        pids = [table.run(f"AP-s{n}-a1", "os:getpid", []) for n in range(1, 4)]
        parents = {table.run("AP-s9-a1", "os:getppid", [])}
        assert len(set(pids)) == 3 and os.getpid() not in parents
    finally:
        table.close()


@pytest.mark.usefixtures("on_path")
def test_a_kill_stops_the_jobs_process_group_and_the_pool_replaces_its_child(
    tmp_path: Path,
) -> None:
    table = pooled(tmp_path, size=1)
    count, never = tmp_path / "count", tmp_path / "never"
    outcome: list[BaseException] = []

    def gated() -> None:
        try:
            table.run("PC1-s1-a1", "poolfuncs:gate_with_helper", [str(count), str(never)])
        except JobCancelled as exc:
            outcome.append(exc)

    thread = threading.Thread(target=gated)
    try:
        warm = table.run("AP-s0-a1", "os:getpid", [])
        thread.start()
        child, helper = map(
            int, until(lambda: (count.exists() and count.read_text().split()) or None, "x")
        )
        assert child == warm  # the warm child took the job
        assert asyncio.run(table.kill("PC1-s1-a1", grace=HANG_GUARD)) is JobState.CANCELLED
        thread.join(HANG_GUARD)
        assert [str(e) for e in outcome] == ["job PC1-s1-a1 cancelled: killed by request"]
        until(lambda: not alive(helper) or None, "the job's helper dying with its group")
        until(lambda: not alive(child) or None, "the killed child gone")
        assert table.run("AP-s2-a1", "os:getpid", []) not in (child, os.getpid())
    finally:
        table.close()
        thread.join(HANG_GUARD)


@pytest.mark.usefixtures("on_path")
def test_a_child_dying_mid_job_fails_that_job_only(tmp_path: Path) -> None:
    table = pooled(tmp_path, size=2)
    count, go = tmp_path / "count", tmp_path / "go"
    results: dict[str, object] = {}

    def gated(job_id: str) -> None:
        try:
            results[job_id] = table.run(job_id, "jobfuncs:gate", [str(count), str(go), job_id])
        except JobFailed as exc:
            results[job_id] = str(exc)

    threads = [threading.Thread(target=gated, args=(f"PC1-s{n}-a1",)) for n in (1, 2)]
    try:
        for t in threads:
            t.start()
        until(lambda: len(lines(count)) == 2 or None, "both jobs running")
        pids = {r.job_id: r.pid for r in table.records()}
        assert len(set(pids.values())) == 2  # one child each
        os.kill(pids["PC1-s1-a1"], signal.SIGKILL)
        threads[0].join(HANG_GUARD)
        assert results == {"PC1-s1-a1": "job PC1-s1-a1 failed (killed by SIGKILL): no output"}
        go.touch()
        threads[1].join(HANG_GUARD)
        assert results["PC1-s2-a1"] == "PC1-s2-a1"
        assert table.run("AP-s3-a1", "builtins:abs", [-3]) == 3
    finally:
        go.touch()
        table.close()
        for t in threads:
            t.join(HANG_GUARD)


@pytest.mark.usefixtures("on_path")
def test_a_kill_of_an_ended_job_never_reaches_the_next_job_of_its_child(tmp_path: Path) -> None:
    spawn = spawner.Spawner(PoolConfig(size=1))
    count, go = tmp_path / "count", tmp_path / "go"
    prefixes = [str(tmp_path / name) for name in ("a", "b")]
    try:
        ended = spawn.start(prefixes[0], encode_spec("builtins:abs", [-1]))
        assert ended.wait() == 0
        running = spawn.start(prefixes[1], encode_spec("jobfuncs:gate", [str(count), str(go), 2]))
        assert running.pid == ended.pid  # the same warm child, on its next job
        until(lambda: lines(count) or None, "the next job running")
        ended.returncode = None  # as if the end had not reached the worker yet
        ended.signal(signal.SIGKILL)  # the spawner knows better: this job is over
        go.touch()
        assert running.wait() == 0
        assert (tmp_path / "b.result").exists()
    finally:
        go.touch()
        spawn.close()


@pytest.mark.usefixtures("on_path")
def test_the_next_job_takes_the_child_that_ran_one_not_a_fork_that_came_back_later(
    tmp_path: Path,
) -> None:
    """A fork that comes back while a child that ran a job is idle goes under it: which child
    the next job gets does not depend on when a fork came back."""
    spawn = spawner.Spawner(PoolConfig(size=2))
    count, go, never = tmp_path / "count", tmp_path / "go", str(tmp_path / "never")
    try:
        gated = [str(count), str(go), 1]
        ran = spawn.start(str(tmp_path / "a"), encode_spec("jobfuncs:gate", gated))
        gated = [str(count), never, 2]
        killed = spawn.start(str(tmp_path / "b"), encode_spec("jobfuncs:gate", gated))
        until(lambda: len(lines(count)) == 2 or None, "both jobs running")
        go.touch()
        assert ran.wait() == 0  # its child is idle again
        killed.signal(signal.SIGKILL)
        assert killed.wait() == -signal.SIGKILL  # its child is let go; a fresh one is forked
        forked = until(
            lambda: children_of(spawn.pid or 0) - {ran.pid, killed.pid} or None,
            "the replacement forked",
        )
        again = spawn.start(str(tmp_path / "c"), encode_spec("builtins:abs", [-3]))
        assert again.wait() == 0
        assert again.pid == ran.pid and again.pid not in forked
    finally:
        go.touch()
        spawn.close()


def test_bad_pool_settings_are_one_line_and_start_nothing(tmp_path: Path) -> None:
    bad = [
        ({"size": -1}, r"^bad sectors.child-pool.size -1: give a whole number >= 0$"),
        ({"max-jobs": 0}, r"^bad sectors.child-pool.max-jobs 0: give a whole number >= 1$"),
        ({"size": "2"}, r"^bad sectors.child-pool.size '2': give a whole number >= 0$"),
        ({"sizes": 2}, r"^unknown sectors.child-pool setting 'sizes': use max-jobs, max-rss"),
    ]
    for settings, error in bad:
        with dask.config.set({"sectors.child-pool": settings}), pytest.raises(ValueError) as exc:
            jobs.open_table(tmp_path, "w1")
        assert re.match(error, str(exc.value)), str(exc.value)
    assert not (tmp_path / "w1").exists()
    with dask.config.set({"sectors.child-pool": {"size": 1, "max-rss-mib": 64}}):
        assert pool_config() == PoolConfig(size=1, max_jobs=100, max_rss_mib=64)


def lines(path: Path) -> list[str]:
    """The lines of `path` (none if it does not exist yet)."""
    return path.read_text().splitlines() if path.exists() else []


def test_a_job_that_left_nothing_is_checked_without_reading_a_file() -> None:
    """What a warm child checks after every job costs a few system calls, no /proc file."""
    code = """if True:
        import builtins, os
        from sectorfsm.sealing.backends.dask import warm

        def no_files(*args, **kw):
            raise AssertionError(f"read {args[0]!r} after a job that left nothing")

        builtins.open = os.listdir = no_files
        assert warm.leftovers() == "", warm.leftovers()
        assert 0 < warm.rss_mib() < 1 << 20
        print("checked")
    """
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD
    )
    assert done.stdout == "checked\n", done.stderr


def test_a_spawner_whose_worker_left_while_it_forked_exits_quietly() -> None:
    """No traceback on the worker's stderr when a table closes with a fork on its way."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.send(b"fork")
    ours.close()  # the worker closed: the spawner still reads the fork, then cannot answer
    try:
        done = subprocess.run(
            [sys.executable, "-m", SPAWNER.decode(), "1"],
            stdin=theirs.fileno(),
            capture_output=True,
            text=True,
            timeout=HANG_GUARD,
        )
    finally:
        theirs.close()
    assert (done.returncode, done.stderr) == (0, "")
