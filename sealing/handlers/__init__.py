"""State handlers, one module per phase, and the state -> handler map (Lotus `plan()` switch)."""

from __future__ import annotations

from ..planner import Handler
from ..states import SectorState
from . import failed, proving, sealing

S = SectorState

#: The handler of each state (the `switch state.State` at the end of `plan()` in
#: `extern/storage-sealing/fsm.go@v1.11.3`); states not listed have none.
HANDLERS: dict[SectorState, Handler] = {
    S.Empty: sealing.handle_wait_deals,
    S.WaitDeals: sealing.handle_wait_deals,
    S.AddPiece: sealing.handle_add_piece,
    S.Packing: sealing.handle_packing,
    S.GetTicket: sealing.handle_get_ticket,
    S.PreCommit1: sealing.handle_pre_commit1,
    S.PreCommit2: sealing.handle_pre_commit2,
    S.PreCommitting: sealing.handle_pre_committing,
    S.SubmitPreCommitBatch: sealing.handle_submit_pre_commit_batch,
    S.PreCommitBatchWait: sealing.handle_pre_commit_wait,
    S.PreCommitWait: sealing.handle_pre_commit_wait,
    S.WaitSeed: sealing.handle_wait_seed,
    S.Committing: sealing.handle_committing,
    S.SubmitCommit: sealing.handle_submit_commit,
    S.SubmitCommitAggregate: sealing.handle_submit_commit_aggregate,
    S.CommitAggregateWait: sealing.handle_commit_wait,
    S.CommitWait: sealing.handle_commit_wait,
    S.CommitFinalize: sealing.handle_finalize_sector,
    S.FinalizeSector: sealing.handle_finalize_sector,
    S.AddPieceFailed: failed.handle_add_piece_failed,
    S.SealPreCommit1Failed: failed.handle_seal_pre_commit1_failed,
    S.SealPreCommit2Failed: failed.handle_seal_pre_commit2_failed,
    S.PreCommitFailed: failed.handle_pre_commit_failed,
    S.ComputeProofFailed: failed.handle_compute_proof_failed,
    S.CommitFailed: failed.handle_commit_failed,
    S.CommitFinalizeFailed: failed.handle_finalize_failed,
    S.FinalizeFailed: failed.handle_finalize_failed,
    S.DealsExpired: failed.handle_deals_expired,
    S.RecoverDealIDs: failed.handle_recover_deal_ids,
    S.Faulty: proving.handle_faulty,
    S.FaultReported: proving.handle_fault_reported,
    S.Terminating: proving.handle_terminating,
    S.TerminateWait: proving.handle_terminate_wait,
    S.TerminateFinality: proving.handle_terminate_finality,
    S.TerminateFailed: failed.handle_terminate_failed,
    S.Removing: proving.handle_removing,
    S.RemoveFailed: failed.handle_remove_failed,
}
