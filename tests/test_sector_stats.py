"""Counts per state kept in the commit of every transition (Lotus's SectorStats, issue item 5).

The fsm side: `StateGroup(count_by=...)` keeps machines per key in the `counts` sub-database,
written with each state record (engine rounds, offline clients, quarantine and restore),
checked at start and rebuilt when missing. The sealing side: `Miner.sector_counts()`,
`Miner.sector_stats()`, MaxSealingSectors and `sectors list --summary` read them.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter as Tally
from pathlib import Path
from typing import Any

import pytest
from conftest import Child, Spawner, run
from fsmtoy import Add, Counter, Finish, Open, Work, make_group
from sealtools import miner
from test_cli_sectors import invoke
from test_crash import load_domain

from sectorfsm.fsm import LmdbStore, StateGroup
from sectorfsm.fsm.codec import packb
from sectorfsm.fsm.counts import COUNTS_DB
from sectorfsm.sealing import requests
from sectorfsm.sealing.errors import SealingLimitError
from sectorfsm.sealing.info import SectorInfo
from sectorfsm.sealing.input import check_sealing_limit
from sectorfsm.sealing.states import SectorState
from sectorfsm.sealing.stats import SectorStats, StatGroup, sector_counts, sector_stats, stat_group
from sectorfsm.sealing.store_view import sector_records, store_path


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


# -- sectors ---------------------------------------------------------------------------------

DAY = 86400.0


def test_lotus_groups_of_states() -> None:
    assert stat_group(SectorState.WaitDeals) is StatGroup.staging
    assert stat_group(SectorState.UndefinedSectorState) is StatGroup.staging
    assert stat_group(SectorState.PreCommit1) is StatGroup.sealing
    assert stat_group(SectorState.FinalizeSector) is StatGroup.sealing
    # v1.11.3 files AddPieceFailed and every other unnamed state under failed.
    assert stat_group(SectorState.AddPieceFailed) is StatGroup.failed
    assert stat_group(SectorState.FailedUnrecoverable) is StatGroup.failed
    assert stat_group(SectorState.Proving) is StatGroup.proving
    assert stat_group(SectorState.TerminateWait) is StatGroup.proving
    assert stat_group(SectorState.Removed) is StatGroup.removed
    stats = sector_stats({"WaitDeals": 1, "PreCommit1": 2, "PreCommitFailed": 3, "Proving": 4})
    assert (stats.staging, stats.sealing, stats.failed, stats.proving) == (1, 2, 3, 4)
    assert stats.total == 10 and stats.cur_sealing == 6  # Lotus curSealing


def test_miner_counts_match_a_scan_and_the_cli_summary(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            a, b = await m.pledge(), await m.pledge()
            await m.wait(a, "Proving", timeout=DAY)
            await m.wait(b, "Proving", timeout=DAY)
            counts = m.sector_counts()
            assert set(counts) == {s.name for s in SectorState}  # every state, zeros too
            truth = Tally(info.state.name for _, info in m.group.list())
            assert {k: n for k, n in counts.items() if n} == dict(truth) == {"Proving": 2}
            assert m.sector_stats() == SectorStats(0, 0, 0, 2, 0, 2)

    run(body)
    # An offline pledge (no engine) counts its WaitingForEngine sector in its own commit.
    with LmdbStore(store_path(tmp_path / "repo")) as store:
        assert requests.pledge_offline(store, 1) == [3]
        records = sector_records(store, events=False)
        counts = sector_counts(records)
        assert counts["UndefinedSectorState"] == 1 and counts["Proving"] == 2
    code, out = invoke(tmp_path / "repo", "list", "--summary")
    assert code == 0, out
    assert "Sectors:\n\tTotal: 3\n\tWaitingForEngine: 1\n\tProving: 2\n" in out
    assert "\tstaging: 1\n" in out and "\tproving: 2\n" in out
    assert "curSealing: 1 (no MaxSealingSectors)" in out
    code, out = invoke(tmp_path / "repo", "list", "--summary", "--json")
    doc = json.loads(out)
    assert doc["states"]["WaitingForEngine"] == 1 and doc["states"]["PreCommit1"] == 0
    assert doc["groups"] == {
        "staging": 1,
        "sealing": 0,
        "failed": 0,
        "proving": 2,
        "removed": 0,
        "total": 3,
        "cur_sealing": 1,
    }
    code, out = invoke(tmp_path / "repo", "list", "--summary", "--states", "Proving")
    assert code != 0 and "takes no --states" in out and "Traceback" not in out


def test_the_sealing_limit_reads_the_counts_not_the_store(tmp_path: Path) -> None:
    with LmdbStore(tmp_path / "store") as store:
        records = sector_records(store)
        for n in (1, 2):  # two sectors pledged offline, waiting for the engine (staging)
            info = SectorInfo(number=n)
            record = records.encode(info, False, None)
            store.write(
                lambda txn, n=n, info=info, record=record: records.client_begin(
                    txn, n, records.key(n), record, False, info
                )
            )

        def no_scan(*_: object, **__: object) -> Any:
            raise AssertionError("MaxSealingSectors must not scan the sectors")

        records.live_ids = no_scan  # type: ignore[method-assign]
        records.list = no_scan  # type: ignore[method-assign]
        check_sealing_limit(records, 3, 1)
        with pytest.raises(SealingLimitError, match=r"curSealing: 2, max: 3"):
            check_sealing_limit(records, 3, 2)


# -- crashes ---------------------------------------------------------------------------------

CHILD = r'''
"""Child of tests/test_sector_stats.py: an engine (or a client) moving boxes between states."""

from __future__ import annotations

import asyncio
import logging
import random
import sys
from dataclasses import dataclass

from sectorfsm.fsm import LmdbStore, StateGroup

STATES = ["New", "A", "B", "C", "Done"]


@dataclass(slots=True)
class Box:
    state: str = "New"
    moves: int = 0


@dataclass(frozen=True, slots=True)
class Move:
    to: str


def planner(events: list[object], st: Box) -> tuple[None, int]:
    for ev in events:
        if isinstance(ev, Move):
            st.state = ev.to
            st.moves += 1
    return None, len(events)


def make_group(store: LmdbStore) -> StateGroup[Box]:
    return StateGroup(store, "box", planner, Box, events=[Move], creating=[Move],
                      final=lambda st: st.state == "Done", count_by=lambda st: st.state,
                      poll_interval=0.02)


async def main(mode: str, repo: str, seed: int) -> None:
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="LOG %(message)s")
    rng = random.Random(seed)
    store = LmdbStore(repo)
    group = make_group(store)
    if mode != "client":
        await group.start()
    print("ready", flush=True)
    if mode == "clean":
        await group.idle()
        await group.stop()
        store.close()
        print("done", flush=True)
        return
    # Engine: boxes 0-299 (new ones created by their first Move); client: boxes from 1000.
    base, span = (0, 300) if mode == "engine" else (1000, 100)
    sent = 0

    async def sender() -> None:
        nonlocal sent
        while True:
            await group.send(base + rng.randrange(span), Move(rng.choice(STATES)))
            sent += 1
            if sent % 100 == 0:
                print(f"sent {sent}", flush=True)

    await asyncio.wait_for(asyncio.gather(*(sender() for _ in range(8))), 120)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
'''


def counts_and_scan(script: Path, repo: Path) -> tuple[dict[str, int] | None, dict[str, int]]:
    """The stored counts and a full scan of the boxes, read in this process (no engine)."""
    domain = load_domain(script)
    with LmdbStore(repo) as store:
        group = domain.make_group(store)
        scanned = dict(Tally(st.state for _, st in group.list()))
        return group.records.counts.read(), scanned


def test_counts_equal_a_full_scan_after_random_kill_9s(spawn: Spawner, tmp_path: Path) -> None:
    seed = int(os.environ.get("CRASH_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    script = tmp_path / "counts_child.py"
    script.write_text(CHILD)
    repo = tmp_path / "repo"

    def child(mode: str, n: int) -> Child:
        return spawn.python(script, mode, repo, str(seed + n), name=mode, cwd=tmp_path)

    engines = []
    for n in range(5):
        engine = child("engine", n)
        engine.wait_for_line(r"^ready$")
        engines.append(engine)
        client = child("client", 100 + n) if n % 2 else None
        if client is not None:
            client.wait_for_line(r"^ready$")
        # Killed at a random point of the work: after 100-600 acknowledged sends.
        engine.wait_for_line(rf"^sent {rng.randrange(1, 7) * 100}$")
        engine.kill()
        if client is not None:
            client.kill()
        stored_counts, scanned = counts_and_scan(script, repo)
        assert stored_counts == scanned, f"after kill {n} (CRASH_SEED={seed})"
    clean = child("clean", 99)
    assert clean.finish() == 0 and clean.output().endswith("done\n"), clean.describe()
    # No start ever found a count to repair: they never drifted.
    for proc in [*engines, clean]:
        assert "LOG" not in proc.output(), f"{proc.describe()} (CRASH_SEED={seed})"
    stored_counts, scanned = counts_and_scan(script, repo)
    assert stored_counts == scanned and sum(scanned.values()) > 100, f"CRASH_SEED={seed}"
