"""The happy path of a sector, in the order of Lotus's `fsm_events.go@v1.11.3`.

Creation and input, precommit, seed and commit, finalize: each event with its `apply()`
effect on SectorInfo, and the failure events each step can send. Retries live in
`recovery.py`, faults and termination in `proving.py`, global events in `global_events.py`.

Ours, not Lotus's (listed in `graph.DEVIATIONS`): `SectorAddPiece` carries the pieces it
assigns, so an assignment survives a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import sector_size_of
from ..info import PendingPiece, Piece, SectorInfo
from .base import SectorEvent

# -- creation and input --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SectorStart(SectorEvent):
    """A new deal sector (-> WaitDeals)."""

    id: int = 0
    sector_type: int = 0
    #: Pin the sector's AddPiece to this worker ("" = any), for `pledge --per-worker`.
    worker: str = ""
    #: Created by auto-pledge (shown in `status`).
    auto: bool = False

    def apply(self, info: SectorInfo, now: float) -> None:
        """Set number, proof type and the AddPiece pin."""
        info.number = self.id
        info.sector_type = self.sector_type
        info.sector_size = sector_size_of(self.sector_type)
        info.ap_worker = self.worker
        info.auto_pledged = self.auto


@dataclass(frozen=True, slots=True)
class SectorStartCC(SectorEvent):
    """A new committed-capacity sector (-> Packing)."""

    id: int = 0
    sector_type: int = 0
    #: Pin the sector's AddPiece to this worker ("" = any), for `pledge --per-worker`.
    worker: str = ""
    #: Created by auto-pledge (shown in `status`).
    auto: bool = False

    def apply(self, info: SectorInfo, now: float) -> None:
        """Set number, proof type and the AddPiece pin."""
        info.number = self.id
        info.sector_type = self.sector_type
        info.sector_size = sector_size_of(self.sector_type)
        info.ap_worker = self.worker
        info.auto_pledged = self.auto


@dataclass(frozen=True, slots=True)
class SectorAddPiece(SectorEvent):
    """Pieces were assigned to the sector (they travel in the event: see module docstring)."""

    pieces: list[PendingPiece] = field(default_factory=list)

    def apply(self, info: SectorInfo, now: float) -> None:
        """Stamp the creation time once; queue the pieces for AddPiece."""
        if info.creation_time == 0:
            info.creation_time = int(now)
        info.pending_pieces.extend(self.pieces)


def _settle_pending(info: SectorInfo, written: list[Piece], dropped: list[PendingPiece]) -> None:
    """Record written pieces; remove them and the dropped ones from the pending list."""
    info.pieces.extend(written)
    gone = {(p.piece_cid, p.deal.deal_id) for p in written if p.deal is not None}
    gone |= {(p.piece_cid, p.deal.deal_id) for p in dropped}
    info.pending_pieces = [
        p for p in info.pending_pieces if (p.piece_cid, p.deal.deal_id) not in gone
    ]


@dataclass(frozen=True, slots=True)
class SectorPieceAdded(SectorEvent):
    """AddPiece wrote pieces into the unsealed file.

    `dropped` (ours): pending pieces that no longer fit and went to another sector.
    """

    new_pieces: list[Piece] = field(default_factory=list)
    dropped: list[PendingPiece] = field(default_factory=list)

    def apply(self, info: SectorInfo, now: float) -> None:
        """Append the pieces; drop the pending entries they fulfil."""
        _settle_pending(info, self.new_pieces, self.dropped)


@dataclass(frozen=True, slots=True)
class SectorAddPieceFailed(SectorEvent):
    """AddPiece failed on one piece.

    Ours: what was written before the failure is kept (`added`), only the failing piece (and
    any moved elsewhere) is `dropped`, and untried pieces stay pending for the retry.
    """

    error: str = ""
    added: list[Piece] = field(default_factory=list)
    dropped: list[PendingPiece] = field(default_factory=list)

    def apply(self, info: SectorInfo, now: float) -> None:
        """Keep the written pieces; forget the failed one."""
        _settle_pending(info, self.added, self.dropped)


@dataclass(frozen=True, slots=True)
class SectorStartPacking(SectorEvent):
    """Seal now with what the sector holds (Ignorable)."""

    ignorable: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class SectorPacked(SectorEvent):
    """Filler pieces were added."""

    filler_pieces: list[Piece] = field(default_factory=list)

    def apply(self, info: SectorInfo, now: float) -> None:
        """Append the fillers as deal-less pieces."""
        info.pieces.extend(Piece(p.piece_cid, p.size, None) for p in self.filler_pieces)


# -- precommit --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SectorTicket(SectorEvent):
    """A sealing ticket was drawn."""

    ticket_value: bytes = b""
    ticket_epoch: int = 0

    def apply(self, info: SectorInfo, now: float) -> None:
        """Set the ticket."""
        info.ticket_epoch = self.ticket_epoch
        info.ticket_value = self.ticket_value


@dataclass(frozen=True, slots=True)
class SectorOldTicket(SectorEvent):
    """The ticket is too old: draw a new one."""


@dataclass(frozen=True, slots=True)
class SectorPreCommit1(SectorEvent):
    """PreCommit1 finished."""

    precommit1_out: bytes = b""

    def apply(self, info: SectorInfo, now: float) -> None:
        """Keep the output; PC2 failures start counting afresh."""
        info.precommit1_out = self.precommit1_out
        info.precommit2_fails = 0


@dataclass(frozen=True, slots=True)
class SectorPreCommit2(SectorEvent):
    """PreCommit2 finished: CommR (sealed) and CommD (unsealed)."""

    sealed: str = ""
    unsealed: str = ""

    def apply(self, info: SectorInfo, now: float) -> None:
        """Set CommD and CommR."""
        info.comm_d = self.unsealed
        info.comm_r = self.sealed


@dataclass(frozen=True, slots=True)
class SectorPreCommitBatch(SectorEvent):
    """Precommit through the batcher."""


@dataclass(frozen=True, slots=True)
class SectorPreCommitBatchSent(SectorEvent):
    """The precommit batch message went out."""

    message: str = ""

    def apply(self, info: SectorInfo, now: float) -> None:
        """Remember the message."""
        info.precommit_message = self.message


@dataclass(frozen=True, slots=True)
class SectorPreCommitLanded(SectorEvent):
    """The precommit is on chain."""

    tipset: int = 0

    def apply(self, info: SectorInfo, now: float) -> None:
        """Remember where it landed."""
        info.precommit_tipset = self.tipset


@dataclass(frozen=True, slots=True)
class SectorSealPreCommit1Failed(SectorEvent):
    """PreCommit1 failed (or a later check sends the sector back to PC1)."""

    error: str = ""

    def apply(self, info: SectorInfo, now: float) -> None:
        """Reset the proof counters; count PC1 failures (a lifetime count, as in Lotus HEAD)."""
        info.invalid_proofs = 0
        info.precommit2_fails = 0
        info.precommit1_fails += 1


@dataclass(frozen=True, slots=True)
class SectorSealPreCommit2Failed(SectorEvent):
    """PreCommit2 failed."""

    error: str = ""

    def apply(self, info: SectorInfo, now: float) -> None:
        """Count it."""
        info.invalid_proofs = 0
        info.precommit2_fails += 1


@dataclass(frozen=True, slots=True)
class SectorChainPreCommitFailed(SectorEvent):
    """The precommit message failed or could not be sent."""

    error: str = ""


@dataclass(frozen=True, slots=True)
class SectorPreCommitted(SectorEvent):
    """A single precommit message was sent."""

    message: str = ""
    precommit_deposit: int = 0

    def apply(self, info: SectorInfo, now: float) -> None:
        """Remember the message and deposit."""
        info.precommit_message = self.message
        info.precommit_deposit = self.precommit_deposit


# -- seed and commit --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SectorSeedReady(SectorEvent):
    """The interactive seed is final enough."""

    seed_value: bytes = b""
    seed_epoch: int = 0

    def apply(self, info: SectorInfo, now: float) -> None:
        """Set the seed."""
        info.seed_epoch = self.seed_epoch
        info.seed_value = self.seed_value


@dataclass(frozen=True, slots=True)
class SectorComputeProofFailed(SectorEvent):
    """Commit1/Commit2 failed."""

    error: str = ""


@dataclass(frozen=True, slots=True)
class SectorCommitFailed(SectorEvent):
    """Committing failed at the chain or in the checks."""

    error: str = ""


@dataclass(frozen=True, slots=True)
class SectorDealsExpired(SectorEvent):
    """A deal's start epoch passed before the sector was sealed."""

    error: str = ""


@dataclass(frozen=True, slots=True)
class SectorTicketExpired(SectorEvent):
    """The ticket expired (nothing sends it, as in Lotus)."""

    error: str = ""


@dataclass(frozen=True, slots=True)
class SectorCommitted(SectorEvent):
    """The PoRep proof is ready."""

    proof: bytes = b""

    def apply(self, info: SectorInfo, now: float) -> None:
        """Keep the proof."""
        info.proof = self.proof


@dataclass(frozen=True, slots=True)
class SectorProofReady(SectorEvent):
    """The proof is ready, finalize first (FinalizeEarly)."""

    proof: bytes = b""

    def apply(self, info: SectorInfo, now: float) -> None:
        """Keep the proof."""
        info.proof = self.proof


@dataclass(frozen=True, slots=True)
class SectorSubmitCommitAggregate(SectorEvent):
    """Commit through the aggregator."""


@dataclass(frozen=True, slots=True)
class SectorCommitSubmitted(SectorEvent):
    """A single ProveCommit message went out."""

    message: str = ""

    def apply(self, info: SectorInfo, now: float) -> None:
        """Remember the message."""
        info.commit_message = self.message


@dataclass(frozen=True, slots=True)
class SectorCommitAggregateSent(SectorEvent):
    """The aggregate ProveCommit message went out."""

    message: str = ""

    def apply(self, info: SectorInfo, now: float) -> None:
        """Remember the message."""
        info.commit_message = self.message


@dataclass(frozen=True, slots=True)
class SectorProving(SectorEvent):
    """The commit landed: the sector is active on chain."""


@dataclass(frozen=True, slots=True)
class SectorFinalized(SectorEvent):
    """Finalize finished."""


@dataclass(frozen=True, slots=True)
class SectorFinalizeFailed(SectorEvent):
    """Finalize failed."""

    error: str = ""
