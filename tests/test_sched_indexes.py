"""Shortcuts of the scheduler's bookkeeping agree with the long way round.

`tasks_of` reads per-type indexes of the queue and of the held tasks instead of sorting the
whole queue; `Ledger.add` of a task that computes at once skips the claim it used to count
and take back; the policy gate counts a worker's disk units again only when the index says
its files changed. Each must give exactly what the long way gave.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from conftest import run, settle

from sectorfsm.sched.filetypes import FileType
from sectorfsm.sched.gate import PolicyGate
from sectorfsm.sched.ledger import Ledger, WorkerResources
from sectorfsm.sched.resources import resource_spec
from sectorfsm.sched.rules import disk_units
from sectorfsm.sched.scheduler import Job, Scheduler
from sectorfsm.sched.selectors import AllocSelector, PinnedSelector, Selector, TaskSelector
from sectorfsm.sched.storage import SectorRef, StorageIndex, StoragePath
from sectorfsm.sched.tasks import TaskType
from sectorfsm.sched.workers import Worker, WorkerSpec

AP = TaskType.ADD_PIECE
PC1 = TaskType.PRE_COMMIT1
C2 = TaskType.COMMIT2
GIB = 1 << 30
TIB = 1 << 40
S32 = 32 << 30


def _long_way(
    sched: Scheduler, types: frozenset[TaskType]
) -> Counter[tuple[SectorRef, TaskType, str | None, bool]]:
    queued = [
        (r.sector, r.task_type, getattr(r.selector, "worker", None), False)
        for r in sched.queue
        if r.task_type in types
    ]
    held = [(j.sector, j.task_type, j.worker.name, True) for j in sched_jobs(sched, types)]
    return Counter(queued + held)


def sched_jobs(sched: Scheduler, types: frozenset[TaskType]) -> list[Job]:
    """Every task a worker's ledger holds, from the ledgers themselves."""
    out = []
    for w in sched.enabled_workers():
        for sid, entry in w.ledger.entries.items():
            if entry.task_type in types:
                s, _ = sched._held_task[sid]
                out.append(Job(sid, s, entry.task_type, w, None, None, 0.0))  # type: ignore[arg-type]
    return out


def test_tasks_of_lists_what_the_queue_and_the_ledgers_hold() -> None:
    rng = random.Random(4)
    res = WorkerResources(cpus=16, mem_physical=256 * GIB, gpus=("g0",))

    async def main() -> None:
        sched = Scheduler()
        for name in ("a", "b", "c"):
            sched.add_worker(WorkerSpec(name, res, paths=(StoragePath(f"{name}-1", name, TIB),)))
        gates: dict[int, asyncio.Event] = {}

        async def work(job: Job) -> None:
            await gates.setdefault(job.sector.number, asyncio.Event()).wait()

        tasks = []
        for n in range(60):
            task, sel = rng.choice(
                [
                    (AP, PinnedSelector(AllocSelector(FileType.UNSEALED), rng.choice("abc"))),
                    (AP, AllocSelector(FileType.UNSEALED)),
                    (PC1, AllocSelector(FileType.CACHE | FileType.SEALED)),
                    (C2, TaskSelector()),
                ]
            )
            selector: Selector = sel
            s = SectorRef(1000, n, S32)
            tasks.append(asyncio.create_task(sched.schedule(s, task, selector, None, work)))
        checked = 0
        for n in rng.sample(range(60), 60):
            await settle()
            for types in (frozenset({AP}), frozenset({AP, PC1}), frozenset({C2, PC1})):
                got = sched.tasks_of(types)
                assert Counter(got) == _long_way(sched, types)
                checked += len(got)
            if rng.random() < 0.2:
                tasks[n].cancel()
            gates.setdefault(n, asyncio.Event()).set()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert checked > 200
        assert sched.tasks_of(frozenset(TaskType)) == []
        await sched.stop()

    run(main)


def test_a_task_that_computes_at_once_leaves_the_ledger_a_claim_and_acquire_leave() -> None:
    rng = random.Random(9)
    res = WorkerResources(cpus=64, mem_physical=1024 * GIB, gpus=("g0", "g1"))
    short, long_ = Ledger(res), Ledger(res)
    for sid in range(200):
        task = rng.choice([AP, PC1, TaskType.PRE_COMMIT2, C2])
        need = resource_spec(task, S32, None)
        if rng.random() < 0.3 and short.entries:
            gone = rng.choice(sorted(short.entries))
            short.free(gone)
            long_.free(gone)
            continue
        computing = rng.random() < 0.7
        short.add(sid, task, need, computing=computing)
        long_.add(sid, task, need, computing=False)
        if computing:
            long_.acquire(sid)
        assert short == long_


def test_the_gates_disk_units_are_recounted_whenever_a_workers_files_change() -> None:
    """Units are cached per worker until its files change: never stale, whatever moved."""
    rng = random.Random(6)
    index = StorageIndex()
    gate = PolicyGate(index)
    res = WorkerResources(cpus=8, mem_physical=64 * GIB)
    workers = {}
    for name in ("a", "b", "c"):
        index.declare(StoragePath(f"{name}-1", name, 40 * TIB))
        index.declare(StoragePath(f"{name}-store", name, 40 * TIB, can_seal=False, can_store=True))
        workers[name] = Worker(WorkerSpec(name, res), None, Ledger(res), 0.0)  # type: ignore[arg-type]
    index.declare(StoragePath("shared", None, 400 * TIB, can_seal=False, can_store=True))
    paths = [*index.paths]
    files = [FileType.UNSEALED, FileType.CACHE, FileType.SEALED, FileType.CACHE | FileType.SEALED]
    recounts = 0
    for step in range(400):
        s = SectorRef(1000, rng.randrange(15), S32)
        op = rng.random()
        if op < 0.4:
            index.add_sector(s, rng.choice(files), rng.choice(paths))
        elif op < 0.6:
            index.remove_sector(s, rng.choice(files), rng.choice([None, *paths]))
        elif op < 0.8:
            index.move_sector(s, rng.choice(files), rng.choice(paths))
        elif op < 0.9:
            index.finalize_sector(s, FileType.CACHE)
        else:
            name = rng.choice("abc")
            store = rng.random() < 0.5  # the same path id, sealing or long-term now
            index.declare(StoragePath(f"{name}-1", name, 40 * TIB, can_store=store))
        for w in workers.values():
            fresh = disk_units((f, True) for _, f in index.local_files(w.name))
            view = gate.view(w, S32)
            assert (view.disk_used, view.ap_disk_used) == fresh, step
            recounts += fresh != (0, 0)
    assert recounts > 300
