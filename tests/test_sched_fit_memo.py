"""`Scheduler.fit` keeps its answer per worker and kind while the worker's ledger holds.

A cycle asks every worker it tests for its room, and most of them changed nothing since the
last cycle: their answer is a lookup. Any add, acquire, free or new resource figures must
give a fresh answer, the one the ledger's own refusals give.
"""

from __future__ import annotations

import random

import pytest
from conftest import run, settle

from sectorfsm.sched.assigners import Fit
from sectorfsm.sched.ledger import Ledger, WorkerResources
from sectorfsm.sched.resources import resource_spec
from sectorfsm.sched.scheduler import Scheduler
from sectorfsm.sched.tasks import TaskType
from sectorfsm.sched.workers import Worker, WorkerSpec

GIB = 1 << 30
S32 = 32 << 30
RES = WorkerResources(cpus=32, mem_physical=512 * GIB, mem_swap=0, gpus=("g0",))
KINDS = (TaskType.PRE_COMMIT1, TaskType.PRE_COMMIT2, TaskType.COMMIT2, TaskType.FINALIZE)


def _plain(w: Worker, task: TaskType, need_of: dict[TaskType, Fit | str]) -> Fit | str:
    """The answer worked out from the ledger alone, as `fit` did before it kept any."""
    kept = need_of[task]
    assert not isinstance(kept, str)
    refusal = w.ledger.claim_refusal(task, kept.need)
    if refusal is not None:
        return refusal
    return Fit(kept.need, w.ledger.start_refusal(task, kept.need), kept.slots)


def test_fit_is_a_lookup_while_the_ledger_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = 0
    claim = Ledger.claim_refusal

    def counted(self: Ledger, task_type: TaskType, need: object) -> str | None:
        nonlocal asked
        asked += 1
        return claim(self, task_type, need)  # type: ignore[arg-type]

    async def main() -> None:
        sched = Scheduler()
        sched.add_worker(WorkerSpec("w", RES))
        await settle()
        w = sched.find_worker("w")
        assert w is not None
        monkeypatch.setattr(Ledger, "claim_refusal", counted)
        first = sched.fit(w, TaskType.PRE_COMMIT1, S32)
        assert sched.fit(w, TaskType.PRE_COMMIT1, S32) is first and asked == 1
        w.ledger.add(1, TaskType.PRE_COMMIT1, resource_spec(TaskType.PRE_COMMIT1, S32))
        again = sched.fit(w, TaskType.PRE_COMMIT1, S32)
        assert asked == 2 and again is not first
        sched.heartbeat("w", WorkerResources(**{**_fields(RES), "mem_used": 500 * GIB}))
        full = sched.fit(w, TaskType.PRE_COMMIT1, S32)
        assert asked == 3 and isinstance(full, str) and "RAM" in full
        await sched.stop()

    run(main)


def _fields(res: WorkerResources) -> dict[str, object]:
    return {f: getattr(res, f) for f in res.__slots__}


def test_fit_agrees_with_the_ledger_through_random_changes() -> None:
    rng = random.Random(7)

    async def main() -> None:
        sched = Scheduler()
        sched.add_worker(WorkerSpec("w", RES))
        await settle()
        w = sched.find_worker("w")
        assert w is not None
        need_of = {t: sched.fit(w, t, S32) for t in KINDS}
        held: list[int] = []
        for sid in range(400):
            op = rng.random()
            task = rng.choice(KINDS)
            if op < 0.4:
                found = sched.fit(w, task, S32)
                if not isinstance(found, str):
                    w.ledger.add(sid, task, found.need, computing=found.busy is None)
                    held.append(sid)
            elif op < 0.7 and held:
                w.ledger.free(held.pop(rng.randrange(len(held))))
            elif op < 0.8 and held:
                w.ledger.acquire(rng.choice(held))
            elif op < 0.85:
                used = rng.choice((0, 100 * GIB, 400 * GIB))
                sched.heartbeat("w", WorkerResources(**{**_fields(RES), "mem_used": used}))
            for t in KINDS:
                assert sched.fit(w, t, S32) == _plain(w, t, need_of)
        await sched.stop()

    run(main)
