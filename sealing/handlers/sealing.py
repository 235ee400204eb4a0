"""Happy-path handlers.

Lotus: `extern/storage-sealing/states_sealing.go@v1.11.3` and
`extern/storage-sealing/input.go@v1.11.3`.

A handler gets a copy of the SectorInfo and acts only through `ctx.send(event)`. Each one is
safe to re-run after a crash: before sending a chain message it looks for the one it may
already have sent, and the message and its event are staged in the same commit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...fsm import Context
from .. import commp
from ..chain import ChainApiError, ExitCode, PreCommitParams, ProveCommit
from ..checks import (
    CheckError,
    ErrApi,
    ErrBadCommD,
    ErrBadTicket,
    ErrExpiredDeals,
    ErrExpiredTicket,
    ErrInvalidDeals,
    ErrPrecommitOnChain,
    ErrSectorNumberAllocated,
    check_commit,
    check_pieces,
    check_precommit,
)
from ..events import (
    SectorAddPiece,
    SectorAddPieceFailed,
    SectorChainPreCommitFailed,
    SectorCommitAggregateSent,
    SectorCommitFailed,
    SectorCommitSubmitted,
    SectorCommitted,
    SectorComputeProofFailed,
    SectorDealsExpired,
    SectorFinalized,
    SectorFinalizeFailed,
    SectorInvalidDealIDs,
    SectorOldTicket,
    SectorPacked,
    SectorPieceAdded,
    SectorPreCommit1,
    SectorPreCommit2,
    SectorPreCommitBatch,
    SectorPreCommitBatchSent,
    SectorPreCommitLanded,
    SectorPreCommitted,
    SectorProofReady,
    SectorProving,
    SectorRemove,
    SectorRetryCommitWait,
    SectorRetryPreCommit,
    SectorRetrySubmitCommit,
    SectorSealPreCommit1Failed,
    SectorSealPreCommit2Failed,
    SectorSeedReady,
    SectorStartPacking,
    SectorSubmitCommitAggregate,
    SectorTicket,
)
from ..info import PendingPiece, Piece, SectorInfo, aligned_end
from ..sealer import PreCommit2Out

if TYPE_CHECKING:
    from ..pipeline import Sealing

RETRYABLE_EXITS = (ExitCode.SysErrInsufficientFunds, ExitCode.SysErrOutOfGas)


# -- input: WaitDeals, AddPiece, Packing ----------------------------------------------------


async def handle_wait_deals(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Start packing when full or when the seal delay passes; otherwise arm a timer."""
    if info.pending_pieces:
        ctx.send(SectorAddPiece())  # pieces assigned while AddPiece ran: write them first
        return
    deals = sum(1 for p in info.pieces if p.deal is not None)
    if deals >= s.deal_limit:
        ctx.send(SectorStartPacking())
        return
    if info.used_space() >= info.sector_size:
        ctx.send(SectorStartPacking())
        return
    if info.creation_time == 0:
        s.input.open_sector(info)
        return
    seal_at = info.creation_time + s.config.wait_deals_delay
    # A deal must be sealed before it starts: never wait past its safe sealing time.
    starts = [p.deal.start_epoch for p in info.pieces if p.deal is not None]
    if starts:
        safe_epoch = min(starts) - s.config.start_epoch_sealing_buffer
        seal_at = min(seal_at, s.chain.epoch_time(safe_epoch))
    s.input.open_sector(info)
    if s.clock.now() >= seal_at:
        ctx.send(SectorStartPacking())
        return
    s.input.arm_timer(info.number, seal_at, ctx, SectorStartPacking())


def required_padding(existing: list[int], size: int) -> list[int]:
    """Filler piece sizes that align a piece of padded `size` after `existing` pieces."""
    offset = sum(existing)
    pads: list[int] = []
    rem = (size - offset % size) % size
    bit = 1
    while rem:
        if rem & bit:
            pads.append(bit)
            rem -= bit
        bit <<= 1
    return pads


def fillers_from_rem(rem_unpadded: int) -> list[int]:
    """Padded sizes of the filler pieces that fill `rem_unpadded` bytes (Lotus FillersFromRem)."""
    to_fill = rem_unpadded + rem_unpadded // 127
    out = []
    bit = 1
    while to_fill:
        if to_fill & bit:
            out.append(bit)
            to_fill -= bit
        bit <<= 1
    return out


async def handle_add_piece(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Write the assigned pieces (with alignment fillers) and check each one's CommP.

    A piece that no longer fits goes to another sector in the same commit; a piece that fails
    fails alone: what was written before it is kept and what comes after it is retried.
    """
    ref = s.ref(info)
    existing = [p.size for p in info.pieces]
    added: list[Piece] = []
    used = sum(existing)
    fits: list[PendingPiece] = []
    moved = []
    for p in info.pending_pieces:
        end = aligned_end(used, p.size)
        if end > info.sector_size:
            moved.append(p)
        else:
            fits.append(p)
            used = end
    for piece in fits:
        try:
            for pad in required_padding(existing, piece.size):
                filler = await s.sealer.add_piece(ref, existing, pad, None)
                if filler.piece_cid != commp.zero_piece_cid(pad):
                    raise CheckError(f"filler of {pad} bytes has CommP {filler.piece_cid}")
                added.append(filler)
                existing.append(pad)
            written = await s.sealer.add_piece(ref, existing, piece.size, piece)
            if written.piece_cid != piece.piece_cid:
                raise CheckError(
                    f"piece CID mismatch: the deal declares {piece.piece_cid}, "
                    f"the data gives {written.piece_cid}"
                )
        except Exception as exc:
            s.input.assign(moved)
            ctx.send(
                SectorAddPieceFailed(
                    f"writing piece {piece.piece_cid} (deal {piece.deal.deal_id}): {exc}",
                    added,
                    [piece, *moved],
                )
            )
            return
        added.append(Piece(piece.piece_cid, piece.size, piece.deal))
        existing.append(piece.size)
    s.input.assign(moved)  # staged with the event below: the move commits atomically
    ctx.send(SectorPieceAdded(added, moved))


async def handle_packing(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Fill the rest of the sector with zero pieces."""
    s.input.close_sector(info.number)
    used = sum(p.size for p in info.pieces)
    rem = commp.unpadded_size(info.sector_size) - used * 127 // 128
    fillers: list[Piece] = []
    ref = s.ref(info)
    existing = [p.size for p in info.pieces]
    for size in fillers_from_rem(rem):
        filler = await s.sealer.add_piece(ref, existing, size, None, worker=info.ap_worker)
        if filler.piece_cid != commp.zero_piece_cid(size):
            raise CheckError(f"filler of {size} bytes has CommP {filler.piece_cid}")
        fillers.append(filler)
        existing.append(size)
    ctx.send(SectorPacked(fillers))


# -- ticket and PreCommit1/2 -------------------------------------------------------------------


async def handle_get_ticket(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Draw the ticket (reusing the precommit's if one is on chain)."""
    chain = s.chain
    head = chain.head()
    ticket_epoch = head - chain.params.seal_randomness_lookback
    pci = chain.precommit_info(info.number)
    error = ""
    if pci is not None:
        ticket_epoch = pci.info.seal_rand_epoch
        if head > pci.precommit_epoch + chain.params.max_prove_commit_duration:
            error = "ticket expired for precommitted sector"
    elif chain.sector_allocated(info.number):
        error = "sector precommitted but expired"
    if error:
        if info.commit_message is not None:
            ctx.send(SectorCommitFailed(f"getting ticket failed: {error}"))
        else:
            ctx.send(SectorRemove())
        return
    ctx.send(SectorTicket(chain.ticket_randomness(ticket_epoch), ticket_epoch))


def _deal_check_event(info: SectorInfo, exc: CheckError, return_state: str) -> object | None:
    if isinstance(exc, ErrInvalidDeals):
        return SectorInvalidDealIDs(return_state)
    if isinstance(exc, ErrExpiredDeals):
        return SectorDealsExpired(str(exc))
    return None


async def handle_pre_commit1(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Check pieces and the ticket's age, then run PreCommit1 on a worker."""
    try:
        check_pieces(s, info)
    except CheckError as exc:
        ev = _deal_check_event(info, exc, "PreCommit1")
        if ev is None:
            raise
        ctx.send(ev)
        return
    chain = s.chain
    head = chain.head()
    if head - info.ticket_epoch > chain.params.max_pre_commit_randomness_lookback:
        pci = chain.precommit_info(info.number)
        if pci is None or head > pci.precommit_epoch + chain.params.max_prove_commit_duration:
            ctx.send(SectorOldTicket())
            return
    try:
        out = await s.sealer.seal_pre_commit1(
            s.ref(info), info.ticket_value, info.pieces, info.has_deals
        )
    except Exception as exc:
        ctx.send(SectorSealPreCommit1Failed(f"seal pre commit(1) failed: {exc}"))
        return
    ctx.send(SectorPreCommit1(out))


async def handle_pre_commit2(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Run PreCommit2 where the PC1 output is."""
    try:
        cids = await s.sealer.seal_pre_commit2(s.ref(info), info.precommit1_out, info.has_deals)
    except Exception as exc:
        ctx.send(SectorSealPreCommit2Failed(f"seal pre commit(2) failed: {exc}"))
        return
    if not cids.unsealed:
        ctx.send(SectorSealPreCommit1Failed("seal pre commit(2) returned undefined CommD"))
        return
    ctx.send(SectorPreCommit2(cids.sealed, cids.unsealed))


# -- precommit ---------------------------------------------------------------------------------


def pre_commit_params(
    s: Sealing, ctx: Context, info: SectorInfo, return_state: str
) -> tuple[PreCommitParams, int] | None:
    """Check the sector and build its precommit; None when an event was sent instead."""
    chain = s.chain
    head = chain.head()
    try:
        check_precommit(s, info, head)
    except ErrApi:
        raise
    except (ErrBadCommD, ErrExpiredTicket, ErrBadTicket) as exc:
        ctx.send(SectorSealPreCommit1Failed(f"checkPrecommit sanity check error: {exc}"))
        return None
    except ErrPrecommitOnChain:
        ctx.send(SectorPreCommitLanded(head))
        return None
    except ErrSectorNumberAllocated:
        raise
    except CheckError as exc:
        ev = _deal_check_event(info, exc, return_state)
        ctx.send(ev if ev is not None else SectorChainPreCommitFailed(f"precommit check: {exc}"))
        return None
    p = chain.params
    ends = [pc.deal.end_epoch for pc in info.pieces if pc.deal is not None]
    expiration = max(ends) if ends else head + p.max_sector_expiration_extension
    lowest = (
        info.ticket_epoch
        + p.max_pre_commit_randomness_lookback
        + p.max_prove_commit_duration
        + p.min_sector_expiration
    )
    highest = head + p.pre_commit_challenge_delay + p.max_sector_expiration_extension
    expiration = min(max(expiration, lowest), highest)
    params = PreCommitParams(
        info.number,
        info.sector_type,
        info.comm_r or "",
        info.ticket_epoch,
        tuple(pc.deal.deal_id for pc in info.pieces if pc.deal is not None),
        expiration,
        info.comm_d,
    )
    return params, chain.precommit_deposit(params)


def sent_message(s: Sealing, method: str, number: int) -> str | None:
    """A message for this sector that was already sent and has not failed (crash recovery)."""
    cid = s.chain.find_message(method, number)
    if cid is None:
        return None
    receipt = s.chain.search_msg(cid)
    if receipt is not None and receipt.exit_code is not ExitCode.Ok:
        return None
    return cid


async def handle_pre_committing(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Batch the precommit, or send it as one message (v1.11.3 `handlePreCommitting`)."""
    if s.config.batch_pre_commits:
        ctx.send(SectorPreCommitBatch())
        return
    found = sent_message(s, "PreCommit", info.number)
    if found is not None:
        ctx.send(SectorPreCommitted(found, info.precommit_deposit))
        return
    built = pre_commit_params(s, ctx, info, "PreCommitting")
    if built is None:
        return
    params, deposit = built
    try:
        msg = s.chain.send_precommits([params], deposit)
    except ChainApiError as exc:
        ctx.send(SectorChainPreCommitFailed(f"pushing message to mpool: {exc}"))
        return
    ctx.send(SectorPreCommitted(msg, deposit))


async def handle_submit_pre_commit_batch(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Hand the precommit to the batcher; it sends SectorPreCommitBatchSent when it flushes."""
    if info.comm_d is None or info.comm_r is None:
        ctx.send(SectorSealPreCommit1Failed("sector had nil commR or commD"))
        return
    found = sent_message(s, "PreCommit", info.number)
    if found is not None:
        ctx.send(SectorPreCommitBatchSent(found))
        return
    built = pre_commit_params(s, ctx, info, "PreCommitting")
    if built is None:
        return
    await s.precommit_batcher.add(ctx, info, *built)


async def handle_pre_commit_wait(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Wait for the precommit message (PreCommitWait and PreCommitBatchWait)."""
    if info.precommit_message is None:
        ctx.send(SectorChainPreCommitFailed("precommit message was nil"))
        return
    try:
        receipt = await s.chain.wait_msg(info.precommit_message, s.chain.params.message_confidence)
    except ChainApiError as exc:
        ctx.send(SectorChainPreCommitFailed(f"waiting for precommit message: {exc}"))
        return
    if receipt.exit_code is ExitCode.Ok:
        ctx.send(SectorPreCommitLanded(receipt.epoch))
    elif receipt.exit_code in RETRYABLE_EXITS:
        ctx.send(SectorRetryPreCommit())
    else:
        ctx.send(
            SectorChainPreCommitFailed(
                f"precommit message failed: exit {receipt.exit_code.name} {receipt.error}"
            )
        )


async def handle_wait_seed(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Wait until the seed epoch is final enough, then read the seed."""
    chain = s.chain
    pci = chain.precommit_info(info.number)
    if pci is None:
        ctx.send(SectorChainPreCommitFailed("precommit info not found on chain"))
        return
    rand_height = pci.precommit_epoch + chain.params.pre_commit_challenge_delay
    s.watch_seed(info.number, rand_height, ctx)
    await chain.wait_epoch(rand_height + chain.params.interactive_porep_confidence)
    try:
        seed = chain.beacon_randomness(rand_height)
    except ChainApiError as exc:
        ctx.send(SectorChainPreCommitFailed(f"getting beacon randomness: {exc}"))
        return
    ctx.send(SectorSeedReady(seed, rand_height))


# -- commit ------------------------------------------------------------------------------------


async def handle_committing(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Compute the proof (C1 then C2) and check it against the chain."""
    if info.commit_message is not None:
        # Lotus goes back to CommitWait whenever the message is found, even a failed one,
        # which loops CommitFailed -> Committing -> CommitWait forever; only a message that
        # succeeded (or has not executed yet) is worth waiting for.
        receipt = s.chain.search_msg(info.commit_message)
        if receipt is None or receipt.exit_code is ExitCode.Ok:
            ctx.send(SectorRetryCommitWait())
            return
    if info.comm_d is None or info.comm_r is None:
        ctx.send(SectorCommitFailed("sector had nil commR or commD"))
        return
    s.watch_seed(info.number, info.seed_epoch, ctx)
    ref = s.ref(info)
    cids = PreCommit2Out(info.comm_r, info.comm_d)
    try:
        c1 = await s.sealer.seal_commit1(
            ref, info.ticket_value, info.seed_value, info.pieces, cids, info.has_deals
        )
    except Exception as exc:
        ctx.send(SectorComputeProofFailed(f"computing seal proof failed(1): {exc}"))
        return
    try:
        proof = await s.sealer.seal_commit2(ref, c1, info.has_deals)
    except Exception as exc:
        ctx.send(SectorComputeProofFailed(f"computing seal proof failed(2): {exc}"))
        return
    try:
        check_commit(s, info, proof)
    except ErrApi:
        raise
    except CheckError as exc:
        ctx.send(SectorComputeProofFailed(f"commit check error: {exc}"))
        return
    ctx.send(SectorProofReady(proof) if s.config.finalize_early else SectorCommitted(proof))


async def handle_submit_commit(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Aggregate, or send one ProveCommitSector (v1.11.3 `handleSubmitCommit`)."""
    if s.config.aggregate_commits:
        ctx.send(SectorSubmitCommitAggregate())
        return
    found = sent_message(s, "ProveCommit", info.number)
    if found is not None:
        ctx.send(SectorCommitSubmitted(found))
        return
    try:
        check_commit(s, info, info.proof)
    except ErrApi:
        raise
    except CheckError as exc:
        ctx.send(SectorCommitFailed(f"commit check error: {exc}"))
        return
    try:
        msg = s.chain.send_prove_commits([ProveCommit(info.number, info.proof)], False)
    except ChainApiError as exc:
        ctx.send(SectorCommitFailed(f"pushing message to mpool: {exc}"))
        return
    ctx.send(SectorCommitSubmitted(msg))


async def handle_submit_commit_aggregate(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Hand the proof to the aggregator; it sends SectorCommitAggregateSent when it flushes."""
    if info.comm_d is None or info.comm_r is None:
        ctx.send(SectorCommitFailed("sector had nil commR or commD"))
        return
    found = sent_message(s, "ProveCommit", info.number)
    if found is not None:
        ctx.send(SectorCommitAggregateSent(found))
        return
    await s.commit_batcher.add(ctx, info)


async def handle_commit_wait(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Wait for the commit message, then for the sector to be active (CommitWait, ...Aggregate)."""
    if info.commit_message is None:
        ctx.send(SectorCommitFailed("entered commit wait with no commit cid"))
        return
    chain = s.chain
    try:
        receipt = await chain.wait_msg(info.commit_message, chain.params.message_confidence)
    except ChainApiError as exc:
        ctx.send(SectorCommitFailed(f"failed to wait for porep inclusion: {exc}"))
        return
    if receipt.exit_code in RETRYABLE_EXITS:
        ctx.send(SectorRetrySubmitCommit())
        return
    if receipt.exit_code is not ExitCode.Ok:
        ctx.send(
            SectorCommitFailed(
                f"submitting sector proof failed (exit={receipt.exit_code.name}, "
                f"msg={info.commit_message}) (t:{info.ticket_value.hex()}; "
                f"s:{info.seed_value.hex()}; p:{info.proof.hex()}) {receipt.error}"
            )
        )
        return
    try:
        on_chain = chain.sector_info(info.number)
    except ChainApiError as exc:
        ctx.send(SectorCommitFailed(f"proof validation failed, calling StateSectorGetInfo: {exc}"))
        return
    if on_chain is None:
        ctx.send(SectorCommitFailed("proof validation failed, sector not found in sector set"))
        return
    ctx.send(SectorProving())


async def handle_finalize_sector(s: Sealing, ctx: Context, info: SectorInfo) -> None:
    """Finalize: drop scratch files, keep the unsealed copy of deals that ask for it."""
    keep = any(
        p.deal is not None and (p.deal.keep_unsealed or s.config.always_keep_unsealed_copy)
        for p in info.pieces
    )
    try:
        await s.sealer.finalize_sector(s.ref(info), keep)
    except Exception as exc:
        ctx.send(SectorFinalizeFailed(f"finalize sector: {exc}"))
        return
    ctx.send(SectorFinalized())
