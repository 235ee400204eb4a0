"""Sector input: deal sectors open for pieces, sector numbers and the sealing limit.

Lotus: `extern/storage-sealing/input.go@v1.11.3` (`openSectors`, `AddPieceToAnySector`,
`tryCreateDealSector`, the WaitDeals timers) and `extern/storage-sealing/garbage.go@v1.11.3`
(`PledgeSector` and its MaxSealingSectors check).

Two paths create sectors and both go through here: the engine (`SectorInput`, which the
`Miner` facade, the planner and the handlers share) and an offline `sectors pledge`
(`requests.pledge_offline`, while no engine runs). They take numbers from one counter in the
store's `meta` and refuse at one limit with one message.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from ..fsm import Clock, Context, GroupRecords, GroupStoppedError, LmdbStore, StateGroup
from ..fsm.codec import packb, unpackb
from .config import SealingConfig, seal_proof_for
from .errors import SealingLimitError
from .events import SectorAddPiece, SectorEvent, SectorStart, SectorStartCC
from .graph import TAKES_PIECES
from .info import DealInfo, PendingPiece, SectorInfo, aligned_end
from .states import SectorState
from .stats import sector_counts, sector_stats

if TYPE_CHECKING:
    from .devnet import DevnetChain

#: `meta` key of the next free sector number (committed with the first event of its sector).
META_NEXT = b"sealing/next_sector"
#: `meta` key of the running engine's `max_sealing_sectors`, which an offline pledge honours.
META_MAX_SEALING = b"sealing/max_sealing_sectors"


def first_free_number(txn: Any, meta: Any) -> int:
    """The number the counter gives next, as transaction `txn` sees it (1 in a new repo)."""
    raw = txn.get(META_NEXT, db=meta)
    return int(unpackb(raw)) if raw is not None else 1


def take_numbers(txn: Any, meta: Any, count: int) -> list[int]:
    """Take `count` numbers from the counter inside write transaction `txn` (no engine runs)."""
    first = first_free_number(txn, meta)
    txn.put(META_NEXT, packb(first + count), db=meta)
    return list(range(first, first + count))


def stored_limit(store: LmdbStore) -> int:
    """The sealing limit of the engine that last ran on `store` (0: none, or never ran)."""
    with store.read() as txn:
        raw = txn.get(META_MAX_SEALING, db=store.db("meta"))
    return int(unpackb(raw)) if raw is not None else 0


def check_sealing_limit(records: GroupRecords[SectorInfo], limit: int, adding: int) -> None:
    """Lotus MaxSealingSectors: `SealingLimitError` if `adding` more sectors would pass `limit`."""
    if limit <= 0:
        return
    # Lotus's curSealing, from the counts kept with every transition: no scan of the store.
    sealing = sector_stats(sector_counts(records)).cur_sealing
    if sealing + adding > limit:
        raise SealingLimitError(f"too many sectors sealing (curSealing: {sealing}, max: {limit})")


def pending_piece(
    chain: DevnetChain,
    sector_size: int,
    piece_cid: str,
    size: int,
    data_path: str | None,
    deal: DealInfo | None = None,
    start_in: int = 10_000,
    duration: int = 518_400,
) -> PendingPiece:
    """A checked deal piece; without `deal`, one is published on `chain` for it first."""
    from . import commp

    commp.unpadded_size(size)  # validates the padded size
    commp.parse_piece_cid(piece_cid)  # validates the CID
    if size > sector_size:
        raise ValueError(f"a piece of {size} bytes does not fit a {sector_size}-byte sector")
    if deal is None:
        head = chain.head()
        proposal = chain.publish_deal(piece_cid, size, head + start_in, head + start_in + duration)
        deal = DealInfo(
            proposal.deal_id, proposal.publish_cid, proposal.start_epoch, proposal.end_epoch
        )
    return PendingPiece(piece_cid, size, deal, data_path)


class SectorInput:
    """The engine's sector input: open deal sectors, piece assignment, numbers and the limit.

    Everything here stages its writes without yielding, so what it posts lands in the commit
    of the caller (a request, a planner round or a handler's event).
    """

    def __init__(
        self, store: LmdbStore, *, clock: Clock, sector_size: int, config: SealingConfig
    ) -> None:
        self.store = store
        self.clock = clock
        self.sector_size = sector_size
        self.config = config
        #: Deal sectors accepting pieces: number -> padded bytes used.
        self.open_sectors: dict[int, int] = {}
        self._timers: dict[int, asyncio.Task[None]] = {}
        self._next = 0
        self._group: StateGroup[SectorInfo] | None = None

    def attach(self, group: StateGroup[SectorInfo]) -> None:
        """Post into `group` (it is built after this: its planner reaches the input)."""
        self._group = group

    @property
    def group(self) -> StateGroup[SectorInfo]:
        """The sectors' group."""
        if self._group is None:
            raise RuntimeError("no sector group is attached to this SectorInput")
        return self._group

    # -- start-up ---------------------------------------------------------------------------

    def load(self) -> None:
        """Read the counter, publish the limit, and rebuild the open sectors from the store."""
        meta = self.store.db("meta")
        with self.store.read() as txn:
            self._next = first_free_number(txn, meta)
        # Offline `sectors pledge` honours the limit of the engine that runs this repo.
        limit = packb(self.config.max_sealing_sectors)
        self.store.write(lambda txn: txn.put(META_MAX_SEALING, limit, db=meta))
        # Only live sectors are read: a million Proving sectors cost nothing at start.
        # An unreadable record is skipped here: `group.start` sets it aside in quarantine.
        for number, info in self.group.records.list_live(on_error=lambda *_: None):
            new = info.state is SectorState.UndefinedSectorState
            if info.state in TAKES_PIECES or new:
                # Pieces still in the inbox are assigned too: count them, or the sector
                # would be offered more than it can hold.
                deal, pieces = self._queued(int(number))
                if new and not deal:
                    continue  # a CC sector (or one not started yet): never a deal sector
                used = info.used_space()
                for piece in pieces:
                    used = aligned_end(used, piece.size)
                self.open_sectors[int(number)] = used

    def _queued(self, number: int) -> tuple[bool, list[PendingPiece]]:
        """Whether a SectorStart waits in the sector's inbox, and the pieces queued there."""
        records = self.group.records
        deal = False
        out: list[PendingPiece] = []
        for _, raw in records.pending(records.key(number)):
            event = records.codec.decode_event(raw, records.what(number, "inbox event"))
            if isinstance(event, SectorAddPiece):
                out.extend(event.pieces)
            deal = deal or isinstance(event, SectorStart)
        return deal, out

    # -- numbers and new sectors ------------------------------------------------------------

    def check_limit(self, adding: int = 1) -> None:
        """Refuse to start `adding` more sectors over the limit (`SealingLimitError`)."""
        check_sealing_limit(self.group.records, self.config.max_sealing_sectors, adding)

    def allocate(self) -> int:
        """The next sector number; the counter is staged to commit with the sector's event."""
        n = self._next
        self._next += 1
        self.store.committer.put("meta", META_NEXT, packb(self._next))
        return n

    def new_cc_sectors(
        self, count: int, *, worker: str = "", auto: bool = False
    ) -> list[tuple[int, asyncio.Future[None]]]:
        """Start `count` CC sectors (within the limit), AddPiece pinned to `worker` if set."""
        self.check_limit(count)
        proof = seal_proof_for(self.sector_size)
        out = []
        for _ in range(count):
            n = self.allocate()
            out.append((n, self.group.post(n, SectorStartCC(n, proof, worker, auto))))
        return out

    # -- deal pieces ------------------------------------------------------------------------

    def assign(self, pieces: list[PendingPiece]) -> list[int]:
        """Put each piece into an open deal sector with room, or a new one (no awaiting)."""
        numbers = []
        for piece in pieces:
            target = None
            for n, used in self.open_sectors.items():
                if aligned_end(used, piece.size) <= self.sector_size:
                    target = n
                    break
            if target is None:
                target = self.allocate()
                self.group.post(target, SectorStart(target, seal_proof_for(self.sector_size)))
                self.open_sectors[target] = 0
            self.open_sectors[target] = aligned_end(self.open_sectors[target], piece.size)
            self.group.post(target, SectorAddPiece([piece]))
            numbers.append(target)
        return numbers

    def open_sector(self, info: SectorInfo) -> None:
        """The sector takes deal pieces until it starts packing."""
        # Pieces assigned but not yet applied are only known here: never count down.
        used = max(self.open_sectors.get(info.number, 0), info.used_space())
        self.open_sectors[info.number] = used

    def leave(self, number: int) -> None:
        """The sector takes no more pieces (a WaitDeals timer it armed still fires)."""
        self.open_sectors.pop(number, None)

    def close_sector(self, number: int) -> None:
        """The sector stopped taking pieces: forget it and its WaitDeals timer."""
        self.open_sectors.pop(number, None)
        timer = self._timers.pop(number, None)
        if timer is not None:
            timer.cancel()

    # -- WaitDeals timers -------------------------------------------------------------------

    def arm_timer(self, number: int, when: float, ctx: Context, event: SectorEvent) -> None:
        """Send `event` to the sector at `when` (Lotus's `time.AfterFunc` in WaitDeals)."""
        old = self._timers.pop(number, None)
        if old is not None:
            old.cancel()

        async def fire() -> None:
            await self.clock.sleep_until(when)
            self._timers.pop(number, None)
            with contextlib.suppress(GroupStoppedError):
                ctx.send(event)

        self._timers[number] = asyncio.get_running_loop().create_task(fire())

    def has_timers(self) -> bool:
        """True while a WaitDeals timer is armed (something will still happen)."""
        return any(not t.done() for t in self._timers.values())

    def stop_timers(self) -> None:
        """Cancel every WaitDeals timer (the engine is stopping)."""
        for t in self._timers.values():
            t.cancel()
        self._timers.clear()
