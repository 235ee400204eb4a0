"""Dispatch latency of the scheduler path onto a remote worker (a real `dask worker` process).

A job's Dask future used to be released on its own as the job ended; the client sends to the
scheduler at most once per 10 ms, so that lone release held the next job's submit back for
the rest of the interval. Now the release rides with the next submit: one message per job.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Spawner, eventually
from test_dask_engine import identity, in_cluster, start_worker

from sectorfsm.sched import Scheduler
from sectorfsm.sched.scheduler import Job
from sectorfsm.sched.selectors import TaskSelector
from sectorfsm.sched.storage import SectorRef
from sectorfsm.sched.tasks import TaskType
from sectorfsm.sealing.backends.dask.backend import RELEASE_DELAY, Releases
from sectorfsm.sealing.backends.dask.membership import Cluster

JOBS = 8


def test_jobs_one_after_another_cost_one_client_message_each(
    spawn: Spawner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    added: list[float] = []  # when each finished job's future was queued for its release
    real_add = Releases.add

    def add(self: Releases, future: Any) -> None:
        added.append(time.monotonic())
        real_add(self, future)

    monkeypatch.setattr(Releases, "add", add)

    async def body(sched: Scheduler, cluster: Cluster, said: list[str]) -> None:
        start_worker(spawn, cluster.address, "wa", identity("wa", (TaskType.ADD_PIECE,)))
        await eventually(lambda: sched.find_worker("wa"), "wa registered")
        client = cluster.client
        # The client's heartbeat (every 5 s) is a message of its own: a loaded machine can
        # take more than one interval for the jobs, so the heartbeats sent are counted.
        beats: list[object] = []
        comm = client.scheduler_comm
        real_send = comm.send

        def send(*msgs: Any) -> None:
            beats.extend(m for m in msgs if m.get("op") == "heartbeat-client")
            real_send(*msgs)

        comm.send = send

        async def work(job: Job) -> Any:
            return await job.run(abs, -1)

        async def one(n: int) -> None:
            sector = SectorRef(1000, n, 2048)
            assert await sched.schedule(sector, TaskType.ADD_PIECE, TaskSelector(), None, work)

        await one(0)  # warm: the worker imports the job registry's child once
        batches, beats_before = client.scheduler_comm.batch_count, len(beats)
        for n in range(1, JOBS + 1):
            await one(n)
        sent = client.scheduler_comm.batch_count - batches
        pending, held = Releases.of(client).pending(), time.monotonic() - added[-1]
        heartbeats = len(beats) - beats_before
        # Each job's submit carries the previous job's release (the old code sent 2 per job).
        # The slack of 2 covers a client heartbeat; it grows by each heartbeat past the first.
        assert sent <= JOBS + 1 + max(1, heartbeats), (
            f"{sent} client messages for {JOBS} jobs ({heartbeats} heartbeats)"
        )
        # An idle engine releases the last job's future on its own, soon: not at once (unless
        # this loop was held up past the delay since the job ended).
        assert pending == 1 or held >= RELEASE_DELAY, (pending, held)
        await eventually(lambda: not Releases.of(client).pending(), "the last release sent")
        await eventually(lambda: not client.futures, "the client holds no job's future")

    in_cluster(tmp_path, body)


def test_a_job_costs_the_engine_one_task_of_its_own(spawn: Spawner, tmp_path: Path) -> None:
    """The backend waits for a job's end or its worker's loss with no watcher task per job."""

    async def body(sched: Scheduler, cluster: Cluster, said: list[str]) -> None:
        start_worker(spawn, cluster.address, "wa", identity("wa", (TaskType.ADD_PIECE,)))
        await eventually(lambda: sched.find_worker("wa"), "wa registered")
        (backend,) = cluster.membership.members.values()
        assert await backend.submit(1, abs, -1) == 1  # warm
        loop = asyncio.get_running_loop()
        made: list[str] = []

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
            made.append(getattr(coro, "__qualname__", type(coro).__name__))
            return asyncio.Task(coro, loop=loop, **kw)

        loop.set_task_factory(factory)
        try:
            assert await backend.submit(2, abs, -2) == 2
        finally:
            loop.set_task_factory(None)
        # The old code also ran a task per job on the worker's `lost` event, then cancelled
        # and reaped it when the job ended.
        ours = [name for name in made if "Backend" in name or "Event" in name]
        assert ours == ["DaskWorkerBackend.call.<locals>.result"], made

    in_cluster(tmp_path, body)


def test_jobs_share_one_dask_task_prefix(spawn: Spawner, tmp_path: Path) -> None:
    """Dask groups keys by their first word and keeps a prefix for good (scheduler and worker
    metrics): a word per job (`j17-...`) grew both with every job."""

    async def body(sched: Scheduler, cluster: Cluster, said: list[str]) -> None:
        start_worker(spawn, cluster.address, "wa", identity("wa", (TaskType.ADD_PIECE,)))
        await eventually(lambda: sched.find_worker("wa"), "wa registered")
        (backend,) = cluster.membership.members.values()
        assert cluster.scheduler is not None
        before = set(cluster.scheduler.task_prefixes)
        for n in range(1, 4):
            assert await backend.submit(n, abs, -n) == n
        assert set(cluster.scheduler.task_prefixes) - before <= {"job"}
        assert len(set(cluster.scheduler.task_prefixes) - before) == 1

    in_cluster(tmp_path, body)
