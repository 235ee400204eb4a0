"""Every failure path of Lotus's failed-state handlers, driven by fault injection on virtual time.

Lotus: `extern/storage-sealing/states_failed.go@v1.11.3`.

Each test ends where Lotus would end, or where our documented difference (graph.DEVIATIONS)
says the sector goes instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sealtools import count, kinds, miner, run

from sectorfsm.fsm import VirtualClock
from sectorfsm.sched import TaskType
from sectorfsm.sealing import commp
from sectorfsm.sealing.chain import ExitCode
from sectorfsm.sealing.events import SectorPacked, SectorTicket
from sectorfsm.sealing.info import DealInfo, SectorInfo
from sectorfsm.sealing.input import pending_piece
from sectorfsm.sealing.miner import SectorStuckError
from sectorfsm.sealing.planner import Planner
from sectorfsm.sealing.states import SectorState

DAY = 86400.0
FAST = {"retry": {"base": 30.0, "factor": 2.0, "cap": 600.0, "budget": 6}}
#: Deal sectors wait an hour for more pieces, and retries back off slowly.
SLOW_SEAL = {"wait_deals_delay": 3600.0, "retry": {"base": 30.0, "budget": 6}}


def _sim(m):  # type: ignore[no-untyped-def]
    return m.sealer.backend.faults


def test_addpiece_failure_retries_through_waitdeals(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=FAST) as m:
            _sim(m).fail_tasks[TaskType.ADD_PIECE] = 1
            n = await m.add_piece(commp.piece_cid(b"a" * 100), 128)
            await m.wait(n, "AddPieceFailed", timeout=DAY)
            info = await m.wait(n, "WaitDeals", timeout=DAY)
            assert "SectorRetryWaitDeals" in kinds(info)  # deviation: v1.11.3 gets stuck
            # The failed piece was dropped with its deal; a new piece still seals.
            await m.add_piece(commp.piece_cid(b"b" * 100), 128)
            info = await m.wait(n, "Proving", timeout=DAY)
            assert count(info, "SectorAddPieceFailed") == 1

    run(body)


def test_pc1_failure_backs_off_from_a_stored_timestamp(tmp_path: Path) -> None:
    async def body() -> None:
        clock = VirtualClock()
        cfg = {"retry": {"base": 1000.0, "factor": 2.0, "cap": 10_000.0, "budget": 5}}
        async with miner(tmp_path, clock=clock, config=cfg) as m:
            _sim(m).fail_tasks[TaskType.PRE_COMMIT1] = 1
            n = await m.pledge()
            info = await m.wait(n, "SealPreCommit1Failed", timeout=DAY)
            failed_at = info.log[-1].timestamp
            assert info.retry_at == pytest.approx(failed_at + 1000.0, abs=1.0)
        # Restart mid-backoff: the wait is timed from the stored timestamp, not from now.
        clock.advance(10.0)
        async with miner(tmp_path, clock=clock, config=cfg) as m:
            info = await m.wait(n, "Proving", timeout=DAY)
            retry = next(e for e in info.log if e.kind == "event;SectorRetrySealPreCommit1")
            assert retry.timestamp - failed_at in (1000, 1001)
            assert info.retries == 0 and info.retry_at == 0  # reset on reaching Proving

    run(body)


def test_backoff_grows_exponentially_then_the_budget_parks_the_sector(tmp_path: Path) -> None:
    async def body() -> None:
        cfg = {"retry": {"base": 100.0, "factor": 3.0, "cap": 10_000.0, "budget": 3}}
        async with miner(tmp_path, config=cfg) as m:
            _sim(m).fail_tasks[TaskType.PRE_COMMIT1] = 100
            n = await m.pledge()
            info = await m.wait(n, "FailedUnrecoverable", timeout=30 * DAY)
            fails = [e.timestamp for e in info.log if e.kind == "event;SectorSealPreCommit1Failed"]
            retries = [e.timestamp for e in info.log if e.kind == "event;SectorRetrySealPreCommit1"]
            assert [r - f for f, r in zip(fails, retries, strict=False)] == [100, 300, 900]
            assert len(fails) == 4 and len(retries) == 3
            assert info.unrecoverable_from == "SealPreCommit1Failed"
            assert "retry budget of 3" in info.last_err
            assert info.log[-1].kind == "event;SectorRetriesExhausted"
            # Data is kept for the operator: the sector's files are still indexed.
            assert m.sealer.holds(m.sealing.ref(info), m.sched.index.__class__ and _unsealed())
            # `retry` resumes it where it failed, with a fresh budget.
            _sim(m).fail_tasks[TaskType.PRE_COMMIT1] = 0
            await m.retry(n)
            info = await m.wait(n, "Proving", timeout=30 * DAY)
            assert kinds(info)[-14:].count("SectorRetryNow") == 1

    run(body)


def _deal(m, cid: str) -> DealInfo:  # type: ignore[no-untyped-def]
    head = m.chain.head()
    p = m.chain.publish_deal(cid, 128, head + 10_000, head + 600_000)
    return DealInfo(p.deal_id, p.publish_cid, p.start_epoch, p.end_epoch)


def _unsealed():  # type: ignore[no-untyped-def]
    from sectorfsm.sched import FileType

    return FileType.UNSEALED


def test_pc2_failures_restart_from_pc1_after_three(tmp_path: Path) -> None:
    async def body() -> None:
        cfg = {"retry": {"base": 10.0, "factor": 1.0, "cap": 10.0, "budget": 10}}
        async with miner(tmp_path, config=cfg) as m:
            _sim(m).fail_tasks[TaskType.PRE_COMMIT2] = 4
            n = await m.pledge()
            info = await m.wait(n, "Proving", timeout=DAY)
            names = kinds(info)
            assert names.count("SectorSealPreCommit2Failed") == 4
            assert names.count("SectorRetrySealPreCommit2") == 3
            assert names.count("SectorRetrySealPreCommit1") == 1  # PreCommit2Fails > 3
            assert names.count("SectorPreCommit1") == 2

    run(body)


def test_failed_precommit_message_retries_the_precommit(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=FAST) as m:
            m.chain.faults.message_exits["PreCommitSector"] = [ExitCode.ErrIllegalArgument]
            n = await m.pledge()
            info = await m.wait(n, "Proving", timeout=DAY)
            names = kinds(info)
            i = names.index("SectorChainPreCommitFailed")
            assert names[i + 1] == "SectorRetryPreCommit"
            assert len(m.chain.messages("PreCommit")) == 2

    run(body)


def test_precommit_already_on_chain_is_found_not_resent(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=FAST) as m:
            n = await m.pledge()
            await m.wait(n, "WaitSeed", timeout=DAY)
            # An operator pushes the sector back; the handler finds its precommit on chain.
            await m.update_state(n, "PreCommitting")
            info = await m.wait(n, "Proving", timeout=DAY)
            assert len(m.chain.messages("PreCommit")) == 1
            assert count(info, "SectorPreCommitLanded") == 2

    run(body)


def test_compute_proof_failure_retries_then_reseals_after_two(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=FAST) as m:
            _sim(m).fail_tasks[TaskType.COMMIT2] = 1
            n = await m.pledge()
            info = await m.wait(n, "Proving", timeout=DAY)
            assert count(info, "SectorComputeProofFailed") == 1
            assert count(info, "SectorRetryComputeProof") == 1
            assert info.invalid_proofs == 1

            _sim(m).fail_tasks[TaskType.COMMIT2] = 3
            k = await m.pledge()
            info = await m.wait(k, "Proving", timeout=DAY)
            names = kinds(info)
            assert names.count("SectorComputeProofFailed") == 3
            assert names.count("SectorRetryComputeProof") == 2
            assert "SectorSealPreCommit1Failed" in names  # "consecutive compute fails"
            # The precommit was already on chain: PreCommitting found it instead of resending.
            assert len(m.chain.messages("PreCommit")) == 2

    run(body)


def test_commit_message_failure_goes_through_commitfailed(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=FAST) as m:
            m.chain.faults.message_exits["ProveCommitSector"] = [ExitCode.ErrIllegalArgument]
            n = await m.pledge()
            info = await m.wait(n, "Proving", timeout=DAY)
            names = kinds(info)
            assert "SectorCommitFailed" in names
            i = names.index("SectorCommitFailed")
            assert names[i + 1] == "SectorRetryComputeProof"

    run(body)


def test_commit_out_of_gas_resubmits(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=FAST) as m:
            m.chain.faults.message_exits["ProveCommitSector"] = [ExitCode.SysErrOutOfGas]
            n = await m.pledge()
            info = await m.wait(n, "Proving", timeout=DAY)
            assert "SectorRetrySubmitCommit" in kinds(info)
            assert len(m.chain.messages("ProveCommit")) == 2

    run(body)


def test_invalid_proofs_exhaust_the_budget_and_retry_resumes(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=FAST) as m:
            n = 1
            m.chain.faults.reject_proofs.add(n)
            assert await m.pledge() == n
            info = await m.wait(n, "FailedUnrecoverable", timeout=30 * DAY)
            names = kinds(info)
            assert "SectorComputeProofFailed" in names
            assert "SectorSealPreCommit1Failed" in names
            m.chain.faults.reject_proofs.clear()
            await m.retry(n)
            info = await m.wait(n, "Proving", timeout=30 * DAY)
            assert len(m.chain.messages("PreCommit")) == 1

    run(body)


def test_wrong_ticket_is_caught_as_an_invalid_proof(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=FAST) as m:
            _sim(m).wrong_ticket.add(1)
            n = await m.pledge()
            info = await m.wait(n, "ComputeProofFailed", timeout=DAY)
            assert "invalid proof" in info.log[-1].trace
            _sim(m).wrong_ticket.clear()
            # The precommit on chain carries a CommR sealed with the wrong ticket: no proof can
            # match it. Lotus loops on it forever; here the budget parks the sector, data kept.
            with pytest.raises(SectorStuckError, match="retry budget"):
                await m.wait(n, "Proving", timeout=30 * DAY)
            assert len(m.chain.messages("PreCommit")) == 1
            await m.remove(n)
            await m.wait(n, "Removed", timeout=DAY)

    run(body)


def test_finalize_failures(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=FAST) as m:
            _sim(m).fail_tasks[TaskType.FINALIZE] = 1
            n = await m.pledge()
            info = await m.wait(n, "Proving", timeout=DAY)
            assert "SectorFinalizeFailed" in kinds(info) and "SectorRetryFinalize" in kinds(info)
        early = {**FAST, "finalize_early": True}
        async with miner(tmp_path / "early", config=early) as m:
            _sim(m).fail_tasks[TaskType.FINALIZE] = 1
            n = await m.pledge()
            await m.wait(n, "CommitFinalizeFailed", timeout=DAY)
            info = await m.wait(n, "Proving", timeout=DAY)
            names = kinds(info)
            assert "SectorProofReady" in names and names.count("SectorFinalized") == 2

    run(body)


def test_expired_deal_removes_the_sector(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=FAST) as m:
            n = await m.add_piece(commp.piece_cid(b"late" * 30), 128, start_in=1)
            info = await m.wait(n, "Removed", timeout=DAY)
            names = kinds(info)
            assert "SectorDealsExpired" in names and "SectorRemove" in names

    run(body)


def test_invalid_deal_id_is_recovered_and_sealing_returns(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=FAST) as m:
            cid = commp.piece_cid(b"moved" * 20)
            deal = _deal(m, cid)
            n = await m.add_piece(cid, 128, deal=deal)
            new = m.chain.republish_deal(deal.deal_id)
            info = await m.wait(n, "Proving", timeout=DAY)
            names = kinds(info)
            assert "SectorInvalidDealIDs" in names and "SectorUpdateDealIDs" in names
            assert info.pieces[0].deal.deal_id == new.deal_id  # type: ignore[union-attr]
            assert info.return_state == ""

    run(body)


def test_unrecoverable_deal_ids_remove_the_sector(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=FAST) as m:
            cid = commp.piece_cid(b"gone" * 20)
            deal = _deal(m, cid)
            n = await m.add_piece(cid, 128, deal=deal)
            m.chain.alter_deal(deal.deal_id, piece_cid=commp.piece_cid(b"other"))
            info = await m.wait(n, "Removed", timeout=DAY)
            assert "SectorInvalidDealIDs" in kinds(info)

    run(body)


def test_chain_api_error_is_retried_after_backoff(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=FAST) as m:
            m.chain.faults.api_errors = 1
            n = await m.pledge()
            info = await m.wait(n, "Proving", timeout=DAY)
            err = next(e for e in info.log if e.kind == "error;StepFailed")
            assert "ChainApiError" in err.message and "Traceback" in err.trace

    run(body)


def test_seed_change_during_committing_recomputes_the_proof(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=FAST) as m:
            n = await m.pledge()
            info = await m.wait(n, "Committing", timeout=DAY)
            old_seed = info.seed_value
            m.chain.reorg(info.seed_epoch)
            info = await m.wait(n, "Proving", timeout=DAY)
            assert info.seed_value != old_seed
            assert info.seed_value == m.chain.beacon_randomness(info.seed_epoch)
            assert count(info, "SectorSeedReady") == 2

    run(body)


def test_remove_during_a_long_pc1_cancels_the_task(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, sector_size="32GiB", chain="mainnet") as m:
            n = await m.pledge()
            await m.wait(n, "PreCommit1", timeout=DAY)
            started = m.clock.now()
            await m.remove(n)
            info = await m.wait(n, "Removed", timeout=DAY)
            assert m.clock.now() - started < 600  # PC1 alone would take 3.5 h
            assert m.sched.jobs() == []
            assert "SectorPreCommit1" not in kinds(info)
            assert not m.sealer.holds(m.sealing.ref(info), _unsealed())

    run(body)


def test_terminate_a_proving_sector(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=FAST) as m:
            n = await m.pledge()
            await m.wait(n, "Proving", timeout=DAY)
            await m.terminate(n)
            info = await m.wait(n, "Removed", timeout=DAY)
            names = kinds(info)
            for ev in ("SectorTerminate", "SectorTerminating", "SectorTerminated", "SectorRemoved"):
                assert ev in names
            assert m.chain.sector_info(n) is None
            assert len(m.chain.messages("TerminateSectors")) == 1

    run(body)


def test_terminating_a_precommitted_sector_pauses_in_terminatefailed(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=FAST) as m:
            n = await m.pledge()
            await m.wait(n, "WaitSeed", timeout=DAY)
            await m.terminate(n)
            info = await m.wait(n, "TerminateFailed", timeout=DAY)
            assert "remove instead of terminating" in info.log[-1].trace
            await m.idle()
            assert m.status(n).state is SectorState.TerminateFailed  # waits for an operator
            await m.remove(n)
            await m.wait(n, "Removed", timeout=DAY)

    run(body)


def test_remove_failure_retries(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=FAST) as m:
            n = await m.pledge()
            await m.wait(n, "Proving", timeout=DAY)
            _sim(m).fail_remove = 1
            await m.remove(n)
            info = await m.wait(n, "Removed", timeout=DAY)
            assert "SectorRemoveFailed" in kinds(info)

    run(body)


def test_unexpected_event_is_logged_and_consumed(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=FAST) as m:
            n = await m.pledge()
            await m.wait(n, "Proving", timeout=DAY)
            await m.group.send(n, SectorPacked())
            await m.idle()
            info = m.status(n)
            assert info.state is SectorState.Proving
            assert info.log[-1].kind == "error;PlanError"
            assert "received unexpected event SectorPacked" in info.log[-1].message
            assert m.group.info(n).pending_events == 0  # type: ignore[union-attr]

    run(body)


def test_committing_consumes_an_unknown_event_instead_of_looping(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            info = SectorInfo(state=SectorState.Committing, number=7)
            _step, processed = Planner(m.sealing).plan([SectorTicket(b"t", 1)], info)
            assert processed == 1  # Lotus returns 0 here and re-plans forever
            assert info.state is SectorState.Committing
            assert "planCommitting got event of unknown type SectorTicket" in info.log[-1].message

    run(body)


def test_a_restart_queued_behind_an_event_is_served_by_that_round(tmp_path: Path) -> None:
    from sectorfsm.fsm import Restart
    from sectorfsm.sealing.events import SectorProving

    async def body() -> None:
        async with miner(tmp_path) as m:
            # After a crash: the event the step sent is in the inbox, Restart comes after it.
            info = SectorInfo(state=SectorState.CommitWait, number=3)
            step, processed = Planner(m.sealing).plan([SectorProving(), Restart()], info)
            assert processed == 2  # else FinalizeSector's handler would start twice
            assert info.state is SectorState.FinalizeSector and step is not None

    run(body)


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
            numbers = m.input.assign(
                [pending_piece(m.chain, m.sector_size, c, 128, None) for c in cids]
            )
            await m.store.committer.waiter()
            assert len(set(numbers)) == 1
            info = await m.wait(numbers[0], "Proving", timeout=10 * DAY)
            sealed = [p.piece_cid for p in info.pieces if p.deal is not None]
            assert sealed == [cids[0], cids[2]]  # the first was kept, the third retried
            failed = next(e for e in info.log if e.kind == "event;SectorAddPieceFailed")
            assert "disk hiccup" in failed.trace and "deal 2" in failed.trace

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
