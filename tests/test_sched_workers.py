"""Worker backends: local detection, and the Dask-shaped submit/kill contract."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from sectorfsm.sched import (
    Job,
    Scheduler,
    SectorRef,
    TaskSelector,
    TaskType,
    WorkerResources,
    WorkerSpec,
    detect_resources,
    local_worker,
)


def test_local_worker_detects_this_host() -> None:
    res = detect_resources(gpus=("gpu0",))
    assert res.cpus == len(os.sched_getaffinity(0))
    assert res.mem_physical > 1 << 28 and 0 <= res.mem_used <= res.mem_physical
    assert res.gpus == ("gpu0",)
    spec = local_worker("here")
    assert spec.name == "here" and not spec.needs_heartbeats


class RecordingBackend:
    """A stand-in for a remote cluster: jobs run until killed; kills are recorded."""

    def __init__(self) -> None:
        self.submitted: list[int] = []
        self.killed: list[int] = []
        self.running: dict[int, asyncio.Event] = {}
        self.started = asyncio.Event()

    async def submit(self, job_id: int, fn: Any, *args: Any) -> Any:
        self.submitted.append(job_id)
        self.started.set()
        stop = self.running[job_id] = asyncio.Event()
        await stop.wait()  # a remote job: only `kill` ends it early
        return fn(*args)

    async def kill(self, job_id: int) -> None:
        self.killed.append(job_id)
        self.running[job_id].set()


def test_cancelling_a_running_job_kills_it_on_the_backend() -> None:
    async def main() -> None:
        backend = RecordingBackend()
        sched = Scheduler()
        sched.add_worker(
            WorkerSpec("remote", WorkerResources(cpus=8, mem_physical=64 << 30)), backend
        )

        async def work(job: Job) -> Any:
            return await job.run(lambda: "done")

        task = asyncio.create_task(
            sched.schedule(SectorRef(1, 1, 2048), TaskType.COMMIT2, TaskSelector(), None, work)
        )
        await backend.started.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert backend.killed == backend.submitted == [1]
        assert not sched.worker("remote").ledger.entries

    asyncio.run(main())


def test_a_finished_remote_job_returns_its_result() -> None:
    async def main() -> str:
        backend = RecordingBackend()
        sched = Scheduler()
        sched.add_worker(
            WorkerSpec("remote", WorkerResources(cpus=8, mem_physical=64 << 30)), backend
        )

        async def work(job: Job) -> Any:
            return await job.run(lambda x: f"sealed {x}", job.sector.number)

        task = asyncio.create_task(
            sched.schedule(SectorRef(1, 7, 2048), TaskType.COMMIT2, TaskSelector(), None, work)
        )
        await backend.started.wait()
        backend.running[1].set()
        return str(await task)

    assert asyncio.run(main()) == "sealed 7"
