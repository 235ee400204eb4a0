"""Sector input (`sealing/input.py`): one counter and one sealing limit for both paths.

The engine (`Miner.pledge`, queued requests, piece assignment) and an offline
`sectors pledge` (`requests.pledge_offline`, while no engine runs) take sector numbers from the
same counter and refuse at the same limit, with the same message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sealtools import miner, run

from sectorfsm.fsm import LmdbStore
from sectorfsm.sched import TaskType
from sectorfsm.sealing import SealingError, commp, requests
from sectorfsm.sealing.errors import SealingLimitError
from sectorfsm.sealing.input import check_sealing_limit, first_free_number, stored_limit
from sectorfsm.sealing.store_view import sector_records, store_path

DAY = 86400.0
#: PreCommit1 keeps failing with a long backoff: pledged sectors stay live (sealing).
STUCK = {"max_sealing_sectors": 2, "retry": {"base": 3600.0, "budget": 50}}


def _next_number(store: LmdbStore) -> int:
    with store.read() as txn:
        return first_free_number(txn, store.db("meta"))


def test_engine_and_offline_pledges_number_from_one_counter(tmp_path: Path) -> None:
    async def engine(expect_waiting: list[int], piece_size: int) -> list[int]:
        async with miner(tmp_path) as m:
            for n in expect_waiting:  # the offline sectors are sealed by this engine
                await m.wait(n, "Proving", timeout=DAY)
            cc = await m.pledge()
            piece = await m.add_piece(commp.piece_cid(b"%d" % piece_size), piece_size)
            return [cc, piece]

    assert run(lambda: engine([], 128)) == [1, 2]
    with LmdbStore(store_path(tmp_path / "repo")) as store:
        offline = requests.pledge_offline(store, 2)
        assert offline == [3, 4]
        assert _next_number(store) == 5
    # A full-sector piece does not fit the open deal sector 2: it opens a new one.
    assert run(lambda: engine([3, 4], 2048)) == [5, 6]


def test_engine_and_offline_refuse_at_one_limit_with_one_message(tmp_path: Path) -> None:
    async def engine() -> str:
        async with miner(tmp_path, config=STUCK) as m:
            faults: Any = m.sealer.backend.faults
            faults.fail_tasks[TaskType.PRE_COMMIT1] = 100
            await m.pledge()
            await m.pledge()
            with pytest.raises(SealingLimitError) as refused:
                await m.pledge()
            assert isinstance(refused.value, SealingError)  # what the facade documents
            # A queued request is refused by the same check.
            rid = requests.submit(m.store, {"op": "pledge", "count": 1})
            m.serve_requests()
            await m.store.committer.waiter()
            assert requests.take_result(m.store, rid) == {"error": str(refused.value)}
            return str(refused.value)

    message = run(engine)
    assert message == "too many sectors sealing (curSealing: 2, max: 2)"
    with LmdbStore(store_path(tmp_path / "repo")) as store:
        assert stored_limit(store) == 2  # published by the engine for offline pledges
        with pytest.raises(ValueError) as refused:  # what the CLI catches
            requests.pledge_offline(store, 1)
        assert isinstance(refused.value, SealingLimitError)
        assert str(refused.value) == message
        # Refused means nothing changed: no number taken, no sector created.
        assert _next_number(store) == 3
        assert sorted(sector_records(store).live_ids()) == [1, 2]


def test_a_pledge_that_fits_no_more_is_refused_whole_offline(tmp_path: Path) -> None:
    async def engine() -> None:
        async with miner(tmp_path, config=STUCK) as m:
            faults: Any = m.sealer.backend.faults
            faults.fail_tasks[TaskType.PRE_COMMIT1] = 100
            await m.pledge()

    run(engine)
    with LmdbStore(store_path(tmp_path / "repo")) as store:
        with pytest.raises(SealingLimitError, match=r"curSealing: 1, max: 2"):
            requests.pledge_offline(store, 2)
        assert requests.pledge_offline(store, 1) == [2]


def test_no_limit_never_reads_the_live_index() -> None:
    class Records:
        def live_ids(self) -> list[int]:
            raise AssertionError("the live index is read only when a limit is set")

    check_sealing_limit(Records(), 0, 1_000_000)  # type: ignore[arg-type]


def test_a_restarted_engine_fills_its_open_deal_sector_first(tmp_path: Path) -> None:
    slow = {"wait_deals_delay": 10 * DAY}

    async def first() -> int:
        async with miner(tmp_path, config=slow) as m:
            return await m.add_piece(commp.piece_cid(b"a" * 100), 128)

    async def second(open_sector: int) -> None:
        async with miner(tmp_path, config=slow) as m:
            # Rebuilt at start-up from the store: the sector still takes pieces.
            assert m.input.open_sectors == {open_sector: 128}
            assert await m.add_piece(commp.piece_cid(b"b" * 100), 128) == open_sector
            await m.idle()
            info = m.status(open_sector)
            assert [p.size for p in info.pieces if p.deal is not None] == [128, 128]

    n = run(first)
    run(lambda: second(n))
