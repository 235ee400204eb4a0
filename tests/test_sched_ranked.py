"""A cycle ranks a pool's workers once per kind, not once per shape (`sched/ranked.py`).

Work on existing files makes nearly every sector a shape of its own, so a cycle placing a
batch of PC2s used to score every GPU box once per sector. The ranking must give exactly the
order `BalancedAssigner.score_from` gives at every turn, round-robin among ties included, and
a cycle must place every task where the eager cycle (every verdict asked) places it.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from conftest import run, settle

import sectorfsm.sched.balanced as balanced
from sectorfsm.sched.assigners import BalancedAssigner
from sectorfsm.sched.filetypes import FileType
from sectorfsm.sched.ledger import Ledger, WorkerResources
from sectorfsm.sched.ranked import Ranked
from sectorfsm.sched.scheduler import Job, Scheduler
from sectorfsm.sched.selectors import ExistingSelector
from sectorfsm.sched.storage import SectorRef, StoragePath
from sectorfsm.sched.tasks import TaskType
from sectorfsm.sched.workers import InProcessBackend, Worker, WorkerSpec

PC2 = TaskType.PRE_COMMIT2
C2 = TaskType.COMMIT2
GIB = 1 << 30
TIB = 1 << 40
S32 = 32 << 30
C, S = FileType.CACHE, FileType.SEALED
GPU_BOX = WorkerResources(cpus=64, mem_physical=512 * GIB, gpus=("g0",))


def test_the_ranking_gives_score_from_order_at_every_turn() -> None:
    rng = random.Random(4)
    assigner = BalancedAssigner()
    for trial in range(60):
        n = rng.randint(1, 30)
        ranked = Ranked({}, 0)
        scored = []
        for i in rng.sample(range(40), n):
            spec = WorkerSpec(f"w{i:02d}", GPU_BOX)
            w = Worker(spec, InProcessBackend(), Ledger(GPU_BOX), 0.0)
            # Few distinct values: ties are the rule, so the round-robin decides most.
            base = (rng.choice((0.0, 0.5, 1.0)), rng.choice((0.0, 0.25)), i)
            cost = rng.choice((0.0, 25.6, 51.2))
            busy = rng.random() < 0.3
            tie, rank = assigner.ties(base, cost)
            ranked.add((busy, *tie), rank, w, base, cost)
            scored.append((busy, base, cost, w))
        ranked.seal()
        for turn in range(0, 42, 3):
            want = sorted(scored, key=lambda r: (r[0], assigner.score_from(r[1], r[2], turn)))
            got = [row[2] for row in ranked.order(turn)]
            assert got == [r[3] for r in want], (trial, turn)


def test_a_batch_of_pc2_scores_the_gpu_pool_once_and_places_as_eager(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fifteen sectors' PC2 queued at once, each a new shape, on twenty GPU boxes."""
    scores = 0
    score_from = BalancedAssigner.score_from

    def counted(self: BalancedAssigner, *args: object) -> tuple[float, float, float, int]:
        nonlocal scores
        scores += 1
        return score_from(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(BalancedAssigner, "score_from", counted)

    def once() -> list[str]:
        async def main() -> list[str]:
            sched = Scheduler()
            sectors = [SectorRef(1000, k, S32) for k in range(15)]
            for s in sectors:
                # Each on a box of its own that does no PC2: a new shape per sector, and
                # every PC2 box must fetch.
                name = f"pc1-{s.number}"
                store = StoragePath(f"{name}-ssd", name, 100 * TIB)
                sched.add_worker(WorkerSpec(name, GPU_BOX, frozenset({C2}), paths=(store,)))
                sched.index.add_sector(s, C | S, store.id)
            for i in range(20):
                path = StoragePath(f"gpu{i}-ssd", f"gpu{i}", 30 * TIB)
                spec = WorkerSpec(f"gpu{i}", GPU_BOX, frozenset({PC2}), paths=(path,))
                spec.bandwidth = (1.25e9, 2.5e9)[i % 2]
                sched.add_worker(spec)
            release = asyncio.Event()

            async def work(job: Job) -> str:
                await release.wait()
                return job.worker.name

            sel = ExistingSelector(C | S, allow_fetch=True)
            await settle()
            jobs = [asyncio.create_task(sched.schedule(s, PC2, sel, None, work)) for s in sectors]
            await settle()
            release.set()
            done = await asyncio.gather(*jobs)
            await sched.stop()
            return done

        return run(main)

    ranked = once()
    ranked_scores, scores = scores, 0
    monkeypatch.setattr(balanced, "cost_floor", lambda *args: None)  # every verdict asked
    eager = once()
    assert ranked == eager
    assert len(set(ranked)) == 15  # spread over the boxes, the faster links first
    # The eager cycle scores every box with room for every sector (~200); a ranked one
    # scores only the boxes that come out on top.
    assert scores > 150, (scores, ranked_scores)
    assert ranked_scores < 4 * 15, (scores, ranked_scores)  # a few per sector
