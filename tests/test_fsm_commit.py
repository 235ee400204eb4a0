"""What reaches the disk, and when: staged sent events, failed commits, unstorable events.

A sent event is durable once `send` returns even though it is staged only at commit time (and
never written if a round consumes it first); a failed commit keeps the events sent while it
was in flight; an event that cannot be stored fails its own send only; and one commit is in
flight at a time, as the runtime relies on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG_GUARD, run, settle
from fsmtoy import Go, Hop, InboxSpy, Note, Rec, make_rec_group, pending_on_disk, state

from sectorfsm.fsm import Context, LmdbStore

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
            g = make_rec_group(store, {"block": block})
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
            await asyncio.wait_for(g.idle(), HANG_GUARD)
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
        g = make_rec_group(store, {"block": block})
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
            g = make_rec_group(store, {}, sightings=sightings)
            await g.start()
            await asyncio.wait_for(g.idle(), HANG_GUARD)
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
            g = make_rec_group(store, {"hop": hop, "chain": chain_async, "block": block})
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
            g = make_rec_group(store, {"block": block})
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
            await asyncio.wait_for(g.idle(), HANG_GUARD)
            stats = g.stats()
            assert stats["pending_events"] == 0 and stats["steps"] == 0
            assert state(g, 1).seen == [1, 2, 3, 4, 5]
            assert pending_on_disk(g, 1) == 0
            await g.stop()

    run(main)


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
            g = make_rec_group(store, {"hold": hold}, sightings=sightings)
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
                    fail.wait(HANG_GUARD)
                    raise OSError("injected commit failure")
                return real_write(fn)

            store.write = failing_write  # type: ignore[method-assign]
            lost = asyncio.ensure_future(g.send(1, Note(1)))
            try:
                await asyncio.to_thread(entered.wait, HANG_GUARD)  # that commit is in flight now
                kept = [asyncio.ensure_future(g.send(1, Note(n))) for n in (2, 3)]
                await settle()  # the sends have gone as far as they can while the commit hangs
                assert not any(t.done() for t in kept), "sent during the commit: not durable yet"
            finally:
                fail.set()  # (a failed check must not leave the writer thread waiting)
            with pytest.raises(OSError, match="injected"):
                await lost
            await asyncio.wait_for(asyncio.gather(*kept), HANG_GUARD)
            if busy:
                # The step was reloaded from disk and re-run (Restart): release it too.
                release.set()
            await asyncio.wait_for(g.idle(), HANG_GUARD)
            assert state(g, 1).seen == [2, 3]
            assert pending_on_disk(g, 1) == 0
            await g.stop()
        # A restart replays nothing: every kept event was applied exactly once.
        async with LmdbStore(tmp_path / "repo") as store:
            g = make_rec_group(store, {"hold": hold}, sightings=sightings)
            await g.start()
            release.set()
            await asyncio.wait_for(g.idle(), HANG_GUARD)
            assert state(g, 1).seen == [2, 3]
            await g.stop()
        assert sightings.count(2) == 1 and sightings.count(3) == 1
        # Idle, the machine planned Note(1) in the round that failed (and was rolled back);
        # busy, the event waited in its queue and was dropped without being planned.
        assert sightings.count(1) == (0 if busy else 1)

    run(main)


# -- an event that cannot be stored fails its own send only --------------------------------


def test_an_unencodable_event_fails_its_own_send_and_stages_nothing(tmp_path: Path) -> None:
    async def wait_forever(ctx: Context, st: Rec) -> None:
        await asyncio.Event().wait()

    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_rec_group(store, {"busy": wait_forever})
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
            g = make_rec_group(store, {})
            with pytest.raises(ValueError, match="cannot be stored"):
                await g.send(2, Note(2**64))

    run(main)


# -- one commit in flight ------------------------------------------------------------------------


def test_one_commit_is_in_flight_at_a_time_under_the_group_commit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Commits never overlap, and each commit's rounds start before the next is planned.

    Steps that wait a tick send their next event while the previous commit is in flight,
    so many batches are taken while rounds are waiting for theirs.
    """
    machines, hops = 50, 20
    active = [0]
    most = [0]
    lock = threading.Lock()

    async def hop(ctx: Context, st: Rec) -> None:
        await asyncio.sleep(0)
        if st.hops < hops:
            ctx.send(Hop())

    async def main() -> None:
        async with LmdbStore(tmp_path, durability="nosync") as store:
            write = store.write

            def counted(fn: Callable[[Any], Any]) -> Any:
                with lock:
                    active[0] += 1
                    most[0] = max(most[0], active[0])
                try:
                    return write(fn)
                finally:
                    with lock:
                        active[0] -= 1

            g = make_rec_group(store, {"hop": hop})
            await g.start()
            await asyncio.gather(*(g.begin(i, Rec()) for i in range(machines)))
            store.write = counted  # type: ignore[method-assign]
            before = store.committer.transactions
            await asyncio.gather(*(g.send(i, Hop()) for i in range(machines)))
            await g.idle()
            assert store.committer.transactions - before >= hops  # many batches, not one
            for i in range(machines):
                info = g.info(i)
                assert info is not None and info.last_error is None
                assert info.state.hops == hops
            await g.stop()

    with caplog.at_level(logging.ERROR, logger="sectorfsm.fsm.commit"):
        run(main)
    assert most[0] == 1
    assert not [r for r in caplog.records if "hook failed" in r.getMessage()]


def test_planning_over_rounds_still_in_flight_is_refused(tmp_path: Path) -> None:
    """If rounds were planned while another commit's rounds are in flight, the runtime says so.

    The committer never does that (it takes a batch only once the previous one landed and
    its callbacks ran), so the test calls the runtime's pre-commit hook itself.
    """
    gate = threading.Event()

    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_rec_group(store, {})
            await g.start()
            await g.begin(1, Rec())
            await g.begin(2, Rec())
            write = store.write

            def held(fn: Callable[[Any], Any]) -> Any:
                gate.wait(60)  # (a hang guard: the test sets it)
                return write(fn)

            store.write = held  # type: ignore[method-assign]
            try:
                sent = asyncio.ensure_future(g.send(1, Note(1)))
                await settle()  # machine 1's round is planned; its commit waits on the gate
                runtime = g._runtime  # (no public way to run the hook out of turn)
                runtime.send(2, Note(2))
                with pytest.raises(RuntimeError, match="one commit in flight at a time"):
                    runtime._plan_dirty()
            finally:
                gate.set()
            await sent
            await g.idle()  # machine 2 stayed dirty: the next flush plans it
            assert state(g, 1).seen == [1] and state(g, 2).seen == [2]
            await g.stop()

    run(main)
