"""`AllowDelay` and the miner-side `testOpenSource.json`, through the rules and the scheduler.

Time is a `VirtualClock` moved by hand: the delay is tested at its exact edges, with no sleeps.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import run, settle

from sectorfsm.fsm import VirtualClock
from sectorfsm.sched.filetypes import FileType
from sectorfsm.sched.ledger import WorkerResources
from sectorfsm.sched.policy import MINER_POLICY_FILE, WorkerPolicy, parse_policy
from sectorfsm.sched.rules import delay_refusal
from sectorfsm.sched.scheduler import Job, Scheduler
from sectorfsm.sched.selectors import AllocSelector
from sectorfsm.sched.storage import SectorRef, StoragePath
from sectorfsm.sched.tasks import TaskType
from sectorfsm.sched.workers import WorkerSpec

GIB = 1 << 30
TIB = 1 << 40
S32 = 32 << 30
BIG = WorkerResources(cpus=64, mem_physical=1024 * GIB, mem_swap=0, gpus=("g0",))
PC1 = TaskType.PRE_COMMIT1
SEL = AllocSelector(FileType.CACHE | FileType.SEALED)
#: Every stage open, no locality binding: only the knob under test restricts.
OPEN = {
    "AddPieceMax": None,
    "PreCommit1Max": None,
    "PreCommit2Max": None,
    "Commit2Max": None,
    "ForceP1FromLocalAP": False,
    "ForceP2FromLocalP1": False,
    "AllowDelay": 0,
}


def spec(name: str, policy: Path | None = None) -> WorkerSpec:
    return WorkerSpec(
        name, BIG, paths=(StoragePath(f"{name}-ssd", name, 20 * TIB),), policy_file=policy
    )


def sector(n: int) -> SectorRef:
    return SectorRef(1000, n, S32)


def gate(seen: list[tuple[int, str]]) -> Callable[[asyncio.Event], Callable[[Job], Awaitable[str]]]:
    def make(release: asyncio.Event) -> Callable[[Job], Awaitable[str]]:
        async def work(job: Job) -> str:
            seen.append((job.sector.number, job.worker.name))
            await release.wait()
            return job.worker.name

        return work

    return make


# --- AllowDelay: the rule --------------------------------------------------------------------


def test_allow_delay_parses_and_defaults() -> None:
    assert parse_policy({}).allow_delay == 3.0  # myScheduler's default for an omitted key
    assert WorkerPolicy().allow_delay == 0.0  # no policy file: no delay
    assert parse_policy({"AllowDelay": 1.5}).allow_delay == 1.5
    assert parse_policy({"allow_delay": 0}).allow_delay == 0.0


@pytest.mark.parametrize("bad", [-1, True, "3", None, float("inf"), float("nan")])
def test_allow_delay_rejects_what_is_not_seconds(bad: object) -> None:
    with pytest.raises(ValueError, match=r"AllowDelay = .*: expected a number of seconds >= 0"):
        parse_policy({"AllowDelay": bad})


def test_delay_refusal_edges() -> None:
    p = WorkerPolicy(allow_delay=3.0)
    assert delay_refusal(p, PC1, None, 100.0) is None  # nothing released yet
    why = delay_refusal(p, PC1, 100.0, 100.0)
    assert why == "a task was released here 0.0s ago; new work waits 3s (AllowDelay)"
    assert delay_refusal(p, PC1, 100.0, 102.9) is not None
    assert delay_refusal(p, PC1, 100.0, 103.0) is None  # the delay is over
    assert delay_refusal(WorkerPolicy(), PC1, 100.0, 100.0) is None  # 0 = off
    # Only the tasks a policy governs wait (as for the drain): finalize/fetch never do.
    assert delay_refusal(p, TaskType.FINALIZE, 100.0, 100.0) is None
    for task in (TaskType.ADD_PIECE, TaskType.PRE_COMMIT2, TaskType.COMMIT1, TaskType.COMMIT2):
        assert delay_refusal(p, task, 100.0, 100.0) is not None


# --- AllowDelay: the scheduler on the virtual clock ------------------------------------------


def test_allow_delay_skips_the_round_after_a_release_until_the_delay_is_over(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "myscheduler.json"
    policy.write_text(json.dumps({**OPEN, "PreCommit1Max": 1, "AllowDelay": 5}))
    clock = VirtualClock(start=0.0, auto_advance=False)
    seen: list[tuple[int, str]] = []
    work = gate(seen)

    async def main() -> None:
        sched = Scheduler(clock=clock)
        sched.add_worker(spec("a", policy))
        first, second = asyncio.Event(), asyncio.Event()
        calls = [
            asyncio.create_task(sched.schedule(sector(1), PC1, SEL, None, work(first))),
            asyncio.create_task(sched.schedule(sector(2), PC1, SEL, None, work(second))),
        ]
        await settle()
        assert seen == [(1, "a")]  # nothing released yet: no delay, the cap holds sector 2
        clock.advance(10)
        first.set()
        assert await calls[0] == "a"
        await settle()
        # The round the release triggered did not refill the worker, and diag says why.
        assert seen == [(1, "a")]
        reason = sched.diag()[0].reasons["a"]
        assert reason == "a task was released here 0.0s ago; new work waits 5s (AllowDelay)"
        clock.advance(4.9)
        await settle()
        assert seen == [(1, "a")]
        assert "released here 4.9s ago" in sched.diag()[0].reasons["a"]
        clock.advance(0.1)  # the delay ends: the scheduler tests the worker again by itself
        await settle()
        assert seen == [(1, "a"), (2, "a")]
        second.set()
        assert await calls[1] == "a"
        await sched.stop()

    run(main)


def test_allow_delay_zero_refills_at_once(tmp_path: Path) -> None:
    policy = tmp_path / "myscheduler.json"
    policy.write_text(json.dumps({**OPEN, "PreCommit1Max": 1}))
    clock = VirtualClock(start=0.0, auto_advance=False)
    seen: list[tuple[int, str]] = []
    work = gate(seen)

    async def main() -> None:
        sched = Scheduler(clock=clock)
        sched.add_worker(spec("a", policy))
        done = asyncio.Event()
        done.set()
        calls = [
            asyncio.create_task(sched.schedule(sector(n), PC1, SEL, None, work(done)))
            for n in (1, 2)
        ]
        assert await asyncio.gather(*calls) == ["a", "a"]
        assert seen == [(1, "a"), (2, "a")]
        assert clock.now() == 0.0 and clock.pending_timers == 0

    run(main)


def test_allow_delay_only_holds_the_worker_that_released(tmp_path: Path) -> None:
    delayed, other = tmp_path / "a.json", tmp_path / "b.json"
    delayed.write_text(json.dumps({**OPEN, "PreCommit1Max": 1, "AllowDelay": 5}))
    other.write_text(json.dumps({**OPEN, "PreCommit1Max": 0}))
    clock = VirtualClock(start=0.0, auto_advance=False)
    seen: list[tuple[int, str]] = []
    work = gate(seen)

    async def main() -> None:
        sched = Scheduler(clock=clock)
        sched.add_worker(spec("a", delayed))
        first, rest = asyncio.Event(), asyncio.Event()
        one = asyncio.create_task(sched.schedule(sector(1), PC1, SEL, None, work(first)))
        await settle()
        first.set()
        await one
        # A worker that joins after the release has no delay of its own and takes the task.
        other.write_text(json.dumps({**OPEN, "PreCommit1Max": 1, "AllowDelay": 5}))
        sched.add_worker(spec("b", other))
        two = asyncio.create_task(sched.schedule(sector(2), PC1, SEL, None, work(rest)))
        await settle()
        assert seen == [(1, "a"), (2, "b")]
        rest.set()
        await two
        await sched.stop()
        assert clock.pending_timers == 0  # stop() cancelled the wake-ups

    run(main)


# --- testOpenSource.json: the miner-side policy ----------------------------------------------


def test_miner_policy_applies_to_workers_without_a_file_and_own_files_win(
    tmp_path: Path,
) -> None:
    own = tmp_path / "own.json"
    own.write_text(json.dumps(OPEN))
    miner = tmp_path / MINER_POLICY_FILE
    miner.write_text(json.dumps({**OPEN, "PreCommit1Max": 0}))
    seen: list[tuple[int, str]] = []
    work = gate(seen)

    async def main() -> None:
        sched = Scheduler()
        sched.add_worker(spec("early"))  # joined before the miner policy was loaded
        sched.use_miner_policy(miner)
        sched.add_worker(spec("late"))  # and one after
        release = asyncio.Event()
        call = asyncio.create_task(sched.schedule(sector(1), PC1, SEL, None, work(release)))
        await settle()
        assert seen == []
        reasons = sched.diag()[0].reasons
        disabled = "PC1 disabled on this worker (PreCommit1Max = 0)"
        assert reasons["early"] == reasons["late"] == disabled
        sched.add_worker(spec("own", own))  # its own file allows PC1: it wins
        await settle()
        assert seen == [(1, "own")]
        assert sched.worker("early").policy.pre_commit1_max == 0
        assert sched.worker("own").policy.pre_commit1_max is None
        release.set()
        await call
        await sched.stop()

    run(main)


def test_miner_policy_hot_reload_and_a_bad_edit_keeps_the_last_good(tmp_path: Path) -> None:
    miner = tmp_path / MINER_POLICY_FILE
    miner.write_text(json.dumps({**OPEN, "PreCommit1Max": 0}))
    seen: list[tuple[int, str]] = []
    work = gate(seen)

    async def main() -> None:
        sched = Scheduler()
        sched.add_worker(spec("a"))
        sched.add_worker(spec("b"))
        sched.use_miner_policy(miner)
        release = asyncio.Event()
        calls = [
            asyncio.create_task(sched.schedule(sector(n), PC1, SEL, None, work(release)))
            for n in (1, 2, 3)
        ]
        await settle()
        assert seen == []
        # A broken edit: the last good policy (PC1 disabled) stays, and every worker says why.
        miner.write_text('{"PreCommit1Max": 3,')
        sched.check_workers()
        await settle()
        assert seen == []
        for reason in sched.diag()[0].reasons.values():
            assert reason.startswith("PC1 disabled on this worker (PreCommit1Max = 0) ")
            assert f"last good policy kept: {miner}" in reason and "invalid JSON" in reason
        errors = {w.policy_error for w in sched.workers()}
        assert len(errors) == 1 and "invalid JSON" in str(errors.pop())
        # A good edit reaches every worker that uses the miner policy, without a restart.
        miner.write_text(json.dumps({**OPEN, "PreCommit1Max": 1}))
        sched.check_workers()
        await settle()
        assert sorted(w for _, w in seen) == ["a", "b"]  # one each: the cap is per worker
        assert all(w.policy_error is None for w in sched.workers())
        release.set()
        await asyncio.gather(*calls)
        await sched.stop()

    run(main)


def test_no_miner_policy_file_restricts_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        sched = Scheduler()
        sched.add_worker(spec("a"))
        watcher = sched.use_miner_policy(tmp_path / MINER_POLICY_FILE)
        assert watcher.error is None and sched.worker("a").policy == WorkerPolicy()

        async def work(job: Job) -> str:
            return job.worker.name

        assert await sched.schedule(sector(1), PC1, SEL, None, work) == "a"
        await sched.stop()

    run(main)
