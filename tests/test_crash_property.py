"""Property: a random event stream with random crash points ends in the same states as a
crash-free run of the same stream.

A crash is simulated in-process. The store runs in durability "nosync": a crash of the process
(not of the machine) loses nothing committed, so the simulation is exact. At the crash point
the store is closed in the middle of the run, without `stop()` and without flushing:
`LmdbStore.close()` waits for the commit in flight on the writer thread (so the crash happens
right after that transaction) and drops every staged-but-uncommitted write, as a dying process
would; then every task of the loop is cancelled. A new `LmdbStore` + `StateGroup` is opened on
the same directory, started (which re-plans pending events, then `Restart`), and only the
events whose `send` had not returned are sent again; acked events are never re-sent.

A re-sent event may also have reached the disk before the crash (its commit landed, but the
crash came before `send` returned), so the planner ignores a `Put` it has seen before and
records it in `dup`; a duplicate of an event whose `send` returned is a bug. Some `Put`s make
the planner run a step that sends a `Derived` event; on `Restart` the planner re-issues the
derived events still missing (the engine plans the events that were in the inbox first), so
derived events must also end up applied exactly once. A step the planner starts supersedes
the last one (the engine drops that one's Deriveds still queued), so it re-issues them all.
The planner takes at most `BATCH` events per round, so crashes also hit machines with
half-planned backlogs (and so it must hold its steps back until it reaches `Restart`: the
engine runs the steps of the rounds before it).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG_GUARD
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sectorfsm.fsm import Context, LmdbStore, Restart, StateGroup, StoreError

MACHINES = 4
BATCH = 3


@dataclass(slots=True)
class Tally:
    total: int = 0
    seen: list[int] = field(default_factory=list)  # sorted ids of the applied Puts
    dup: list[int] = field(default_factory=list)  # ids of Puts delivered again (ignored)
    want: list[int] = field(default_factory=list)  # sorted ids whose Derived is not applied yet
    issued: list[int] = field(default_factory=list)  # ... of which a step sent the Derived
    derived: list[int] = field(default_factory=list)  # sorted ids of applied Deriveds, dups kept


@dataclass(frozen=True, slots=True)
class Put:
    eid: int
    machine: int
    amount: int
    derive: bool


@dataclass(frozen=True, slots=True)
class Derived:
    eid: int


def _step(eids: list[int]) -> Any:
    async def step(ctx: Context, state: Tally) -> None:
        await asyncio.sleep(0)
        for eid in eids:
            ctx.send(Derived(eid))
        await asyncio.sleep(0)  # the machine stays busy: the Deriveds wait in the inbox

    return step


def planner(events: list[Any], s: Tally) -> tuple[Any, int]:
    batch = events[:BATCH]
    for i, ev in enumerate(batch):
        if isinstance(ev, Put):
            if ev.eid in s.seen:
                s.dup.append(ev.eid)
                continue
            bisect.insort(s.seen, ev.eid)
            s.total += ev.amount
            if ev.derive:
                bisect.insort(s.want, ev.eid)
        elif isinstance(ev, Derived):
            bisect.insort(s.derived, ev.eid)
            if ev.eid in s.want:
                s.want.remove(ev.eid)
            if ev.eid in s.issued:
                s.issued.remove(ev.eid)
        elif isinstance(ev, Restart):
            # Re-run the step at once: Deriveds that reached the inbox before the crash were
            # planned before Restart, so whatever is still wanted died with the process.
            s.issued = list(s.want)
            if s.issued:
                return _step(list(s.issued)), i + 1
        else:
            raise ValueError(f"unexpected event {ev!r}")
    if any(isinstance(ev, Restart) for ev in events[len(batch) :]):
        # The engine restarted and we have not reached its Restart yet: start no step now.
        # Its Deriveds would queue behind Restart, which would then issue them again.
        return None, len(batch)
    todo = [e for e in s.want if e not in s.issued]
    if todo:
        # A new step supersedes the last one, whose Deriveds still queued are dropped: it
        # issues every Derived still wanted.
        s.issued = list(s.want)
        return _step(list(s.issued)), len(batch)
    return None, len(batch)


def make_group(store: LmdbStore) -> StateGroup[Tally]:
    return StateGroup(store, "tally", planner, Tally, events=[Put, Derived], creating=[Put])


async def life(
    repo: Path,
    todo: Sequence[Put],
    acked: set[int],
    sends: collections.Counter[int],
    concurrency: int,
    crash: tuple[int, int] | None,
) -> None:
    """One run of the engine: send `todo` from `concurrency` coroutines, then crash or stop.

    `crash=(k, ticks)`: crash `ticks` loop iterations after the k-th send of this run
    returned (k=0: right after start; k >= len(todo): once every send returned, while steps
    and their events may still be under way). `acked` gets the id of every event whose send
    returned; `sends` counts how often each event was sent.
    """
    store = LmdbStore(repo, durability="nosync")
    group = make_group(store)
    await group.start()
    loop = asyncio.get_running_loop()
    driver = asyncio.current_task()
    queue = collections.deque(todo)
    crashed: asyncio.Future[None] = loop.create_future()  # a plain future: never cancelled
    fired = False
    acks = 0

    def fire() -> None:
        nonlocal fired
        if fired or crash is None:
            return
        fired = True

        def tick(n: int) -> None:
            if n:
                loop.call_soon(tick, n - 1)
                return
            store.close()  # waits for the commit in flight, drops everything staged
            # Die before the loop runs another callback: no send whose commit just landed
            # gets to return (its event is durable, but not acked: it will be re-sent).
            for t in asyncio.all_tasks():
                if t is not driver:
                    t.cancel()
            crashed.set_result(None)

        loop.call_soon(tick, crash[1])

    async def worker() -> None:
        nonlocal acks
        while queue and not store.closed:
            ev = queue.popleft()
            sends[ev.eid] += 1
            try:
                await group.send(ev.machine, ev)
            except StoreError:
                if store.closed:
                    return  # sent into a dead engine: not acked
                raise
            acked.add(ev.eid)  # returned: the event is durable
            acks += 1
            if crash is not None and acks >= crash[0]:
                fire()

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    if crash is None:
        await asyncio.gather(*workers)
        await group.idle()
        await group.stop()
        store.close()
        return

    if crash[0] == 0:
        fire()
    waiting: set[asyncio.Future[Any]] = {*workers, crashed}
    while not crashed.done():
        done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for w in done - {crashed}:
            if not w.cancelled() and w.exception() is not None:
                raise w.exception()  # type: ignore[misc]  # failed before the crash: a bug
        if waiting == {crashed}:
            fire()  # every send returned: crash while steps and Deriveds are still under way
    # The process is dead: cancel whatever its loop still runs (steps started by the last
    # commit's callbacks, the mailbox poller), as the tick did for everything before.
    while others := [t for t in asyncio.all_tasks() if t is not driver and not t.done()]:
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)
    for w in workers:
        if not w.cancelled() and w.exception() is not None:
            raise w.exception()  # type: ignore[misc]


def read_states(repo: Path) -> tuple[dict[int, Tally], tuple[int, int, int]]:
    store = LmdbStore(repo, durability="nosync")
    try:
        states = dict(make_group(store).list())
        with store.read() as txn:
            leftovers = tuple(
                txn.stat(store.db(name))["entries"] for name in ("inbox", "mailbox", "quarantine")
            )
    finally:
        store.close()
    return states, leftovers  # type: ignore[return-value]


def without_dup(states: dict[int, Tally]) -> dict[int, tuple[Any, ...]]:
    return {
        mid: (s.total, s.seen, s.want, s.issued, s.derived) for mid, s in sorted(states.items())
    }


def model(stream: Sequence[Put]) -> dict[int, tuple[Any, ...]]:
    """What every run must end in: each Put applied once, each derived event once."""
    out: dict[int, tuple[Any, ...]] = {}
    for mid in sorted({p.machine for p in stream}):
        mine = [p for p in stream if p.machine == mid]
        out[mid] = (
            sum(p.amount for p in mine),
            sorted(p.eid for p in mine),
            [],
            [],
            sorted(p.eid for p in mine if p.derive),
        )
    return out


events_st = st.lists(
    st.tuples(st.integers(0, MACHINES - 1), st.integers(1, 9), st.booleans()),
    min_size=1,
    max_size=30,
)
# (k, ticks): k is taken modulo the number of events left, ticks are mostly few.
crashes_st = st.lists(
    st.tuples(st.integers(0, 30), st.one_of(st.integers(0, 3), st.integers(0, 40))),
    min_size=1,
    max_size=3,
)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=events_st, crashes=crashes_st, concurrency=st.integers(1, 8))
def test_crashes_end_in_the_states_of_a_crash_free_run(
    events: list[tuple[int, int, bool]], crashes: list[tuple[int, int]], concurrency: int
) -> None:
    stream = [Put(i, m, amount, derive) for i, (m, amount, derive) in enumerate(events)]
    with tempfile.TemporaryDirectory(prefix="fsm-crash-prop-") as tmp:
        clean_repo, crash_repo = Path(tmp) / "clean", Path(tmp) / "crash"

        # The reference: the same stream, no crash.
        clean_acked: set[int] = set()
        asyncio.run(life(clean_repo, stream, clean_acked, collections.Counter(), concurrency, None))
        assert clean_acked == {p.eid for p in stream}
        clean, clean_left = read_states(clean_repo)
        assert without_dup(clean) == model(stream)
        assert all(not s.dup for s in clean.values())
        assert clean_left == (0, 0, 0)

        # The same stream with crashes; each run re-sends only what was not acked.
        acked: set[int] = set()
        sends: collections.Counter[int] = collections.Counter()
        acked_before: list[set[int]] = []
        for crash in [*crashes, None]:
            acked_before.append(set(acked))
            todo = [p for p in stream if p.eid not in acked]
            if crash is not None:
                crash = (crash[0] % (len(todo) + 1), crash[1])
            asyncio.run(life(crash_repo, todo, acked, sends, concurrency, crash))
        assert acked == {p.eid for p in stream}
        crashed, crashed_left = read_states(crash_repo)

        where = f"(acked before each run: {[sorted(a) for a in acked_before]})"
        dups = collections.Counter(e for s in crashed.values() for e in s.dup)
        for eid, n in sorted(dups.items()):
            # An event is applied at most once per send; a dup can only come from a re-send
            # of an event whose earlier send had not returned.
            assert n <= sends[eid] - 1, (
                f"event {eid} applied {n + 1} times but sent {sends[eid]} times {where}"
            )
        assert without_dup(crashed) == without_dup(clean), where
        # Coverage of the interesting cases (see --hypothesis-show-statistics).
        event(f"sends repeated after a crash: {min(sum(sends.values()) - len(stream), 5)}")
        event(f"re-sent events that had landed before the crash: {min(sum(dups.values()), 3)}")
        assert crashed_left == (0, 0, 0), f"inbox/mailbox/quarantine left: {crashed_left}"


def test_a_cancelled_send_does_not_cancel_the_concurrent_ones(tmp_path: Path) -> None:
    """A caller that dies mid-send (its task cancelled, as the crash simulation above does to
    every caller) must not take the other senders of the same commit down with it: their
    events are committed, and their `send` must return normally. Otherwise a caller sees a
    failure for an event that was applied, and a retry applies it twice.
    """

    async def main() -> list[BaseException | None]:
        store = LmdbStore(tmp_path, durability="nosync")
        group = make_group(store)
        await group.start()
        await group.send(0, Put(0, 0, 1, False))
        doomed = asyncio.create_task(group.send(0, Put(1, 0, 1, False)))
        others = [asyncio.create_task(group.send(0, Put(e, 0, 1, False))) for e in (2, 3)]
        await asyncio.sleep(0)  # all three are staged in one commit and wait for it
        doomed.cancel()
        results = await asyncio.gather(*others, return_exceptions=True)
        await asyncio.gather(doomed, return_exceptions=True)
        await group.idle()
        await group.stop()
        store.close()
        return results

    results = asyncio.run(main())
    states, _ = read_states(tmp_path)
    assert states[0].seen == [0, 1, 2, 3]  # every event was applied, the cancelled one too
    assert results == [None, None], (
        f"cancelling one send made the concurrent sends of the same commit fail: {results!r}"
    )


@dataclass(slots=True)
class Job:
    state: str = "Idle"


@dataclass(frozen=True, slots=True)
class Begin:
    pass


@dataclass(frozen=True, slots=True)
class Abort:
    pass


def test_a_step_cancelled_before_it_ever_ran_releases_its_machine(tmp_path: Path) -> None:
    """A cancelling event that comes right after the send that started a step (the step's
    task is created in the iteration in which that send returns, so it has not run yet) must
    cancel the step like any other: the machine plans the event and the group gets idle.
    """

    async def forever(ctx: Context, job: Job) -> None:
        await asyncio.sleep(3600)

    def jobs(events: list[Any], job: Job) -> tuple[Any, int]:
        step = None
        for ev in events:
            if isinstance(ev, Begin):
                job.state, step = "Working", forever
            elif isinstance(ev, Abort):
                job.state, step = "Aborted", None
        return step, len(events)

    async def main() -> tuple[Job | None, dict[str, int], bool]:
        store = LmdbStore(tmp_path, durability="nosync")
        group = StateGroup(store, "jobs", jobs, Job, events=[Begin, Abort], cancelling=[Abort])
        await group.start()
        await group.begin(1, Job())
        await group.send(1, Begin())
        await group.send(1, Abort())
        try:
            await asyncio.wait_for(group.idle(), HANG_GUARD)  # idle comes in ms
            idle = True
        except TimeoutError:
            idle = False
        result = group.get(1), group.stats(), idle
        await asyncio.wait_for(group.stop(), HANG_GUARD)
        store.close()
        return result

    state, stats, idle = asyncio.run(main())
    assert idle and state == Job("Aborted"), (
        f"the step cancelled before it started left its machine busy for good: "
        f"state={state} stats={stats} idle={idle}"
    )
