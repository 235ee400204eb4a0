"""`Miner.subscribe`: durable state changes for embedders, bounded so the engine never waits."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG_GUARD, eventually
from sealtools import miner, run

from sectorfsm.sealing import Gap, SectorState, StateChange
from sectorfsm.sealing.notify import StateChanges, state_change

S = SectorState


def _chain(changes: list[Any], sector: int) -> list[StateChange]:
    mine = [c for c in changes if isinstance(c, StateChange) and c.sector == sector]
    for a, b in itertools.pairwise(mine):
        assert a.after is b.before, (a, b)  # no change is missing or out of order
    return mine


def test_changes_arrive_in_order_and_only_once_durable(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            seen: list[Any] = []

            async def consume() -> None:
                async for change in m.subscribe():
                    # Delivered after its commit: the stored log already holds the event.
                    assert isinstance(change, StateChange)
                    logged = [e.kind for e in m.status(change.sector).log]
                    assert f"event;{change.event}" in logged
                    seen.append(change)

            consumer = asyncio.get_running_loop().create_task(consume())
            await asyncio.sleep(0)
            n = await m.pledge()
            await m.wait(n, "Proving")
            await m.idle()
            # The consumer is a task of its own: it reads the last change when next scheduled.
            await eventually(
                lambda: any(c.sector == n and c.after is S.Proving for c in seen),
                "the consumer reading the change to Proving",
            )
            chain = _chain(seen, n)
            assert chain[0] == StateChange(n, S.UndefinedSectorState, S.Packing, "SectorStartCC")
            assert chain[-1].after is S.Proving
            assert [c.after for c in chain][:3] == [S.Packing, S.GetTicket, S.PreCommit1]
            consumer.cancel()

    run(body)


def test_a_slow_consumer_gets_a_gap_and_never_stalls_the_engine(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            slow = m.subscribe(maxsize=2)  # never read until the sector is done
            full = m.subscribe()
            n = await m.pledge()
            await m.wait(n, "Proving")  # the engine did not wait for `slow`
            await m.idle()
            full.close()
            everything = [c async for c in full]
            assert len(_chain(everything, n)) == len(everything) > 4
            slow.close()
            got = [c async for c in slow]
            assert got == [*everything[:2], Gap(len(everything) - 2)]

    run(body)


def test_changes_after_a_gap_follow_it_in_order() -> None:
    async def body() -> None:
        changes = StateChanges(lambda callback, *args: callback(*args, None))
        sub = changes.subscribe(maxsize=1)
        hops = [StateChange(1, S.Packing, S.GetTicket, "SectorPacked")] * 4
        for hop in hops[:3]:
            changes.staged(hop)  # the 2nd and 3rd do not fit
        assert await anext(sub) == hops[0]
        changes.staged(hops[3])  # room again: the gap goes first, then the change
        sub.close()
        assert [c async for c in sub] == [Gap(2), hops[3]]

    run(body)


def test_a_change_whose_commit_failed_is_never_reported() -> None:
    async def body() -> None:
        pending: list[tuple[Any, tuple[Any, ...]]] = []
        changes = StateChanges(lambda callback, *args: pending.append((callback, args)))
        sub = changes.subscribe()
        changes.staged(StateChange(1, S.Packing, S.GetTicket, "SectorPacked"))
        changes.staged(StateChange(2, S.Packing, S.GetTicket, "SectorPacked"))
        (first, a), (second, b) = pending
        first(*a, OSError("disk full"))  # that commit failed: its round was undone
        second(*b, None)
        sub.close()
        assert [c.sector async for c in sub if isinstance(c, StateChange)] == [2]

    run(body)


def test_iteration_ends_when_the_engine_stops(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            sub = m.subscribe()
            reader = asyncio.get_running_loop().create_task(_drain(sub))
            await m.pledge()
        assert (await asyncio.wait_for(reader, HANG_GUARD)) >= 1  # it ended: the engine stopped

    run(body)


async def _drain(sub: Any) -> int:
    return len([c async for c in sub])


def test_no_subscriber_costs_no_callback(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            assert not m.changes.active
            sub = m.subscribe()
            assert m.changes.active
            sub.close()
            assert not m.changes.active
            with pytest.raises(ValueError, match="maxsize"):
                m.subscribe(maxsize=0)

    run(body)


def test_the_planners_state_change_is_the_dataclass_as_its_constructor_builds_it() -> None:
    made = state_change(7, SectorState.Packing, SectorState.PreCommit1, "SectorPacked")
    want = StateChange(7, SectorState.Packing, SectorState.PreCommit1, "SectorPacked")
    assert type(made) is StateChange and made == want and hash(made) == hash(want)
    assert repr(made) == repr(want) and dataclasses.astuple(made) == dataclasses.astuple(want)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.sector = 8  # type: ignore[misc]
