"""Prefetch under `balanced`: a task fetches while the GPU is busy, bounded so nobody hoards."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import run

from sectorfsm.fsm import VirtualClock
from sectorfsm.sched.fetch import fetch_prepare
from sectorfsm.sched.filetypes import FileType, space_needed
from sectorfsm.sched.ledger import WorkerResources
from sectorfsm.sched.scheduler import Job, Scheduler
from sectorfsm.sched.selectors import ExistingSelector, TaskSelector
from sectorfsm.sched.storage import SectorRef, StoragePath
from sectorfsm.sched.tasks import TaskType
from sectorfsm.sched.workers import WorkerSpec

GIB = 1 << 30
TIB = 1 << 40
S32 = 32 << 30
GPU_BOX = WorkerResources(cpus=32, mem_physical=512 * GIB, gpus=("rtx",))
PC1_BOX = WorkerResources(cpus=64, mem_physical=1024 * GIB)
FILES = FileType.CACHE | FileType.SEALED
#: The link every worker has, in bytes per second: PC2's files take FETCH_S to arrive.
LINK = 1.25e9
FETCH_S = space_needed(FILES, S32) / LINK


def spec(name: str, res: WorkerResources, tasks: set[TaskType]) -> WorkerSpec:
    return WorkerSpec(
        name,
        res,
        task_types=frozenset(tasks),
        paths=(StoragePath(f"{name}-ssd", name, 20 * TIB),),
        bandwidth=LINK,
    )


def sector(n: int) -> SectorRef:
    return SectorRef(1000, n, S32)


class Trace:
    """Work that takes `seconds` of virtual time and records who ran what, when."""

    def __init__(self, sched: Scheduler, clock: VirtualClock) -> None:
        self.sched, self.clock = sched, clock
        self.starts: list[tuple[str, TaskType, str, float]] = []
        self.gpu_running: dict[str, int] = {}
        self.most_gpu = 0

    def work(self, seconds: float) -> Callable[[Job], Awaitable[None]]:
        async def work(job: Job) -> None:
            name = job.worker.name
            self.starts.append((name, job.task_type, str(job.sector), self.clock.now()))
            led = job.worker.ledger
            assert led.mem_min_used <= led.resources.mem_physical
            assert led.gpu_used <= len(led.resources.gpus) + 1e-9
            assert led.claimed_gpu <= len(led.resources.gpus) + 1e-9
            self.gpu_running[name] = self.gpu_running.get(name, 0) + 1
            self.most_gpu = max(self.most_gpu, self.gpu_running[name])
            try:
                await self.clock.sleep(seconds)
            finally:
                self.gpu_running[name] -= 1

        return work

    def pc2(self, n: int, seconds: float) -> Awaitable[None]:
        sel = ExistingSelector(FILES, allow_fetch=True)
        prep = fetch_prepare(self.sched, FILES)
        return self.sched.schedule(sector(n), TaskType.PRE_COMMIT2, sel, prep, self.work(seconds))

    def c2(self, n: int, seconds: float) -> Awaitable[None]:
        return self.sched.schedule(
            sector(n), TaskType.COMMIT2, TaskSelector(), None, self.work(seconds)
        )


def cluster(clock: VirtualClock, gpu_boxes: int = 1) -> tuple[Scheduler, Trace]:
    sched = Scheduler(clock=clock)
    sched.add_worker(spec("pc1", PC1_BOX, {TaskType.PRE_COMMIT1}))
    for i in range(gpu_boxes):
        sched.add_worker(spec(f"gpu{i}", GPU_BOX, {TaskType.PRE_COMMIT2, TaskType.COMMIT2}))
    return sched, Trace(sched, clock)


async def start(coro: Awaitable[Any]) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(0)
    return task


async def finish(tasks: list[asyncio.Task[Any]]) -> None:
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_pc2_fetches_while_c2_holds_the_gpu_and_starts_when_it_ends() -> None:
    clock = VirtualClock(start=0.0)

    async def main() -> None:
        sched, trace = cluster(clock)
        sched.index.add_sector(sector(2), FILES, "pc1-ssd")
        c2 = await start(trace.c2(1, 3 * FETCH_S))
        pc2 = await start(trace.pc2(2, 100.0))
        await finish([c2, pc2])
        # The fetch ran beside C2; the GPU went to PC2 the moment C2 let it go.
        assert trace.starts == [
            ("gpu0", TaskType.COMMIT2, str(sector(1)), 0.0),
            ("gpu0", TaskType.PRE_COMMIT2, str(sector(2)), pytest.approx(3 * FETCH_S)),
        ]
        assert trace.most_gpu == 1
        assert not sched.worker("gpu0").ledger.entries

    run(main)


def test_a_stream_of_pc2_and_c2_never_overcommits_the_gpu_or_memory() -> None:
    clock = VirtualClock(start=0.0)

    async def main() -> None:
        sched, trace = cluster(clock)
        tasks = []
        for n in range(12):
            sched.index.add_sector(sector(n), FILES, "pc1-ssd")
            # Each task outlasts a fetch, as PC2 (25 min) and C2 (30 min) outlast 7 min.
            tasks.append(await start(trace.pc2(n, FETCH_S + 200.0 + 37 * n)))
            tasks.append(await start(trace.c2(100 + n, FETCH_S + 150.0 + 11 * n)))
        await finish(tasks)
        assert len(trace.starts) == 24
        assert trace.most_gpu == 1, "two GPU tasks ran at once on one GPU"
        # The GPU idled only while the first PC2's files arrived: the rest fetched beside work.
        busy = sum(2 * FETCH_S + 200.0 + 37 * n + 150.0 + 11 * n for n in range(12))
        assert clock.now() == pytest.approx(FETCH_S + busy)
        led = sched.worker("gpu0").ledger
        assert not led.entries and led.claimed_gpu == 0 and led.gpu_used == 0

    run(main)


def test_a_task_goes_to_an_idle_worker_rather_than_waiting_on_a_busy_one() -> None:
    clock = VirtualClock(start=0.0)

    async def main() -> None:
        sched, trace = cluster(clock, gpu_boxes=2)
        # gpu0 holds the PC2's files (no fetch: it scores best) but its GPU is busy with C2.
        sched.index.add_sector(sector(2), FILES, "gpu0-ssd")
        sched.disable("gpu1", "not yet")
        c2 = await start(trace.c2(1, 1000.0))
        sched.enable("gpu1")
        pc2 = await start(trace.pc2(2, 100.0))
        await finish([c2, pc2])
        assert [(w, t) for w, _, _, t in trace.starts] == [
            ("gpu0", 0.0),
            ("gpu1", pytest.approx(FETCH_S)),
        ]

    run(main)


def test_claims_are_bounded_to_one_waiting_task_per_gpu() -> None:
    clock = VirtualClock(start=0.0)

    async def main() -> None:
        sched, trace = cluster(clock, gpu_boxes=2)
        tasks = [await start(trace.c2(1, 1000.0)), await start(trace.c2(2, 3000.0))]
        for n in range(10, 14):
            sched.index.add_sector(sector(n), FILES, "pc1-ssd")
            tasks.append(await start(trace.pc2(n, 500.0)))
        await clock.sleep(1.0)
        # One PC2 fetching per GPU; the other two wait in the queue, not on a worker.
        assert [sched.worker(f"gpu{i}").ledger.claimed_gpu for i in range(2)] == [1.0, 1.0]
        assert len(sched.queue) == 2
        await finish(tasks)
        # gpu0 frees first: the queued PC2s go there, none waits on gpu1 behind its long C2.
        by_worker = [(w, tt) for w, tt, _, _ in trace.starts]
        assert by_worker.count(("gpu0", TaskType.PRE_COMMIT2)) == 3
        assert by_worker.count(("gpu1", TaskType.PRE_COMMIT2)) == 1
        assert trace.most_gpu == 1

    run(main)
