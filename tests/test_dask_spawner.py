"""The job registry's warm spawner: job children are forked, not started as fresh interpreters.

Each child is forked by one long-lived spawner per table (its own session, dying with the
spawner, which dies with the worker); a spawner that dies takes its running children with it
and the next job gets a new one; without a spawner a job still runs, as a fresh interpreter.
Job functions are `os` functions (what the child sees) and tests/jobfuncs.py's `gate`.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
from conftest import HANG_GUARD, Spawner, until

from sectorfsm.sealing.backends.dask import jobs, spawner
from sectorfsm.sealing.backends.dask.jobrecord import JobFailed, JobState
from sectorfsm.sealing.backends.dask.jobs import JobTable

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


def spawners_of(pid: int) -> list[int]:
    """The job spawner processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and parent_of(int(entry.name)) == pid:
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if SPAWNER in cmdline:
                found.append(int(entry.name))
    return found


def test_a_table_opened_on_a_worker_has_its_spawner_before_any_job(tmp_path: Path) -> None:
    with jobs.hold_jobs():
        table = jobs.open_table(tmp_path, "box/1")
        assert table.root == tmp_path / "box_1"
        (warm,) = spawners_of(os.getpid())  # started with the table, no job yet
        assert jobs.open_table(tmp_path, "box/1") is table  # the same table, no second spawner
        assert spawners_of(os.getpid()) == [warm]
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
        started = until(lambda: count.exists() and count.read_text().split(), "the job's child")
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
        before = threading.active_count()
        running = [
            threading.Thread(target=table.run, args=(f"PC1-s{n}-a1", "jobfuncs:gate", gated))
            for n in range(4)
        ]
        for t in running:
            t.start()
        until(lambda: len(count.read_text().split()) == 5 or None, "four gated jobs running")
        # One thread per waiting caller, none per child: the spawner's reader reports the ends.
        assert threading.active_count() == before + len(running)
        assert not [t for t in threading.enumerate() if t.name.startswith("job-PC1")]
        go.touch()
        for t in running:
            t.join(HANG_GUARD)
        assert {r.state for r in table.records()} == {JobState.DONE}
    finally:
        table.close()


def test_a_running_record_with_a_complete_result_is_done_after_a_restart(tmp_path: Path) -> None:
    # Why a done record is written without fsync: the child's result file (synced) decides.
    table = JobTable(tmp_path / "jobs")
    try:
        assert table.run("AP-s1-a1", "builtins:abs", [-4]) == 4
        jobdir = tmp_path / "jobs" / "AP-s1-a1"
        (record,) = table.records()
        record.state = JobState.RUNNING
        (jobdir / "record").write_bytes(record.encode())  # as if the done record was lost
    finally:
        table.close()
    again = JobTable(tmp_path / "jobs")
    try:
        again.recover()
        assert [r.state for r in again.records()] == [JobState.DONE]
        assert again.run("AP-s1-a1", "builtins:abs", [-4]) == 4  # answered, not re-run
    finally:
        again.close()
