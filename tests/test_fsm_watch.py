"""Per-machine wake-ups: a waiter on one machine is woken by that machine's commits only."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG_GUARD
from fsmtoy import Add, Finish, Open, make_group
from sealtools import miner, run

from sectorfsm.fsm import GroupStoppedError, LmdbStore
from sectorfsm.sealing import SectorState


def test_watch_wakes_on_its_own_machine_only(tmp_path: Path) -> None:
    async def body() -> None:
        store = LmdbStore(tmp_path / "s", durability="nosync")
        group = make_group(store)
        await group.start()
        try:
            await group.send("a", Open())
            await group.send("b", Open())
            watched = group.watch("a")
            for uid in range(20):  # twenty commits of b
                await group.send("b", Add(uid))
            await group.idle()
            assert not watched.done()
            await group.send("a", Add(100))
            await asyncio.wait_for(watched, HANG_GUARD)  # (a's own commit resolves it)
            state = group.get("a")
            assert state is not None and state.applied == [100]
        finally:
            await group.stop()
            store.close()

    asyncio.run(body())


def test_watch_tells_the_count_key_of_the_state_its_commit_wrote(tmp_path: Path) -> None:
    async def body() -> None:
        store = LmdbStore(tmp_path / "s", durability="nosync")
        counted = make_group(store, count_by=lambda st: st.state)
        await counted.start()
        try:
            await counted.send("a", Open())
            watched = counted.watch("a")
            await counted.send("a", Finish())
            assert await asyncio.wait_for(watched, HANG_GUARD) == "Closed"
        finally:
            await counted.stop()
        plain = make_group(store)  # (no counts: the wake-up only says "re-read")
        await plain.start()
        try:
            await plain.send("b", Open())
            watched = plain.watch("b")
            await plain.send("b", Add(1))
            assert await asyncio.wait_for(watched, HANG_GUARD) is None
        finally:
            await plain.stop()
            store.close()

    asyncio.run(body())


def test_stop_wakes_every_watcher_and_a_stopped_group_refuses(tmp_path: Path) -> None:
    async def body() -> None:
        store = LmdbStore(tmp_path / "s", durability="nosync")
        group = make_group(store)
        await group.start()
        await group.send("a", Open())
        watched = group.watch("a")
        abandoned = group.watch("a")
        abandoned.cancel()  # (a waiter that timed out: dropped, never resolved)
        await group.stop()
        assert watched.done() and watched.result() is None
        with pytest.raises(GroupStoppedError, match="not running"):
            group.watch("a")
        store.close()

    asyncio.run(body())


def count_reads(m: Any) -> dict[Any, int]:
    """Count `m.group.get` calls per sector from now on (the dict fills as they happen)."""
    reads: dict[Any, int] = {}
    get = m.group.get

    def counting_get(number: Any) -> Any:
        reads[number] = reads.get(number, 0) + 1
        return get(number)

    m.group.get = counting_get
    return reads


def test_miner_wait_reads_its_sector_only_when_it_changes(tmp_path: Path) -> None:
    """Waiting on sector A while sector B seals: A's record is read about once per its round."""

    async def body() -> None:
        async with miner(tmp_path, durability="nosync") as m:
            a = await m.pledge()
            b = await m.pledge()
            await m.wait(a, "Proving")
            await m.wait(b, "Proving")
            reads = count_reads(m)
            waiter = asyncio.ensure_future(m.wait(a, "Removed"))
            before = m.store.committer.batches_committed
            await m.update_state(b, SectorState.Removing)
            await m.wait(b, "Removed")
            await m.idle()
            commits = m.store.committer.batches_committed - before
            assert commits >= 2 and not waiter.done()
            # One read when the wait began; B's commits woke no one on A.
            assert reads.get(a) == 1, (reads, commits)
            await m.remove(a)
            info = await asyncio.wait_for(waiter, HANG_GUARD)
            assert info.state is SectorState.Removed
            # A's own rounds (Removing, then Removed) each woke its waiter once.
            assert reads[a] <= 4, reads

    run(body)


@pytest.mark.parametrize("timeout", [None, 1e9])
def test_miner_wait_reads_the_sector_only_in_the_state_it_decides_on(
    tmp_path: Path, timeout: float | None
) -> None:
    """A sector sealing through a dozen states is read when the wait begins and at Proving."""

    async def body() -> None:
        async with miner(tmp_path, durability="nosync") as m:
            reads = count_reads(m)
            a = await m.pledge()
            info = await m.wait(a, "Proving", timeout=timeout)
            assert info.state is SectorState.Proving
            assert len(info.log) > 10  # (it went through every sealing state meanwhile)
            assert reads[a] == 2, reads

    run(body)


def test_a_waiting_miner_wait_holds_no_sector_info(tmp_path: Path) -> None:
    """A waiter keeps no decoded info while it waits (thousands of waiters: their memory)."""

    async def body() -> None:
        async with miner(tmp_path, durability="nosync") as m:
            a = await m.pledge()
            waiter = asyncio.ensure_future(m.wait(a, "Removed"))
            await m.wait(a, "Proving")
            frame = waiter.get_coro().cr_frame  # type: ignore[union-attr]
            assert not waiter.done() and frame is not None
            assert "info" not in frame.f_locals, sorted(frame.f_locals)
            await m.remove(a)
            assert (await asyncio.wait_for(waiter, HANG_GUARD)).state is SectorState.Removed

    run(body)
