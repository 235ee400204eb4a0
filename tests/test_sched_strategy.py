"""The scheduler's seams: the cycle strategy it holds, and the fetch slots `fetch.py` owns."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from conftest import settle

from sectorfsm.fsm import VirtualClock
from sectorfsm.sched.balanced import BalancedCycle
from sectorfsm.sched.fetch import PARALLEL_FETCH_LIMIT, fetch_prepare
from sectorfsm.sched.filetypes import FileType
from sectorfsm.sched.ledger import WorkerResources
from sectorfsm.sched.lotus import LotusMode
from sectorfsm.sched.scheduler import Job, Scheduler
from sectorfsm.sched.selectors import ExistingSelector, TaskSelector
from sectorfsm.sched.storage import SectorRef, StoragePath
from sectorfsm.sched.tasks import TaskType
from sectorfsm.sched.workers import Worker, WorkerSpec

GIB = 1 << 30
S32 = 32 << 30
BIG = WorkerResources(cpus=64, mem_physical=1024 * GIB)


def spec(name: str) -> WorkerSpec:
    return WorkerSpec(name, BIG, paths=(StoragePath(f"{name}-ssd", name, 1 << 50),))


class Recording:
    """A strategy that only records what the scheduler tells it, then delegates."""

    def __init__(self, inner: BalancedCycle) -> None:
        self.inner = inner
        self.cycles: list[tuple[list[str], int]] = []
        self.before: list[int] = []
        self.released: list[int] = []

    def cycle(self, changed: Sequence[Worker], new_shapes: set[int]) -> None:
        self.cycles.append((sorted(w.name for w in changed), len(new_shapes)))
        self.inner.cycle(changed, new_shapes)

    async def before_work(self, job: Job) -> None:
        self.before.append(job.sched_id)

    def release(self, sched_id: int) -> None:
        self.released.append(sched_id)


def test_the_assigner_name_picks_the_strategy() -> None:
    assert isinstance(Scheduler().strategy, BalancedCycle)
    assert isinstance(Scheduler(assigner="lotus").strategy, LotusMode)


def test_a_strategy_hears_changes_hooks_and_releases() -> None:
    async def main() -> None:
        sched = Scheduler()
        rec = Recording(BalancedCycle(sched))
        sched.strategy = rec
        sched.add_worker(spec("a"))
        sched.add_worker(spec("b"))
        sched.disable("b", "maintenance")

        async def work(job: Job) -> str:
            return job.worker.name

        got = await sched.schedule(SectorRef(1000, 1, S32), TaskType.COMMIT1, TaskSelector(),
                                   None, work)  # fmt: skip
        assert got == "a"
        # Both additions came before the loop ran: one cycle, the enabled worker, one shape.
        assert rec.cycles[0] == (["a"], 1)
        assert rec.before == [1] and rec.released == [1]

    asyncio.run(main())


def test_request_cycle_runs_one_cycle_however_often_it_is_asked() -> None:
    async def main() -> None:
        sched = Scheduler()
        await settle()
        before = sched.cycles
        for _ in range(5):
            sched.request_cycle()
        await settle()
        assert sched.cycles == before + 1

    asyncio.run(main())


def test_enabled_workers_leaves_out_disabled_ones() -> None:
    sched = Scheduler()
    for name in ("a", "b", "c"):
        sched.add_worker(spec(name))
    sched.disable("b", "maintenance")
    assert [w.name for w in sched.enabled_workers()] == ["a", "c"]
    assert [w.name for w in sched.workers_for(TaskType.COMMIT1)] == ["a", "b", "c"]
    assert sched.find_worker("b") is sched.worker("b")
    assert sched.find_worker("nope") is None


def test_fetches_to_one_worker_share_one_limit_across_fetchers() -> None:
    clock = VirtualClock(start=0.0)
    files = FileType.CACHE | FileType.SEALED

    async def main() -> int:
        sched = Scheduler(clock=clock)
        sched.add_worker(spec("src"))
        sched.add_worker(spec("dst"))
        sched.disable("src", "busy")
        at_once = peak = 0

        async def transfer(job: Job, source: str | None, nbytes: int) -> None:
            nonlocal at_once, peak
            at_once += 1
            peak = max(peak, at_once)
            await clock.sleep(10)
            at_once -= 1

        async def work(job: Job) -> None:
            return None

        sel = ExistingSelector(files, allow_fetch=True)
        calls = []
        for n in range(3 * PARALLEL_FETCH_LIMIT):
            s = SectorRef(1000, n, S32)
            sched.index.add_sector(s, files, "src-ssd")
            # A fetcher per task, as the sealer makes them: the limit is still per worker.
            fetch = fetch_prepare(sched, files, transfer)
            calls.append(sched.schedule(s, TaskType.COMMIT1, sel, fetch, work))
        await asyncio.gather(*calls)
        return peak

    assert asyncio.run(main()) == PARALLEL_FETCH_LIMIT
