"""The scheduler end to end: placement, balance, locality, policy, heartbeats, cancel, diag."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG_GUARD, run, settle

from sectorfsm.fsm import VirtualClock
from sectorfsm.sched.filetypes import FileType, space_needed
from sectorfsm.sched.ledger import WorkerResources
from sectorfsm.sched.scheduler import Job, Scheduler, SchedulerError
from sectorfsm.sched.selectors import AllocSelector, ExistingSelector, TaskSelector
from sectorfsm.sched.storage import SectorRef, StoragePath
from sectorfsm.sched.tasks import TaskType
from sectorfsm.sched.workers import WorkerSpec

GIB = 1 << 30
TIB = 1 << 40
S32 = 32 << 30
BIG = WorkerResources(cpus=64, mem_physical=1024 * GIB, mem_swap=0, gpus=("g0",))


def spec(name: str, res: WorkerResources = BIG, **kw: Any) -> WorkerSpec:
    kw.setdefault("paths", (StoragePath(f"{name}-ssd", name, 20 * TIB),))
    return WorkerSpec(name, res, **kw)


def sector(n: int) -> SectorRef:
    return SectorRef(1000, n, S32)


def hold(release: asyncio.Event, seen: list[str]) -> Callable[[Job], Awaitable[str]]:
    async def work(job: Job) -> str:
        seen.append(job.worker.name)
        await release.wait()
        return job.worker.name

    return work


def test_tasks_spread_evenly_and_never_exceed_capacity() -> None:
    async def main() -> None:
        sched = Scheduler()
        # PC1 32G peaks at 64 GiB (+10 MiB base): 1024 GiB RAM+swap holds 15, CPU would allow 64.
        for name in ("a", "b", "c"):
            sched.add_worker(spec(name))
        release, seen = asyncio.Event(), []
        calls = [
            asyncio.create_task(
                sched.schedule(
                    sector(n),
                    TaskType.PRE_COMMIT1,
                    AllocSelector(FileType.CACHE | FileType.SEALED),
                    None,
                    hold(release, seen),
                )
            )
            for n in range(60)
        ]
        await settle()
        counts = Counter(seen)
        assert counts == {"a": 15, "b": 15, "c": 15}, counts
        assert len(sched.queue) == 15
        assert all(
            w.ledger.mem_min_used <= w.ledger.resources.mem_physical
            for w in sched.enabled_workers()
        )
        release.set()
        results = await asyncio.gather(*calls)
        assert Counter(results) == {"a": 20, "b": 20, "c": 20}
        assert not sched.jobs()

    run(main)


def test_round_robin_tie_break_is_deterministic() -> None:
    async def main() -> list[str]:
        sched = Scheduler()
        for name in ("a", "b", "c"):
            sched.add_worker(spec(name))
        order: list[str] = []

        async def work(job: Job) -> None:
            order.append(job.worker.name)

        for n in range(6):  # one at a time: each finds every worker idle
            await sched.schedule(sector(n), TaskType.COMMIT2, TaskSelector(), None, work)
        return order

    assert run(main) == ["a", "b", "c", "a", "b", "c"]


def test_locality_wins_and_fetch_is_costed() -> None:
    async def main() -> None:
        sched = Scheduler()
        for name in ("a", "b"):
            sched.add_worker(spec(name))
        s = sector(7)
        sched.index.add_sector(s, FileType.CACHE | FileType.SEALED, "b-ssd")
        got: list[tuple[str, int]] = []

        async def work(job: Job) -> None:
            got.append((job.worker.name, job.placement.fetch_bytes))

        sel = ExistingSelector(FileType.CACHE | FileType.SEALED, allow_fetch=True)
        for _ in range(3):
            await sched.schedule(s, TaskType.PRE_COMMIT2, sel, None, work)
        assert got == [("b", 0)] * 3
        # Without fetch, a sector whose files are on b can only go to b.
        strict = ExistingSelector(FileType.CACHE, allow_fetch=False)
        sched.disable("b", "maintenance")
        task = asyncio.create_task(sched.schedule(s, TaskType.PRE_COMMIT2, strict, None, work))
        await settle()
        diag = sched.diag()
        assert diag[0].reasons == {"a": "sector cache is on b", "b": "maintenance"}
        sched.enable("b")
        await asyncio.wait_for(task, HANG_GUARD)
        # With fetch allowed and b busy, a takes it and pays the transfer.
        sched.disable("b", "maintenance")
        await sched.schedule(s, TaskType.PRE_COMMIT2, sel, None, work)
        assert got[-1] == ("a", space_needed(FileType.CACHE | FileType.SEALED, S32))

    run(main)


def test_space_is_reserved_at_assignment() -> None:
    async def main() -> None:
        sched = Scheduler()
        need = space_needed(FileType.CACHE | FileType.SEALED, S32)
        sched.add_worker(spec("a", paths=(StoragePath("a-ssd", "a", 2 * need + need // 2),)))
        release, seen = asyncio.Event(), []
        sel = AllocSelector(FileType.CACHE | FileType.SEALED)
        calls = [
            asyncio.create_task(
                sched.schedule(sector(n), TaskType.PRE_COMMIT1, sel, None, hold(release, seen))
            )
            for n in range(3)
        ]
        await settle()
        assert len(seen) == 2, "a third PC1 would overfill the path"
        assert sched.index.paths["a-ssd"].reserved == 2 * need
        assert sched.diag()[0].reasons["a"] == (
            "no sealing path with 483.2 GiB free (241.6 GiB free)"
        )
        release.set()
        await asyncio.gather(*calls)
        assert sched.index.paths["a-ssd"].reserved == 0

    run(main)


def test_policy_caps_drain_and_hot_reload(tmp_path: Path) -> None:
    policy = tmp_path / "myscheduler.json"
    policy.write_text(
        json.dumps(
            {
                "PreCommit1Max": 2,
                "ForceP1FromLocalAP": False,
                "AddPieceMax": 1,
                "PreCommit2Max": 1,
                "Commit2Max": 1,
            }
        )
    )

    async def main() -> None:
        sched = Scheduler()
        sched.add_worker(spec("a", policy_file=policy))
        release, seen = asyncio.Event(), []
        sel = AllocSelector(FileType.CACHE | FileType.SEALED)
        calls = [
            asyncio.create_task(
                sched.schedule(sector(n), TaskType.PRE_COMMIT1, sel, None, hold(release, seen))
            )
            for n in range(4)
        ]
        await settle()
        assert len(seen) == 2
        assert sched.diag()[0].reasons["a"].startswith("PC1 cap 2 reached")
        # Raise the cap in the file: the scheduler picks it up without a restart.
        policy.write_text(json.dumps({"PreCommit1Max": 3, "ForceP1FromLocalAP": False}))
        sched.check_workers()
        await settle()
        assert len(seen) == 3
        # A broken edit keeps the last good policy and says why.
        policy.write_text("{ not json")
        sched.check_workers()
        assert sched.workers()[0].policy_error is not None
        assert sched.worker("a").policy.pre_commit1_max == 3
        # Drain: running work finishes, nothing new starts.
        policy.write_text(json.dumps({"PreCommit1Max": 9, "IsPlanOffline": True}))
        sched.check_workers()
        await settle()
        assert len(seen) == 3
        assert "draining" in sched.diag()[0].reasons["a"]
        release.set()
        await settle()
        assert len(seen) == 3 and len(sched.queue) == 1
        for c in calls:
            if not c.done():
                c.cancel()
        await asyncio.gather(*calls, return_exceptions=True)

    run(main)


def test_heartbeat_grace_disables_then_reenables() -> None:
    clock = VirtualClock(start=0.0, auto_advance=False)

    async def main() -> None:
        sched = Scheduler(clock=clock)
        sched.add_worker(spec("a", heartbeat_grace=30))
        clock.advance(29)
        sched.check_workers()
        assert sched.workers()[0].enabled
        clock.advance(2)
        sched.check_workers()
        snap = sched.workers()[0]
        assert not snap.enabled and snap.disabled_reason == "no heartbeat for 31 s"

        async def work(job: Job) -> str:
            return job.worker.name

        task = asyncio.create_task(
            sched.schedule(sector(1), TaskType.COMMIT2, TaskSelector(), None, work)
        )
        await settle()
        assert not task.done()
        assert sched.diag()[0].reasons["a"] == "no heartbeat for 31 s"
        sched.heartbeat("a")
        assert await asyncio.wait_for(task, HANG_GUARD) == "a"

    run(main)


def test_started_monitor_disables_silent_remote_workers_but_not_in_process_ones() -> None:
    clock = VirtualClock(start=0.0, auto_advance=False)

    class Remote:
        """Stands for a worker in another process (it must send heartbeats)."""

        async def submit(self, job_id: int, fn: Callable[..., Any], *args: Any) -> Any:
            raise NotImplementedError

        async def kill(self, job_id: int) -> None:
            return None

    async def main() -> None:
        sched = Scheduler(clock=clock, policy_poll_interval=0.001)
        sched.add_worker(spec("local", heartbeat_grace=30))
        sched.add_worker(spec("remote", heartbeat_grace=30), Remote())
        checked = asyncio.Event()
        check = sched.check_workers

        def spy() -> None:
            check()
            checked.set()

        sched.check_workers = spy  # type: ignore[method-assign]
        await sched.start()
        try:
            clock.advance(31)
            checked.clear()
            # A check after the jump, in background.
            await asyncio.wait_for(checked.wait(), HANG_GUARD)
            assert not sched.worker("remote").enabled
            assert sched.worker("local").enabled
        finally:
            await sched.stop()

    run(main)


def test_assigned_but_unstarted_task_is_requeued_when_its_worker_goes() -> None:
    async def main() -> None:
        sched = Scheduler()
        sched.add_worker(spec("a"))
        sched.add_worker(spec("b"))
        sched.disable("b", "off")

        async def work(job: Job) -> str:
            return job.worker.name

        task = asyncio.create_task(
            sched.schedule(sector(1), TaskType.COMMIT2, TaskSelector(), None, work)
        )
        # Let the cycle assign it to a, then take a away before the task starts.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        sched.disable("a", "lost")
        sched.enable("b")
        assert await asyncio.wait_for(task, HANG_GUARD) == "b"
        assert not sched.worker("a").ledger.entries

    run(main)


def test_cancel_queued_and_running_tasks_frees_everything() -> None:
    async def main() -> None:
        sched = Scheduler()
        # Room for exactly one PC1 (56 GiB, peaking at 64 GiB).
        sched.add_worker(spec("a", WorkerResources(cpus=64, mem_physical=100 * GIB)))
        started = asyncio.Event()
        cancelled: list[int] = []

        async def work(job: Job) -> None:
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.append(job.sched_id)
                raise

        sel = AllocSelector(FileType.CACHE | FileType.SEALED)
        running = asyncio.create_task(
            sched.schedule(sector(1), TaskType.PRE_COMMIT1, sel, None, work)
        )
        await started.wait()
        queued = asyncio.create_task(
            sched.schedule(sector(2), TaskType.PRE_COMMIT1, sel, None, work)
        )
        await settle()
        assert len(sched.queue) == 1
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        assert len(sched.queue) == 0
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        assert cancelled == [1]
        w = sched.worker("a")
        assert not w.ledger.entries and w.ledger.mem_min_used == 0
        assert sched.index.paths["a-ssd"].reserved == 0
        # And by id, through the API: the hog runs, the second one waits and is cancelled.
        hog = asyncio.create_task(sched.schedule(sector(4), TaskType.PRE_COMMIT1, sel, None, work))
        await settle()
        queued2 = asyncio.create_task(
            sched.schedule(sector(3), TaskType.PRE_COMMIT1, sel, None, work)
        )
        await settle()
        (waiting,) = sched.queue
        assert waiting.sector == sector(3)
        assert sched.cancel(waiting.sched_id) and not sched.cancel(waiting.sched_id)
        with pytest.raises(asyncio.CancelledError):
            await queued2
        hog.cancel()
        await asyncio.gather(hog, return_exceptions=True)
        assert not w.ledger.entries and len(sched.queue) == 0

    run(main)


def test_work_errors_go_back_to_the_caller_and_free_the_worker() -> None:
    async def main() -> None:
        sched = Scheduler()
        sched.add_worker(spec("a"))

        async def boom(job: Job) -> None:
            raise RuntimeError("PC2 blew up")

        with pytest.raises(RuntimeError, match="PC2 blew up"):
            await sched.schedule(sector(1), TaskType.PRE_COMMIT2, TaskSelector(), None, boom)
        assert not sched.worker("a").ledger.entries

        async def prepare(job: Job) -> None:
            raise OSError("fetch failed")

        async def never(job: Job) -> None:
            raise AssertionError("work must not run after a failed prepare")

        with pytest.raises(OSError, match="fetch failed"):
            await sched.schedule(sector(2), TaskType.PRE_COMMIT2, TaskSelector(), prepare, never)
        assert not sched.worker("a").ledger.entries

    run(main)


def test_job_runs_on_the_worker_backend_and_phases_are_visible() -> None:
    async def main() -> None:
        sched = Scheduler()
        sched.add_worker(spec("a"))
        phases: list[str] = []

        def compute(x: int) -> int:  # a plain function: runs in a thread on this backend
            return x * 2

        async def prepare(job: Job) -> None:
            phases.append(sched.jobs()[0].phase)

        async def work(job: Job) -> int:
            phases.append(sched.jobs()[0].phase)
            return int(await job.run(compute, 21))

        assert (
            await sched.schedule(sector(1), TaskType.COMMIT2, TaskSelector(), prepare, work) == 42
        )
        assert phases == ["preparing", "running"]

    run(main)


def test_diag_explains_every_worker() -> None:
    async def main() -> None:
        sched = Scheduler()
        sched.add_worker(spec("small", WorkerResources(cpus=8, mem_physical=30 * GIB)))
        sched.add_worker(spec("c2only", task_types=frozenset({TaskType.COMMIT2})))
        task = asyncio.create_task(
            sched.schedule(
                sector(1),
                TaskType.PRE_COMMIT1,
                AllocSelector(FileType.CACHE | FileType.SEALED),
                None,
                hold(asyncio.Event(), []),
            )
        )
        await settle()
        (d,) = sched.diag()
        assert d.task == "PC1" and d.sector == "s-t01000-1"
        assert d.reasons == {
            "small": "needs 56.01 GiB RAM, 30 GiB free",
            "c2only": "does not do PC1",
        }
        snap = sched.snapshot()
        json.dumps(snap)  # publishable as-is
        assert snap["jobs"][0]["phase"] == "queued"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(main)


def test_worker_management_errors() -> None:
    sched = Scheduler()
    with pytest.raises(SchedulerError, match="no worker named 'x'"):
        sched.remove_worker("x")
    with pytest.raises(SchedulerError, match="no worker named 'x'"):
        sched.heartbeat("x")
    with pytest.raises(ValueError, match="unknown assigner 'fifo'"):
        Scheduler(assigner="fifo")


def test_a_decision_touches_only_what_changed() -> None:
    """With a deep queue, freeing one slot costs O(shapes + workers), not queue x workers."""

    async def main() -> None:
        sched = Scheduler()
        for i in range(50):
            sched.add_worker(spec(f"w{i}", WorkerResources(cpus=64, mem_physical=100 * GIB)))
        release: dict[int, asyncio.Event] = {}

        async def work(job: Job) -> None:
            ev = release[job.sched_id] = asyncio.Event()
            await ev.wait()

        sel = AllocSelector(FileType.CACHE | FileType.SEALED)
        calls = [
            asyncio.create_task(sched.schedule(sector(n), TaskType.PRE_COMMIT1, sel, None, work))
            for n in range(2000)
        ]
        await settle()
        assert len(release) == 50 and len(sched.queue) == 1950
        before = sched.checks
        next(iter(release.values())).set()
        await settle()
        assert len(release) == 51
        assert sched.checks - before <= 3, "one freed slot re-tested more than its worker"
        for c in calls:
            c.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        assert not any(w.ledger.entries for w in sched.enabled_workers())

    run(main)


def test_fetch_moves_files_at_link_speed_and_updates_the_index() -> None:
    from sectorfsm.sched.fetch import fetch_prepare

    clock = VirtualClock(start=0.0)

    async def main() -> None:
        sched = Scheduler(clock=clock)
        slow = 125_000_000  # 1 Gbit/s
        sched.add_worker(spec("a", bandwidth=slow))
        sched.add_worker(spec("b", bandwidth=10 * slow))
        s = sector(9)
        files = FileType.CACHE | FileType.SEALED
        sched.index.add_sector(s, files, "a-ssd")
        sched.disable("a", "busy")
        seen: list[tuple[str, float]] = []

        async def work(job: Job) -> None:
            seen.append((job.worker.name, clock.now()))

        sel = ExistingSelector(files, allow_fetch=True)
        await sched.schedule(s, TaskType.PRE_COMMIT2, sel, fetch_prepare(sched, files), work)
        nbytes = space_needed(files, S32)
        # Moved over the slower of the two links (a's 1 Gbit/s), then the work ran on b.
        assert seen == [("b", pytest.approx(nbytes / slow))]
        assert sched.index.holders(s, files) == {"b"}
        assert sched.index.paths["b-ssd"].reserved == 0

    run(main)


def test_snapshots_are_staged_into_the_next_commit(tmp_path: Path) -> None:
    from sectorfsm.fsm import LmdbStore
    from sectorfsm.sched.views import load_snapshot

    async def main() -> None:
        sched = Scheduler()
        sched.add_worker(spec("a"))
        with LmdbStore(tmp_path / "repo") as store:
            assert load_snapshot(store) is None
            published = sched.publish(store)
            assert load_snapshot(store) is None  # staged: the loop never waits on the disk
            await store.committer.flush()
            snap = load_snapshot(store)
            assert snap == published and snap["workers"][0]["name"] == "a"
            assert snap["jobs"] == [] and isinstance(snap["at"], float)

    run(main)


@pytest.mark.parametrize(("link", "expect"), [(125_000_000, "a"), (100_000_000_000, "b")])
def test_waiting_for_the_holder_beats_a_slow_fetch(link: float, expect: str) -> None:
    """PC2 waits ~25 min for the box that holds its 483 GiB rather than fetch them for 69 min;
    with a fast enough link, fetching to an idle box wins."""
    from sectorfsm.sched.resources import parse_overrides

    clock = VirtualClock(start=0.0)
    one_pc2 = parse_overrides({"PC2_MAX_CONCURRENT": 1})
    files = FileType.CACHE | FileType.SEALED

    async def main() -> list[tuple[int, str]]:
        sched = Scheduler(clock=clock)
        sched.add_worker(spec("a", bandwidth=link, overrides=one_pc2))
        sched.add_worker(spec("b", bandwidth=link, overrides=one_pc2))
        placed: list[tuple[int, str]] = []

        async def pc2(job: Job) -> None:
            placed.append((job.sector.number, job.worker.name))
            await clock.sleep(25 * 60)

        sel = ExistingSelector(files, allow_fetch=True)
        for n in (1, 2, 3):
            sched.index.add_sector(sector(n), files, "a-ssd")
        await sched.schedule(sector(1), TaskType.PRE_COMMIT2, sel, None, pc2)  # learn: 25 min
        running = asyncio.create_task(
            sched.schedule(sector(2), TaskType.PRE_COMMIT2, sel, None, pc2)
        )
        await clock.sleep(60)  # sector 2 runs on a for a minute
        await sched.schedule(sector(3), TaskType.PRE_COMMIT2, sel, None, pc2)
        await running
        return placed

    placed = asyncio.run(main())
    assert placed[:2] == [(1, "a"), (2, "a")]
    assert placed[2] == (3, expect)


def test_queued_requests_are_indexed_by_sector() -> None:
    async def main() -> None:
        sched = Scheduler(clock=VirtualClock())  # no workers: everything stays queued

        async def work(job: Job) -> None:
            return None

        sectors = [SectorRef(1000, n, 2048) for n in range(1, 4)]
        tasks = [
            asyncio.ensure_future(sched.schedule(s, t, TaskSelector(), None, work))
            for s in sectors
            for t in (TaskType.PRE_COMMIT1, TaskType.COMMIT2)
        ]
        await asyncio.sleep(0)
        assert [r.task_type for r in sched.queue.for_sector(sectors[1])] == [
            TaskType.PRE_COMMIT1,
            TaskType.COMMIT2,
        ]
        assert sched.queue.shape_count() == 2  # one shape per task type here
        tasks[2].cancel()  # sector 2's PC1 leaves the queue
        await asyncio.sleep(0)
        assert [r.task_type for r in sched.queue.for_sector(sectors[1])] == [TaskType.COMMIT2]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert all(sched.queue.for_sector(s) == [] for s in sectors)

    run(main)
