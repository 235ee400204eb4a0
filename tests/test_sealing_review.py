"""Regressions found in review: pieces, budgets, parked sectors, limits, `--until-proving`."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from sealtools import kinds, miner, run

from sectorfsm.cli import run as runmod
from sectorfsm.fsm import LmdbStore, VirtualClock
from sectorfsm.sched import TaskType
from sectorfsm.sealing import SealingError, commp, requests
from sectorfsm.sealing.store_view import store_path

DAY = 86400.0
SLOW_SEAL = {"wait_deals_delay": 3600.0, "retry": {"base": 30.0, "budget": 6}}


def test_one_failed_piece_drops_only_itself(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=SLOW_SEAL) as m:
            backend: Any = m.sealer.backend
            original = backend.add_piece
            writes = {"deal": 0}

            async def flaky(job: Any, existing: Any, size: int, piece: Any) -> Any:
                if piece is not None:
                    writes["deal"] += 1
                    if writes["deal"] == 2:
                        raise RuntimeError("disk hiccup on the second deal piece")
                return await original(job, existing, size, piece)

            backend.add_piece = flaky
            cids = [commp.piece_cid(bytes([i]) * 100) for i in range(3)]
            # Assigned in one tick: one AddPiece step handles all three.
            numbers = m._assign([m._pending_piece(c, 128, None) for c in cids])
            await m.store.committer.waiter()
            assert len(set(numbers)) == 1
            info = await m.wait(numbers[0], "Proving", timeout=10 * DAY)
            sealed = [p.piece_cid for p in info.pieces if p.deal is not None]
            assert sealed == [cids[0], cids[2]]  # the first was kept, the third retried
            failed = next(e for e in info.log if e.kind == "event;SectorAddPieceFailed")
            assert "disk hiccup" in failed.trace and "deal 2" in failed.trace

    run(body)


def test_restart_keeps_a_full_sector_full(tmp_path: Path) -> None:
    async def body() -> None:
        clock = VirtualClock()
        a, b, c = (commp.piece_cid(bytes([i]) * 100) for i in range(3))
        async with miner(tmp_path, clock=clock, config=SLOW_SEAL) as m:
            first = await m.add_piece(a, 128)
            assert await m.add_piece(b, 1024) == first  # 128 + 896 padding + 1024 = full
        async with miner(tmp_path, clock=clock, config=SLOW_SEAL) as m:
            assert m.sealing.open_sectors[first] == 2048
            other = await m.add_piece(c, 512)
            assert other != first
            info = await m.wait(other, "Proving", timeout=10 * DAY)
            assert info.pieces[0].piece_cid == c
            assert "SectorAddPieceFailed" not in kinds(await m.wait(first, "Proving"))

    run(body)


def test_remove_failures_count_against_the_budget(tmp_path: Path) -> None:
    async def body() -> None:
        cfg = {"retry": {"base": 30.0, "budget": 3}}
        async with miner(tmp_path, config=cfg) as m:
            n = await m.pledge()
            await m.wait(n, "Proving", timeout=DAY)
            m.sealer.backend.faults.fail_remove = 1000  # type: ignore[attr-defined]
            await m.remove(n)
            info = await m.wait(n, "FailedUnrecoverable", timeout=30 * DAY)
            assert info.unrecoverable_from == "RemoveFailed"
            assert kinds(info).count("SectorRemoveFailed") == 4  # the first try + 3 retries
            assert "simulated removal failure" in info.last_err

    run(body)


def test_a_parked_sector_shows_its_cause_and_retry_is_immediate(tmp_path: Path) -> None:
    async def body() -> None:
        cfg = {"retry": {"base": 3600.0, "budget": 1}}
        async with miner(tmp_path, config=cfg) as m:
            faults: Any = m.sealer.backend.faults
            faults.fail_tasks[TaskType.PRE_COMMIT1] = 2
            n = await m.pledge()
            info = await m.wait(n, "FailedUnrecoverable", timeout=DAY)
            assert info.retry_at == 0  # nothing pending: `status` must not promise a retry
            assert "simulated PC1 failure" in info.last_err  # the cause, not only the budget
            resumed_at = m.clock.now()
            await m.retry(n)
            info = await m.wait(n, "Proving", timeout=DAY)
            retried = next(
                e.timestamp
                for e in info.log
                if e.kind == "event;SectorRetrySealPreCommit1" and e.timestamp >= resumed_at - 1
            )
            assert retried - resumed_at < 60  # not the 1-hour backoff again
            assert info.last_err == ""

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


def test_until_proving_stops_when_nothing_can_move(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            a = await m.pledge()
            await m.wait(a, "Proving", timeout=DAY)
            b = await m.pledge()
            await m.wait(b, "WaitSeed", timeout=DAY)
            await m.terminate(b)  # precommitted only: Lotus pauses in TerminateFailed
            await m.wait(b, "TerminateFailed", timeout=DAY)
            await m.idle()
            with pytest.raises(runmod._Outcome, match=f"{b} in TerminateFailed"):
                await asyncio.wait_for(runmod._supervise(m, asyncio.Event(), True), 10)

    run(body)
