"""SectorInfo: everything the engine persists about one sector (Lotus `types.go`), and its log.

Field names are Lotus's in snake_case (`TicketValue` -> `ticket_value`); `number` is Lotus's
`SectorNumber`. CIDs are stored as strings. Records are msgpack maps keyed by field name, so a
field added later reads as its default in old records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..fsm.codec import APPEND_ONLY
from .states import SectorState

#: Lotus truncates a sector's log above this many entries (`logEvents`,
#: `extern/storage-sealing/fsm.go@v1.11.3`).
LOG_LIMIT = 8000
#: ...keeping entries [0:LOG_KEEP_HEAD] and [LOG_KEEP_TAIL:].
LOG_KEEP_HEAD = 2000
LOG_KEEP_TAIL = 6000
#: Event messages longer than this are cut, with "... truncated" appended (as Lotus does).
MESSAGE_LIMIT = 8000


@dataclass(slots=True)
class DealInfo:
    """The deal a piece belongs to (Lotus `PieceDealInfo`)."""

    deal_id: int
    publish_cid: str | None = None
    start_epoch: int = 0
    end_epoch: int = 0
    keep_unsealed: bool = True


@dataclass(slots=True)
class Piece:
    """One piece in a sector; `deal` is None for filler (pledge) pieces."""

    piece_cid: str
    size: int  # padded bytes
    deal: DealInfo | None = None


@dataclass(slots=True)
class PendingPiece:
    """A deal piece assigned to a sector but not yet written by AddPiece.

    Lotus keeps these in memory (`assignedPieces`) and loses them on restart; here they travel
    in the durable `SectorAddPiece` event and live in SectorInfo until AddPiece writes them.
    """

    piece_cid: str
    size: int  # padded bytes
    deal: DealInfo
    #: Where the piece's bytes are (a file path); None for the `sim` sealer.
    data_path: str | None = None


@dataclass(slots=True)
class LogEntry:
    """One entry of a sector's log (Lotus `Log`): kind is `event;<Event>`, `error;...`, ..."""

    timestamp: int
    kind: str
    message: str
    trace: str = ""


@dataclass(slots=True)
class SectorInfo:
    """The persisted state of one sector."""

    state: SectorState = SectorState.UndefinedSectorState
    number: int = 0
    sector_type: int = 0  # RegisteredSealProof
    sector_size: int = 0  # bytes; derived from sector_type in Lotus, stored here for clarity

    # Packing
    creation_time: int = 0
    pieces: list[Piece] = field(default_factory=list)
    pending_pieces: list[PendingPiece] = field(default_factory=list)

    # PreCommit1
    ticket_value: bytes = b""
    ticket_epoch: int = 0
    precommit1_out: bytes = b""
    precommit1_fails: int = 0

    # PreCommit2
    comm_d: str | None = None
    comm_r: str | None = None
    proof: bytes = b""

    # PreCommit message
    precommit_deposit: int = 0
    precommit_message: str | None = None
    precommit_tipset: int = 0
    precommit2_fails: int = 0

    # WaitSeed
    seed_value: bytes = b""
    seed_epoch: int = 0

    # Committing
    commit_message: str | None = None
    invalid_proofs: int = 0

    # Faults
    fault_report_msg: str | None = None

    # Recovery (RecoverDealIDs returns here)
    return_state: str = ""

    # Termination
    terminate_message: str | None = None
    terminated_at: int = 0

    # Retry bookkeeping (our backoff; Lotus has a flat 1-minute cool-down)
    #: When the pending retry may run (engine clock, unix seconds); 0 when none is pending.
    retry_at: float = 0.0
    #: Retries spent since the sector last reached Proving (or the operator's last `retry`).
    retries: int = 0
    #: The failed state a FailedUnrecoverable sector gave up in (`retry` resumes it there).
    unrecoverable_from: str = ""

    # Pledge tools (`sealing/autopledge.py`): the worker this CC sector's AddPiece is pinned
    # to ("" = any), and whether auto-pledge created it.
    ap_worker: str = ""
    auto_pledged: bool = False

    # Debug
    last_err: str = ""
    #: Only ever appended to (`log_append` assigns a new list to truncate it): the engine
    #: then reuses the encoded entries of the previous record (the field must stay last).
    log: list[LogEntry] = field(default_factory=list, metadata=APPEND_ONLY)

    @property
    def has_deals(self) -> bool:
        """True when any piece belongs to a deal (Lotus `hasData`)."""
        return any(p.deal is not None for p in self.pieces)

    def deal_ids(self) -> list[int]:
        """Deal ids of the pieces, 0 for fillers (as `sectors status` shows them)."""
        return [p.deal.deal_id if p.deal is not None else 0 for p in self.pieces]

    def used_space(self) -> int:
        """Padded bytes taken by pieces added or assigned, alignment fillers included."""
        used = 0
        for size in [p.size for p in self.pieces] + [p.size for p in self.pending_pieces]:
            used = aligned_end(used, size)
        return used


def aligned_end(used: int, size: int) -> int:
    """Where a piece of padded `size` ends when added after `used` bytes (pieces are aligned)."""
    return used + (-used % size) + size


def log_append(info: SectorInfo, entry: LogEntry) -> None:
    """Append to the sector's log, truncating as Lotus does but keeping a visible marker.

    Lotus drops entries 2000..5999 when the log passes 8000 entries, and writes its
    "truncate" marker where it is immediately overwritten (`logEvents` in
    `extern/storage-sealing/fsm.go@v1.11.3` keeps `Log[:2000]`, which excludes it). Here the
    marker survives at index 2000, so an operator can see that history was cut.
    """
    log = info.log
    if len(log) > LOG_LIMIT:
        dropped = LOG_KEEP_TAIL - LOG_KEEP_HEAD
        marker = LogEntry(
            entry.timestamp,
            "truncate",
            f"truncating log (above {LOG_LIMIT} entries): {dropped} entries dropped",
        )
        info.log = [*log[:LOG_KEEP_HEAD], marker, *log[LOG_KEEP_TAIL:]]
    info.log.append(entry)
