"""Lotus's sector checks (`extern/storage-sealing/checks.go@v1.11.3`): pieces, precommit and commit.

Each failure is a `CheckError` subclass named as in Lotus, so handlers map them to events the
way Lotus does. A chain API failure becomes `ErrApi`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import commp
from .chain import ChainApiError, PreCommitOnChain
from .info import SectorInfo

if TYPE_CHECKING:
    from .pipeline import Sealing


class CheckError(Exception):
    """A sector check failed."""


class ErrApi(CheckError):
    """The chain API failed; try again later."""


class ErrInvalidDeals(CheckError):
    """A deal does not match its piece (or is gone)."""


class ErrInvalidPiece(CheckError):
    """A filler piece has the wrong commitment, or a piece is misaligned."""


class ErrExpiredDeals(CheckError):
    """A deal's start epoch has passed."""


class ErrBadCommD(CheckError):
    """CommD does not match the pieces."""


class ErrExpiredTicket(CheckError):
    """The ticket is older than the randomness lookback."""


class ErrBadTicket(CheckError):
    """The precommit on chain used another ticket."""


class ErrPrecommitOnChain(CheckError):
    """The precommit is already on chain."""


class ErrSectorNumberAllocated(CheckError):
    """The sector number is used on chain, with no matching precommit."""


class ErrBadSeed(CheckError):
    """The seed is missing, or differs from the chain's."""


class ErrInvalidProof(CheckError):
    """The proof does not verify."""


class ErrNoPrecommit(CheckError):
    """There is no precommit on chain."""


class ErrCommitWaitFailed(CheckError):
    """The sector is already committed; wait for the commit message instead."""


def check_pieces(s: Sealing, info: SectorInfo) -> None:
    """Fillers carry the zero commitment; deals exist, match and have not started."""
    try:
        head = s.chain.head()
    except ChainApiError as exc:
        raise ErrApi(f"getting chain head: {exc}") from exc
    offset = 0
    for i, p in enumerate(info.pieces):
        if p.size <= 0 or offset % p.size:
            raise ErrInvalidPiece(f"piece {i} ({p.piece_cid}) is not aligned at offset {offset}")
        offset += p.size
        if p.deal is None:
            if p.piece_cid != commp.zero_piece_cid(p.size):
                raise ErrInvalidPiece(f"deal-less piece {i} is not a zero piece: {p.piece_cid}")
            continue
        try:
            deal = s.chain.deal(p.deal.deal_id)
        except ChainApiError as exc:
            raise ErrApi(f"getting deal {p.deal.deal_id}: {exc}") from exc
        if deal is None:
            raise ErrInvalidDeals(f"deal {p.deal.deal_id} of piece {i} not found on chain")
        if deal.provider != s.chain.miner:
            raise ErrInvalidDeals(
                f"piece {i} deal {p.deal.deal_id} is for provider f0{deal.provider}, "
                f"not f0{s.chain.miner}"
            )
        if deal.piece_cid != p.piece_cid:
            raise ErrInvalidDeals(
                f"piece {i} ({p.piece_cid}) does not match deal {p.deal.deal_id}'s piece "
                f"{deal.piece_cid}"
            )
        if deal.piece_size != p.size:
            raise ErrInvalidDeals(
                f"piece {i} size {p.size} does not match deal {p.deal.deal_id}'s {deal.piece_size}"
            )
        if head >= deal.start_epoch:
            raise ErrExpiredDeals(
                f"piece {i} deal {p.deal.deal_id} should have started at epoch "
                f"{deal.start_epoch}, head is {head}"
            )


def check_precommit(s: Sealing, info: SectorInfo, head: int) -> None:
    """Pieces, CommD, an existing precommit, the sector number and the ticket's age."""
    check_pieces(s, info)
    if info.has_deals:
        expected = commp.unsealed_cid(
            info.sector_size, [(p.piece_cid, p.size) for p in info.pieces]
        )
        if info.comm_d != expected:
            raise ErrBadCommD(f"on chain CommD differs from sector: {expected} != {info.comm_d}")
    try:
        pci = s.chain.precommit_info(info.number)
        allocated = pci is None and s.chain.sector_allocated(info.number)
    except ChainApiError as exc:
        raise ErrApi(f"getting precommit info: {exc}") from exc
    if pci is not None:
        if pci.info.seal_rand_epoch != info.ticket_epoch:
            raise ErrBadTicket(
                f"bad ticket epoch: {info.ticket_epoch} != {pci.info.seal_rand_epoch}"
            )
        raise ErrPrecommitOnChain("precommit already on chain")
    if allocated:
        raise ErrSectorNumberAllocated(f"sector number {info.number} is allocated on chain")
    lookback = s.chain.params.max_pre_commit_randomness_lookback
    if info.ticket_epoch < head - lookback:
        raise ErrExpiredTicket(
            f"ticket expired: seal height {info.ticket_epoch}, head {head}, lookback {lookback}"
        )


def precommit_or_none(s: Sealing, number: int) -> PreCommitOnChain | None:
    """The precommit on chain; chain errors become `ErrApi`."""
    try:
        return s.chain.precommit_info(number)
    except ChainApiError as exc:
        raise ErrApi(f"getting precommit info: {exc}") from exc


def check_commit(s: Sealing, info: SectorInfo, proof: bytes) -> None:
    """The seed matches the chain, and the proof verifies against the precommit."""
    if info.seed_epoch == 0:
        raise ErrBadSeed("seed epoch was not set")
    pci = precommit_or_none(s, info.number)
    if pci is None:
        try:
            committed = s.chain.sector_info(info.number) is not None
        except ChainApiError as exc:
            raise ErrApi(f"getting sector info: {exc}") from exc
        if committed and info.commit_message is not None:
            raise ErrCommitWaitFailed("sector is already committed; waiting for the message")
        if committed:
            raise CheckError("sector is committed on chain but no commit message is known")
        raise ErrNoPrecommit("precommit info not found on-chain")
    delay = s.chain.params.pre_commit_challenge_delay
    if pci.precommit_epoch + delay != info.seed_epoch:
        raise ErrBadSeed(
            f"bad seed: expected seed epoch {pci.precommit_epoch + delay}, had {info.seed_epoch}"
        )
    try:
        seed = s.chain.beacon_randomness(info.seed_epoch)
        ok = s.chain.verify_seal(
            info.number,
            pci.info.sealed_cid,
            info.comm_d or "",
            info.ticket_value,
            info.seed_value,
            proof,
        )
    except ChainApiError as exc:
        raise ErrApi(f"checking the commit: {exc}") from exc
    if seed != info.seed_value:
        raise ErrBadSeed("seed has changed")
    if not ok:
        raise ErrInvalidProof("invalid proof (compute error?)")
    check_pieces(s, info)
