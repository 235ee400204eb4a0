"""`Miner`: the Python facade over the engine, the scheduler, the sealer and the chain.

    async with Miner.open("repo", sealer="sim", clock="virtual") as miner:
        n = await miner.pledge()
        info = await miner.wait(n, "Proving")

Every mutating call returns once its event is durable. Sector numbers come from a counter that
is committed together with the sector's first event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..fsm import Clock, LmdbStore, StateGroup
from ..fsm.codec import packb, unpackb
from ..fsm.store import DURABILITIES
from ..sched import (
    Scheduler,
    SectorRef,
    StoragePath,
    WorkerResources,
    WorkerSpec,
    parse_sector_size,
)
from ..sched.config import check_workers
from . import requests
from .chain import ChainParams
from .config import SealingConfig, seal_proof_for
from .devnet import DevnetChain
from .events import (
    ALL_EVENTS,
    SectorAddPiece,
    SectorForceState,
    SectorRemove,
    SectorRetryNow,
    SectorStart,
    SectorStartCC,
    SectorTerminate,
)
from .info import DealInfo, PendingPiece, SectorInfo, aligned_end
from .options import (
    chain_params,
    check_scalars,
    check_sealer_options,
    make_clock,
    sealing_config,
)
from .owners import adopt_storage
from .pipeline import Sealing
from .sealer import Backend, ScheduledSealer
from .sim import SimBackend
from .states import DORMANT_STATES, FAILED_STATES, SectorState, parse_state
from .store_view import GROUP

log = logging.getLogger("sectorfsm.sealing")


_META_MINER = requests.META_MINER
_META_NEXT = requests.META_NEXT
#: Seconds between looks at the request queue (the CLI's pledge and add-piece).
REQUEST_POLL = 0.2
#: States in which a SectorAddPiece is accepted. A new sector (UndefinedSectorState) takes
#: pieces only once its SectorStart is applied, and a CC one (SectorStartCC) never does.
_TAKES_PIECES = frozenset(
    {
        SectorState.Empty,
        SectorState.WaitDeals,
        SectorState.AddPiece,
        SectorState.AddPieceFailed,
    }
)
#: States a sector will not leave on its own: `wait` stops there.
STUCK_STATES = frozenset({SectorState.FailedUnrecoverable, SectorState.Removed})


def _cancels(event: object, info: SectorInfo) -> bool:
    """A retry cancels only a failed state's handler (its backoff), never a sealing one."""
    return not isinstance(event, SectorRetryNow) or info.state in FAILED_STATES


class SealingError(Exception):
    """Base of the facade's errors."""


class UnknownSectorError(SealingError, LookupError):
    """No sector has this number."""


class NotFailedError(SealingError):
    """`retry` on a sector that is not in a failed state."""


class SectorStuckError(SealingError):
    """`wait` saw the sector settle in a state it will not leave on its own."""


def sim_worker(name: str = "sim-worker", capacity: int = 1 << 50) -> WorkerSpec:
    """A simulated worker: big enough for any sector size, with one sealing+storage path."""
    return WorkerSpec(
        name=name,
        resources=WorkerResources(cpus=128, mem_physical=2 << 40, mem_swap=0, gpus=("sim-gpu",)),
        paths=(StoragePath(f"{name}-path", name, capacity, can_seal=True, can_store=True),),
        needs_heartbeats=False,
    )


class Miner:
    """One storage miner: its sectors, sealing pipeline, scheduler, sealer and chain."""

    def __init__(
        self,
        store: LmdbStore,
        *,
        clock: Clock,
        sector_size: int,
        miner: int,
        chain: DevnetChain,
        sched: Scheduler,
        sealer: ScheduledSealer,
        config: SealingConfig,
    ) -> None:
        self.store = store
        self.clock = clock
        self.sector_size = sector_size
        self.miner_id = miner
        self.chain = chain
        self.sched = sched
        self.sealer = sealer
        self.config = config
        self.sealing = Sealing(
            miner=miner,
            sector_size=sector_size,
            clock=clock,
            chain=chain,
            sealer=sealer,
            config=config,
        )
        self.group: StateGroup[SectorInfo] = StateGroup(
            store,
            GROUP,
            self._plan,
            SectorInfo,
            events=ALL_EVENTS,
            final=lambda info: info.state in DORMANT_STATES,
            creating=(SectorStart, SectorStartCC),
            cancelling=(SectorRemove, SectorTerminate, SectorForceState, SectorRetryNow),
            cancels=_cancels,
            clock=clock,
        )
        self.sealing.group = self.group
        self.sealing.reassign = self._assign
        self._next = 0
        self._changed = asyncio.Event()
        self._server: asyncio.Task[None] | None = None
        self._serving: set[bytes] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        repo: str | os.PathLike[str],
        *,
        sealer: str = "sim",
        clock: str | Clock = "real",
        sector_size: str | int = "2KiB",
        chain: str | ChainParams = "devnet",
        config: SealingConfig | dict[str, Any] | None = None,
        workers: Iterable[WorkerSpec] | None = None,
        miner: int = 1000,
        durability: str = "group",
        sim_time_scale: float = 1.0,
        sealer_options: dict[str, Any] | None = None,
    ) -> AsyncIterator[Miner]:
        """Open (or create) a miner repo and run its engine until the block exits.

        Every argument is checked before anything is created on disk: a bad value is a
        `ValueError` naming it. `chain="devnet"` sizes its epochs so that the `sim` sealer's
        work fits the ticket deadlines (about 10 s epochs for 32 GiB sectors, 20 s for
        64 GiB); explicit `ChainParams` that cannot fit them are refused, naming the block
        time that would (see `sealing/options.py`). Declared `workers` must be able to run
        every sealing task on this sector size.
        """
        check_scalars(miner=miner, sim_time_scale=sim_time_scale, sealer=sealer)
        if durability not in DURABILITIES:
            raise ValueError(f"durability: must be one of {DURABILITIES}, got {durability!r}")
        the_clock = make_clock(clock)
        try:
            size = parse_sector_size(sector_size)
            seal_proof_for(size)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sector_size: {exc}") from None
        params = chain_params(chain, sector_size=size, sealer=sealer, time_scale=sim_time_scale)
        cfg = sealing_config(config, params)
        options = check_sealer_options(sealer_options)
        specs = list(workers) if workers is not None else None
        if specs is not None:
            check_workers(specs, size)
        root = Path(repo)
        # The backend checks its options before anything is created: a bad config leaves
        # no trace; a good one creates the storage directories.
        backend: Backend
        if sealer == "sim":
            backend = SimBackend(the_clock, miner, time_scale=sim_time_scale)
        else:
            from .backends import check_worker_paths, make_backend

            if specs is not None:
                check_worker_paths(specs, root, options)
            backend = make_backend(sealer, clock=the_clock, miner=miner, repo=root, options=options)
        store = _open_store(root, durability)
        try:
            # Claim the repo first: a second engine is refused before it touches the store.
            store.lock_engine()
            adopt_storage(store, backend, miner)  # (before a new repo records its identity)
            _check_identity(store, miner, size)
            devnet = DevnetChain(store, the_clock, params, miner=miner)
            sched = Scheduler(clock=the_clock)
            if specs is None and sealer == "sim":
                specs = [sim_worker()]
            elif specs is None:
                from .backends import default_workers

                specs = default_workers(sealer, root)
                check_workers(specs, size)
            for spec in specs:
                sched.add_worker(spec)
            scheduled = ScheduledSealer(sched, backend, store)
            m = cls(
                store,
                clock=the_clock,
                sector_size=size,
                miner=miner,
                chain=devnet,
                sched=sched,
                sealer=scheduled,
                config=cfg,
            )
            await m._start()
            try:
                yield m
            finally:
                await m._stop()
        finally:
            store.unlock_engine()
            store.close()

    async def _start(self) -> None:
        with self.store.read() as txn:
            raw = txn.get(_META_NEXT, db=self.store.db("meta"))
        self._next = unpackb(raw) if raw is not None else 1
        # Offline `sectors pledge` honours the limit of the engine that runs this repo.
        limit = packb(self.config.max_sealing_sectors)
        meta = self.store.db("meta")
        self.store.write(lambda txn: txn.put(requests.META_MAX_SEALING, limit, db=meta))
        # Only live sectors are read: a million Proving sectors cost nothing at start.
        # An unreadable record is skipped here: `group.start` sets it aside in quarantine.
        for number, info in self.group.records.list_live(on_error=lambda *_: None):
            new = info.state is SectorState.UndefinedSectorState
            if info.state in _TAKES_PIECES or new:
                # Pieces still in the inbox are assigned too: count them, or the sector
                # would be offered more than it can hold.
                deal, pieces = self._queued(int(number))
                if new and not deal:
                    continue  # a CC sector (or one not started yet): never a deal sector
                used = info.used_space()
                for piece in pieces:
                    used = aligned_end(used, piece.size)
                self.sealing.open_sectors[int(number)] = used
        self.sealer.load(lambda n: SectorRef(self.miner_id, n, self.sector_size))
        self.store.committer.add_listener(self._changed.set)
        await self.sched.start()  # policy-file hot reload and the heartbeat-grace monitor
        await self.group.start()
        self.serve_requests()
        self._server = asyncio.get_running_loop().create_task(self._serve())

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._server
        self.sealing.close()
        await self.group.stop()
        await self.sched.stop()
        self.store.committer.remove_listener(self._changed.set)

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

    def _plan(self, events: list[Any], info: SectorInfo) -> Any:
        # Pieces sent to a sector that does not take them (a CC sector, one that started
        # packing, or a new one before its SectorStart applies: that round plans nothing
        # after it) go to another sector, in this commit.
        if info.state in _TAKES_PIECES:
            return self.sealing.plan(events, info)
        stray = [i for i, e in enumerate(events) if isinstance(e, SectorAddPiece) and e.pieces]
        if not stray:
            return self.sealing.plan(events, info)
        if info.state is not SectorState.UndefinedSectorState:
            self.sealing.open_sectors.pop(info.number, None)  # (a new deal sector stays open)
        emptied = [SectorAddPiece([]) if i in stray else e for i, e in enumerate(events)]
        step, processed = self.sealing.plan(emptied, info)
        # Only once the round is planned (it may raise and be re-planned), and only for the
        # events it consumed: the others come back in a later round.
        for i in stray:
            if i < processed:
                self._assign(events[i].pieces)
        return step, processed

    # -- requests from other processes ---------------------------------------------------------

    async def _serve(self) -> None:
        while True:
            await asyncio.sleep(REQUEST_POLL)
            try:
                self.serve_requests()
            except Exception:
                log.exception("serving queued requests")

    def serve_requests(self) -> int:
        """Execute queued pledge/add-piece requests; each commits with its sector events."""
        done = 0
        for rid, request in requests.pending(self.store):
            if rid in self._serving:
                continue  # executed, its commit is on the way
            self._serving.add(rid)
            try:
                result = self._execute(request)
            except (ValueError, SealingError) as exc:
                # The CLI that queued it may be gone: the log is where the operator sees it.
                log.error("queued request %s failed: %s", request, exc)
                result = {"error": str(exc)}
            requests.stage_done(self.store, rid, result)
            self.store.committer.on_commit(lambda rid, err: self._serving.discard(rid), rid)
            done += 1
        return done

    def _execute(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "pledge":
            count = int(request.get("count", 1))
            self.check_sealing_limit(count)
            numbers = []
            for _ in range(count):
                n = self._allocate()
                self.group.post(n, SectorStartCC(n, seal_proof_for(self.sector_size)))
                numbers.append(n)
            return {"sectors": numbers}
        if op == "add_piece":
            piece = self._pending_piece(
                request["piece_cid"], int(request["size"]), request.get("data_path")
            )
            [n] = self._assign([piece])
            return {"sector": n, "deal": piece.deal.deal_id}
        raise ValueError(f"unknown request {op!r}")

    # -- sectors ------------------------------------------------------------------------------

    def _allocate(self) -> int:
        n = self._next
        self._next += 1
        # Staged with the sector's first event: the counter and the sector commit together.
        self.store.committer.put("meta", _META_NEXT, packb(self._next))
        return n

    def check_sealing_limit(self, adding: int = 1) -> None:
        """Lotus MaxSealingSectors: refuse to start `adding` more sectors over the limit."""
        limit = self.config.max_sealing_sectors
        if limit <= 0:
            return
        # Only live sectors can be sealing: read the live index, not the whole store.
        sealing = len(self.group.records.live_ids())
        if sealing + adding > limit:
            raise SealingError(f"too many sectors sealing (curSealing: {sealing}, max: {limit})")

    async def pledge(self) -> int:
        """Create a committed-capacity sector; returns its number once it is durable."""
        self.check_sealing_limit()
        n = self._allocate()
        await self.group.post(n, SectorStartCC(n, seal_proof_for(self.sector_size)))
        return n

    def _assign(self, pieces: list[PendingPiece]) -> list[int]:
        """Put each piece into an open deal sector with room, or a new one (no awaiting)."""
        numbers = []
        for piece in pieces:
            target = None
            for n, used in self.sealing.open_sectors.items():
                if aligned_end(used, piece.size) <= self.sector_size:
                    target = n
                    break
            if target is None:
                target = self._allocate()
                self.group.post(target, SectorStart(target, seal_proof_for(self.sector_size)))
                self.sealing.open_sectors[target] = 0
            self.sealing.open_sectors[target] = aligned_end(
                self.sealing.open_sectors[target], piece.size
            )
            self.group.post(target, SectorAddPiece([piece]))
            numbers.append(target)
        return numbers

    async def add_piece(
        self,
        piece_cid: str,
        size: int,
        *,
        deal: DealInfo | None = None,
        data_path: str | None = None,
        start_in: int = 10_000,
        duration: int = 518_400,
    ) -> int:
        """Add a deal piece (padded `size`); returns the sector it went into once durable.

        Without `deal`, a deal for the piece is published on the devnet, starting `start_in`
        epochs from now and lasting `duration` epochs.
        """
        piece = self._pending_piece(piece_cid, size, data_path, deal, start_in, duration)
        [n] = self._assign([piece])
        await self.store.committer.waiter()
        return n

    def _pending_piece(
        self,
        piece_cid: str,
        size: int,
        data_path: str | None,
        deal: DealInfo | None = None,
        start_in: int = 10_000,
        duration: int = 518_400,
    ) -> PendingPiece:
        from . import commp

        commp.unpadded_size(size)  # validates the padded size
        commp.parse_piece_cid(piece_cid)  # validates the CID
        if size > self.sector_size:
            raise ValueError(
                f"a piece of {size} bytes does not fit a {self.sector_size}-byte sector"
            )
        if deal is None:
            head = self.chain.head()
            proposal = self.chain.publish_deal(
                piece_cid, size, head + start_in, head + start_in + duration
            )
            deal = DealInfo(
                proposal.deal_id,
                proposal.publish_cid,
                proposal.start_epoch,
                proposal.end_epoch,
            )
        return PendingPiece(piece_cid, size, deal, data_path)

    def _get(self, number: int) -> SectorInfo:
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            raise UnknownSectorError(f"{number!r} is not a sector number")
        info = self.group.get(number)
        if info is None:
            raise UnknownSectorError(f"sector {number} not found")
        return info

    def status(self, number: int) -> SectorInfo:
        """The sector's persisted info; `UnknownSectorError` if there is no such sector."""
        return self._get(number)

    def list(self, states: Iterable[str | SectorState] | None = None) -> Iterator[SectorInfo]:
        """Sectors in number order, optionally only those in `states`."""
        wanted = None if states is None else {parse_state(str(s)) for s in states}
        for _, info in self.group.list():
            if wanted is None or info.state in wanted:
                yield info

    async def wait(
        self,
        number: int,
        state: str | SectorState,
        timeout: float | None = None,  # noqa: ASYNC109 - engine-clock seconds (may be virtual)
    ) -> SectorInfo:
        """Wait until the sector is in `state`; returns its info.

        `timeout` is in seconds of the engine clock. Raises `SectorStuckError` if the sector
        settles in FailedUnrecoverable or Removed instead, and `TimeoutError` on timeout.
        """
        target = parse_state(str(state))
        deadline = None if timeout is None else self.clock.now() + timeout
        while True:
            info = self._get(number)
            if info.state is target:
                return info
            if info.state in STUCK_STATES:
                raise SectorStuckError(
                    f"sector {number} is in {info.state.name}, not {target.name}"
                    + (f": {info.last_err}" if info.last_err else "")
                )
            if deadline is not None and self.clock.now() >= deadline:
                raise TimeoutError(f"sector {number} is still in {info.state.name}")
            self._changed.clear()
            waiter = asyncio.ensure_future(self._changed.wait())
            timer = (
                asyncio.ensure_future(self.clock.sleep_until(deadline))
                if deadline is not None
                else None
            )
            try:
                await asyncio.wait(
                    [t for t in (waiter, timer) if t is not None],
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                waiter.cancel()
                if timer is not None:
                    timer.cancel()

    async def retry(self, number: int) -> None:
        """Retry a failed sector now (skipping the backoff); resume a FailedUnrecoverable one."""
        info = self._get(number)
        if info.state not in FAILED_STATES:
            raise NotFailedError(
                f"sector {number} is in {info.state.name}, which is not a failed state; "
                "retry only applies to failed sectors"
            )
        await self.group.send(number, SectorRetryNow())

    async def remove(self, number: int) -> None:
        """Remove the sector and its data (cancels a running compute step)."""
        self._get(number)
        await self.group.send(number, SectorRemove())

    async def terminate(self, number: int) -> None:
        """Terminate the sector on chain, then remove it."""
        self._get(number)
        await self.group.send(number, SectorTerminate())

    async def update_state(self, number: int, state: str | SectorState) -> None:
        """Force the sector into `state` (validated against the graph's states)."""
        target = parse_state(str(state))
        self._get(number)
        await self.group.send(number, SectorForceState(target))

    def settled(self) -> bool:
        """True when nothing will happen without new input: no event, step, timer or request."""
        return (
            self.group.is_idle()
            and not self.sealing.has_timers()
            and not requests.pending(self.store)
        )

    async def idle(self) -> None:
        """Wait until nothing is pending or running."""
        await self.group.idle()


def _open_store(root: Path, durability: str) -> LmdbStore:
    root.mkdir(parents=True, exist_ok=True)
    return LmdbStore(root / "store", durability=durability)  # type: ignore[arg-type]


def _check_identity(store: LmdbStore, miner: int, size: int) -> None:
    meta = store.db("meta")
    with store.read() as txn:
        raw = txn.get(_META_MINER, db=meta)
    if raw is None:
        store.write(lambda txn: txn.put(_META_MINER, packb([miner, size]), db=meta))
        return
    stored_miner, stored_size = unpackb(raw)
    if (stored_miner, stored_size) != (miner, size):
        raise SealingError(
            f"{store.path} belongs to miner f0{stored_miner} with {stored_size}-byte sectors; "
            f"asked for f0{miner} with {size}-byte sectors"
        )
