"""Counts per state kept in the commit of every transition (Lotus's SectorStats, issue item 5).

The fsm side: `StateGroup(count_by=...)` keeps machines per key in the `counts` sub-database,
written with each state record (engine rounds, offline clients, quarantine and restore),
checked at start and rebuilt when missing. The sealing side: `Miner.sector_counts()`,
`Miner.sector_stats()`, MaxSealingSectors and `sectors list --summary` read them.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from pathlib import Path
from typing import Any

import pytest
from conftest import run
from fsmtoy import Add, Counter, Finish, Open, Work, make_group

from sectorfsm.fsm import LmdbStore, StateGroup
from sectorfsm.fsm.codec import packb
from sectorfsm.fsm.counts import COUNTS_DB


def by_state(st: Counter) -> str:
    """The toy counters' count key."""
    return st.state


def scan(group: StateGroup[Any]) -> dict[str, int]:
    """The truth: a full scan of the group's records."""
    return dict(Tally(by_state(state) for _, state in group.records.list()))


def stored(group: StateGroup[Any]) -> dict[str, int] | None:
    """What the counts say (None: not exact)."""
    assert group.records.counts is not None
    return group.records.counts.read()


def test_counts_follow_every_transition_in_the_same_commit(tmp_path: Path) -> None:
    async def body() -> None:
        async with LmdbStore(tmp_path / "s", "nosync") as store:
            g = make_group(store, count_by=by_state)
            await g.start()
            for i in range(6):
                await g.begin(i, Counter())
            await g.send(1, Work(0.0))
            await g.send(2, Finish())
            await g.send(3, Add(1))
            await g.send(9, Open())  # a creating event makes machine 9
            await g.idle()
            # Each committed state is counted exactly once, final or not.
            assert stored(g) == scan(g) == {"Idle": 6, "Closed": 1}
            assert g.counts() == {"Idle": 6, "Closed": 1}
            with store.read() as txn:
                split = g.records.counts.stored(txn)  # type: ignore[union-attr]
            assert split == ({"Idle": 6}, {"Closed": 1})
            await g.stop()

    run(body)


def test_offline_clients_count_the_machines_they_create(tmp_path: Path) -> None:
    async def body() -> None:
        async with LmdbStore(tmp_path / "s", "nosync") as store:
            g = make_group(store, count_by=by_state)
            await g.start()
            await g.begin(1, Counter())
            await g.stop()
            # Not started: a client. Its begin and creating send write the record directly.
            await g.begin(2, Counter(state="Working"))
            await g.send(3, Open())
            assert stored(g) == scan(g) == {"Idle": 2, "Working": 1}
            await g.start()
            await g.idle()
            assert stored(g) == scan(g)
            await g.stop()

    run(body)


def test_a_store_without_counts_is_counted_at_start(tmp_path: Path) -> None:
    async def body() -> None:
        async with LmdbStore(tmp_path / "s", "nosync") as store:
            old = make_group(store)  # a version that kept no counts
            await old.start()
            for i in range(5):
                await old.begin(i, Counter())
            await old.send(4, Finish())
            await old.idle()
            await old.stop()
            g = make_group(store, count_by=by_state)
            assert stored(g) is None
            assert g.counts() == {"Idle": 4, "Closed": 1}  # (a scan until the engine counts)
            await g.start()
            assert stored(g) == {"Idle": 4, "Closed": 1}
            await g.stop()

    run(body)


def test_a_wrong_live_count_is_logged_and_repaired_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with LmdbStore(tmp_path / "s", "nosync") as store:
            g = make_group(store, count_by=by_state)
            await g.start()
            for i in range(3):
                await g.begin(i, Counter())
            await g.idle()
            await g.stop()
            db = store.db(COUNTS_DB)
            store.write(lambda txn: txn.put(b"counters\x00LIdle", packb(7), db=db))
            store.write(lambda txn: txn.put(b"counters\x00LGhost", packb(2), db=db))
            assert stored(g) == {"Idle": 7, "Ghost": 2}
            with caplog.at_level(logging.ERROR, logger="sectorfsm.fsm.counts"):
                await g.start()
            assert stored(g) == scan(g) == {"Idle": 3}
            assert "Idle: 7 -> 3" in caplog.text and "Ghost: 2 -> 0" in caplog.text
            await g.stop()

    run(body)


def test_quarantine_and_restore_keep_the_counts_exact(tmp_path: Path) -> None:
    async def body() -> None:
        async with LmdbStore(tmp_path / "s", "nosync") as store:
            g = make_group(store, count_by=by_state)
            await g.start()
            for i in range(3):
                await g.begin(i, Counter())
            await g.send(2, Finish())
            await g.idle()
            await g.stop()
            good = g.records.raw(g.records.key(2))
            assert good is not None
            states = store.db("states")
            store.write(lambda txn: txn.put(g.records.key(2), b"\xc1bad", db=states))
            await g.send(2, Add(1))  # a client's event for the (final, now unreadable) machine
            await g.start()
            await g.idle()
            assert 2 in g.unreadable
            assert stored(g) == scan(g) == {"Idle": 2}
            await g.stop()
            store.write(lambda txn: g.records.restore(txn, 2, good))
            assert stored(g) == scan(g) == {"Idle": 2, "Closed": 1}

    run(body)
