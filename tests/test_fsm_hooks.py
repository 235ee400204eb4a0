"""Events sent and rounds that fail while the pre-commit hooks build a commit.

Planners run inside the committer's pre-commit hooks. A planner may post to another machine
(of its own group or of another group) and a round may fail to be stored; none of that may
cost another event its durability or leave a machine unplanned.
"""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path
from typing import Any

from conftest import HANG_GUARD, run
from fsmtoy import Go, Note, Rec, make_rec_group, pending_on_disk, state

from sectorfsm.fsm import Context, LmdbStore, StateGroup


def test_post_from_another_groups_planner_is_durable_when_its_future_resolves(
    tmp_path: Path,
) -> None:
    """Group B's planner posts to a busy machine of group A, whose hook already ran."""

    async def main() -> None:
        release = asyncio.Event()

        async def hold(ctx: Context, st: Rec) -> None:
            await release.wait()

        posted: list[asyncio.Future[None]] = []
        async with LmdbStore(tmp_path / "repo") as store:
            ga = make_rec_group(store, name="a", steps={"hold": hold})
            gb = make_rec_group(
                store, name="b", steps={}, on_go=lambda ev, st: posted.append(ga.post(1, Note(7)))
            )
            await ga.start()  # A's hooks come first in every flush
            await gb.start()
            await ga.begin(1, Rec())
            await gb.begin(1, Rec())
            await ga.send(1, Go("hold"))  # A1 is busy: the posted Note waits in its queue
            await gb.send(1, Go("fwd"))
            await asyncio.wait_for(posted[0], HANG_GUARD)  # the post reports the Note durable...
            assert pending_on_disk(ga, 1) == 1  # ...so it must be in A1's inbox
            release.set()
            await asyncio.wait_for(ga.idle(), HANG_GUARD)
            assert ga.get(1) == Rec(phase="hold", seen=[7])
            await ga.stop()
            await gb.stop()

    run(main)


def test_a_round_that_cannot_be_stored_costs_no_other_machine_its_durability(
    tmp_path: Path,
) -> None:
    """Machine 2's planner stores a value msgpack cannot encode: its event is rejected alone,
    and machine 1's event, sent in the same commit, is on disk when `send` returns."""

    async def main() -> None:
        release = asyncio.Event()

        async def hold(ctx: Context, st: Rec) -> None:
            await release.wait()

        def on_go(ev: Go, st: Rec) -> None:
            if ev.tag == "bad":
                st.extra = datetime.date(2024, 1, 1)  # not msgpack-encodable

        async with LmdbStore(tmp_path / "repo") as store:
            g = make_rec_group(store, name="g", steps={"hold": hold}, on_go=on_go)
            await g.start()
            await g.begin(1, Rec())
            await g.begin(2, Rec())
            await g.send(1, Go("hold"))  # machine 1 busy: its next event is only queued
            await asyncio.gather(g.send(2, Go("bad")), g.send(1, Note(5)))
            assert pending_on_disk(g, 1) == 1
            # The bad event was consumed as a planner error; the state stayed as it was.
            info = g.info(2)
            assert info is not None and info.state == Rec()
            assert info.last_error is not None and "date" in info.last_error
            release.set()
            await asyncio.wait_for(g.idle(), HANG_GUARD)
            assert g.get(1) == Rec(phase="hold", seen=[5])
            await g.stop()

    run(main)


def test_a_final_predicate_that_raises_is_a_planner_error(tmp_path: Path) -> None:
    async def main() -> None:
        def final(st: Rec) -> bool:
            if st.phase == "boom":
                raise ValueError("cannot tell")
            return st.phase == "done"

        async with LmdbStore(tmp_path / "repo") as store:
            g = make_rec_group(store, name="g", steps={}, final=final)
            await g.start()
            await g.begin(1, Rec())
            await g.send(1, Go("boom"))
            await asyncio.wait_for(g.idle(), HANG_GUARD)
            info = g.info(1)
            assert info is not None and info.state.phase == "idle"
            assert info.last_error is not None and "cannot tell" in info.last_error
            await g.send(1, Go("done"))
            await asyncio.wait_for(g.idle(), HANG_GUARD)
            info = g.info(1)
            assert info is not None and info.final and info.state.phase == "done"
            await g.stop()

    run(main)


def test_planner_post_to_an_idle_machine_of_its_own_group_gets_planned(tmp_path: Path) -> None:
    """The post comes while the commit is being built: it must start another flush."""

    async def main() -> None:
        groups: list[StateGroup[Rec]] = []

        def forward(ev: Go, st: Rec) -> None:
            if ev.tag == "fwd":
                groups[0].post(2, Note(9))

        async with LmdbStore(tmp_path / "repo") as store:
            g = make_rec_group(store, name="g", steps={}, on_go=forward)
            groups.append(g)
            await g.start()
            await g.begin(1, Rec())
            await g.begin(2, Rec())
            await g.send(1, Go("fwd"))
            await asyncio.wait_for(g.idle(), HANG_GUARD)
            assert g.get(2) == Rec(seen=[9])
            await g.stop()

    run(main)


def test_sync_mode_a_failed_send_is_not_applied_by_the_round_after_it(tmp_path: Path) -> None:
    """In sync mode the send's put and the round that consumes it are separate transactions
    of one batch: when the put fails, so does the round, and the event is never applied."""

    async def main() -> None:
        async with LmdbStore(tmp_path / "repo", "sync") as store:
            g = make_rec_group(store, name="g", steps={})
            await g.start()
            await g.begin(1, Rec())
            real_write = store.write
            armed = [True]

            def failing_write(fn: Any) -> Any:
                if armed[0]:
                    armed[0] = False
                    raise OSError("injected commit failure")
                return real_write(fn)

            store.write = failing_write  # type: ignore[method-assign]
            try:
                await g.send(1, Note(1))
            except OSError as exc:
                assert "injected" in str(exc)
            else:
                raise AssertionError("the send whose put failed must raise")
            await g.send(1, Note(2))
            await asyncio.wait_for(g.idle(), HANG_GUARD)
            # (The failed commit reloaded the machine, as after a crash: it saw a Restart.)
            assert state(g, 1).seen == [2]
            assert pending_on_disk(g, 1) == 0
            await g.stop()

    run(main)
