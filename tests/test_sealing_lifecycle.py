"""Sectors from pledge and from deal pieces to Proving, on both clocks, with the scheduler."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import HANG_GUARD
from sealtools import HAPPY, count, kinds, miner, run

from sectorfsm.fsm import VirtualClock
from sectorfsm.sched import TaskType
from sectorfsm.sealing import commp
from sectorfsm.sealing.chain import ChainParams, ExitCode
from sectorfsm.sealing.config import SealingConfig
from sectorfsm.sealing.info import LogEntry, SectorInfo, log_append
from sectorfsm.sealing.states import SectorState

DAY = 86400.0
#: Deal sectors wait an hour for more pieces, and retries back off slowly.
SLOW_SEAL = {"wait_deals_delay": 3600.0, "retry": {"base": 30.0, "budget": 6}}


def test_pledge_reaches_proving_on_virtual_clock_with_every_step_scheduled(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            n = await m.pledge()
            info = await m.wait(n, "Proving", timeout=86400)
            assert info.number == n == 1
            assert kinds(info) == list(HAPPY)
            # The scheduler placed every compute step (each went through a worker's ledger).
            runs = m.sealer.backend.runs  # type: ignore[attr-defined]
            for task in (
                TaskType.ADD_PIECE,
                TaskType.PRE_COMMIT1,
                TaskType.PRE_COMMIT2,
                TaskType.COMMIT1,
                TaskType.COMMIT2,
                TaskType.FINALIZE,
            ):
                assert runs.get(task) == 1, task
            assert m.sched.jobs() == []
            # Real commitments: a CC sector's CommD is the zero commitment of the sector.
            assert info.comm_d == commp.zero_piece_cid(2048)
            assert info.comm_r is not None and info.comm_r.startswith("bagboea4b5abc")
            on_chain = m.chain.sector_info(n)
            assert on_chain is not None and on_chain.sealed_cid == info.comm_r

    run(body)


def test_pledge_reaches_proving_on_real_clock(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, clock="real", chain=ChainParams.devnet(block_time=0.02)) as m:
            n = await m.pledge()
            info = await m.wait(n, "Proving", timeout=HANG_GUARD)  # (real clock)
            assert info.state is SectorState.Proving

    run(body)


def test_deal_piece_reaches_proving_on_real_clock(tmp_path: Path) -> None:
    async def body() -> None:
        cfg = {"wait_deals_delay": 0.2}
        async with miner(
            tmp_path, clock="real", chain=ChainParams.devnet(block_time=0.02), config=cfg
        ) as m:
            n = await m.add_piece(commp.piece_cid(b"real time deal" * 5), 128)
            info = await m.wait(n, "Proving", timeout=HANG_GUARD)  # (real clock)
            assert info.pieces[0].deal is not None

    run(body)


def test_a_32gib_sector_takes_hours_of_simulated_time(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, sector_size="32GiB", chain="mainnet") as m:
            start = m.clock.now()
            n = await m.pledge()
            await m.wait(n, "Proving", timeout=10 * 86400)
            hours = (m.clock.now() - start) / 3600
            assert hours > 3.5  # PC1 alone is 3.5 h for 32 GiB

    run(body)


def test_deal_piece_goes_through_waitdeals_addpiece_packing(tmp_path: Path) -> None:
    async def body() -> None:
        data = b"sectorfsm deal piece " * 5  # 105 bytes -> a 128-byte padded piece
        cid = commp.piece_cid(data)
        async with miner(tmp_path) as m:
            n = await m.add_piece(cid, 128)
            info = await m.wait(n, "Proving", timeout=86400)
            names = kinds(info)
            assert names[:4] == [
                "SectorStart",
                "SectorAddPiece",
                "SectorPieceAdded",
                "SectorStartPacking",
            ]
            assert info.pieces[0].piece_cid == cid and info.pieces[0].deal is not None
            assert sum(p.size for p in info.pieces) == 2048
            # CommD is the real unsealed CID of the deal piece plus the zero fillers.
            expected = commp.unsealed_cid(2048, [(p.piece_cid, p.size) for p in info.pieces])
            assert info.comm_d == expected
            deal_id = info.pieces[0].deal.deal_id  # type: ignore[union-attr]
            chain_sector = m.chain.sector_info(n)
            assert chain_sector is not None and chain_sector.deal_ids == (deal_id,)

    run(body)


def test_pieces_fill_one_sector_then_a_new_one_opens(tmp_path: Path) -> None:
    async def body() -> None:
        cids = [commp.piece_cid(bytes([i]) * 1000) for i in range(3)]  # 1024-byte padded each
        async with miner(tmp_path) as m:
            a = await m.add_piece(cids[0], 1024)
            b = await m.add_piece(cids[1], 1024)
            c = await m.add_piece(cids[2], 1024)
            assert a == b != c
            full = await m.wait(a, "Proving", timeout=86400)
            # The sector filled up, so it was packed without waiting for the seal delay.
            assert [p.piece_cid for p in full.pieces] == cids[:2]
            assert count(full, "SectorStartPacking") == 1
            other = await m.wait(c, "Proving", timeout=86400)
            assert other.pieces[0].piece_cid == cids[2]

    run(body)


def test_seal_delay_starts_packing_a_partly_filled_sector(tmp_path: Path) -> None:
    async def body() -> None:
        cid = commp.piece_cid(b"x" * 100)
        async with miner(tmp_path, config={"wait_deals_delay": 600.0}) as m:
            start = m.clock.now()
            n = await m.add_piece(cid, 128)
            await m.wait(n, "Packing", timeout=86400)
            assert m.clock.now() - start >= 600.0
            await m.wait(n, "Proving", timeout=86400)

    run(body)


def test_precommits_and_commits_are_batched(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            ns = [await m.pledge() for _ in range(5)]
            for n in ns:
                await m.wait(n, "Proving", timeout=86400)
            methods = [method for _, method, _ in m.chain.messages()]
            assert methods == ["PreCommitSectorBatch", "ProveCommitAggregate"]
            assert all(sorted(s) == ns for _, _, s in m.chain.messages())

    run(body)


def test_single_message_paths_without_batching(tmp_path: Path) -> None:
    async def body() -> None:
        cfg = {"batch_pre_commits": False, "aggregate_commits": False}
        async with miner(tmp_path, config=cfg) as m:
            n = await m.pledge()
            info = await m.wait(n, "Proving", timeout=86400)
            names = kinds(info)
            assert "SectorPreCommitted" in names and "SectorCommitSubmitted" in names
            assert "SectorPreCommitBatch" not in names
            assert [method for _, method, _ in m.chain.messages()] == [
                "PreCommitSector",
                "ProveCommitSector",
            ]

    run(body)


def test_few_commits_or_a_low_base_fee_go_individually(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config={"min_commit_batch": 4}) as m:
            ns = [await m.pledge() for _ in range(2)]
            for n in ns:
                await m.wait(n, "Proving", timeout=86400)
            commits = [meth for _, meth, _ in m.chain.messages("ProveCommit")]
            assert commits == ["ProveCommitSector", "ProveCommitSector"]

    run(body)


def test_numbers_come_from_a_persisted_counter(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            assert [await m.pledge() for _ in range(3)] == [1, 2, 3]
            await m.idle()
        async with miner(tmp_path) as m:
            assert await m.pledge() == 4
            assert [i.number for i in m.list()] == [1, 2, 3, 4]
            assert [i.number for i in m.list(states=["Proving"])] == [1, 2, 3]

    run(body)


def test_exit_codes_out_of_gas_retries_the_precommit(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            m.chain.faults.message_exits["PreCommitSector"] = [ExitCode.SysErrOutOfGas]
            n = await m.pledge()
            info = await m.wait(n, "Proving", timeout=86400)
            assert "SectorRetryPreCommit" in kinds(info)

    run(body)


def test_log_truncation_keeps_a_visible_marker() -> None:
    info = SectorInfo()
    for i in range(8001):
        log_append(info, LogEntry(i, "event;SectorRestart", str(i)))
    log_append(info, LogEntry(9000, "event;SectorPacked", "last"))
    assert len(info.log) == 8001 - 4000 + 1 + 1
    assert info.log[2000].kind == "truncate" and "dropped" in info.log[2000].message
    assert info.log[1999].message == "1999" and info.log[2001].message == "6000"
    assert info.log[-1].message == "last"


def test_retry_policy_backs_off_exponentially() -> None:
    from sectorfsm.sealing.config import RetryPolicy

    p = RetryPolicy(base=10, factor=3, cap=200, budget=5)
    assert [p.delay(i) for i in range(5)] == [10, 30, 90, 200, 200]
    with pytest.raises(ValueError):
        RetryPolicy(factor=0.5)
    with pytest.raises(ValueError, match="unknown sealing option"):
        SealingConfig.from_dict({"nope": 1})


def test_pc1_on_another_worker_fetches_the_unsealed_file(tmp_path: Path) -> None:
    from sectorfsm.sched import FileType, StoragePath, WorkerResources, WorkerSpec

    res = WorkerResources(cpus=8, mem_physical=1 << 40, mem_swap=0)
    ap = frozenset({TaskType.ADD_PIECE})
    workers = [
        WorkerSpec("w1", res, ap, (StoragePath("p1", "w1", 1 << 40),), needs_heartbeats=False),
        WorkerSpec(
            "w2",
            res,
            frozenset(TaskType) - ap,
            (StoragePath("p2", "w2", 1 << 40, can_store=True),),
            needs_heartbeats=False,
        ),
    ]

    async def body() -> None:
        async with miner(tmp_path, workers=workers) as m:
            n = await m.pledge()
            info = await m.wait(n, "WaitSeed", timeout=86400)
            ref = m.sealing.ref(info)
            # AddPiece ran on w1; PC1 ran on w2 and moved the unsealed file there (as Lotus).
            assert m.sched.index.find_sector(ref, FileType.UNSEALED) == {"p2": FileType.UNSEALED}
            assert set(m.sched.index.find_sector(ref, FileType.CACHE)) == {"p2"}
            assert m.sched.index.paths["p1"].used == 0
        # The move is persisted: a restarted engine knows where the files are.
        async with miner(tmp_path, workers=workers) as m:
            assert m.sched.index.find_sector(ref, FileType.UNSEALED) == {"p2": FileType.UNSEALED}
            await m.wait(n, "Proving", timeout=86400)

    run(body)


def test_restart_keeps_a_full_sector_full(tmp_path: Path) -> None:
    async def body() -> None:
        clock = VirtualClock()
        a, b, c = (commp.piece_cid(bytes([i]) * 100) for i in range(3))
        async with miner(tmp_path, clock=clock, config=SLOW_SEAL) as m:
            first = await m.add_piece(a, 128)
            assert await m.add_piece(b, 1024) == first  # 128 + 896 padding + 1024 = full
        async with miner(tmp_path, clock=clock, config=SLOW_SEAL) as m:
            assert m.input.open_sectors[first] == 2048
            other = await m.add_piece(c, 512)
            assert other != first
            info = await m.wait(other, "Proving", timeout=10 * DAY)
            assert info.pieces[0].piece_cid == c
            assert "SectorAddPieceFailed" not in kinds(await m.wait(first, "Proving"))

    run(body)


@pytest.mark.parametrize("block_time", [0.02, 0.08, 0.2, 0.3, 1.0, 9.9])
def test_the_devnet_head_is_the_epoch_just_waited_for(tmp_path: Path, block_time: float) -> None:
    """`wait_epoch(e)` wakes at the start of `e`: the head is then `e`, never `e - 1`.

    Before, float division put the head one epoch back for most epochs at most block
    times; a handler that waited for an epoch and looked again found it still ahead.
    """
    from sectorfsm.fsm import LmdbStore, VirtualClock
    from sectorfsm.sealing.chain import ChainParams
    from sectorfsm.sealing.devnet import DevnetChain

    async def body() -> None:
        clock = VirtualClock(start=1_600_000_123.456)
        async with LmdbStore(tmp_path / "store", durability="nosync") as store:
            chain = DevnetChain(store, clock, ChainParams.devnet(block_time), miner=1000)
            for epoch in range(chain.head() + 1, chain.head() + 400, 7):
                await chain.wait_epoch(epoch)
                assert chain.head() == epoch

    run(body)
