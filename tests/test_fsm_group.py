"""StateGroup semantics: the API, batching, one step per machine, failures, restart, dormancy."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG_GUARD, run, settle
from fsmtoy import (
    Add,
    Bad,
    Cancel,
    Counter,
    Crash,
    Finish,
    Open,
    Probe,
    Stop,
    Work,
    make_group,
)

from sectorfsm.fsm import (
    GroupStoppedError,
    LmdbStore,
    MachineExistsError,
    StateGroup,
    StepFailed,
    UnknownMachineError,
    VirtualClock,
)


def test_begin_send_get_has_info(tmp_path: Path) -> None:
    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store)
            await g.start()
            await g.begin(7, Counter())
            assert g.has(7) and not g.has(8)
            await g.send(7, Add(uid=1, amount=5))
            await g.idle()
            st = g.get(7)
            assert st is not None and st.total == 5 and st.applied == [1]
            info = g.info(7)
            assert info is not None and info.pending_events == 0 and not info.final
            assert g.get(8) is None and g.info(8) is None
            with pytest.raises(MachineExistsError, match="7"):
                await g.begin(7, Counter())
            with pytest.raises(UnknownMachineError, match="no machine 99"):
                await g.send(99, Add(uid=2))
            assert not g.has(99), "a send to an unknown id must not create a record"
            await g.stop()

    run(main)


def test_string_ids_and_creating_event(tmp_path: Path) -> None:
    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store)
            await g.start()
            await g.send("alpha", Open())  # declared as creating
            await g.send("alpha", Add(uid=1))
            await g.idle()
            st = g.get("alpha")
            assert st is not None and st.state == "Idle" and st.total == 1
            with pytest.raises(ValueError, match="NUL"):
                await g.send("a\x00b", Add(uid=1))
            with pytest.raises(TypeError, match="bool"):
                g.has(True)
            await g.stop()

    run(main)


def test_send_returns_only_when_durable(tmp_path: Path) -> None:
    """After send returns, the event is on disk: applied in the state, or pending in the inbox."""

    async def main() -> None:
        store = LmdbStore(tmp_path)
        probe = Probe()
        g = make_group(store, probe)
        await g.start()
        await g.begin(1, Counter())
        await g.send(1, Work(seconds=3600))  # a long step: later events stay queued
        await probe.started(1)
        await g.send(1, Add(uid=42))
        info = g.info(1)  # read straight from the store
        assert info is not None
        assert info.pending_events == 1
        assert 42 not in info.state.applied
        await g.stop()
        store.close()

    run(main)


def test_one_step_at_a_time_and_batching(tmp_path: Path) -> None:
    probe = Probe()
    clock = VirtualClock()

    async def main() -> None:
        async with LmdbStore(tmp_path, durability="nosync") as store:
            g = make_group(store, probe, clock=clock)
            await g.start()
            for i in range(20):
                await g.begin(i, Counter())
            await asyncio.gather(*(g.send(i, Work(seconds=10)) for i in range(20)))
            # While each step runs, more events arrive; they must be planned as one batch.
            await asyncio.gather(*(g.send(i, Add(uid=u)) for i in range(20) for u in range(5)))
            await g.idle()
            for i in range(20):
                st = g.get(i)
                assert st is not None
                assert st.applied == [0, 1, 2, 3, 4]
                assert st.state == "Idle"
                # Work, then [Add x5 + Done] or [Add x5] then [Done]: the five Adds in one batch.
                assert 5 in st.batches or 6 in st.batches, st.batches
            await g.stop()

    run(main)
    assert probe.max_per_machine == 1, "two steps ran at once on one machine"
    assert probe.max_total == 20, "machines did not run their steps concurrently"


def test_step_starts_only_after_its_state_is_committed(tmp_path: Path) -> None:
    seen: list[str | None] = []

    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            g: StateGroup[Counter]

            async def step(ctx: Any, st: Counter) -> None:
                persisted = g.get(ctx.id)
                seen.append(None if persisted is None else persisted.state)

            def planner(events: list[Any], st: Counter) -> tuple[Any, int]:
                st.state = "Stepped"
                return step, len(events)

            g = StateGroup(store, "p", planner, Counter, events=[Add])
            await g.start()
            await g.begin(1, Counter())
            await g.send(1, Add(uid=1))
            await g.idle()
            await g.stop()

    run(main)
    assert seen == ["Stepped"]


def test_failing_step_records_error_and_machine_stays_usable(tmp_path: Path) -> None:
    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store)
            await g.start()
            await g.begin(1, Counter())
            await g.send(1, Crash())
            await g.idle()
            info = g.info(1)
            assert info is not None
            assert info.state.state == "Failed"
            assert info.state.failures == ["RuntimeError: disk on fire in Idle"]
            assert info.last_error == "step failed: RuntimeError: disk on fire in Idle"
            # Still usable: further events are planned and steps run.
            await g.send(1, Work(seconds=0))
            await g.send(1, Add(uid=3))
            await g.idle()
            st = g.get(1)
            assert st is not None and st.state == "Idle" and st.applied == [3]
            await g.stop()

    run(main)


def test_unexpected_event_is_logged_and_consumed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    probe = Probe()

    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store, probe)
            await g.start()
            await g.begin(1, Counter())
            await g.send(1, Work(seconds=0.2))
            # Queued behind the step: a good event, the bad one, another good one.
            await g.send(1, Add(uid=1))
            await g.send(1, Bad())
            await g.send(1, Add(uid=2))
            await g.idle()
            info = g.info(1)
            assert info is not None
            assert info.pending_events == 0
            assert info.state.applied == [1, 2], "good events around the bad one were lost"
            assert info.last_error is not None and "planner rejected Bad" in info.last_error
            plans = probe.plans
            await asyncio.sleep(0.3)
            assert probe.plans == plans, "the planner keeps being called: a replan loop"
            await g.stop()

    with caplog.at_level(logging.WARNING, logger="sectorfsm.fsm"):
        run(main)
    assert any("planner rejected Bad" in r.getMessage() for r in caplog.records)


def test_planner_that_consumes_nothing_does_not_loop(tmp_path: Path) -> None:
    calls = 0

    def planner(events: list[Any], st: Counter) -> tuple[Any, int]:
        nonlocal calls
        calls += 1
        return None, 0

    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            g = StateGroup(store, "lazy", planner, Counter, events=[Add])
            await g.start()
            await g.begin(1, Counter())
            await g.send(1, Add(uid=1))
            await g.idle()
            info = g.info(1)
            assert info is not None and info.pending_events == 0
            assert info.last_error == "planner did not consume event Add"
            await g.stop()

    run(main)
    assert calls == 1


def test_cancelling_event_cancels_running_step(tmp_path: Path) -> None:
    probe = Probe()

    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store, probe)
            await g.start()
            await g.begin(1, Counter())
            await g.send(1, Work(seconds=3600))
            await probe.started(1)
            await g.send(1, Cancel())
            await asyncio.wait_for(g.idle(), HANG_GUARD)
            st = g.get(1)
            assert st is not None and st.state == "Cancelled"
            await g.stop()

    run(main)
    assert probe.cancelled == [(1, True)]


def test_a_cancel_that_finds_no_step_does_not_cancel_a_later_one(tmp_path: Path) -> None:
    """A cancelling event that arrives while a round planning no step commits cancels nothing.

    Before, its request lingered and skipped the step of whichever later round planned one
    (a sector resumed by `retry` then sat in its failed state for ever).
    """
    probe = Probe()
    gate = threading.Event()

    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store, probe)
            await g.start()
            await g.begin(1, Counter())
            write = store.write

            def held(fn: Callable[[Any], Any]) -> Any:
                gate.wait(60)  # (a hang guard: the test sets it)
                return write(fn)

            store.write = held  # type: ignore[method-assign]
            try:
                added = asyncio.ensure_future(g.send(1, Add(uid=1)))  # its round plans no step
                await settle()  # the round is planned; its commit waits on the gate
                assert not g.is_idle() and g.stats()["pending_events"] == 0
                cancel = asyncio.ensure_future(g.send(1, Cancel()))
                await settle()
                assert g.stats()["pending_events"] == 1  # queued behind the committing round
            finally:
                gate.set()  # (a failed check must not leave the writer thread waiting)
            await asyncio.gather(added, cancel)
            await g.idle()
            await g.send(1, Work(seconds=0))
            await g.idle()
            st = g.get(1)
            assert st is not None and st.state == "Idle", st
            await g.stop()

    run(main)
    assert [s for _, s in probe.steps_started] == ["Working"]


def test_terminated_machine_is_final_and_dormant(tmp_path: Path) -> None:
    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store)
            await g.start()
            await g.begin(1, Counter())
            await g.begin(2, Counter())
            await g.send(1, Stop())
            await g.send(2, Finish())
            await g.idle()
            assert g.stats()["loaded"] == 0, "final machines must not stay in memory"
            info = g.info(1)
            assert info is not None and info.final
            info2 = g.info(2)
            assert info2 is not None and info2.final and info2.state.state == "Closed"
            # An event to a dormant machine wakes it from disk.
            await g.send(2, Add(uid=9))
            await g.idle()
            st2 = g.get(2)
            assert st2 is not None and st2.applied == [9]
            assert g.stats()["loaded"] == 0
            await g.stop()

    run(main)


def test_restart_replans_live_machines_only(tmp_path: Path) -> None:
    async def first() -> None:
        store = LmdbStore(tmp_path)
        probe = Probe()
        g = make_group(store, probe)
        await g.start()
        for i in range(5):
            await g.begin(i, Counter())
        await g.send(0, Finish())  # final: stays dormant
        await g.send(1, Work(seconds=3600))  # running at "crash" time
        await probe.started(1)
        await g.send(1, Add(uid=11))  # pending behind the step
        # Abandon the group as a crash would: no stop(), no flush.
        store.close()

    async def second() -> None:
        probe = Probe()
        async with LmdbStore(tmp_path) as store:
            g = make_group(store, probe)
            await g.start()
            await g.idle()
            restarted = {i: g.get(i) for i in range(5)}
            assert restarted[0] is not None and restarted[0].restarts == 0
            for i in range(1, 5):
                st = restarted[i]
                assert st is not None and st.restarts == 1, (i, st)
            st1 = restarted[1]
            assert st1 is not None
            # Pending event planned before Restart; Restart re-ran the Working step to Done.
            assert st1.applied == [11] and st1.state == "Idle"
            assert (1, "Working") in probe.steps_started
            assert g.stats()["loaded"] == 4
            await g.stop()

    run(first)
    run(second)


def test_group_commit_coalesces_concurrent_sends(tmp_path: Path) -> None:
    async def main(durability: Any) -> tuple[int, int]:
        path = tmp_path / durability
        async with LmdbStore(path, durability=durability) as store:
            g = make_group(store)
            await g.start()
            await asyncio.gather(*(g.begin(i, Counter()) for i in range(50)))
            before = store.committer.transactions
            await asyncio.gather(*(g.send(i, Add(uid=i)) for i in range(50)))
            await g.idle()
            commits = store.committer.transactions - before
            assert all((st.applied == [i]) for i, st in g.list())
            await g.stop()
            return commits, 50

    group_commits, n = asyncio.run(main("group"))
    sync_commits, _ = asyncio.run(main("sync"))
    assert group_commits <= 3, f"group mode used {group_commits} commits for {n} sends"
    # sync: one commit per send and one per planner round (whatever ran in the same flush).
    assert sync_commits >= 2 * n


def test_list_pages_and_count_by(tmp_path: Path) -> None:
    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store)
            await g.start()
            for i in [5, -3, 1000, 0, 42]:
                await g.begin(i, Counter(total=i))
            await g.send(42, Finish())
            await g.idle()
            ids = [mid for mid, _ in g.list(page_size=2)]
            assert ids == [-3, 0, 5, 42, 1000], "ints must list in numeric order across pages"
            assert [mid for mid, _ in g.list(start_after=5, page_size=1)] == [42, 1000]
            assert [mid for mid, _ in g.list(lambda s: s.total > 4)] == [5, 42, 1000]
            assert g.count_by("state") == {"Idle": 4, "Closed": 1}
            await g.stop()

    run(main)


def test_stopped_group_refuses_ctx_send_and_store_reopens(tmp_path: Path) -> None:
    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store)
            await g.start()
            await g.begin(1, Counter())
            await g.stop()
            with pytest.raises(GroupStoppedError):
                g.post(1, Add(uid=1))
            await g.start()  # a group can start again
            await g.send(1, Add(uid=1))
            await g.idle()
            await g.stop()
        async with LmdbStore(tmp_path) as store:
            st = make_group(store).get(1)
            assert st is not None and st.applied == [1]

    run(main)


def test_two_groups_share_a_store(tmp_path: Path) -> None:
    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            a = make_group(store)
            b = StateGroup(store, "other", a.planner, Counter, events=[Add])
            await a.start()
            await b.start()
            await a.begin(1, Counter())
            await b.begin(1, Counter())
            await a.send(1, Add(uid=1))
            await b.send(1, Add(uid=2))
            await a.idle()
            await b.idle()
            sa, sb = a.get(1), b.get(1)
            assert sa is not None and sb is not None
            assert sa.applied == [1] and sb.applied == [2]
            await a.stop()
            await b.stop()

    run(main)


def test_bad_arguments(tmp_path: Path) -> None:
    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            with pytest.raises(ValueError, match="group names"):
                make_group(store).__class__(store, "", lambda e, s: (None, 0), Counter)
            with pytest.raises(ValueError, match="not among"):
                StateGroup(store, "x", lambda e, s: (None, 0), Counter, creating=[Open])
            with pytest.raises(TypeError, match="dataclass"):
                StateGroup(store, "x", lambda e, s: (None, 0), dict)
            g = make_group(store)
            await g.start()
            await g.begin(1, Counter())
            with pytest.raises(TypeError, match="not a registered event"):
                await g.send(1, object())
            with pytest.raises(TypeError, match="must be a Counter"):
                await g.begin(2, "nope")  # type: ignore[arg-type]
            await g.stop()

    run(main)


def test_done_event_flow_with_virtual_clock_is_instant(tmp_path: Path) -> None:
    clock = VirtualClock(start=1_000.0)

    async def main() -> float:
        async with LmdbStore(tmp_path, durability="nosync") as store:
            g = make_group(store, clock=clock)
            await g.start()
            for i in range(10):
                await g.begin(i, Counter())
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for _ in range(3):  # three rounds of six simulated hours each
                await asyncio.gather(*(g.send(i, Work(seconds=6 * 3600)) for i in range(10)))
                await g.idle()
            wall = loop.time() - t0
            assert all(st.state == "Idle" for _, st in g.list())
            assert g.get(0) is not None
            await g.stop()
            return wall

    wall = run(main)
    assert clock.now() == pytest.approx(1_000.0 + 3 * 6 * 3600)
    assert wall < 5, f"18 simulated hours took {wall:.2f}s of wall time"


def test_ten_thousand_concurrent_machines(tmp_path: Path) -> None:
    n = 10_000

    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store)
            await g.start()
            await asyncio.gather(*(g.send(i, Open()) for i in range(n)))
            await asyncio.gather(*(g.send(i, Work(seconds=0.01)) for i in range(n)))
            await asyncio.gather(*(g.send(i, Add(uid=i)) for i in range(n)))
            await g.idle()
            states = dict(g.list())
            assert len(states) == n
            assert all(st.state == "Idle" and st.applied == [i] for i, st in states.items())
            assert g.stats()["steps"] == 0
            await g.stop()

    run(main)


def test_plain_function_steps_run_inline(tmp_path: Path) -> None:
    """A step may be a plain function: it runs inline after the commit, without a Task."""
    seen: list[int] = []

    def step(ctx: Any, st: Counter) -> None:
        seen.append(st.total)
        if st.total < 3:
            ctx.send(Add(uid=st.total + 1))
        elif st.total == 3:
            raise RuntimeError("plain step broke")

    def planner(events: list[Any], st: Counter) -> tuple[Any, int]:
        for ev in events:
            if isinstance(ev, Add):
                st.total += 1
                st.applied.append(ev.uid)
            elif isinstance(ev, StepFailed):
                st.failures.append(ev.error)
                return None, len(events)
        return step, len(events)

    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            g = StateGroup(store, "plain", planner, Counter, events=[Add])
            await g.start()
            await g.begin(1, Counter())
            tasks_before = len(asyncio.all_tasks())
            await g.send(1, Add(uid=1))
            await g.idle()
            assert len(asyncio.all_tasks()) == tasks_before
            info = g.info(1)
            assert info is not None
            assert info.state.applied == [1, 2, 3]
            assert info.state.failures == ["RuntimeError: plain step broke"]
            assert info.last_error == "step failed: RuntimeError: plain step broke"
            await g.stop()

    run(main)
    assert seen == [1, 2, 3]
