"""Failed-state handlers (Lotus `extern/storage-sealing/states_failed.go@v1.11.3`).

The cool-down is not here: every failed state's step first waits out the backoff stored in
`SectorInfo.retry_at` (see `planner.run_handler`), or gives the sector up to
FailedUnrecoverable when its retry budget is spent. These handlers then decide, as Lotus
does, where the sector goes back to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...fsm import Context
from ..chain import ChainApiError, ExitCode
from ..checks import (
    CheckError,
    ErrApi,
    ErrBadCommD,
    ErrBadSeed,
    ErrBadTicket,
    ErrCommitWaitFailed,
    ErrExpiredDeals,
    ErrExpiredTicket,
    ErrInvalidDeals,
    ErrInvalidProof,
    ErrNoPrecommit,
    ErrPrecommitOnChain,
    ErrSectorNumberAllocated,
    check_commit,
    check_precommit,
)
from ..events import (
    SectorDealsExpired,
    SectorEvent,
    SectorInvalidDealIDs,
    SectorPreCommitLanded,
    SectorRemove,
    SectorRetryCommitWait,
    SectorRetryComputeProof,
    SectorRetryFinalize,
    SectorRetryInvalidProof,
    SectorRetryPreCommit,
    SectorRetryPreCommitWait,
    SectorRetrySealPreCommit1,
    SectorRetrySealPreCommit2,
    SectorRetrySubmitCommit,
    SectorRetryWaitDeals,
    SectorRetryWaitSeed,
    SectorSealPreCommit1Failed,
    SectorTerminate,
    SectorUpdateDealIDs,
)
from ..info import SectorInfo

if TYPE_CHECKING:
    from ..pipeline import Sealing

#: Lotus: more PreCommit2 failures than this restart from PreCommit1.
MAX_PRE_COMMIT2_FAILS = 3


class Stall(Exception):
    """Lotus would leave the sector where it is; we retry it after the backoff."""


def _message_verdict(
    s: Sealing, message: str | None, rewait: SectorEvent, resend: SectorEvent
) -> SectorEvent | None:
    """What became of the sector's last message: wait on it again, resend it, or look further.

    Lotus's first step in PreCommitFailed and CommitFailed: a message that succeeded or has
    not executed yet is waited on again; one that ran out of gas is sent again.
    """
    if message is None:
        return None
    try:
        receipt = s.chain.search_msg(message)
    except ChainApiError:
        return rewait
    if receipt is None or receipt.exit_code is ExitCode.Ok:
        return rewait
    if receipt.exit_code is ExitCode.SysErrOutOfGas:
        return resend
    return None


async def handle_add_piece_failed(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Back to WaitDeals (Lotus HEAD; v1.11.3 leaves the sector stuck)."""
    ctx.send(SectorRetryWaitDeals())


async def handle_seal_pre_commit1_failed(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Retry PreCommit1 (the budget bounds it; v1.11.3 retries forever)."""
    ctx.send(SectorRetrySealPreCommit1())


async def handle_seal_pre_commit2_failed(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Retry PreCommit2, or PreCommit1 after too many PC2 failures."""
    if info.precommit2_fails > MAX_PRE_COMMIT2_FAILS:
        ctx.send(SectorRetrySealPreCommit1())
    else:
        ctx.send(SectorRetrySealPreCommit2())


async def handle_pre_commit_failed(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Find out what happened to the precommit, then retry from the right place."""
    chain = s.chain
    head = chain.head()
    verdict = _message_verdict(
        s, info.precommit_message, SectorRetryPreCommitWait(), SectorRetryPreCommit()
    )
    if verdict is not None:
        ctx.send(verdict)
        return
    try:
        check_precommit(s, info, head)
    except ErrApi:
        raise
    except (ErrBadCommD, ErrExpiredTicket, ErrBadTicket) as exc:
        ctx.send(SectorSealPreCommit1Failed(f"checkPrecommit sanity check error: {exc}"))
        return
    except ErrInvalidDeals:
        ctx.send(SectorInvalidDealIDs("PreCommitFailed"))
        return
    except ErrExpiredDeals as exc:
        ctx.send(SectorDealsExpired(f"sector deals expired: {exc}"))
        return
    except ErrNoPrecommit:
        ctx.send(SectorRetryPreCommit())
        return
    except ErrPrecommitOnChain:
        pci = chain.precommit_info(info.number)
        if pci is None:
            raise Stall("precommit disappeared from chain") from None
        if info.precommit_message is None:
            ctx.send(SectorPreCommitLanded(head))
            return
        if pci.info.sealed_cid != info.comm_r:
            raise Stall(
                f"sector {info.number} is precommitted on chain with CommR "
                f"{pci.info.sealed_cid}, the sector has {info.comm_r}"
            ) from None
        ctx.send(SectorRetryWaitSeed())
        return
    except ErrSectorNumberAllocated as exc:
        raise Stall(str(exc)) from None
    except CheckError:
        raise
    ctx.send(SectorRetryPreCommit())


async def handle_compute_proof_failed(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Retry the proof; after two failures in a row, reseal from PreCommit1."""
    if info.invalid_proofs > 1:
        ctx.send(SectorSealPreCommit1Failed("consecutive compute fails"))
        return
    ctx.send(SectorRetryComputeProof())


async def handle_commit_failed(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Find out why the commit failed, then retry from the right place."""
    verdict = _message_verdict(
        s, info.commit_message, SectorRetryCommitWait(), SectorRetrySubmitCommit()
    )
    if verdict is not None:
        ctx.send(verdict)
        return
    try:
        check_commit(s, info, info.proof)
    except ErrApi:
        raise
    except ErrBadSeed:
        ctx.send(SectorRetryWaitSeed())
        return
    except ErrInvalidProof:
        if info.invalid_proofs > 0:
            ctx.send(SectorSealPreCommit1Failed("consecutive invalid proofs"))
        else:
            ctx.send(SectorRetryInvalidProof())
        return
    except ErrPrecommitOnChain:
        ctx.send(SectorRetryPreCommitWait())
        return
    except ErrNoPrecommit:
        ctx.send(SectorRetryPreCommit())
        return
    except ErrInvalidDeals:
        ctx.send(SectorInvalidDealIDs("CommitFailed"))
        return
    except ErrExpiredDeals as exc:
        ctx.send(SectorDealsExpired(f"sector deals expired: {exc}"))
        return
    except ErrCommitWaitFailed:
        ctx.send(SectorRetryCommitWait())
        return
    ctx.send(SectorRetryComputeProof())


async def handle_finalize_failed(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Finalize again (CommitFinalizeFailed and FinalizeFailed)."""
    ctx.send(SectorRetryFinalize())


async def handle_remove_failed(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Try removing again."""
    ctx.send(SectorRemove(retry=True))


async def handle_terminate_failed(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Terminate again, unless the sector is only precommitted (then an operator decides)."""
    try:
        pci = s.chain.precommit_info(info.number)
    except ChainApiError:
        pci = None
    if pci is not None:
        return  # Lotus pauses here: a precommitted sector must be removed by hand
    ctx.send(SectorTerminate(retry=True))


async def handle_deals_expired(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """A deal's start passed: remove the sector, unless it is already committed on chain."""
    if s.chain.sector_info(info.number) is not None:
        raise Stall("sector is committed on-chain, but we're in DealsExpired")
    ctx.send(SectorRemove())


async def handle_recover_deal_ids(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Find the current deal id of each piece whose deal no longer matches (Lotus HEAD logic)."""
    chain = s.chain
    head = chain.head()
    updates: dict[int, int] = {}
    for i, p in enumerate(info.pieces):
        if p.deal is None:
            continue
        deal = chain.deal(p.deal.deal_id)
        ok = (
            deal is not None
            and deal.provider == chain.miner
            and deal.piece_cid == p.piece_cid
            and deal.piece_size == p.size
        )
        if ok:
            continue
        if p.deal.start_epoch <= head:
            raise Stall(f"piece {i}'s deal {p.deal.deal_id} has started (epoch {head})")
        if not p.deal.publish_cid:
            ctx.send(SectorRemove())
            return
        found = chain.deal_by_publish_cid(p.deal.publish_cid, p.piece_cid)
        if found is None or found.piece_cid != p.piece_cid:
            ctx.send(SectorRemove())
            return
        updates[i] = found.deal_id
    ctx.send(SectorUpdateDealIDs(updates))
