"""The `sectorfsm.Miner` facade: its API as named, bad input, operator commands."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from sealtools import kinds, miner, run

import sectorfsm
from sectorfsm.fsm import LmdbStore
from sectorfsm.sched import TaskType
from sectorfsm.sched.lotus import LotusMode
from sectorfsm.sealing import (
    NotFailedError,
    SealingError,
    SectorState,
    SectorStuckError,
    UnknownSectorError,
    commp,
    requests,
)
from sectorfsm.sealing.states import EXISTING_STATES
from sectorfsm.sealing.store_view import store_path

DAY = 86400.0


def test_public_names() -> None:
    assert sectorfsm.Miner.__name__ == "Miner"
    assert len(EXISTING_STATES) == 42
    assert all(s.value == s.name for s in EXISTING_STATES)


def test_sector_info_exposes_state_number_and_log(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            n = await m.pledge()
            info = await m.wait(n, SectorState.Proving, timeout=DAY)
            assert (info.state, info.number) == (SectorState.Proving, n)
            entry = info.log[0]
            assert entry.kind == "event;SectorStartCC"
            assert isinstance(entry.timestamp, int) and entry.message.startswith('{"User"')
            assert entry.trace == ""

    run(body)


def test_bad_input_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            n = await m.pledge()
            await m.wait(n, "Proving", timeout=DAY)
            before = m.status(n)
            with pytest.raises(UnknownSectorError, match="sector 99 not found"):
                m.status(99)
            with pytest.raises(UnknownSectorError):
                m.status(-1)
            with pytest.raises(UnknownSectorError):
                await m.remove(99)
            with pytest.raises(UnknownSectorError):
                await m.wait(99, "Proving")
            with pytest.raises(ValueError, match=r"not a valid sector state.*WaitDeals"):
                await m.update_state(n, "Sealing")
            with pytest.raises(ValueError, match="not a valid sector state"):
                await m.wait(n, "Nope")
            with pytest.raises(NotFailedError, match="Proving, which is not a failed state"):
                await m.retry(n)
            with pytest.raises(ValueError, match="invalid padded piece size 100"):
                await m.add_piece(commp.piece_cid(b"x"), 100)
            with pytest.raises(ValueError):
                await m.add_piece("bafy-not-a-piece-cid", 128)
            with pytest.raises(ValueError, match="does not fit"):
                await m.add_piece(commp.piece_cid(b"x"), 4096)
            await m.idle()
            assert m.status(n) == before
            assert [i.number for i in m.list()] == [n]
            with pytest.raises(ValueError, match="not a valid sector state"):
                list(m.list(states=["Bogus"]))

    run(body)


def test_open_refuses_bad_config(tmp_path: Path) -> None:
    async def body() -> None:
        with pytest.raises(ValueError, match="sealer"):
            async with miner(tmp_path, sealer="nope"):
                pass
        with pytest.raises(ValueError, match="sector size"):
            async with miner(tmp_path, sector_size="3KiB"):
                pass
        with pytest.raises(ValueError, match="unknown sealing option"):
            async with miner(tmp_path, config={"wait_deal_delay": 1}):
                pass
        with pytest.raises(ValueError, match="unknown assigner 'nope'"):
            async with miner(tmp_path, assigner="nope"):
                pass
        assert not (tmp_path / "repo").exists()  # refused before anything was created
        async with miner(tmp_path) as m:
            await m.pledge()
        with pytest.raises(SealingError, match="2048-byte sectors"):
            async with miner(tmp_path, sector_size="8MiB"):
                pass

    run(body)


def test_the_lotus_assigner_seals_a_sector(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, assigner="lotus") as m:
            assert isinstance(m.sched.strategy, LotusMode)
            n = await m.pledge()
            assert (await m.wait(n, "Proving")).state.name == "Proving"

    run(body)


def test_update_state_moves_a_sector_and_the_handler_runs(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            n = await m.pledge()
            await m.wait(n, "Proving", timeout=DAY)
            await m.update_state(n, "Removing")
            info = await m.wait(n, "Removed", timeout=DAY)
            assert "SectorForceState" in kinds(info)

    run(body)


def test_packing_failed_is_handled_as_deals_expired(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            n = await m.pledge()
            await m.wait(n, "Proving", timeout=DAY)
            await m.update_state(n, "PackingFailed")
            # Committed on chain: DealsExpired refuses to remove it, as Lotus does. Lotus then
            # stalls silently; here it is retried and finally parked, with the reason.
            with pytest.raises(SectorStuckError, match="committed on-chain"):
                await m.wait(n, "Removed", timeout=30 * DAY)
            info = m.status(n)
            assert info.unrecoverable_from == "DealsExpired"
            assert "event;SectorForceState" in [e.kind for e in info.log]

    run(body)


def test_retry_skips_the_backoff(tmp_path: Path) -> None:
    async def body() -> None:
        from sectorfsm.sched import TaskType

        cfg = {"retry": {"base": 7200.0, "budget": 5}}
        async with miner(tmp_path, config=cfg) as m:
            m.sealer.backend.faults.fail_tasks[TaskType.PRE_COMMIT1] = 1  # type: ignore[attr-defined]
            n = await m.pledge()
            await m.wait(n, "SealPreCommit1Failed", timeout=DAY)
            failed = m.clock.now()
            await m.retry(n)
            await m.wait(n, "Proving", timeout=DAY)
            assert m.clock.now() - failed < 3600  # did not wait out the 2 h backoff

    run(body)


def test_wait_reports_a_sector_that_gave_up(tmp_path: Path) -> None:
    async def body() -> None:
        # PC1 fails every time: the retry budget runs out.
        cfg = {"retry": {"base": 10.0, "budget": 3}}
        async with miner(tmp_path, config=cfg) as m:
            m.sealer.backend.faults.fail_tasks[TaskType.PRE_COMMIT1] = 100  # type: ignore[attr-defined]
            n = await m.pledge()
            with pytest.raises(SectorStuckError, match="FailedUnrecoverable"):
                await m.wait(n, "Proving", timeout=30 * DAY)
            assert kinds(m.status(n)).count("SectorSealPreCommit1Failed") == 4
            with pytest.raises(TimeoutError):
                k = await m.pledge()
                await m.wait(k, "Proving", timeout=60)

    run(body)


def test_a_corrupt_chain_record_is_a_clear_error_and_loses_nothing(tmp_path: Path) -> None:
    from sectorfsm.fsm import LmdbStore, StoreError

    async def body() -> None:
        async with miner(tmp_path) as m:
            n = await m.pledge()
            await m.wait(n, "Proving", timeout=DAY)
        store = LmdbStore(tmp_path / "repo" / "store")
        db = store.db("devnet")
        store.write(lambda txn: txn.put(b"msg/000000000001", b"\xc1garbage", db=db))
        store.close()
        with pytest.raises(StoreError, match=r"record 'msg/000000000001' in .* cannot be read"):
            async with miner(tmp_path):
                pass
        from sectorfsm.sealing.store_view import read_sector

        info = read_sector(tmp_path / "repo", n)
        assert info is not None and info.state is SectorState.Proving

    run(body)


def test_max_sealing_sectors_limits_pledges(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config={"max_sealing_sectors": 2}) as m:
            a, b = await m.pledge(), await m.pledge()
            with pytest.raises(SealingError, match=r"too many sectors sealing \(curSealing: 2"):
                await m.pledge()
            await m.wait(a, "Proving", timeout=DAY)
            await m.wait(b, "Proving", timeout=DAY)
            assert await m.pledge() == 3

    run(body)


def test_the_sealing_limit_holds_for_queued_and_offline_pledges(tmp_path: Path) -> None:
    async def body() -> None:
        cfg = {"max_sealing_sectors": 2, "retry": {"base": 3600.0, "budget": 50}}
        async with miner(tmp_path, config=cfg) as m:
            faults: Any = m.sealer.backend.faults
            faults.fail_tasks[TaskType.PRE_COMMIT1] = 100  # both stay sealing (failed, live)
            await m.pledge()
            await m.pledge()
            rid = requests.submit(m.store, {"op": "pledge", "count": 1})
            m.serve_requests()
            await m.store.committer.waiter()
            result = requests.take_result(m.store, rid)
            assert result is not None and "too many sectors sealing" in result["error"]
            with pytest.raises(SealingError):
                await m.pledge()
        with (
            LmdbStore(store_path(tmp_path / "repo")) as store,
            pytest.raises(ValueError, match="too many sectors sealing"),
        ):
            requests.pledge_offline(store, 1)

    run(body)


def test_a_failed_queued_request_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            requests.submit(
                m.store, {"op": "add_piece", "piece_cid": commp.piece_cid(b"x"), "size": 4096}
            )
            with caplog.at_level(logging.ERROR, logger="sectorfsm.sealing"):
                m.serve_requests()
            await m.idle()
        assert "does not fit" in caplog.text

    run(body)
