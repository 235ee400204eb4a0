"""Groups whose steps only read their state (`StateGroup(shared_state=True)`), and `peek`.

Such a group's machine keeps the object its step was handed and plans its next round from it,
with no read-back and decode of the record its last round committed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import run
from fsmtoy import Go, Note, Rec, make_rec_group, state

from sectorfsm.fsm import Context, LmdbStore


def test_shared_state_is_planned_next_without_a_read_back(tmp_path: Path) -> None:
    """`shared_state=True`: a step's state is the machine's own, planned from with no decode."""
    seen: list[Rec] = []

    async def main() -> None:
        async with LmdbStore(tmp_path / "repo", "nosync") as store:

            async def look(ctx: Context, st: Rec) -> None:
                seen.append(st)
                await asyncio.sleep(0)  # (a step that waits, as sealing steps do)

            g = make_rec_group(store, {"m": look}, shared_state=True)
            await g.start()
            await g.begin(1, Rec(seen=[1]))
            await g.send(1, Go("m"))
            await g.idle()
            await g.send(1, Note(2))
            await g.send(1, Go("m"))
            await g.idle()
            assert state(g, 1).seen == [1, 2] and state(g, 1).phase == "m"
            await g.stop()

    run(main)
    # One object throughout: a decoded record would have been a new one.
    assert len(seen) == 2 and seen[0] is seen[1] and seen[1].seen == [1, 2]


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "own-copy"])
def test_peek_reads_the_committed_state_without_a_copy_when_shared(
    tmp_path: Path, shared: bool
) -> None:
    """`peek` is `get`, but hands out a shared step's state object itself (no read, no decode)."""
    held: list[Rec] = []

    async def main() -> None:
        async with LmdbStore(tmp_path / "repo", "nosync") as store:
            started, release = asyncio.Event(), asyncio.Event()

            async def hold(ctx: Context, st: Rec) -> None:
                held.append(st)
                started.set()
                await release.wait()

            g = make_rec_group(store, {"m": hold}, shared_state=shared)
            await g.start()
            assert g.peek(1) is None
            await g.begin(1, Rec(seen=[1]))
            await g.send(1, Go("m"))
            await started.wait()  # the step now waits on `release`
            peeked = g.peek(1)
            assert peeked == g.get(1) == held[0]
            assert (peeked is held[0]) is shared
            release.set()
            await g.send(1, Note(2))
            await g.idle()
            assert g.peek(1) == Rec(seen=[1, 2], phase="m")
            await g.stop()

    run(main)


def test_shared_state_planner_failure_restores_the_committed_record(tmp_path: Path) -> None:
    """A planner that raises on a shared state leaves the machine at its committed record."""

    def on_go(ev: Go, st: Rec) -> None:
        if ev.tag == "bad":
            st.seen.append(666)
            raise ValueError("bad go")

    async def main() -> None:
        async with LmdbStore(tmp_path / "repo", "nosync") as store:

            def look(ctx: Context, st: Rec) -> None:
                assert st.phase == "m"

            g = make_rec_group(store, {"m": look}, on_go=on_go, shared_state=True)
            await g.start()
            await g.begin(1, Rec(seen=[1]))
            await g.send(1, Go("m"))
            await g.idle()
            await g.send(1, Go("bad"))
            await g.idle()
            await g.send(1, Note(3))
            await g.idle()
            info = g.records.info(1)
            assert info is not None
            assert info.state.seen == [1, 3] and info.state.phase == "m"
            assert info.last_error is not None and "bad go" in info.last_error
            await g.stop()

    run(main)
