"""`Sealing`: what the planner and handlers share (Lotus's `Sealing` struct).

It holds the chain, the sealer, the config, the batchers, and the in-memory helpers that Lotus
also keeps in memory: WaitDeals timers, the open deal sectors, and the seed watches that
re-deliver a seed after a reorg. All of it is rebuilt from the store when the engine starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..fsm import Clock, Context, GroupStoppedError, StateGroup
from ..sched import SectorRef
from .batch import CommitBatcher, PreCommitBatcher
from .chain import ChainAPI
from .config import SealingConfig
from .events import SectorEvent, SectorSeedReady
from .handlers import HANDLERS
from .info import PendingPiece, SectorInfo
from .planner import plan, run_handler
from .sealer import Sealer
from .states import SectorState

log = logging.getLogger("sectorfsm.sealing")

S = SectorState


def _nowhere(pieces: list[PendingPiece]) -> object:
    if pieces:
        raise RuntimeError("no piece assigner is attached to this Sealing")
    return None


class Sealing:
    """Shared state of the sealing pipeline for one miner."""

    def __init__(
        self,
        *,
        miner: int,
        sector_size: int,
        clock: Clock,
        chain: ChainAPI,
        sealer: Sealer,
        config: SealingConfig,
    ) -> None:
        self.miner = miner
        self.sector_size = sector_size
        self.clock = clock
        self.chain = chain
        self.sealer = sealer
        self.config = config
        #: Lotus getDealPerSectorLimit.
        self.deal_limit = 256 if sector_size < 64 << 30 else 512
        self.precommit_batcher = PreCommitBatcher(self)
        self.commit_batcher = CommitBatcher(self)
        self.group: StateGroup[SectorInfo] | None = None
        self._timers: dict[int, asyncio.Task[None]] = {}
        self._seeds: dict[int, tuple[int, Context]] = {}
        #: Deal sectors accepting pieces: number -> padded bytes used.
        self.open_sectors: dict[int, int] = {}
        #: Puts pieces into other sectors without yielding (the Miner sets it).
        self.reassign: Callable[[list[PendingPiece]], object] = _nowhere
        chain_reorg = getattr(chain, "on_reorg", None)
        if chain_reorg is not None:
            chain_reorg(self._reorged)

    # -- planning -----------------------------------------------------------------------------

    def plan(
        self, events: list[Any], info: SectorInfo
    ) -> tuple[Callable[[Context, SectorInfo], Awaitable[None]] | None, int]:
        """The planner the engine calls."""
        return plan(self, events, info)

    def step_for(self, info: SectorInfo) -> Callable[[Context, SectorInfo], Awaitable[None]] | None:
        """The step for the sector's (new) state, or None when there is nothing to do."""
        handler = HANDLERS.get(info.state)
        if handler is None:
            self.forget(info.number)
            return None
        if info.state not in (S.WaitDeals, S.AddPiece, S.Empty):
            self.open_sectors.pop(info.number, None)
        return functools.partial(run_handler, self, handler)

    def ref(self, info: SectorInfo) -> SectorRef:
        """The scheduler's handle on a sector."""
        return SectorRef(self.miner, info.number, info.sector_size or self.sector_size)

    # -- deal input -----------------------------------------------------------------------------

    def open_sector(self, info: SectorInfo) -> None:
        """The sector takes deal pieces until it starts packing."""
        # Pieces assigned but not yet applied are only known here: never count down.
        used = max(self.open_sectors.get(info.number, 0), info.used_space())
        self.open_sectors[info.number] = used

    def close_sector(self, number: int) -> None:
        """The sector stopped taking pieces."""
        self.open_sectors.pop(number, None)
        timer = self._timers.pop(number, None)
        if timer is not None:
            timer.cancel()

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

    # -- seeds ------------------------------------------------------------------------------------

    def watch_seed(self, number: int, seed_epoch: int, ctx: Context) -> None:
        """Re-deliver the seed to this sector if a reorg changes it (Lotus `ChainAt` revert)."""
        self._seeds[number] = (seed_epoch, ctx)

    def _reorged(self, from_epoch: int) -> None:
        for number, (seed_epoch, ctx) in list(self._seeds.items()):
            if seed_epoch < from_epoch:
                continue
            info = self.group.get(number) if self.group is not None else None
            if info is None or info.state not in (S.WaitSeed, S.Committing):
                self._seeds.pop(number, None)
                continue
            if info.state is S.WaitSeed:
                continue  # the WaitSeed step reads the seed after the confidence wait
            try:
                seed = self.chain.beacon_randomness(seed_epoch)
            except Exception:
                log.exception("sector %d: reading the seed after a reorg", number)
                continue
            with contextlib.suppress(GroupStoppedError):
                ctx.send(SectorSeedReady(seed, seed_epoch))

    def has_timers(self) -> bool:
        """True while a WaitDeals timer is armed (something will still happen)."""
        return any(not t.done() for t in self._timers.values())

    def forget(self, number: int) -> None:
        """Drop in-memory helpers of a sector that has nothing more to do."""
        self._seeds.pop(number, None)
        self.close_sector(number)

    def close(self) -> None:
        """Cancel timers and batch timers (the engine is stopping)."""
        for t in self._timers.values():
            t.cancel()
        self._timers.clear()
        self.precommit_batcher.close()
        self.commit_batcher.close()
