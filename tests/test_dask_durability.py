"""What a job's files survive without `fsync`, and what a torn file is read as.

A job's `running` record and its result are written and renamed without `fsync` (the page
cache survives a kill of any of our processes; a job that ends well writes no other
record); only a power loss of the worker machine can lose or tear them, and then a torn
result is a failed job, never a result. Failed and cancelled records are still synced.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import child_env

from sectorfsm.sealing.backends.dask import child
from sectorfsm.sealing.backends.dask.jobrecord import JobFailed, JobRecord, JobState, encode_spec
from sectorfsm.sealing.backends.dask.table import JobTable


def test_a_done_job_costs_no_fsync_in_the_worker_nor_in_its_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    prefix = tmp_path / "inline"
    assert child.main(["child", str(prefix)], encode_spec("builtins:abs", [-2])) == 0
    assert child.open_result((tmp_path / "inline.result").read_bytes()) == 2
    table = JobTable(tmp_path / "jobs")
    try:
        assert table.run("AP-s1-a1", "builtins:abs", [-3]) == 3
        with pytest.raises(JobFailed):
            table.run("AP-s2-a1", "builtins:int", ["bad"])
    finally:
        table.close()
    # The failed record only (a thread another test left may sync its own files meanwhile).
    assert len([path for path in synced if path.startswith(str(tmp_path))]) == 1, synced
    states = {r.job_id: r.state for r in JobTable(tmp_path / "jobs").records()}
    assert states == {"AP-s1-a1": JobState.DONE, "AP-s2-a1": JobState.FAILED}


@pytest.mark.parametrize("torn", [b"", b"\x00", b"\x00" * 5, b"\x01\x00\x00"])
def test_a_torn_result_is_a_failed_job_never_a_result(tmp_path: Path, torn: bytes) -> None:
    table = JobTable(tmp_path / "jobs")
    try:
        assert table.run("AP-s1-a1", "builtins:abs", [-1]) == 1
        job = tmp_path / "jobs" / "AP-s1-a1"
        job.with_name(f"{job.name}.result").write_bytes(torn)  # as a power loss may leave it
        with pytest.raises(JobFailed, match="result on the worker is missing or unreadable"):
            table.run("AP-s1-a1", "builtins:abs", [-1])
        (record,) = table.records()
        record.state = JobState.RUNNING  # the done record lost too: recovery reads the result
        job.with_name(f"{job.name}.record").write_bytes(record.encode())
    finally:
        table.close()
    again = JobTable(tmp_path / "jobs")
    try:
        again.recover()
        (record,) = again.records()
        assert record.state is JobState.FAILED
        with pytest.raises(JobFailed, match="its worker stopped while it ran"):
            again.run("AP-s1-a1", "builtins:abs", [-1])  # not re-run either
    finally:
        again.close()


def test_a_lost_record_runs_the_job_again_a_lost_result_does_not(tmp_path: Path) -> None:
    table = JobTable(tmp_path / "jobs")
    try:
        assert table.run("AP-s1-a1", "builtins:abs", [-1]) == 1
        assert table.run("AP-s2-a1", "builtins:abs", [-2]) == 2
        # After a power loss: the first job's files without its record, the second's done
        # record without its result.
        os.unlink(tmp_path / "jobs" / "AP-s1-a1.record")
        os.unlink(tmp_path / "jobs" / "AP-s2-a1.result")
        assert table.run("AP-s1-a1", "builtins:abs", [-1]) == 1  # its run died: run again
        with pytest.raises(JobFailed, match="missing or unreadable"):
            table.run("AP-s2-a1", "builtins:abs", [-2])
        assert [r.state for r in table.records()] == [JobState.DONE, JobState.DONE]
    finally:
        table.close()


def test_a_job_that_ends_well_writes_its_record_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its `running` record and its result say it is done: no `done` record is written."""
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    count = tmp_path / "count"
    args = [str(count), 2, 3]
    table = JobTable(tmp_path / "jobs")
    try:
        assert table.run("AP-s1-a1", "jobfuncs:add", args) == 5
        raw = JobRecord.decode((tmp_path / "jobs" / "AP-s1-a1.record").read_bytes())
        assert raw.state is JobState.RUNNING and raw.pid > 0  # as written before its child ran
        (record,) = table.records()
        assert record.state is JobState.DONE and record.exit_code == 0
        assert record.finished >= record.started > 0
        assert table.run("AP-s1-a1", "jobfuncs:add", args) == 5  # answered, not run again
    finally:
        table.close()
    again = JobTable(tmp_path / "jobs")  # the worker process restarted
    try:
        again.recover()
        assert [r.state for r in again.records()] == [JobState.DONE]
        assert again.run("AP-s1-a1", "jobfuncs:add", args) == 5
    finally:
        again.close()
    assert len(count.read_text().splitlines()) == 1


def test_a_new_jobs_record_is_written_in_place_and_an_empty_one_fails_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first record needs no temporary file and rename: a kill can only leave it empty
    (no child has the job yet), and an empty record is a failed job, never one run again."""
    renames: list[str] = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: renames.append(str(b)) or real(a, b))
    table = JobTable(tmp_path / "jobs")
    try:
        assert table.run("AP-s1-a1", "builtins:abs", [-1]) == 1
        # The result's rename is the child's, in its own process (a thread another test left
        # may rename its own files meanwhile).
        assert [path for path in renames if path.startswith(str(tmp_path))] == []
        (tmp_path / "jobs" / "AP-s2-a1.record").write_bytes(b"")  # as a kill may leave it
        with pytest.raises(JobFailed, match="record on the worker is unreadable"):
            table.run("AP-s2-a1", "builtins:abs", [-2])
    finally:
        table.close()
