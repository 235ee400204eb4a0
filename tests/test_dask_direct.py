"""The worker talks to its warm job children itself; acknowledged jobs are deleted off the lock.

The spawner only forks, reaps and signals: a job's start and end go between the worker and
its child with nothing in between, so a frozen spawner stops no job that has a warm child.
A job's record is written once as it starts, with the child's pid in it. An acknowledged
job leaves the table at once and its files are deleted by the table's sweeper thread, so a
slow disk never holds the table's lock (and every job of the worker) up.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import HANG_GUARD, until

from sectorfsm.sealing.backends.dask import sweeper
from sectorfsm.sealing.backends.dask.jobrecord import JobFailed, JobRecord, JobState
from sectorfsm.sealing.backends.dask.pool import PoolConfig
from sectorfsm.sealing.backends.dask.sweeper import Sweeper
from sectorfsm.sealing.backends.dask.table import JobTable

TESTS = Path(__file__).resolve().parent


def in_thread(call: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    """Run `call(*args)` on a thread; its result (or error) lands in the list."""
    out: list[Any] = []

    def body() -> None:
        try:
            out.append(call(*args))
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def test_a_frozen_spawner_stops_no_job_that_has_a_warm_child(tmp_path: Path) -> None:
    table = JobTable(tmp_path / "jobs", PoolConfig(size=2))
    spawner = 0
    try:
        assert table.run("AP-s1-a1", "builtins:abs", [-1]) == 1
        spawner = table.spawner_pid() or 0
        assert spawner
        os.kill(spawner, signal.SIGSTOP)
        thread, out = in_thread(table.run, "AP-s2-a1", "os:getppid", [])
        thread.join(HANG_GUARD)
        assert out == [spawner]  # forked by it, but run and answered without it
    finally:
        if spawner:
            os.kill(spawner, signal.SIGCONT)
        table.close()


def test_a_job_record_has_its_childs_pid_before_the_job_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    table = JobTable(tmp_path / "jobs", PoolConfig(size=1))
    try:
        for n in (1, 2):
            pid, raw = table.run(f"AP-s{n}-a1", "poolfuncs:own_record", [])
            record = JobRecord.decode(raw)
            assert (record.state, record.pid) == (JobState.RUNNING, pid)
    finally:
        table.close()


def test_an_ack_never_holds_the_table_up_while_the_disk_deletes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = JobTable(tmp_path / "jobs")
    deleting, go = threading.Event(), threading.Event()
    real = sweeper.delete

    def slow_delete(path: str) -> None:
        deleting.set()
        go.wait(HANG_GUARD)  # a disk that takes its time
        real(path)

    try:
        assert table.run("AP-s1-a1", "builtins:abs", [-1]) == 1
        monkeypatch.setattr(sweeper, "delete", slow_delete)
        acking, acked = in_thread(table.ack, "AP-s1-a1")
        assert deleting.wait(HANG_GUARD)
        running, out = in_thread(table.run, "AP-s2-a1", "builtins:abs", [-2])
        running.join(HANG_GUARD)
        assert out == [2]  # while the first job's files are still being deleted
        acking.join(HANG_GUARD)
        assert acked == [True]
        assert [r.job_id for r in table.records()] == ["AP-s2-a1"]  # gone from the table
        assert table.ack("AP-s1-a1") is False
    finally:
        go.set()
        table.close()
    trash = tmp_path / "jobs+trash"
    until(lambda: not any(trash.iterdir()) or None, "the sweeper emptying the trash")


def test_what_a_killed_worker_left_in_the_trash_is_deleted_by_the_next_table(
    tmp_path: Path,
) -> None:
    left = tmp_path / "jobs+trash" / "AP-s1-a1.1.0"
    left.mkdir(parents=True)
    for name in ("record", "result", "output", "spec"):
        (left / name).write_bytes(b"x")
    table = JobTable(tmp_path / "jobs")
    try:
        table.recover()
        until(lambda: not left.exists() or None, "the trash emptied")
        assert table.records() == []
    finally:
        table.close()


def test_the_sweeper_deletes_dropped_jobs_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drops within `delay` of the first wait for one batch: one wake-up of its thread."""
    delay = 0.5
    # The thread's wait of `delay` ends when the test says: a loaded machine can take longer
    # than that between the first drop and the checks that the batch is still open.
    naps: list[float] = []
    batch_closes = threading.Event()
    real_sleep = time.sleep

    def nap(seconds: float) -> None:
        if seconds != delay:  # the sweeper of another test's table
            real_sleep(seconds)
            return
        naps.append(seconds)
        batch_closes.wait(HANG_GUARD)

    monkeypatch.setattr(sweeper, "time", SimpleNamespace(sleep=nap))
    trash = tmp_path / "jobs+trash"
    sweep = Sweeper(str(trash), delay=delay)
    root = tmp_path / "jobs"
    root.mkdir()
    try:
        for n in range(10):
            for name in ("record", "result"):
                (root / f"AP-s{n}-a1.{name}").write_bytes(b"x")
        for n in range(10):
            job = f"AP-s{n}-a1"
            assert sweep.drop(job, f"{root}/{job}.record", [f"{root}/{job}.result"]) is True
        assert sweep.drop("AP-s9-a2", f"{root}/AP-s9-a2.record") is False  # no such job
        assert not list(root.glob("*.record"))  # out of the table at once
        assert len(list(trash.iterdir())) == 10  # none deleted yet: the batch is still open
        assert len(list(root.glob("*.result"))) == 10
        sweep.settle("AP-s3-a1")  # the id is taken again: what is left of it goes now
        assert not (root / "AP-s3-a1.result").exists()
        until(lambda: naps or None, "the sweeper's thread waiting for its batch")
    finally:
        batch_closes.set()
    until(lambda: not any(trash.iterdir()) or None, "the batch deleted")
    until(lambda: not any(root.iterdir()) or None, "the jobs' files deleted")
    assert naps == [delay]  # one wake-up of the thread for all ten


def test_a_job_makes_no_directory_and_an_ack_leaves_none_of_its_files(tmp_path: Path) -> None:
    """A job's files sit in the table's root (`ID.NAME`): a directory per job cost more CPU
    (its creation, its first file, its removal) than the rest of a trivial job."""
    root = tmp_path / "jobs"
    table = JobTable(root)
    try:
        assert table.run("AP-s1-a1", "builtins:abs", [-1]) == 1
        assert table.run("AP-s1-a1.x", "builtins:abs", [-2]) == 2  # dotted ids stay apart
        assert not [p for p in root.iterdir() if p.is_dir()]
        names = sorted(p.name for p in root.iterdir() if not p.name.startswith("+child-"))
        assert names == [f"AP-s1-a1{x}.{n}" for x in ("", ".x") for n in ("record", "result")]
        assert [r.job_id for r in table.records()] == ["AP-s1-a1", "AP-s1-a1.x"]
        assert table.ack("AP-s1-a1") is True
        assert [r.job_id for r in table.records()] == ["AP-s1-a1.x"]  # forgotten at once
        assert table.ack("AP-s1-a1") is False
        left = lambda: sorted(p.name for p in root.glob("AP-*")) == names[2:] or None  # noqa: E731
        until(left, "the acknowledged job's files deleted")
        assert table.run("AP-s1-a1", "builtins:abs", [-3]) == 3  # the id is free again
    finally:
        table.close()


def test_jobs_of_a_worker_from_before_the_flat_layout_are_kept(tmp_path: Path) -> None:
    """A directory per job (as earlier workers left them) becomes files of the root at start."""
    first = JobTable(tmp_path / "jobs")
    try:
        assert first.run("AP-s1-a1", "builtins:abs", [-5]) == 5
        running = JobRecord("PC1-s2-a1", "builtins:abs", JobState.RUNNING, started=2.0)
    finally:
        first.close()
    root = tmp_path / "jobs"
    for job_id in ("AP-s1-a1", "PC1-s2-a1"):
        (root / job_id).mkdir()
    for name in ("record", "result"):
        os.rename(root / f"AP-s1-a1.{name}", root / "AP-s1-a1" / name)
    (root / "AP-s1-a1" / "output").write_bytes(b"")
    (root / "PC1-s2-a1" / "record").write_bytes(running.encode())
    (root / "stray.record.tmp").write_bytes(b"half")
    (root / "AP-s7-a1.result").write_bytes(b"acked")  # its record went, then the worker died
    again = JobTable(root)
    try:
        again.recover()
        until(lambda: not [p for p in root.iterdir() if p.is_dir()] or None, "dirs swept")
        states = {r.job_id: r.state for r in again.records()}
        assert states == {"AP-s1-a1": JobState.DONE, "PC1-s2-a1": JobState.FAILED}
        assert again.run("AP-s1-a1", "builtins:abs", [-5]) == 5  # its result, not a re-run
        assert not (root / "stray.record.tmp").exists()
        assert not (root / "AP-s7-a1.result").exists()
    finally:
        again.close()


def test_a_warm_child_writes_one_output_file_a_failed_job_keeps_its_own(tmp_path: Path) -> None:
    """A new output file per job was a tenth of a trivial job's CPU: a warm child empties its
    own for each job, and hands it to a job that fails (its last line is the job's error)."""
    root = tmp_path / "jobs"
    table = JobTable(root, PoolConfig(size=1))
    try:
        for n in range(1, 4):
            assert table.run(f"AP-s{n}-a1", "builtins:abs", [-n]) == n
        (output,) = root.glob("+child-*.output")
        assert not list(root.glob("AP-*.output"))
        with pytest.raises(JobFailed, match=r"failed \(exit code 1\): ValueError: invalid"):
            table.run("AP-s4-a1", "builtins:int", ["bad"])
        assert "ValueError" in (root / "AP-s4-a1.output").read_text()
        assert table.run("AP-s5-a1", "builtins:abs", [-5]) == 5  # the same child, a new file
        assert [p.name for p in root.glob("+child-*.output")] == [output.name]
        assert output.read_bytes() == b""
    finally:
        table.close()
