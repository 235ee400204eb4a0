"""The engine's hot path: eager steps, lazily staged sent events and the codec fast paths.

These pin down behaviour that the "steps start eagerly / events staged only if unconsumed /
plain-dataclass codec" rework must keep: a step that never waits costs no Task, a sent event
is durable once `send` returns even though it is staged only at commit time, and the codec's
shortcuts round-trip exactly what the slow paths did.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import datetime
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sectorfsm.fsm import (
    Context,
    LmdbStore,
    MachineId,
    RecordCodec,
    RecordError,
    Restart,
    StateGroup,
    StepFailed,
)
from sectorfsm.fsm.codec import packb, unpackb

# -- a small domain -------------------------------------------------------------------------

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("hotpath_var", default="unset")


@dataclass
class Rec:
    """A plain dataclass (no slots, no __post_init__): the codec's fast paths apply to it."""

    phase: str = "idle"
    seen: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    hops: int = 0
    restarts: int = 0


@dataclass(frozen=True, slots=True)
class Go:
    """Run the step registered under `tag`."""

    tag: str


@dataclass(frozen=True, slots=True)
class Note:
    uid: int


@dataclass(frozen=True, slots=True)
class Hop:
    """One more link of a chain: runs the step registered under "hop"."""


@dataclass(frozen=True, slots=True)
class Halt:
    """A cancelling event."""


EVENTS: list[type] = [Go, Note, Hop, Halt]
StepFn = Callable[[Context, Rec], Awaitable[None] | None]


def make_group(
    store: LmdbStore,
    steps: dict[str, StepFn],
    *,
    sightings: list[int] | None = None,
    **kw: Any,
) -> StateGroup[Rec]:
    """A group whose planner runs `steps[tag]` on `Go(tag)` and records everything else."""

    def planner(events: list[Any], st: Rec) -> tuple[Any, int]:
        step: StepFn | None = None
        for ev in events:
            if isinstance(ev, Go):
                st.phase = ev.tag
                step = steps[ev.tag]
            elif isinstance(ev, Note):
                st.seen.append(ev.uid)
                if sightings is not None:
                    sightings.append(ev.uid)
            elif isinstance(ev, Hop):
                st.hops += 1
                step = steps.get("hop")
            elif isinstance(ev, StepFailed):
                st.errors.append(ev.error)
                step = None
            elif isinstance(ev, Halt):
                st.phase = "halted"
                step = None
            elif isinstance(ev, Restart):
                st.restarts += 1
                step = None
        return step, len(events)

    kw.setdefault("cancelling", [Halt])
    return StateGroup(store, "hot", planner, Rec, events=EVENTS, **kw)


def run(fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(fn())


def state(g: StateGroup[Rec], mid: MachineId) -> Rec:
    st = g.get(mid)
    assert st is not None, f"machine {mid!r} is missing"
    return st


def pending_on_disk(g: StateGroup[Rec], mid: MachineId) -> int:
    info = g.info(mid)  # a fresh read transaction: only what was committed
    assert info is not None
    return info.pending_events


class TaskCounter:
    """Records every Task created on the loop (installed as its task factory)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def install(self) -> None:
        def factory(
            loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kw: Any
        ) -> asyncio.Task[Any]:
            self.names.append(getattr(coro, "__qualname__", type(coro).__name__))
            return asyncio.Task(coro, loop=loop, **kw)

        asyncio.get_running_loop().set_task_factory(factory)

    def uninstall(self) -> None:
        """Stop counting (`asyncio.run` creates tasks of its own while shutting down)."""
        asyncio.get_running_loop().set_task_factory(None)

    @property
    def step_tasks(self) -> int:
        """Tasks the engine created to finish a step (`StateGroup._run_step`)."""
        return sum(1 for n in self.names if n.endswith("._run_step"))


class InboxSpy:
    """Sees the inbox as every write transaction leaves it (wraps `store.write`).

    Looking at the result rather than at `put` calls keeps this independent of how the
    committer writes (put, putmulti, ...): a staged inbox put shows up as an entry.
    """

    def __init__(self, store: LmdbStore, monkeypatch: pytest.MonkeyPatch) -> None:
        inbox = store.db("inbox")
        #: Every inbox key present at the end of some write transaction, and the count of
        #: those transactions.
        self.keys: set[bytes] = set()
        self.commits = 0
        real = store.write

        def write(fn: Callable[[Any], Any]) -> Any:
            def spied(txn: Any) -> Any:
                result = fn(txn)
                self.commits += 1
                self.keys.update(key for key, _ in txn.cursor(db=inbox))
                return result

            return real(spied)

        monkeypatch.setattr(store, "write", write)


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
            g = make_group(store, {"go": hop, "hop": hop}, eager_steps=eager)
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
            g = make_group(store, {"w": step})
            await g.start()
            await g.begin(1, Rec())
            counter.install()
            await g.send(1, Go("w"))
            # The synchronous part ran inline, before `send` even returned.
            assert trail == ["sync part"]
            if wait != "sleep0":
                await asyncio.sleep(0.02)
                assert trail == ["sync part"] and g.stats()["steps"] == 1
                if wait == "event":
                    gate.set()
                else:
                    fut.set_result(3)
            await asyncio.wait_for(g.idle(), 5)
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
            g = make_group(store, {"x": step})
            await g.start()
            await g.begin(1, Rec())
            counter.install()
            await g.send(1, Go("x"))
            await asyncio.wait_for(g.idle(), 5)
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
            g = make_group(store, {"s": step})
            await g.start()
            try:
                await g.begin(1, Rec())
                await g.send(1, Go("s"))
                if when == "suspended":
                    await asyncio.wait_for(suspended.wait(), 5)
                await g.send(1, Halt())
                await asyncio.wait_for(g.idle(), 1.0)  # normally done in milliseconds
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
            g = make_group(store, {"s": step})
            await g.start()
            await g.begin(1, Rec())
            await g.send(1, Go("s"))
            if when == "suspended":
                await asyncio.wait_for(suspended.wait(), 5)
            # "right-after-start": stop() awaits the mailbox poller before it cancels steps, so
            # the step's Task has usually run by then; the cancelling-event test above covers
            # the window where it has not.
            await asyncio.wait_for(g.stop(), 5)
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

            g = make_group(store, {"v": step})
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

            g = make_group(store, {"writer": writer, "reader": reader})
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
            g = make_group(store, {"t": step}, eager_steps=eager)
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

            g = make_group(store, {"m": meddle})
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


# -- lazily staged sent events --------------------------------------------------------------


@pytest.mark.parametrize("durability", ["group", "nosync", "sync"])
@pytest.mark.parametrize("sender", ["send", "ctx.send"])
def test_event_for_a_busy_machine_is_on_disk_while_its_step_runs(
    tmp_path: Path, durability: Any, sender: str
) -> None:
    """`send` returns once durable; what a step sends before it waits is flushed too."""

    async def main() -> None:
        release = asyncio.Event()

        async def block(ctx: Context, st: Rec) -> None:
            if sender == "ctx.send":
                ctx.send(Note(7))
            await release.wait()

        async with LmdbStore(tmp_path / "repo", durability) as store:
            g = make_group(store, {"block": block})
            await g.start()
            await g.begin(1, Rec())
            await g.send(1, Go("block"))
            if sender == "send":
                await g.send(1, Note(7))
            else:
                await store.committer.flush()  # the step sent Note(7) and waits
            # Still running its step: the event can only be in the inbox.
            assert g.stats()["steps"] == 1
            assert pending_on_disk(g, 1) == 1
            assert 7 not in state(g, 1).seen
            release.set()
            await asyncio.wait_for(g.idle(), 5)
            assert state(g, 1).seen == [7]
            assert pending_on_disk(g, 1) == 0
            await g.stop()

    run(main)


@pytest.mark.parametrize("shutdown", ["stop", "crash"])
@pytest.mark.parametrize("durability", ["group", "sync"])
def test_pending_event_of_a_busy_machine_is_redelivered_once_after_restart(
    tmp_path: Path, durability: Any, shutdown: str
) -> None:
    path = tmp_path / "repo"
    expected = [7, 8] if shutdown == "stop" else [7]

    async def first() -> None:
        never = asyncio.Event()

        async def block(ctx: Context, st: Rec) -> None:
            await never.wait()

        store = LmdbStore(path, durability)
        g = make_group(store, {"block": block})
        await g.start()
        await g.begin(1, Rec())
        await g.send(1, Go("block"))
        await g.send(1, Note(7))
        if shutdown == "stop":
            # Staged by nobody yet: stop() itself must write it to the inbox.
            g.post(1, Note(8))
            await g.stop()
            store.close()
        else:
            store.close()  # as a crash would: no stop(), no flush

    async def restart(sightings: list[int], restarts: int) -> None:
        async with LmdbStore(path, durability) as store:
            g = make_group(store, {}, sightings=sightings)
            await g.start()
            await asyncio.wait_for(g.idle(), 5)
            st = state(g, 1)
            assert st.seen == expected and st.restarts == restarts
            assert pending_on_disk(g, 1) == 0
            await g.stop()

    run(first)
    sightings: list[int] = []
    asyncio.run(restart(sightings, 1))
    assert sightings == expected, "pending events must be planned exactly once"
    asyncio.run(restart(sightings, 2))
    assert sightings == expected, "a second restart re-delivered consumed events"


def test_events_consumed_in_the_flush_they_are_sent_in_never_touch_the_inbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, hops = 20, 30

    async def main() -> None:
        release = asyncio.Event()

        def hop(ctx: Context, st: Rec) -> None:
            if st.hops < hops:
                ctx.send(Hop())

        async def chain_async(ctx: Context, st: Rec) -> None:
            await asyncio.sleep(0)  # resumes in a Task, sends, returns in the same tick
            hop(ctx, st)

        async def block(ctx: Context, st: Rec) -> None:
            await release.wait()

        async with LmdbStore(tmp_path / "repo") as store:
            g = make_group(store, {"hop": hop, "chain": chain_async, "block": block})
            await g.start()
            for i in range(n + 1):
                await g.begin(i, Rec())
            spy = InboxSpy(store, monkeypatch)
            await asyncio.gather(*(g.post(i, Go("hop")) for i in range(n // 2)))
            await asyncio.gather(*(g.post(i, Go("chain")) for i in range(n // 2, n)))
            await g.idle()
            assert all(state(g, i).hops == hops for i in range(n))
            assert spy.commits >= hops, "the spy does not see the engine's commits"
            assert spy.keys == set(), f"{len(spy.keys)} consumed events reached the inbox"

            # Control: an event for a busy machine must be written, then deleted once consumed.
            await g.send(n, Go("block"))
            await g.send(n, Note(1))
            assert len(spy.keys) == 1 and pending_on_disk(g, n) == 1
            release.set()
            await g.idle()
            assert state(g, n).seen == [1]
            assert pending_on_disk(g, n) == 0
            await g.stop()

    run(main)


def test_stats_count_events_queued_behind_a_running_step(tmp_path: Path) -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def block(ctx: Context, st: Rec) -> None:
            await release.wait()

        async with LmdbStore(tmp_path / "repo") as store:
            g = make_group(store, {"block": block})
            await g.start()
            await g.begin(1, Rec())
            await g.send(1, Go("block"))
            for uid in (1, 2, 3):
                await g.send(1, Note(uid))
            stats = g.stats()
            assert stats["pending_events"] == 3
            assert stats["steps"] == 1 and stats["loaded"] == 1
            assert pending_on_disk(g, 1) == 3
            # Posted but not yet staged for commit: counted all the same.
            futures = [g.post(1, Note(uid)) for uid in (4, 5)]
            assert g.stats()["pending_events"] == 5
            await asyncio.gather(*futures)
            assert pending_on_disk(g, 1) == 5
            release.set()
            await asyncio.wait_for(g.idle(), 5)
            stats = g.stats()
            assert stats["pending_events"] == 0 and stats["steps"] == 0
            assert state(g, 1).seen == [1, 2, 3, 4, 5]
            assert pending_on_disk(g, 1) == 0
            await g.stop()

    run(main)


# -- codec fast paths -----------------------------------------------------------------------


@dataclass
class Lean:
    """Every field decodes as msgpack hands it over: both codec fast paths apply."""

    name: str = ""
    nums: list[int] = field(default_factory=list)
    grid: list[list[int]] = field(default_factory=list)
    note: str | None = None
    count: int = 0


@dataclass
class Flat:
    """Like `Lean` plus a dict field (decoded through a converter: the slow decode path)."""

    name: str = ""
    nums: list[int] = field(default_factory=list)
    grid: list[list[int]] = field(default_factory=list)
    tags: dict[str, int] = field(default_factory=dict)
    note: str | None = None
    count: int = 0


def _through_bytes(payload: Any) -> Any:
    return unpackb(packb(payload))


def test_plain_dataclass_fast_paths_share_nothing_between_decodes() -> None:
    lean: RecordCodec[Lean] = RecordCodec(Lean, [])
    obj = Lean("a", [1, 2], [[3], [4, 5]], None, 7)
    payload = lean.encode_state_fields(obj)
    # Encoder fast path: the instance dict is the payload (no copy).
    assert payload is obj.__dict__
    raw = packb(payload)
    fresh = unpackb(raw)
    back = lean.decode_state_fields(fresh)
    assert back == obj and type(back) is Lean
    # Decoder fast path: a complete record becomes the instance dict.
    assert back.__dict__ is fresh

    one, two = (lean.decode_state_fields(unpackb(raw)) for _ in range(2))
    one.nums.append(99)
    one.grid[0].append(99)
    one.count = -1
    assert two == obj, "decodes of one record share mutable state"
    assert obj == Lean("a", [1, 2], [[3], [4, 5]], None, 7)


@pytest.mark.parametrize("note", [None, "n"])
def test_plain_dataclass_with_list_dict_optional_fields_round_trips(note: str | None) -> None:
    codec: RecordCodec[Flat] = RecordCodec(Flat, [])
    obj = Flat("a", [1, 2], [[3], []], {"x": 1, "y": -2}, note, 7)
    raw = packb(codec.encode_state_fields(obj))
    back = codec.decode_state_fields(unpackb(raw))
    assert back == obj and type(back) is Flat
    other = codec.decode_state_fields(unpackb(raw))
    back.tags["z"] = 3
    back.grid[1].append(1)
    assert other == obj


def test_extra_instance_attribute_is_not_encoded() -> None:
    codec: RecordCodec[Flat] = RecordCodec(Flat, [])
    obj = Flat("a", [1])
    obj.extra = 1  # type: ignore[attr-defined]
    payload = codec.encode_state_fields(obj)
    assert set(payload) == {f.name for f in dataclasses.fields(Flat)}
    back = codec.decode_state_fields(_through_bytes(payload))
    assert back == obj and not hasattr(back, "extra")
    assert obj.extra == 1  # type: ignore[attr-defined]  # the instance itself is untouched


@dataclass
class Single:
    n: int = 0


def test_extra_attribute_on_a_single_field_dataclass_is_not_encoded() -> None:
    codec: RecordCodec[Single] = RecordCodec(Single, [])
    obj = Single(3)
    obj.extra = 1  # type: ignore[attr-defined]
    assert codec.encode_state_fields(obj) == {"n": 3}


def test_record_missing_a_field_decodes_with_its_default() -> None:
    codec: RecordCodec[Flat] = RecordCodec(Flat, [])
    older = _through_bytes({"name": "old", "count": 2})  # written before nums/grid/... existed
    back = codec.decode_state_fields(older)
    assert back == Flat("old", count=2)
    again = codec.decode_state_fields(_through_bytes({"name": "old"}))
    back.nums.append(1)
    assert again.nums == [], "a default_factory list was shared between decodes"


@dataclass
class Normalised:
    name: str = ""
    runs: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = self.name.strip().lower()
        self.runs.append(len(self.runs))


@dataclass(slots=True)
class Slotted:
    a: int = 0
    xs: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Frozen:
    a: int = 0
    label: str = ""
    xs: tuple[int, ...] = ()


def test_post_init_slots_and_frozen_dataclasses_round_trip() -> None:
    post: RecordCodec[Normalised] = RecordCodec(Normalised, [])
    payload = _through_bytes(post.encode_state_fields(Normalised(" AB ")))
    assert payload == {"name": "ab", "runs": [0]}
    # A complete record, yet __post_init__ must still run (no dict-install shortcut).
    back = post.decode_state_fields(payload)
    assert back.name == "ab" and back.runs == [0, 1], "__post_init__ did not run on decode"
    back = post.decode_state_fields(_through_bytes({"name": " CD", "runs": [7]}))
    assert back.name == "cd" and back.runs == [7, 1]

    slotted: RecordCodec[Slotted] = RecordCodec(Slotted, [])
    s = Slotted(1, [2, 3])
    assert slotted.decode_state_fields(_through_bytes(slotted.encode_state_fields(s))) == s

    frozen: RecordCodec[Frozen] = RecordCodec(Frozen, [])
    f = Frozen(1, "x", (2, 3))
    fb = frozen.decode_state_fields(_through_bytes(frozen.encode_state_fields(f)))
    assert fb == f and hash(fb) == hash(f) and fb.xs == (2, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fb.a = 2  # type: ignore[misc]


def test_unknown_field_raises_record_error_naming_it() -> None:
    codec: RecordCodec[Flat] = RecordCodec(Flat, [Note])
    complete = codec.encode_state_fields(Flat())
    with pytest.raises(RecordError, match=r"unknown field\(s\) \['bogus'\] for Flat"):
        codec.decode_state_fields(_through_bytes({**complete, "bogus": 1}))
    with pytest.raises(RecordError, match=r"rec 9: unknown field\(s\) \['zzz'\] for Note"):
        codec.decode_event(packb([1, "Note", {"uid": 1, "zzz": 0}]), "rec 9")
    with pytest.raises(RecordError, match="expected a mapping for Flat"):
        codec.decode_state_fields([1, 2])


@dataclass
class WithInit:
    n: int = 0
    m: int = 0

    def __init__(self, n: int = 0, m: int = 0) -> None:  # a hand-written __init__
        self.n = n
        self.m = m
        self.total = n + m


def test_dataclass_with_its_own_init_runs_it_on_decode() -> None:
    codec: RecordCodec[WithInit] = RecordCodec(WithInit, [])
    back = codec.decode_state_fields(_through_bytes(codec.encode_state_fields(WithInit(2, 3))))
    assert (back.n, back.m) == (2, 3)
    assert getattr(back, "total", None) == 5


class _YieldingDict(dict[str, Any]):
    """msgpack packs a dict subclass through `.items()`: this lets other threads in mid-pack."""

    def items(self) -> Any:
        for kv in super().items():
            time.sleep(0)  # releases the GIL
            yield kv


def test_packb_is_safe_from_many_threads() -> None:
    """Packers are per thread: concurrent packs never mix up their buffers."""
    threads, per_thread = 4, 5_000
    errors: list[str] = []
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            obj: list[Any] = [t, i, f"t{t}-{i}" * (i % 7), {"k": [i] * (i % 5)}, b"\x00" * (i % 11)]
            if i % 20 == 0:
                # A pack that is suspended half-way while other threads pack: a Packer
                # shared between threads garbles both outputs.
                obj.append(_YieldingDict(a=t, b=[i] * (i % 4), c=f"x{i}"))
            try:
                back = unpackb(packb(obj))
            except Exception as exc:
                errors.append(f"thread {t} item {i}: {exc!r}")
                return
            if back != obj:
                errors.append(f"thread {t} item {i}: {back!r}")
                return

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert errors == []


# -- a failed commit ----------------------------------------------------------------------------


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_failed_commit_keeps_events_sent_while_it_was_in_flight(tmp_path: Path, busy: bool) -> None:
    """Events sent during a commit that then fails are kept, applied once and made durable.

    The commit's own events are lost with it, and their senders are told so; the machine is
    reloaded from disk as after a crash. `busy`: the machine's step is running meanwhile, so
    the events wait in memory (unstaged) rather than being planned.
    """

    async def main() -> None:
        release = asyncio.Event()
        sightings: list[int] = []

        async def hold(ctx: Context, st: Rec) -> None:
            await release.wait()

        async with LmdbStore(tmp_path / "repo") as store:
            g = make_group(store, {"hold": hold}, sightings=sightings)
            await g.start()
            await g.begin(1, Rec())
            if busy:
                await g.send(1, Go("hold"))
            real_write = store.write
            entered, fail = threading.Event(), threading.Event()
            armed = [True]

            def failing_write(fn: Any) -> Any:
                if armed[0]:
                    armed[0] = False
                    entered.set()
                    fail.wait(5)
                    raise OSError("injected commit failure")
                return real_write(fn)

            store.write = failing_write  # type: ignore[method-assign]
            lost = asyncio.ensure_future(g.send(1, Note(1)))
            await asyncio.to_thread(entered.wait, 5)  # that commit is in flight now
            kept = [asyncio.ensure_future(g.send(1, Note(n))) for n in (2, 3)]
            await asyncio.sleep(0.01)
            assert not any(t.done() for t in kept), "sent during the commit: not durable yet"
            fail.set()
            with pytest.raises(OSError, match="injected"):
                await lost
            await asyncio.wait_for(asyncio.gather(*kept), 5)
            if busy:
                # The step was reloaded from disk and re-run (Restart): release it too.
                release.set()
            await asyncio.wait_for(g.idle(), 5)
            assert state(g, 1).seen == [2, 3]
            assert pending_on_disk(g, 1) == 0
            await g.stop()
        # A restart replays nothing: every kept event was applied exactly once.
        async with LmdbStore(tmp_path / "repo") as store:
            g = make_group(store, {"hold": hold}, sightings=sightings)
            await g.start()
            release.set()
            await asyncio.wait_for(g.idle(), 5)
            assert state(g, 1).seen == [2, 3]
            await g.stop()
        assert sightings.count(2) == 1 and sightings.count(3) == 1
        # Idle, the machine planned Note(1) in the round that failed (and was rolled back);
        # busy, the event waited in its queue and was dropped without being planned.
        assert sightings.count(1) == (0 if busy else 1)

    run(main)


@dataclass(slots=True)
class SlotBase:
    a: int = 1


@dataclass
class PlainOnSlots(SlotBase):
    """Not slotted itself (it has a __dict__), but its base keeps `a` in a slot."""

    b: int = 2


def test_plain_subclass_of_a_slots_dataclass_round_trips() -> None:
    """No dict fast path when a field lives in a base class's slot."""
    codec = RecordCodec(PlainOnSlots, [])
    st = PlainOnSlots(a=5, b=6)
    back = codec.decode_state_fields(unpackb(packb(codec.encode_state_fields(st))))
    assert back == st
    own = codec.own_state_decoder(unpackb(packb(codec.encode_state_fields(st))))
    assert own == st


def test_list_field_holding_a_set_still_encodes() -> None:
    """A `list[int]` field passes through the codec as it is; a set in it is packed as a list."""

    @dataclass
    class Listy:
        seen: list[int] = field(default_factory=list)

    codec = RecordCodec(Listy, [])
    st = Listy(seen={3, 1})  # type: ignore[arg-type]
    back = codec.decode_state_fields(unpackb(packb(codec.encode_state_fields(st))))
    assert sorted(back.seen) == [1, 3]
    with pytest.raises(TypeError, match="can not serialize 'date'"):
        packb({"when": datetime.date(2024, 1, 1)})


# -- an event that cannot be stored fails its own send only --------------------------------


def test_an_unencodable_event_fails_its_own_send_and_stages_nothing(tmp_path: Path) -> None:
    async def wait_forever(ctx: Context, st: Rec) -> None:
        await asyncio.Event().wait()

    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store, {"busy": wait_forever})
            await g.start()
            for mid in (1, 2, 3):
                await g.begin(mid, Rec())
            await g.send(1, Go("busy"))  # its next event is staged for the inbox, not planned
            # Same tick: the bad event fails alone; the other send lands.
            bad, good = await asyncio.gather(
                g.send(1, Note(2**64)), g.send(2, Note(7)), return_exceptions=True
            )
            assert isinstance(bad, ValueError) and good is None
            assert str(bad) == (
                "Note for hot machine 1 cannot be stored: "
                "an integer in it is outside the 64-bit range"
            )
            # An idle machine: refused at once, nothing acknowledged, nothing recorded.
            with pytest.raises(ValueError, match="cannot be stored"):
                await g.send(3, Note(2**64))
            with pytest.raises(ValueError, match="cannot be stored"):
                g.post(3, Note(-(2**64)))
            await g.send(3, Note(8))
            await store.committer.flush()
            assert state(g, 2).seen == [7] and state(g, 3).seen == [8]
            for mid in (1, 2, 3):
                info = g.info(mid)
                assert info is not None and info.last_error is None
            assert pending_on_disk(g, 1) == 0
            await g.stop()
        # A client (no engine running) is refused the same way.
        async with LmdbStore(tmp_path) as store:
            g = make_group(store, {})
            with pytest.raises(ValueError, match="cannot be stored"):
                await g.send(2, Note(2**64))

    run(main)
