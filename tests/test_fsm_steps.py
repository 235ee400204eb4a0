"""Steps: started inline until their first wait, a Task only for a step that waits.

A step that never waits costs no Task; one that waits resumes in exactly one Task; a failing,
cancelled or stopped step leaves its machine usable; each step runs in its own copy of the
context and of the state.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import tracemalloc
from pathlib import Path

import pytest
from conftest import HANG_GUARD, run, settle
from fsmtoy import (
    Go,
    Halt,
    Hop,
    Note,
    Rec,
    StepFn,
    TaskCounter,
    make_rec_group,
    pending_on_disk,
    state,
)

from sectorfsm.fsm import Context, LmdbStore, MachineId, StateGroup

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("hotpath_var", default="unset")


# -- eager steps ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("async_step", "eager", "tasks_per_step"),
    [(True, True, 0), (False, True, 0), (True, False, 1), (False, False, 0)],
    ids=["async-eager", "plain-eager", "async-lazy", "plain-lazy"],
)
def test_steps_that_never_wait_create_no_tasks(
    tmp_path: Path, async_step: bool, eager: bool, tasks_per_step: int
) -> None:
    """Chains of non-waiting steps on many machines run with no Task (except eager_steps=False)."""
    n, hops = 100, 5

    def hop_plain(ctx: Context, st: Rec) -> None:
        if st.hops < hops:
            ctx.send(Hop())

    async def hop_async(ctx: Context, st: Rec) -> None:
        hop_plain(ctx, st)

    hop: StepFn = hop_async if async_step else hop_plain
    counter = TaskCounter()

    async def main() -> None:
        async with LmdbStore(tmp_path / "repo", "nosync") as store:
            g = make_rec_group(store, {"go": hop, "hop": hop}, eager_steps=eager)
            await g.start()
            for i in range(n):
                await g.begin(i, Rec())
            counter.install()  # after start: the mailbox poller is not ours to count
            # `post` returns plain futures: gathering them creates no Task either.
            await asyncio.gather(*(g.post(i, Go("go")) for i in range(n)))
            await g.idle()
            counter.uninstall()
            assert all(st.hops == hops and st.phase == "go" for _, st in g.list())
            assert g.stats()["steps"] == 0
            await g.stop()

    run(main)
    steps_run = n * (hops + 1)  # the Go step plus one per Hop
    assert counter.step_tasks == tasks_per_step * steps_run
    # Nothing else (no helper task per step) may have been created either.
    assert len(counter.names) == counter.step_tasks, counter.names[:5]


@pytest.mark.parametrize("wait", ["sleep0", "event", "future"])
def test_step_that_waits_resumes_in_one_task_and_its_events_apply(
    tmp_path: Path, wait: str
) -> None:
    """A step that suspends gets exactly one Task; what it sends after resuming is applied."""
    counter = TaskCounter()
    trail: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        gate = asyncio.Event()
        fut: asyncio.Future[int] = loop.create_future()

        async def step(ctx: Context, st: Rec) -> None:
            trail.append("sync part")
            if wait == "sleep0":
                await asyncio.sleep(0)
                uid = 1
            elif wait == "event":
                await gate.wait()
                uid = 2
            else:
                uid = await fut
            trail.append("resumed")
            assert asyncio.current_task() is not None  # resumed inside the engine's Task
            ctx.send(Note(uid))

        async with LmdbStore(tmp_path / "repo") as store:
            g = make_rec_group(store, {"w": step})
            await g.start()
            await g.begin(1, Rec())
            counter.install()
            await g.send(1, Go("w"))
            # The synchronous part ran inline, before `send` even returned.
            assert trail == ["sync part"]
            if wait != "sleep0":
                await settle()  # the step stays suspended until it is let go
                assert trail == ["sync part"] and g.stats()["steps"] == 1
                if wait == "event":
                    gate.set()
                else:
                    fut.set_result(3)
            await asyncio.wait_for(g.idle(), HANG_GUARD)
            assert trail == ["sync part", "resumed"]
            st = state(g, 1)
            assert st.seen == [{"sleep0": 1, "event": 2, "future": 3}[wait]]
            assert st.errors == [] and pending_on_disk(g, 1) == 0
            counter.uninstall()
            await g.stop()

    run(main)
    assert counter.step_tasks == 1


@pytest.mark.parametrize("where", ["async-before-await", "async-after-await", "plain"])
def test_step_exception_becomes_step_failed_and_machine_stays_usable(
    tmp_path: Path, where: str
) -> None:
    counter = TaskCounter()

    async def raising_async(ctx: Context, st: Rec) -> None:
        if where == "async-after-await":
            await asyncio.sleep(0)
        raise RuntimeError(f"boom {where}")

    def raising_plain(ctx: Context, st: Rec) -> None:
        raise RuntimeError(f"boom {where}")

    step: StepFn = raising_plain if where == "plain" else raising_async

    async def main() -> None:
        async with LmdbStore(tmp_path / "repo") as store:
            g = make_rec_group(store, {"x": step})
            await g.start()
            await g.begin(1, Rec())
            counter.install()
            await g.send(1, Go("x"))
            await asyncio.wait_for(g.idle(), HANG_GUARD)
            info = g.info(1)
            assert info is not None
            assert info.state.errors == [f"RuntimeError: boom {where}"]
            assert info.last_error == f"step failed: RuntimeError: boom {where}"
            assert info.pending_events == 0
            # Usable afterwards: the next event is planned as usual.
            await g.send(1, Note(5))
            await g.idle()
            assert state(g, 1).seen == [5]
            assert g.stats()["steps"] == 0
            counter.uninstall()
            await g.stop()

    run(main)
    # Only the step that got as far as waiting needed a Task.
    assert counter.step_tasks == (1 if where == "async-after-await" else 0)


@pytest.mark.parametrize("when", ["suspended", "right-after-start"])
def test_cancelling_event_cancels_an_eagerly_started_step_where_it_waits(
    tmp_path: Path, when: str
) -> None:
    """Halt interrupts the step as it would a Task: CancelledError where it waits.

    "right-after-start": the step ran its synchronous part but its Task has not run yet when
    Halt comes. Either way `ctx.cancelled` is set, `finally` runs (and may itself wait), the
    step is not recorded as failed and the machine stays usable.
    """
    trail: list[tuple[str, bool]] = []

    async def main() -> None:
        suspended = asyncio.Event()
        never = asyncio.Event()

        async def step(ctx: Context, st: Rec) -> None:
            trail.append(("sync part", ctx.cancelled))
            if when == "suspended":
                await asyncio.sleep(0)  # from here on the step runs in its Task
                suspended.set()
            try:
                await never.wait()
            except asyncio.CancelledError:
                trail.append(("cancelled", ctx.cancelled))
                raise
            except GeneratorExit:
                trail.append(("generator exit", ctx.cancelled))
                raise
            finally:
                trail.append(("finally", ctx.cancelled))
                await asyncio.sleep(0)  # cleanup may itself wait
                trail.append(("cleanup done", ctx.cancelled))

        async with LmdbStore(tmp_path / "repo") as store:
            g = make_rec_group(store, {"s": step})
            await g.start()
            try:
                await g.begin(1, Rec())
                await g.send(1, Go("s"))
                if when == "suspended":
                    await asyncio.wait_for(suspended.wait(), HANG_GUARD)
                await g.send(1, Halt())
                await asyncio.wait_for(g.idle(), HANG_GUARD)  # (the step never ends by itself)
                info = g.info(1)
                assert info is not None
                assert info.state.phase == "halted" and info.state.errors == []
                assert info.last_error is None, "a cancelled step is not a failed step"
                assert g.stats()["steps"] == 0
                await g.send(1, Note(1))
                await g.idle()
                assert state(g, 1).seen == [1]
            finally:
                await g.stop()

    run(main)
    assert trail == [
        ("sync part", False),
        ("cancelled", True),
        ("finally", True),
        ("cleanup done", True),
    ]


@pytest.mark.parametrize("when", ["suspended", "right-after-start"])
def test_stop_cancels_a_suspended_step_and_runs_its_finally(tmp_path: Path, when: str) -> None:
    trail: list[tuple[str, bool]] = []

    async def main() -> None:
        suspended = asyncio.Event()
        never = asyncio.Event()

        async def step(ctx: Context, st: Rec) -> None:
            if when == "suspended":
                await asyncio.sleep(0)
                suspended.set()
            try:
                await never.wait()
            except asyncio.CancelledError:
                trail.append(("cancelled", ctx.cancelled))
                raise
            finally:
                trail.append(("finally", ctx.cancelled))
                await asyncio.sleep(0)
                trail.append(("cleanup done", ctx.cancelled))

        async with LmdbStore(tmp_path / "repo") as store:
            g = make_rec_group(store, {"s": step})
            await g.start()
            await g.begin(1, Rec())
            await g.send(1, Go("s"))
            if when == "suspended":
                await asyncio.wait_for(suspended.wait(), HANG_GUARD)
            # "right-after-start": stop() awaits the mailbox poller before it cancels steps, so
            # the step's Task has usually run by then; the cancelling-event test above covers
            # the window where it has not.
            await asyncio.wait_for(g.stop(), HANG_GUARD)
            assert not g.started and g.is_idle()
            # Stopped mid-step: the machine is still live on disk, in the step's state.
            assert state(g, 1).phase == "s"

    run(main)
    assert trail == [("cancelled", True), ("finally", True), ("cleanup done", True)]


def test_context_vars_are_isolated_between_steps_of_one_batch(tmp_path: Path) -> None:
    """A var set before the first await survives it; other steps of the batch never see it."""
    n = 10
    seen: dict[tuple[MachineId, str], str] = {}
    batches: set[int] = set()

    async def main() -> None:
        async with LmdbStore(tmp_path / "repo") as store:

            async def step(ctx: Context, st: Rec) -> None:
                batches.add(store.committer.batch_no)
                seen[ctx.id, "before"] = VAR.get()
                VAR.set(f"set by {ctx.id}")
                await asyncio.sleep(0)
                seen[ctx.id, "after"] = VAR.get()

            g = make_rec_group(store, {"v": step})
            await g.start()
            for i in range(n):
                await g.begin(i, Rec())
            # Staged in one tick: planned in one flush, started by one commit callback.
            await asyncio.gather(*(g.post(i, Go("v")) for i in range(n)))
            await g.idle()
            assert VAR.get() == "unset", "a step's context var leaked into the caller"
            await g.stop()

    run(main)
    assert len(batches) == 1, "the steps did not start from the same commit batch"
    assert {seen[i, "before"] for i in range(n)} == {"unset"}
    assert [seen[i, "after"] for i in range(n)] == [f"set by {i}" for i in range(n)]


def test_context_var_set_by_a_step_does_not_leak_into_steps_it_triggers(
    tmp_path: Path,
) -> None:
    seen: dict[MachineId, str] = {}

    async def main() -> None:
        async with LmdbStore(tmp_path / "repo") as store:
            g: StateGroup[Rec]

            def writer(ctx: Context, st: Rec) -> None:
                VAR.set("set by a")
                g.post("b", Go("reader"))

            def reader(ctx: Context, st: Rec) -> None:
                seen[ctx.id] = VAR.get()

            g = make_rec_group(store, {"writer": writer, "reader": reader})
            await g.start()
            await g.begin("a", Rec())
            await g.begin("b", Rec())
            await g.send("a", Go("writer"))
            await g.idle()
            await g.stop()

    run(main)
    assert seen == {"b": "unset"}


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "lazy"])
def test_current_task_inside_steps(tmp_path: Path, eager: bool) -> None:
    """eager_steps=False: a Task from the first line; eager: a Task once the step waited."""
    seen: dict[str, bool] = {}

    async def step(ctx: Context, st: Rec) -> None:
        seen["first line"] = asyncio.current_task() is not None
        await asyncio.sleep(0)
        seen["after await"] = asyncio.current_task() is not None

    async def main() -> None:
        async with LmdbStore(tmp_path / "repo", "nosync") as store:
            g = make_rec_group(store, {"t": step}, eager_steps=eager)
            await g.start()
            await g.begin(1, Rec())
            await g.send(1, Go("t"))
            await g.idle()
            await g.stop()

    run(main)
    assert seen["after await"] is True
    if not eager:
        assert seen["first line"] is True
    elif sys.version_info < (3, 12):
        # Documented in fsm/steps.py: on 3.11 an eager step has no Task before it waits.
        assert seen["first line"] is False


def test_step_gets_a_private_copy_of_the_state(tmp_path: Path) -> None:
    """What a step does to its (decoded) state copy never reaches the persisted state."""
    copies: list[Rec] = []

    async def main() -> None:
        async with LmdbStore(tmp_path / "repo", "nosync") as store:

            def meddle(ctx: Context, st: Rec) -> None:
                copies.append(st)
                st.seen.append(999)
                st.phase = "meddled"

            g = make_rec_group(store, {"m": meddle})
            await g.start()
            await g.begin(1, Rec(seen=[1]))
            await g.send(1, Go("m"))
            await g.idle()
            await g.send(1, Go("m"))  # a second copy, decoded from the same kind of record
            await g.send(1, Note(2))
            await g.idle()
            st = state(g, 1)
            assert st.seen == [1, 2] and st.phase == "m"
            await g.stop()

    run(main)
    assert len(copies) == 2 and copies[0] is not copies[1]
    assert copies[0].seen is not copies[1].seen
    assert copies[1].seen == [1, 999], "the first step's mutation leaked into the second copy"


def test_step_is_handed_the_planned_state_and_the_next_round_decodes_the_record(
    tmp_path: Path,
) -> None:
    """One decoded state per machine in flight: the step holds it, the machine its record."""
    planned: list[Rec] = []
    stepped: list[Rec] = []

    async def main() -> None:
        async with LmdbStore(tmp_path / "repo", "nosync") as store:

            def meddle(ctx: Context, st: Rec) -> None:
                stepped.append(st)
                st.seen.append(999)  # (after its round committed: must never be persisted)

            g = make_rec_group(store, {"m": meddle}, on_go=lambda _ev, st: planned.append(st))
            await g.start()
            await g.begin(1, Rec(seen=[1]))
            await g.send(1, Go("m"))
            await g.idle()
            await g.send(1, Go("x"))  # planned from the record, not from the step's object
            await g.idle()
            assert state(g, 1).seen == [1] and state(g, 1).phase == "x"
            await g.stop()

    run(main)
    assert len(planned) == 2 and len(stepped) == 1
    assert stepped[0] is planned[0], "the step got a second decoded copy of the state"
    assert planned[1] is not stepped[0] and planned[1].seen == [1]


def test_a_machine_whose_step_waits_keeps_one_copy_of_its_state(tmp_path: Path) -> None:
    """The step holds the state; the machine keeps neither a decoded nor an encoded copy."""
    n, size = 200, 16_000
    gate, all_waiting = asyncio.Event(), asyncio.Event()
    waiting: list[MachineId] = []

    async def hold(ctx: Context, st: Rec) -> None:
        waiting.append(ctx.id)
        if len(waiting) == n:
            all_waiting.set()
        await gate.wait()
        ctx.send(Note(len(st.extra)))

    async def main() -> tuple[int, int]:
        async with LmdbStore(tmp_path / "repo", "nosync") as store:
            g = make_rec_group(store, {"hold": hold})
            await g.start()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for mid in range(n):
                    # Each state's one big field, built apart so no two machines share it.
                    await g.begin(mid, Rec(extra="".join(["x", str(mid)]).ljust(size, "y")))
                for mid in range(n):
                    await g.send(mid, Go("hold"))
                await all_waiting.wait()
                held = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            gate.set()
            await g.idle()
            assert state(g, 7).seen == [size]  # (each step ran to its end with its state)
            await g.stop()
            return held, n

    held, machines = run(main)
    # One copy of each state: `size` bytes per machine and some change; two copies (its
    # record, or a decoded state beside the step's) would be over 2 * `size`.
    assert held / machines < 1.5 * size, f"{held / machines:.0f} bytes per waiting machine"


def test_a_machine_whose_record_is_gone_is_dropped_and_the_rest_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A step's machine is read back from the store when planned next; a missing record is
    logged and that machine forgotten, without stopping the round of any other."""
    gate, both_waiting = asyncio.Event(), asyncio.Event()
    waiting: list[MachineId] = []

    async def hold(ctx: Context, st: Rec) -> None:
        waiting.append(ctx.id)
        if len(waiting) == 2:
            both_waiting.set()
        await gate.wait()
        ctx.send(Note(1))

    async def main() -> None:
        async with LmdbStore(tmp_path / "repo", "nosync") as store:
            g = make_rec_group(store, {"hold": hold})
            await g.start()
            await g.begin("gone", Rec())
            await g.begin("kept", Rec())
            await g.send("gone", Go("hold"))
            await g.send("kept", Go("hold"))
            await both_waiting.wait()
            key = g.records.key("gone")
            store.write(lambda txn: txn.delete(key, db=store.db("states")))
            gate.set()
            await g.idle()
            assert state(g, "kept").seen == [1]
            assert g.get("gone") is None
            await g.send("kept", Note(2))  # the engine goes on
            await g.idle()
            assert state(g, "kept").seen == [1, 2]
            await g.stop()

    with caplog.at_level("ERROR", logger="sectorfsm.fsm"):
        run(main)
    assert "cannot read machine 'gone' back" in caplog.text
    assert "is gone from the store" in caplog.text
