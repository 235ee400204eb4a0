"""The Dask worker's job registry: each job runs once, in a child a kill really stops.

The Dask tests run a real scheduler in the test's event loop and real `dask worker`
processes on 127.0.0.1; job functions come from tests/jobfuncs.py and count their runs in
a file. Every wait is on something observable (a worker joined, a count line, a pid gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dask.config
import pytest
from conftest import HANG_GUARD, Child, Spawner, child_env, eventually, run, until
from distributed import Client, Scheduler
from distributed.core import Status

from sectorfsm.sealing.backends.dask import jobs
from sectorfsm.sealing.backends.dask.acks import AckBatch
from sectorfsm.sealing.backends.dask.jobrecord import (
    JobCancelled,
    JobDetached,
    JobError,
    JobFailed,
    JobRecord,
    JobSpecError,
    JobState,
)
from sectorfsm.sealing.backends.dask.table import JobTable

TESTS = Path(__file__).resolve().parent
GATE = "jobfuncs:gate"


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def lines(path: Path) -> list[str]:
    """The lines of `path` (none if it does not exist yet)."""
    return path.read_text().splitlines() if path.exists() else []


@dataclass
class Cluster:
    """A scheduler in this loop, an async client, and `dask worker` processes."""

    spawn: Spawner
    scheduler: Scheduler
    client: Client
    state: Path

    def worker(self, name: str) -> Child:
        """Start a `dask worker` process (no nanny) named `name`."""
        args = [
            "-m",
            "distributed.cli.dask_worker",
            self.scheduler.address,
            *("--name", name, "--nthreads", "4", "--memory-limit", "0"),
            *("--no-nanny", "--no-dashboard", "--host", "127.0.0.1"),
        ]
        return self.spawn.python(*args, name=name, env=child_env())

    async def address(self, name: str) -> str:
        """The address of the worker named `name`, once it has joined."""

        def find() -> str | None:
            return next((a for a, w in self.scheduler.workers.items() if w.name == name), None)

        found: str = await eventually(find, f"worker {name} joining")
        return found


@contextlib.asynccontextmanager
async def cluster(spawn: Spawner, tmp: Path) -> AsyncIterator[Cluster]:
    """A scheduler that fails a task as its worker dies, and a client with the registry."""
    config = {
        "distributed.scheduler.allowed-failures": 0,
        "distributed.scheduler.work-stealing": False,
    }
    with dask.config.set(config):
        async with (
            Scheduler(host="127.0.0.1", port=0, dashboard=False) as scheduler,
            Client(scheduler.address, asynchronous=True) as client,
        ):
            await jobs.install(client, str(tmp / "jobs"))
            try:
                yield Cluster(spawn, scheduler, client, tmp / "jobs")
            finally:
                spawn.close()  # the workers go before the scheduler


def in_cluster(spawn: Spawner, tmp: Path, body: Callable[[Cluster], Awaitable[None]]) -> None:
    """Run `body` against a fresh cluster on a fresh event loop."""

    async def main() -> None:
        async with cluster(spawn, tmp) as c:
            await body(c)

    run(main)


# ---------------------------------------------------------------------- without Dask


def test_bad_input_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    table = JobTable(tmp_path / "jobs")
    cases: list[tuple[str, str, Any]] = [
        ("../escape", "jobfuncs:add", []),
        ("", "jobfuncs:add", []),
        ("PC1-s1-a1", "jobfuncs.add", []),
        ("PC1-s1-a1", "jobfuncs:add", "not a list"),
        ("PC1-s1-a1", "jobfuncs:add", [object()]),
    ]
    for job_id, func, args in cases:
        with pytest.raises(JobSpecError) as err:
            table.run(job_id, func, args)
        assert "\n" not in str(err.value)
        with pytest.raises(JobSpecError):
            jobs.submit(None, "tcp://127.0.0.1:1", job_id, func, args)  # type: ignore[arg-type]
    assert not (tmp_path / "jobs").exists()
    assert table.ack("PC1-s9-a1") is False
    with pytest.raises(JobSpecError):
        table.ack("a/b")


def test_a_job_left_running_by_a_dead_worker_is_failed_not_rerun(tmp_path: Path) -> None:
    table = JobTable(tmp_path / "jobs")
    (tmp_path / "jobs").mkdir()
    left = JobRecord("PC1-s1-a1", GATE, JobState.RUNNING, pid=0, started=1.0)
    (tmp_path / "jobs" / "PC1-s1-a1.record").write_bytes(left.encode())
    table.recover()
    (record,) = table.records()
    assert record.state is JobState.FAILED and "not re-run" in record.error
    count = tmp_path / "count"
    with pytest.raises(JobFailed, match="its worker stopped while it ran"):
        table.run("PC1-s1-a1", GATE, [str(count), str(tmp_path / "go"), 1])
    assert not count.exists()


def test_a_job_id_is_never_reused_for_other_work(tmp_path: Path) -> None:
    table = JobTable(tmp_path / "jobs")
    (tmp_path / "jobs").mkdir()
    done = JobRecord("AP-s1-a1", "jobfuncs:add", JobState.DONE, digest="0" * 64)
    (tmp_path / "jobs" / "AP-s1-a1.record").write_bytes(done.encode())
    with pytest.raises(JobSpecError, match="already names another job"):
        table.run("AP-s1-a1", "jobfuncs:add", ["count", 9, 9])
    assert table.records() == [done]


def test_a_running_job_attaches_refuses_ack_and_dies_on_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    table = JobTable(tmp_path / "jobs")
    count, never = tmp_path / "count", tmp_path / "never"
    args = [str(count), str(never), 7]
    outcomes: list[BaseException] = []

    def run_one() -> None:
        try:
            table.run("PC1-s7-a1", GATE, args)
        except JobCancelled as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=run_one) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        until(lambda: lines(count) or None, "the job's child starting")
        with pytest.raises(JobSpecError, match="is running: kill it"):
            table.ack("PC1-s7-a1")
        assert asyncio.run(table.kill("PC1-s7-a1")) is JobState.CANCELLED
    finally:
        table.close()  # whatever happened, no child outlives the test
        for thread in threads:
            thread.join(HANG_GUARD)
    assert len(outcomes) == 2  # the second run attached to the first one's child
    assert len(lines(count)) == 1
    assert table.ack("PC1-s7-a1") is True and table.records() == []


def test_under_hold_jobs_a_closing_worker_detaches_and_the_next_one_attaches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    count, release = tmp_path / "count", tmp_path / "release"
    args = [str(count), str(release), 42]
    outcomes: list[object] = []
    state = str(tmp_path / "jobs")

    def worker() -> Any:
        return SimpleNamespace(name="w1", status=Status.running)

    def wait_in_task(table: JobTable, job_id: str, job_args: list[Any]) -> threading.Thread:
        def body() -> None:
            try:
                outcomes.append(table.run(job_id, GATE, job_args))
            except JobError as exc:
                outcomes.append(exc)

        thread = threading.Thread(target=body)
        thread.start()
        return thread

    with jobs.hold_jobs(wait=HANG_GUARD):
        first, w1 = jobs.JobRegistry(state), worker()
        first.setup(w1)
        assert first.table is not None
        task = wait_in_task(first.table, "PC1-s1-a1", args)
        until(lambda: lines(count) or None, "the job's child starting")
        (pid,) = map(int, lines(count))

        again = jobs.JobRegistry(state)  # an engine registering the plugin again
        first.teardown(w1)
        again.setup(w1)
        assert again.table is first.table and task.is_alive()

        w1.status = Status.closing  # the scheduler went away: the Worker closes
        again.teardown(w1)
        task.join(HANG_GUARD)
        assert isinstance(outcomes[0], JobDetached) and alive(pid)

        nxt = jobs.JobRegistry(state)  # the next Worker of the process
        nxt.setup(worker())
        assert nxt.table is first.table
        release.touch()
        assert nxt.table.run("PC1-s1-a1", GATE, args) == 42
        assert lines(count) == [str(pid)]

        task = wait_in_task(nxt.table, "PC1-s2-a1", [str(count), str(tmp_path / "no"), 0])
        until(lambda: len(lines(count)) == 2 or None, "the second job's child starting")
        second = int(lines(count)[1])
    # Leaving hold_jobs (the `sectors worker` process exiting) kills what still runs.
    task.join(HANG_GUARD)
    assert not alive(second)
    assert isinstance(outcomes[1], JobFailed) and "worker closed" in str(outcomes[1])


def test_a_coroutine_waiting_for_a_job_can_go_and_come_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run_async` (the Dask task's way): cancelling or detaching its wait leaves the job."""
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    table = JobTable(tmp_path / "jobs")
    count, go = tmp_path / "count", tmp_path / "go"
    args = [str(count), str(go), 5]

    async def main() -> None:
        first = asyncio.ensure_future(table.run_async("PC1-s1-a1", GATE, args))
        await eventually(lambda: lines(count), "the job's child starting")
        first.cancel()  # as a closing Dask worker cancels its coroutine tasks
        with pytest.raises(asyncio.CancelledError):
            await first
        second = asyncio.ensure_future(table.run_async("PC1-s1-a1", GATE, args))
        await asyncio.sleep(0)  # one loop turn: the task's first step attaches it, in full
        table.detach()
        with pytest.raises(JobDetached):
            await second
        go.touch()
        assert await table.run_async("PC1-s1-a1", GATE, args) == 5

    try:
        run(main)
    finally:
        go.touch()
        table.close()
    assert len(lines(count)) == 1  # one child ran it, through three waits


# ---------------------------------------------------------------------- real Dask


def test_run_a_job_get_its_result_keep_it_until_ack(spawn: Spawner, tmp_path: Path) -> None:
    count = tmp_path / "count"

    async def body(c: Cluster) -> None:
        c.worker("w1")
        addr = await c.address("w1")
        fut = jobs.submit(c.client, addr, "AP-s1-a1", "jobfuncs:add", [str(count), 2, 3])
        assert await fut == 5
        fut.release()  # once the scheduler forgets the key, a resubmit is a new task
        await eventually(lambda: "AP-s1-a1" not in c.scheduler.tasks, "the key forgotten")
        (record,) = await jobs.jobs(c.client, addr)
        assert record.job_id == "AP-s1-a1" and record.state is JobState.DONE

        async def again() -> Any:
            fut = jobs.submit(c.client, addr, "AP-s1-a1", "jobfuncs:add", [str(count), 2, 3])
            return await fut

        assert await again() == 5  # from the record: the child did not run again
        assert len(lines(count)) == 1
        # A coroutine task: the worker ran it on its event loop (where `client.run` runs
        # this), not on one of its task threads.
        on_loop = await c.client.run(
            lambda key, dask_worker: dask_worker.threads.get(key) == threading.get_ident(),
            "AP-s1-a1",
            workers=[addr],
        )
        assert on_loop == {addr: True}

        failing = jobs.submit(c.client, addr, "PC1-s1-a1", "jobfuncs:boom", ["no ticket"])
        with pytest.raises(JobFailed) as err:
            await failing
        assert str(err.value) == "job PC1-s1-a1 failed (exit code 1): ValueError: no ticket"

        assert await jobs.ack(c.client, addr, "AP-s1-a1") is True
        assert [r.job_id for r in await jobs.jobs(c.client, addr)] == ["PC1-s1-a1"]
        assert await jobs.ack(c.client, addr, "AP-s1-a1") is False

    in_cluster(spawn, tmp_path, body)


def test_kill_stops_the_child_and_the_task_ends_cancelled(spawn: Spawner, tmp_path: Path) -> None:
    count, stubborn = tmp_path / "count", tmp_path / "stubborn"

    async def body(c: Cluster) -> None:
        c.worker("w1")
        addr = await c.address("w1")
        never = str(tmp_path / "never")
        fut = jobs.submit(c.client, addr, "PC1-s2-a1", GATE, [str(count), never, 0])
        await eventually(lambda: lines(count), "the job's child starting")
        (record,) = await jobs.jobs(c.client, addr)
        assert record.state is JobState.RUNNING and alive(record.pid)

        assert await jobs.kill(c.client, addr, "PC1-s2-a1") is JobState.CANCELLED
        with pytest.raises(JobCancelled, match="killed by request"):
            await fut
        # SIGTERM ended it, so no grace period was spent before a SIGKILL (its exit status
        # says so, where a time limit would fail on a loaded machine).
        records = {r.job_id: r for r in await jobs.jobs(c.client, addr)}
        assert records["PC1-s2-a1"].exit_code == -signal.SIGTERM
        assert not alive(record.pid)

        # a child that ignores SIGTERM gets SIGKILL after the grace
        fut = jobs.submit(c.client, addr, "PC1-s3-a1", "jobfuncs:stubborn", [str(stubborn)])
        await eventually(lambda: lines(stubborn), "the stubborn child starting")
        assert await jobs.kill(c.client, addr, "PC1-s3-a1", grace=0.2) is JobState.CANCELLED
        with pytest.raises(JobCancelled):
            await fut
        records = {r.job_id: r for r in await jobs.jobs(c.client, addr)}
        assert records["PC1-s3-a1"].exit_code == -signal.SIGKILL

        # killed before it started: a late run raises instead of starting it
        assert await jobs.kill(c.client, addr, "PC1-s4-a1") is JobState.CANCELLED
        late = jobs.submit(c.client, addr, "PC1-s4-a1", GATE, [str(count), never, 0])
        with pytest.raises(JobCancelled, match="before it started"):
            await late
        assert len(lines(count)) == 1

    in_cluster(spawn, tmp_path, body)


ENGINE = """
import sys
from distributed import Client
from sectorfsm.sealing.backends.dask import jobs
client = Client(sys.argv[1])
fut = jobs.submit(client, sys.argv[2], "PC1-s5-a1", "jobfuncs:gate", sys.argv[3:5] + [42])
print("submitted", flush=True)
print("result", fut.result(), flush=True)
"""


def test_engine_killed_mid_job_the_child_runs_once(spawn: Spawner, tmp_path: Path) -> None:
    count, release = tmp_path / "count", tmp_path / "release"

    async def body(c: Cluster) -> None:
        c.worker("w1")
        addr = await c.address("w1")
        args = [str(count), str(release)]
        clients = set(c.scheduler.clients)
        engine = spawn.python("-c", ENGINE, c.scheduler.address, addr, *args, env=child_env())
        await eventually(lambda: lines(count), "the job's child starting")
        engine.kill()  # kill -9 of the engine: its client connection drops mid-job
        await eventually(lambda: set(c.scheduler.clients) == clients, "its client gone")

        fut = jobs.submit(c.client, addr, "PC1-s5-a1", GATE, [*args, 42])
        (record,) = await jobs.jobs(c.client, addr)
        assert record.state is JobState.RUNNING and alive(record.pid)
        release.touch()
        assert await fut == 42
        assert len(lines(count)) == 1  # one child, its result handed to the new engine
        (record,) = await jobs.jobs(c.client, addr)
        assert record.state is JobState.DONE  # kept until the engine acknowledges it

    in_cluster(spawn, tmp_path, body)


def test_worker_restart_reports_the_running_job_failed(spawn: Spawner, tmp_path: Path) -> None:
    count = tmp_path / "count"

    async def body(c: Cluster) -> None:
        worker = c.worker("w1")
        addr = await c.address("w1")
        args = [str(count), str(tmp_path / "never"), 0]
        fut = jobs.submit(c.client, addr, "PC1-s6-a1", GATE, args)
        await eventually(lambda: lines(count), "the job's child starting")
        (record,) = await jobs.jobs(c.client, addr)

        worker.kill()  # kill -9 of the worker process alone: the child dies with it
        with pytest.raises(Exception, match="died"):  # KilledWorker
            await fut
        fut.release()  # Dask would hand the errored task back to a resubmit of a key still held
        await eventually(lambda: "PC1-s6-a1" not in c.scheduler.tasks, "the key forgotten")
        await eventually(lambda: not alive(record.pid), "the child dying with its worker")
        await eventually(lambda: not c.scheduler.workers, "the worker leaving")

        c.worker("w1")  # restarted under the same name: the registry is installed again
        addr = await c.address("w1")
        (record,) = await jobs.jobs(c.client, addr)
        assert record.state is JobState.FAILED
        assert "its worker stopped while it ran" in record.error
        again = jobs.submit(c.client, addr, "PC1-s6-a1", GATE, args)
        with pytest.raises(JobFailed, match="not re-run"):
            await again
        assert len(lines(count)) == 1

    in_cluster(spawn, tmp_path, body)


def test_acks_ride_with_the_next_job_or_go_together_after_a_delay(
    spawn: Spawner, tmp_path: Path
) -> None:
    count = tmp_path / "count"

    async def body(c: Cluster) -> None:
        c.worker("w1")
        addr = await c.address("w1")
        runs: list[str] = []
        real = c.client.run

        async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
            runs.append(fn.__name__)
            return await real(fn, *args, **kwargs)

        c.client.run = counted  # type: ignore[method-assign]
        batch = AckBatch(c.client, addr, delay=HANG_GUARD)  # only a job can carry them
        for n in (1, 2):
            fut = jobs.submit(c.client, addr, f"AP-s{n}-a1", "jobfuncs:add", [str(count), n, n])
            assert await fut == 2 * n
            fut.release()
            batch.add(f"AP-s{n}-a1")
        with pytest.raises(JobSpecError):
            batch.add("a/b")
        carried = batch.take()
        fut = jobs.submit(c.client, addr, "AP-s3-a1", "jobfuncs:add", [str(count), 3, 3], carried)
        assert await fut == 6
        fut.release()
        assert runs == []  # no round trip of their own
        assert [r.job_id for r in await jobs.jobs(c.client, addr)] == ["AP-s3-a1"]
        assert batch.take() == []

        soon = AckBatch(c.client, addr, delay=0.05)
        soon.add("AP-s3-a1")
        soon.add("AP-s9-a1")  # never known there: acking it again is harmless
        await eventually(lambda: "ack_jobs" in runs, "the batch sent alone")
        await eventually(lambda: _records_gone(c, addr), "the record forgotten")
        assert runs.count("ack_jobs") == 1 and "ack_job" not in runs  # one trip for the batch

    in_cluster(spawn, tmp_path, body)


async def _records_gone(c: Cluster, addr: str) -> bool:
    return not await jobs.jobs(c.client, addr)


def test_acks_carried_by_a_job_are_forgotten_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    table = JobTable(tmp_path / "jobs")
    count, go = tmp_path / "count", tmp_path / "go"
    done: list[object] = []
    try:
        assert table.run("AP-s1-a1", "builtins:abs", [-1]) == 1
        assert table.run("AP-s2-a1", "builtins:abs", [-2]) == 2
        (tmp_path / "jobs" / "AP-s2-a1.spec").write_bytes(b"left by a fresh child")
        gated = threading.Thread(
            target=lambda: done.append(
                table.run("PC1-s3-a1", GATE, [str(count), str(go), 3], ["AP-s1-a1", "AP-s2-a1"])
            )
        )
        gated.start()
        # Deleted while the job runs (the gate is still closed), the extra file included.
        # The acks go as the child gets the job, so its first line may come after them.
        until(lambda: [r.job_id for r in table.records()] == ["PC1-s3-a1"] or None, "acks")
        until(lambda: lines(count) or None, "the gated child started")
        assert not done
        go.touch()
        gated.join(HANG_GUARD)
        assert done == [3]
        kept = ["PC1-s3-a1.record", "PC1-s3-a1.result"]
        until(
            lambda: sorted(p.name for p in (tmp_path / "jobs").glob("*-a1.*")) == kept or None,
            "the acknowledged jobs' files deleted",
        )
    finally:
        go.touch()
        table.close()


def test_a_table_recovered_again_while_a_job_runs_keeps_the_files_of_running_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under `hold_jobs` each new Worker recovers the same table while its jobs run: only the
    first recovery, before any job, drops temporary files and files beside no record."""
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    root = tmp_path / "jobs"
    table = JobTable(root)
    count, go = tmp_path / "count", tmp_path / "go"
    done: list[object] = []
    try:
        table.recover()
        gated = threading.Thread(
            target=lambda: done.append(table.run("PC1-s1-a1", GATE, [str(count), str(go), 7]))
        )
        gated.start()
        until(lambda: lines(count) or None, "the job running")
        writing = [root / "PC1-s1-a1.result.tmp", root / "other.result"]
        for path in writing:
            path.write_bytes(b"being written")
        table.recover()  # a new Worker of the same process
        assert all(path.exists() for path in writing)
        go.touch()
        gated.join(HANG_GUARD)
        assert done == [7]
    finally:
        go.touch()
        table.close()
