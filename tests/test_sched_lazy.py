"""The balanced cycle asks verdicts lazily: only the workers that come out on top are asked.

It also asks each worker's room for a kind once per cycle: a worker without room for it is
left out of every later new shape of the kind in that cycle (`BalancedCycle._open_pool`).

A burst ranks every worker of a shape by the score its verdict would give (the selector's
transfer cost is known before `check`: `selectors.cost_floor`) and asks the verdict of the
best one first; a refusal drops it and the next is asked. These tests check that the cost
floor is the cost `check` gives, and that a whole pipeline of sectors lands on exactly the
workers the eager cycle (every worker asked) chooses, with far fewer verdicts.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from conftest import HANG_GUARD, run

import sectorfsm.sched.balanced as balanced
from sectorfsm.fsm.clock import VirtualClock
from sectorfsm.sched.filetypes import FileType
from sectorfsm.sched.ledger import WorkerResources
from sectorfsm.sched.queue import Request
from sectorfsm.sched.scheduler import Job, Scheduler
from sectorfsm.sched.selectors import (
    AllocSelector,
    ExistingSelector,
    MoveSelector,
    PinnedSelector,
    Selector,
    TaskSelector,
    cost_floor,
)
from sectorfsm.sched.storage import SectorRef, StorageIndex, StoragePath
from sectorfsm.sched.tasks import TaskType
from sectorfsm.sched.waits import other_holder
from sectorfsm.sched.workers import Worker, WorkerSpec

AP = TaskType.ADD_PIECE
PC1 = TaskType.PRE_COMMIT1
PC2 = TaskType.PRE_COMMIT2
C2 = TaskType.COMMIT2
FIN = TaskType.FINALIZE
GIB = 1 << 30
TIB = 1 << 40
S32 = 32 << 30
U, S, C = FileType.UNSEALED, FileType.SEALED, FileType.CACHE
BANDWIDTHS = (1.25e8, 1.25e9, 3.125e9)


def test_cost_floor_is_the_cost_check_gives_wherever_it_places() -> None:
    rng = random.Random(3)
    index = StorageIndex()
    workers = []
    for i in range(8):
        name = f"w{i}"
        tasks = frozenset(rng.sample(list(TaskType), rng.randint(1, 4)))
        cap = rng.choice((70, 2000)) * GIB  # some too small to receive a fetch
        index.declare(StoragePath(f"{name}-1", name, cap))
        spec = WorkerSpec(name, WorkerResources(cpus=8, mem_physical=64 * GIB), task_types=tasks)
        spec.bandwidth = rng.choice(BANDWIDTHS)
        workers.append(spec)
    sectors = [SectorRef(1000, n, S32) for n in range(12)]
    for s in sectors:
        for f in (U, C, S):
            if rng.random() < 0.5:
                index.add_sector(s, f, f"w{rng.randrange(8)}-1")
    selectors: list[Selector] = [
        TaskSelector(),
        AllocSelector(U),
        AllocSelector(C | S, fetch=U),
        ExistingSelector(C | S),
        ExistingSelector(C | S, allow_fetch=True),
        ExistingSelector(C),
        PinnedSelector(ExistingSelector(C | S, allow_fetch=True), "w3"),
    ]
    placed = 0
    for sel, s in itertools.product(selectors, sectors):
        floor = cost_floor(sel, s, index)
        assert floor is not None
        for spec in workers:
            w = Worker(spec, None, None, 0.0)  # type: ignore[arg-type]
            verdict = sel.check(s, w, index)
            if not isinstance(verdict, str):
                placed += 1
                assert floor(w) == verdict.cost_s, (sel, s, spec.name)
    assert placed > 100
    # A move to shared long-term storage reads space other workers reserve: never lazy.
    assert cost_floor(MoveSelector(C | S), sectors[0], index) is None


def _cluster(sched: Scheduler, rng: random.Random, policy: Path) -> None:
    for i in range(10):
        name = f"pc1-{i}"
        res = WorkerResources(cpus=64, mem_physical=rng.choice((256, 512, 1024)) * GIB)
        path = StoragePath(f"{name}-ssd", name, 30 * TIB)
        spec = WorkerSpec(
            name, res, task_types=frozenset({AP, PC1}), paths=(path,), policy_file=policy
        )
        spec.bandwidth = rng.choice(BANDWIDTHS)
        sched.add_worker(spec)
    for i in range(12):
        name = f"gpu-{i}"
        gpus = tuple(f"g{g}" for g in range(rng.choice((1, 2))))
        res = WorkerResources(cpus=32, mem_physical=rng.choice((256, 512)) * GIB, gpus=gpus)
        path = StoragePath(f"{name}-ssd", name, rng.choice((2, 30)) * TIB)
        spec = WorkerSpec(name, res, task_types=frozenset({PC2, C2, FIN}), paths=(path,))
        spec.bandwidth = rng.choice(BANDWIDTHS)
        sched.add_worker(spec)


async def _pipeline(sched: Scheduler, clock: VirtualClock, n: int) -> list[tuple[object, ...]]:
    """`n` sectors through AP, PC1, PC2, C2 and FIN; every job's (time, sector, type, where)."""
    rng = random.Random(11)
    minutes = {AP: 10, PC1: 210, PC2: 25, C2: 30, FIN: 5}
    stages: list[tuple[TaskType, Selector]] = [
        (AP, AllocSelector(U)),
        (PC1, AllocSelector(C | S, fetch=U)),
        (PC2, ExistingSelector(C | S, allow_fetch=True)),
        (C2, TaskSelector()),
        (FIN, ExistingSelector(C)),
    ]
    log: list[tuple[object, ...]] = []

    async def sector(s: SectorRef) -> None:
        for task, sel in stages:

            async def work(job: Job, task: TaskType = task) -> None:
                log.append((clock.now(), s.number, task.short, job.worker.name, job.placement))
                await clock.sleep(minutes[task] * 60 * rng.uniform(0.9, 1.1))
                where = job.placement.path
                if task is AP and where is not None:
                    sched.index.add_sector(s, U, where)
                elif task is PC1 and where is not None:
                    sched.index.move_sector(s, U, where)
                    sched.index.add_sector(s, C | S, where)
                elif task is PC2 and job.placement.fetch_bytes and where is not None:
                    sched.index.move_sector(s, C | S, where)
                else:
                    return
                sched.files_changed(s)

            await sched.schedule(s, task, sel, None, work)

    async with asyncio.timeout(HANG_GUARD):
        await asyncio.gather(*(sector(SectorRef(1000, k, S32)) for k in range(n)))
    return log


def test_lazy_verdicts_place_every_task_where_asking_every_worker_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = tmp_path / "myscheduler.json"
    policy.write_text(json.dumps({"AddPieceMax": 2, "PreCommit1Max": 5, "AllowDelay": 0}))

    def once() -> tuple[list[tuple[object, ...]], int]:
        async def main() -> tuple[list[tuple[object, ...]], int]:
            clock = VirtualClock()
            sched = Scheduler(clock=clock)
            _cluster(sched, random.Random(5), policy)
            log = await _pipeline(sched, clock, 120)
            await sched.stop()
            return log, sched.checks

        return run(main)

    lazy, lazy_checks = once()
    # Every worker of the type for every new shape, not just those with room at the first ask.
    with monkeypatch.context() as m:
        m.setattr(
            balanced.BalancedCycle,
            "_open_pool",
            lambda self, task, size: self.sched.workers_for(task),
        )
        whole_pool, _ = once()
    monkeypatch.setattr(balanced, "cost_floor", lambda *args: None)
    eager, eager_checks = once()
    assert len(lazy) == 5 * 120
    assert lazy == whole_pool
    assert lazy == eager
    # Several workers took each stage, some tasks fetched: the choice was not trivial.
    assert len({where for _, _, t, where, _ in lazy if t == "PC2"}) > 3
    assert any(p.fetch_bytes for *_, p in lazy)  # type: ignore[attr-defined]
    assert lazy_checks < eager_checks


def test_the_round_robin_goes_in_order_of_joining_whoever_is_scored_first() -> None:
    """A lazy burst scores workers an eager one never would: their rank must not move."""

    async def main() -> None:
        sched = Scheduler()
        res = WorkerResources(cpus=64, mem_physical=512 * GIB, gpus=("g0",))
        for name in ("a", "b", "c"):
            sched.add_worker(WorkerSpec(name, res, task_types=frozenset({C2})))
        c, a = sched.worker("c"), sched.worker("a")
        assert sched.assigner.base(C2, c, 1)[2] == 2  # scored first, ranked third
        assert sched.assigner.base(C2, a, 1)[2] == 0
        await sched.stop()

    run(main)


def test_the_cycles_other_holder_is_waits_other_holder() -> None:
    rng = random.Random(8)

    async def main() -> None:
        sched = Scheduler()
        res = WorkerResources(cpus=64, mem_physical=512 * GIB, gpus=("g0",))
        for i in range(6):
            tasks = frozenset(rng.sample([PC1, PC2, C2, FIN], 2))
            path = StoragePath(f"w{i}-1", f"w{i}", 30 * TIB)
            sched.add_worker(WorkerSpec(f"w{i}", res, task_types=tasks, paths=(path,)))
        sched.disable("w5", "test")
        cycle = sched.strategy
        assert isinstance(cycle, balanced.BalancedCycle)
        seen: Counter[bool] = Counter()
        for n in range(40):
            s = SectorRef(1000, n, S32)
            for f in (U, C, S):
                for i in rng.sample(range(6), rng.randint(0, 3)):
                    sched.index.add_sector(s, f, f"w{i}-1")
            for task, sel in (
                (PC2, ExistingSelector(C | S, allow_fetch=True)),
                (FIN, ExistingSelector(C)),
                (C2, TaskSelector()),
            ):
                key = (0, 0, 0, 0, n)
                req = Request(n, s, task, 0, sel, None, None, key, 0.0, None)  # type: ignore[arg-type]
                burst = balanced._Burst(0, None)
                for i in range(6):
                    w = sched.worker(f"w{i}")
                    want = other_holder(sched, req, w) is not None
                    assert cycle._other_holder(req, w, burst) == want
                    seen[want] += 1
        assert seen[True] > 20 and seen[False] > 20
        await sched.stop()

    run(main)
