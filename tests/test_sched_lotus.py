"""The `lotus` baseline behaves like Lotus's window scheduler, overcommit included."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

from conftest import HANG_GUARD, settle

from sectorfsm.sched.filetypes import FileType
from sectorfsm.sched.ledger import WorkerResources
from sectorfsm.sched.lotus import ActiveResources
from sectorfsm.sched.resources import resource_spec
from sectorfsm.sched.scheduler import Job, Scheduler
from sectorfsm.sched.selectors import AllocSelector, TaskSelector
from sectorfsm.sched.storage import SectorRef, StoragePath
from sectorfsm.sched.tasks import TaskType
from sectorfsm.sched.workers import WorkerSpec

GIB = 1 << 30
S32 = 32 << 30
ONE_PC1 = WorkerResources(cpus=64, mem_physical=100 * GIB)


def worker(name: str, res: WorkerResources = ONE_PC1) -> WorkerSpec:
    return WorkerSpec(name, res, paths=(StoragePath(f"{name}-ssd", name, 1 << 50),))


def test_lotus_promises_a_worker_more_than_it_has_and_balanced_does_not() -> None:
    async def run(assigner: str) -> tuple[int, int]:
        sched = Scheduler(assigner=assigner)
        sched.add_worker(worker("a"))
        release = asyncio.Event()
        prepared: list[int] = []

        async def prepare(job: Job) -> None:
            prepared.append(job.sched_id)  # Lotus fetches here, before active has room

        async def work(job: Job) -> None:
            await release.wait()

        sel = AllocSelector(FileType.CACHE | FileType.SEALED)
        calls = [
            asyncio.create_task(
                sched.schedule(SectorRef(1, n, S32), TaskType.PRE_COMMIT1, sel, prepare, work)
            )
            for n in range(6)
        ]
        await settle()
        promised = 6 - len(sched.queue)
        release.set()
        await asyncio.gather(*calls)
        return promised, len(prepared)

    lotus_promised, lotus_prepared = asyncio.run(run("lotus"))
    balanced_promised, balanced_prepared = asyncio.run(run("balanced"))
    assert balanced_promised == 1, "balanced admits exactly what fits"
    # Two windows, each sized to the idle worker, plus preparing while active is full.
    assert lotus_promised >= 3, lotus_promised
    assert lotus_prepared == balanced_prepared == 6


def test_lotus_completes_a_mixed_workload_on_several_workers() -> None:
    async def main() -> Counter[str]:
        sched = Scheduler(assigner="lotus")
        for name in ("a", "b", "c"):
            sched.add_worker(
                worker(name, WorkerResources(cpus=32, mem_physical=512 * GIB, gpus=("g",)))
            )
        done: Counter[str] = Counter()

        async def work(job: Job) -> None:
            done[job.worker.name] += 1
            await asyncio.sleep(0.001)

        calls = []
        for n in range(90):
            t = (TaskType.PRE_COMMIT1, TaskType.PRE_COMMIT2, TaskType.COMMIT2)[n % 3]
            calls.append(sched.schedule(SectorRef(1, n, S32), t, TaskSelector(), None, work))
        await asyncio.wait_for(asyncio.gather(*calls), HANG_GUARD)
        return done

    done = asyncio.run(main())
    assert sum(done.values()) == 90
    assert set(done) == {"a", "b", "c"}


def test_active_resources_match_lotus_can_handle_request() -> None:
    res = WorkerResources(cpus=16, mem_physical=128 * GIB, mem_swap=0, gpus=("g",))
    active = ActiveResources()
    pc2 = resource_spec(TaskType.PRE_COMMIT2, S32)
    assert active.can_handle(TaskType.PRE_COMMIT2, pc2, res)
    delta = active.add(TaskType.PRE_COMMIT2, pc2, res)
    # PC2 32G on a GPU worker: MaxParallelismGPU 6 threads of 16, one whole GPU.
    assert active.cpu == 6 and active.gpu == 1.0 and delta == 1.0
    assert not active.can_handle(TaskType.PRE_COMMIT2, pc2, res), "one GPU, already used"
    active.free(TaskType.PRE_COMMIT2, pc2, res)
    assert active.cpu == 0 and active.utilization(res) == 0.0


def test_lotus_runs_one_gpu_task_at_a_time_and_prepares_the_next_beside_it() -> None:
    # Lotus admits one GPU task to `active` on a one-GPU worker, but fetches the next one in
    # `preparing` meanwhile: PC2's files arrive while C2 holds the GPU (sched_worker.go).
    async def main() -> tuple[list[str], int]:
        sched = Scheduler(assigner="lotus")
        res = WorkerResources(cpus=32, mem_physical=512 * GIB, gpus=("g",))
        sched.add_worker(worker("gpu", res))
        log: list[str] = []
        running: set[str] = set()
        most = 0
        release = {name: asyncio.Event() for name in ("C2", "PC2")}

        async def prepare(job: Job) -> None:
            log.append(f"prepare {job.task_type.short}")

        def work_of(name: str) -> Callable[[Job], Awaitable[None]]:
            async def work(job: Job) -> None:
                nonlocal most
                running.add(name)
                most = max(most, len(running))
                log.append(f"work {name}")
                await release[name].wait()
                running.discard(name)
                log.append(f"end {name}")

            return work

        sel = TaskSelector()
        c2 = asyncio.create_task(
            sched.schedule(SectorRef(1, 1, S32), TaskType.COMMIT2, sel, None, work_of("C2"))
        )
        await settle()
        pc2 = asyncio.create_task(
            sched.schedule(SectorRef(1, 2, S32), TaskType.PRE_COMMIT2, sel, prepare, work_of("PC2"))
        )
        await settle()
        assert log == ["work C2", "prepare PC2"], log  # fetched beside C2, not started
        release["C2"].set()
        await settle()
        assert log[-2:] == ["end C2", "work PC2"], log
        release["PC2"].set()
        await asyncio.wait_for(asyncio.gather(c2, pc2), HANG_GUARD)
        return log, most

    log, most = asyncio.run(main())
    assert most == 1, log
