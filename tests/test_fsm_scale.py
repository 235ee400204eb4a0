"""Engine costs that must not grow with the number of machines (issue: scale)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, NoReturn

import pytest
from fsmtoy import Add, Cancel, Counter, Finish, Open, make_group
from sealtools import miner, run

from sectorfsm.fsm import LmdbStore, StateGroup
from sectorfsm.fsm.codec import packb
from sectorfsm.fsm.counts import COUNTS_DB, INDEX_DB
from sectorfsm.sealing import SectorState


def test_nosync_commits_run_on_the_loop_thread(tmp_path: Path) -> None:
    """No fsync to overlap: a `nosync` commit costs no hand-off to a writer thread and back."""

    async def body() -> list[bool]:
        store = LmdbStore(tmp_path / "s", durability="nosync")
        on_loop: list[bool] = []
        store.committer.observe_commits(
            lambda _s: on_loop.append(threading.current_thread() is threading.main_thread())
        )
        group = make_group(store)
        await group.start()
        try:
            await group.send("a", Open())
            for uid in range(5):
                await group.send("a", Add(uid))
        finally:
            await group.stop()
            store.close()
        return on_loop

    on_loop = asyncio.run(body())
    assert on_loop and all(on_loop), on_loop


def _index_group(store: LmdbStore) -> StateGroup[Counter]:
    return make_group(store, count_by=lambda st: st.state)


def _by_state(group: StateGroup[Counter], *states: str) -> list[object]:
    return [mid for mid, _ in group.list_by(states)]


def _no_scan(group: StateGroup[Counter]) -> None:
    def scan(*_a: object, **_k: object) -> NoReturn:
        raise AssertionError("list_by scanned the whole group")

    group.records.list = scan  # type: ignore[method-assign]


def test_list_by_follows_transitions_and_restarts_without_a_scan(tmp_path: Path) -> None:
    async def body() -> None:
        store = LmdbStore(tmp_path / "s", durability="nosync")
        group = _index_group(store)
        await group.start()
        for i in range(1, 8):
            await group.send(i, Open())
        for i in (2, 5):
            await group.send(i, Cancel())
        await group.send(7, Finish())  # (final: it stays in the index)
        await group.idle()
        _no_scan(group)
        assert _by_state(group, "Idle") == [1, 3, 4, 6]
        assert _by_state(group, "Cancelled", "Closed") == [2, 5, 7]
        assert _by_state(group, "Nowhere") == []
        await group.send(2, Open())  # Cancelled -> Idle
        await group.idle()
        assert _by_state(group, "Idle") == [1, 2, 3, 4, 6]
        assert _by_state(group, "Cancelled") == [5]
        await group.stop()
        # Restart: the index is on disk, read by a new group object.
        again = _index_group(store)
        _no_scan(again)
        assert _by_state(again, "Idle") == [1, 2, 3, 4, 6]
        await again.start()
        await again.send(6, Finish())
        await again.idle()
        assert _by_state(again, "Closed") == [6, 7]
        await again.stop()
        store.close()

    asyncio.run(body())


def test_a_store_written_before_the_index_is_rebuilt_once_at_start(tmp_path: Path) -> None:
    async def body() -> None:
        store = LmdbStore(tmp_path / "s", durability="nosync")
        group = _index_group(store)
        await group.start()
        for i in range(1, 5):
            await group.send(i, Open())
        await group.send(3, Cancel())
        await group.idle()
        await group.stop()

        # Make it what an older version wrote: counts (marker version 1), no key index.
        def downgrade(txn: Any) -> None:
            index = store.db(INDEX_DB)
            for key in [k for k, _ in txn.cursor(db=index)]:
                txn.delete(key, db=index)
            txn.put(b"counters\x00", packb(1), db=store.db(COUNTS_DB))

        store.write(downgrade)
        old = _index_group(store)
        # Until an engine rebuilds it, the index is not trusted: a scan answers, correctly.
        assert _by_state(old, "Cancelled") == [3]
        await old.start()  # the one rebuild
        _no_scan(old)
        assert _by_state(old, "Idle") == [1, 2, 4]
        assert _by_state(old, "Cancelled") == [3]
        assert old.counts() == {"Idle": 3, "Cancelled": 1}
        await old.stop()
        store.close()

    asyncio.run(body())


def test_miner_list_by_state_uses_the_index(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, durability="nosync") as m:
            a, b, c = [await m.pledge() for _ in range(3)]
            for n in (a, b, c):
                await m.wait(n, "Proving")
            await m.remove(b)
            await m.wait(b, "Removed")
            _no_scan(m.group)  # type: ignore[arg-type]
            assert [i.number for i in m.list(states=["Proving"])] == [a, c]
            assert [i.number for i in m.list(states=[SectorState.Removed, "Proving"])] == [a, b, c]
            with pytest.raises(ValueError):
                list(m.list(states=["NoSuchState"]))

    run(body)


def test_sim_tasks_of_a_lost_worker_fail_and_a_cancelled_one_stays_cancelled() -> None:
    """The sim sealer tracks running tasks per worker (no future shared by all of them)."""
    from types import SimpleNamespace

    from sectorfsm.fsm import VirtualClock
    from sectorfsm.sched import TaskType
    from sectorfsm.sealing.backends.sim import SimBackend, SimTaskError

    async def body() -> None:
        backend = SimBackend(VirtualClock(), 1000)

        def job(worker: str, n: int) -> Any:
            return SimpleNamespace(
                task_type=TaskType.ADD_PIECE,
                worker=SimpleNamespace(name=worker),
                sector=SimpleNamespace(size=2048, number=n),
            )

        on_a = [
            asyncio.ensure_future(backend.add_piece(job("a", n), [], 2048, None)) for n in range(50)
        ]
        on_b = asyncio.ensure_future(backend.add_piece(job("b", 99), [], 2048, None))
        cancelled = on_a.pop()
        await asyncio.sleep(0)
        cancelled.cancel()
        backend.lose_worker("a")
        results = await asyncio.gather(*on_a, return_exceptions=True)
        assert all(isinstance(r, SimTaskError) and "lost with worker a" in str(r) for r in results)
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert (await on_b).size == 2048  # (another worker's task is untouched)

    asyncio.run(body())
