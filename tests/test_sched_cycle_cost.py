"""What one balanced cycle pays for: each lookup once per cycle, not once per queued shape.

A cycle that walks a deep queue of one kind after many workers changed at once (a simulated
cluster whose jobs end together) used to ask every changed worker's policy about every
shape, and every changed worker whether it still had room, once per shape. The answers are
checked against the rules they stand for, and the cycle against a count of those lookups.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from pathlib import Path

import pytest
from conftest import run, settle

from sectorfsm.sched import gate as gate_module
from sectorfsm.sched.filetypes import FileType
from sectorfsm.sched.gate import PolicyGate
from sectorfsm.sched.ledger import Ledger, WorkerResources
from sectorfsm.sched.policy import WorkerPolicy
from sectorfsm.sched.scheduler import Job, Scheduler
from sectorfsm.sched.selectors import AllocSelector
from sectorfsm.sched.storage import SectorRef, StorageIndex, StoragePath
from sectorfsm.sched.tasks import TaskType
from sectorfsm.sched.workers import InProcessBackend, Worker, WorkerSpec

PC1 = TaskType.PRE_COMMIT1
GIB = 1 << 30
TIB = 1 << 40
S32 = 32 << 30
U, S, C = FileType.UNSEALED, FileType.SEALED, FileType.CACHE
BIG = WorkerResources(cpus=64, mem_physical=1024 * GIB, mem_swap=0)


class _Fixed:
    """A policy source that never changes."""

    def __init__(self, policy: WorkerPolicy) -> None:
        self.path = Path("fixed.json")
        self.policy = policy
        self.error: str | None = None
        self.loaded_at: float | None = None

    def poll(self) -> bool:
        return False


def test_pool_rules_filter_a_pool_as_local_enough_does() -> None:
    rng = random.Random(5)
    index = StorageIndex()
    names = [f"w{i}" for i in range(9)]
    for n in names:
        index.declare(StoragePath(f"{n}-ssd", n, 40 * TIB))
    sectors = [SectorRef(1000, n, S32) for n in range(12)]
    for s in sectors:
        for f in (U, C, S):
            for n in rng.sample(names, rng.choice((0, 1, 2))):
                index.add_sector(s, f, f"{n}-ssd")
    gate = PolicyGate(index)
    narrowed = 0
    for trial in range(40):
        pool = []
        for n in rng.sample(names, rng.randint(0, len(names))):
            watcher = None
            if rng.random() < 0.8:
                watcher = _Fixed(
                    WorkerPolicy(
                        force_p1_from_local_ap=rng.random() < 0.5,
                        force_p2_from_local_p1=rng.random() < 0.5,
                        force_c2_from_local_p2=rng.random() < 0.5,
                    )
                )
            spec = WorkerSpec(n, BIG)
            pool.append(Worker(spec, InProcessBackend(), Ledger(BIG), 0.0, watcher=watcher))
        for task, s in itertools.product(TaskType, sectors):
            want = gate.local_enough(pool, task, s)
            got = gate.local_of(gate.pool_rules(pool, task), s)
            assert got == want, (trial, task, s)
            narrowed += len(want) < len(pool)
    assert narrowed > 500  # the rules did narrow the pools, often


def test_a_cycle_after_many_workers_changed_asks_each_policy_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twelve workers freed at once, a queue of PC1 each bound to its holder by policy."""
    policy = tmp_path / "myscheduler.json"
    policy.write_text(json.dumps({"PreCommit1Max": 1, "ForceP1FromLocalAP": True}))
    names = [f"w{i:02d}" for i in range(12)]
    release = asyncio.Event()
    lookups = 0
    required = gate_module.local_files_required

    def counted(p: WorkerPolicy, task: TaskType) -> FileType:
        nonlocal lookups
        lookups += 1
        return required(p, task)

    async def work(job: Job) -> str:
        if job.sector.number < len(names):
            await release.wait()
        return job.worker.name

    async def main() -> None:
        sched = Scheduler()
        for n in names:
            path = StoragePath(f"{n}-ssd", n, 40 * TIB)
            sched.add_worker(WorkerSpec(n, BIG, paths=(path,), policy_file=policy))
        await settle()
        sel = AllocSelector(C | S, fetch=U)
        # Sector k's unsealed file is on worker k % 12: each worker runs one, two more wait.
        sectors = [SectorRef(1000, k, S32) for k in range(3 * len(names))]
        for k, s in enumerate(sectors):
            sched.index.add_sector(s, U, f"{names[k % len(names)]}-ssd")
        jobs = [asyncio.create_task(sched.schedule(s, PC1, sel, None, work)) for s in sectors]
        await settle()
        assert len(sched.queue) == 2 * len(names)
        monkeypatch.setattr(gate_module, "local_files_required", counted)
        cycles = sched.cycles
        release.set()  # every worker frees its slot in the same turn of the loop
        await settle()
        # One cycle walked the queue with all twelve changed; the others ran what it placed.
        assert sched.cycles - cycles >= 1
        # Each worker's policy is asked once per pool and cycle, not once per queued shape
        # (that was 12 x 24 lookups for the first cycle alone).
        assert 0 < lookups <= 2 * len(names) * (sched.cycles - cycles)
        assert lookups < len(names) * len(sectors)
        done = await asyncio.gather(*jobs)
        assert done == [names[k % len(names)] for k in range(len(sectors))]
        await sched.stop()

    run(main)


def test_the_index_keeps_a_sectors_answers_while_only_other_sectors_change() -> None:
    index = StorageIndex()
    for n in ("a", "b"):
        index.declare(StoragePath(f"{n}-ssd", n, 40 * TIB))
    one, two = SectorRef(1000, 1, S32), SectorRef(1000, 2, S32)
    index.add_sector(one, C | S, "a-ssd")
    held, where = index.holders(one, C | S), index.locations(one)
    index.add_sector(two, C, "b-ssd")  # another sector's files: the same answers, kept
    assert index.holders(one, C | S) is held and index.locations(one) is where
    index.add_sector(one, C | S, "b-ssd")  # its own: asked again, and right
    assert index.holders(one, C | S) == {"a", "b"}
    assert index.locations(one) == {("a", int(C | S)), ("b", int(C | S))}
    index.remove_sector(one, C, "a-ssd")
    assert index.holders(one, C | S) == {"b"} and index.holders(one, S) == {"a", "b"}
    index.declare(StoragePath("b-ssd", "c", 40 * TIB))  # a path changes hands: every answer
    assert index.holders(two, C) == {"c"}
