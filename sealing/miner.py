"""`Miner`: the Python facade over the engine, the scheduler, the sealer and the chain.

    async with Miner.open("repo", sealer="sim", clock="virtual") as miner:
        n = await miner.pledge()
        info = await miner.wait(n, "Proving")

Every mutating call returns once its event is durable. Sector numbers come from a counter that
is committed together with the sector's first event (`input.py`, which also holds the open deal
sectors and the sealing limit); the planner (`planner.py`) runs each state's handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fsm import Clock, LmdbStore, StateGroup
from ..fsm.codec import packb, unpackb
from ..fsm.gctune import engine_gc
from ..fsm.store import DURABILITIES
from ..sched import (
    Scheduler,
    SectorRef,
    WorkerSpec,
    parse_sector_size,
)
from ..sched.assigners import make_assigner
from ..sched.config import check_workers
from . import requests
from .autopledge import AutoPledger, PledgePlan, execute_plan, plan_pledge
from .backends import default_workers, make_backend
from .chain import ChainParams
from .config import SealingConfig, seal_proof_for
from .devnet import DevnetChain
from .errors import NotFailedError as NotFailedError
from .errors import SealingError as SealingError
from .errors import SectorStuckError as SectorStuckError
from .errors import UnknownSectorError as UnknownSectorError
from .events import (
    ALL_EVENTS,
    SectorForceState,
    SectorRemove,
    SectorRetryNow,
    SectorStart,
    SectorStartCC,
    SectorTerminate,
)
from .graph import DORMANT_STATES, FAILED_STATES, STUCK_STATES
from .info import DealInfo, SectorInfo
from .input import SectorInput, pending_piece
from .notify import StateChanges, Subscription
from .options import (
    chain_params,
    check_scalars,
    check_sealer_options,
    make_clock,
    sealing_config,
)
from .owners import adopt_storage
from .pipeline import Sealing
from .planner import Planner
from .sealer import ScheduledSealer
from .states import SectorState, parse_state
from .stats import SectorStats, sector_counts, sector_stats
from .store_view import GROUP, state_key

if TYPE_CHECKING:
    from .metrics import EngineMetrics

log = logging.getLogger("sectorfsm.sealing")


_META_MINER = requests.META_MINER
#: Count keys (`state_key`: the state value) of the states `wait` gives up in.
_STUCK_VALUES = frozenset(s.value for s in STUCK_STATES)


def _cancels(event: object, info: SectorInfo) -> bool:
    """A retry cancels only a failed state's handler (its backoff), never a sealing one."""
    return not isinstance(event, SectorRetryNow) or info.state in FAILED_STATES


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
        #: Open deal sectors, piece assignment, sector numbers and the sealing limit.
        self.input = SectorInput(store, clock=clock, sector_size=sector_size, config=config)
        #: State-change subscriptions (`subscribe`), fed by the planner once rounds commit.
        self.changes = StateChanges(store.committer.on_commit)
        self.sealing = Sealing(
            miner=miner,
            sector_size=sector_size,
            clock=clock,
            chain=chain,
            sealer=sealer,
            config=config,
            sector_input=self.input,
        )
        self.group: StateGroup[SectorInfo] = StateGroup(
            store,
            GROUP,
            Planner(self.sealing, self.changes),
            SectorInfo,
            events=ALL_EVENTS,
            final=lambda info: info.state in DORMANT_STATES,
            creating=(SectorStart, SectorStartCC),
            cancelling=(SectorRemove, SectorTerminate, SectorForceState, SectorRetryNow),
            cancels=_cancels,
            clock=clock,
            count_by=state_key,
            shared_state=True,  # handlers only read the SectorInfo they get
        )
        self.sealing.group = self.group
        self.input.attach(self.group)
        #: Executes what `sectors pledge`/`add-piece` queue from other processes.
        self.requests = requests.RequestServer(store, self.input, chain, sched)
        #: Keeps AutoPledgeDiff workers fed (`sealing/autopledge.py`).
        self.autopledge = AutoPledger(
            sched, self.input, store, enabled=config.auto_pledge, changes=self.changes
        )

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
        assigner: str = "balanced",
    ) -> AsyncIterator[Miner]:
        """Open (or create) a miner repo and run its engine until the block exits.

        Every argument is checked before anything is created on disk: a bad value is a
        `ValueError` naming it. `chain="devnet"` sizes its epochs so that the `sim` sealer's
        work fits the ticket deadlines (about 10 s epochs for 32 GiB sectors, 20 s for
        64 GiB); explicit `ChainParams` that cannot fit them are refused, naming the block
        time that would (see `sealing/options.py`). Declared `workers` must be able to run
        every sealing task on this sector size. `assigner` picks the scheduler's placement:
        `balanced` (the default) or `lotus` (Lotus's window assigner, the baseline).
        """
        check_scalars(miner=miner, sim_time_scale=sim_time_scale, sealer=sealer)
        make_assigner("balanced" if assigner == "lotus" else assigner)  # a bad name: ValueError
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
        # The backend checks its options (and the declared workers' storage paths) before
        # anything is created: a bad config leaves no trace; a good one creates the storage
        # directories.
        backend = make_backend(
            sealer,
            clock=the_clock,
            miner=miner,
            repo=root,
            options=options,
            time_scale=sim_time_scale,
            workers=specs,
        )
        store = _open_store(root, durability)
        try:
            # Claim the repo first: a second engine is refused before it touches the store.
            store.lock_engine()
            adopt_storage(store, backend, miner)  # (before a new repo records its identity)
            _check_identity(store, miner, size)
            devnet = DevnetChain(store, the_clock, params, miner=miner)
            sched = Scheduler(clock=the_clock, assigner=assigner)
            if specs is None:
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
            with engine_gc():  # (its in-flight sectors would make full collections O(N^2))
                await m._start()
                try:
                    yield m
                finally:
                    await m._stop()
        finally:
            store.unlock_engine()
            store.close()

    async def _start(self) -> None:
        self.input.load()
        self.sealer.load(lambda n: SectorRef(self.miner_id, n, self.sector_size))
        await self.sched.start()  # policy-file hot reload and the heartbeat-grace monitor
        await self.group.start()
        self.requests.start()
        self.autopledge.start()

    async def _stop(self) -> None:
        self.autopledge.stop()
        await self.requests.stop()
        self.changes.close()
        self.sealing.close()
        await self.group.stop()
        await self.sched.stop()

    # -- sectors ------------------------------------------------------------------------------

    @functools.cached_property
    def metrics(self) -> EngineMetrics:
        """Prometheus metrics (`metrics.registry`, the one `sectors run --metrics` serves).

        Created on first use, on the engine's loop: counters count from then on, and an
        engine nobody monitors pays nothing per transition.
        """
        from .metrics import EngineMetrics  # (prometheus_client only for those who use it)

        return EngineMetrics(self)

    def subscribe(self, maxsize: int = 1000) -> Subscription:
        """State changes as they become durable: `async for change in miner.subscribe()`.

        Yields `StateChange(sector, before, after, event)`, and `Gap(missed)` where a slow
        consumer's buffer of `maxsize` overflowed (the engine never waits for a subscriber).
        Iteration ends when the engine stops or the subscription is closed.
        """
        return self.changes.subscribe(maxsize)

    def serve_requests(self) -> int:
        """Execute queued pledge/add-piece requests now; each commits with its sector events."""
        return self.requests.serve()

    def check_sealing_limit(self, adding: int = 1) -> None:
        """Lotus MaxSealingSectors: refuse to start `adding` more sectors over the limit."""
        self.input.check_limit(adding)

    async def pledge(self) -> int:
        """Create a committed-capacity sector; returns its number once it is durable."""
        [(n, durable)] = self.input.new_cc_sectors(1)
        await durable
        return n

    async def pledge_fill(self, *, dry_run: bool = False) -> PledgePlan:
        """Pledge one CC sector per free AP slot (myScheduler `mypledge`), each pinned there.

        Returns the per-worker count and the sectors created (none with `dry_run`); its
        `stopped` says when MaxSealingSectors cut it short.
        """
        return await self._pledge_plan("fill", dry_run)

    async def pledge_per_worker(self, *, dry_run: bool = False) -> PledgePlan:
        """One CC sector per eligible AP worker, its AddPiece pinned there (`mypledgeonce`)."""
        return await self._pledge_plan("per-worker", dry_run)

    async def _pledge_plan(self, mode: str, dry_run: bool) -> PledgePlan:
        limit = self.config.max_sealing_sectors
        plan = plan_pledge(self.sched, self.group, limit, self.sector_size, mode)
        plan.dry_run = dry_run
        if not dry_run:
            futures = execute_plan(plan, self.input)
            await asyncio.gather(*futures)
        return plan

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
        piece = pending_piece(
            self.chain, self.sector_size, piece_cid, size, data_path, deal, start_in, duration
        )
        [n] = self.input.assign([piece])
        await self.store.committer.waiter()
        return n

    def _get(self, number: int) -> SectorInfo:
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            raise UnknownSectorError(f"{number!r} is not a sector number")
        info = self.group.get(number)
        if info is None:
            raise UnknownSectorError(f"sector {number} not found")
        return info

    def sector_counts(self) -> dict[str, int]:
        """Sectors per state name, every SectorState present (counts kept per commit: no scan)."""
        return sector_counts(self.group.records)

    def sector_stats(self) -> SectorStats:
        """Lotus's SectorStats: sectors per group (staging, sealing, failed, proving, removed)."""
        return sector_stats(self.sector_counts())

    def status(self, number: int) -> SectorInfo:
        """The sector's persisted info; `UnknownSectorError` if there is no such sector."""
        return self._get(number)

    def list(self, states: Iterable[str | SectorState] | None = None) -> Iterator[SectorInfo]:
        """Sectors in number order, optionally only those in `states` (read from the index)."""
        if states is None:
            for _, info in self.group.list():
                yield info
            return
        wanted = {parse_state(str(s)).value for s in states}  # (bad names: before any read)
        for _, info in self.group.list_by(wanted):
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
        # The states a commit must leave the sector in for this wait to read it again: a
        # commit moving it between two others says so in its wake-up (the group's count key
        # is the state value), and the sector's record is not read and decoded for nothing.
        decisive = _STUCK_VALUES | {target.value}
        deadline = None if timeout is None else self.clock.now() + timeout
        timer: asyncio.Task[None] | None = None
        try:
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
                if not self.group.started:  # (nothing would change the sector any more)
                    raise SealingError(f"sector {number}: the engine is not running")
                # Watched right after the read, with no await between: no commit is missed.
                # The read is dropped while waiting: a sector's info (its log) held by each of
                # thousands of waiters was a third of the engine's memory per sector in flight.
                del info
                while True:
                    changed = self.group.watch(number)
                    if deadline is None:
                        moved_to = await changed
                    else:
                        if timer is None:  # one timer for the whole wait, on the engine clock
                            timer = asyncio.ensure_future(self.clock.sleep_until(deadline))
                        try:
                            await asyncio.wait(
                                (changed, timer), return_when=asyncio.FIRST_COMPLETED
                            )
                        finally:
                            changed.cancel()
                        if changed.cancelled():  # (the deadline: the read decides)
                            break
                        moved_to = changed.result()
                    if moved_to is None or moved_to in decisive:
                        break
        finally:
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
            and not self.input.has_timers()
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
