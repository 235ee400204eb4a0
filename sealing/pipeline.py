"""`Sealing`: what the planner and handlers share (Lotus's `Sealing` struct).

It holds the chain, the sealer, the config, the batchers, the sector input (open deal sectors,
their WaitDeals timers, piece assignment: `input.py`) and the seed watches that re-deliver a
seed after a reorg, which Lotus also keeps in memory. All of it is rebuilt from the store when
the engine starts.
"""

from __future__ import annotations

import contextlib
import logging

from ..fsm import Clock, Context, GroupStoppedError, StateGroup
from ..sched import SectorRef
from .batch import CommitBatcher, PreCommitBatcher
from .chain import ChainAPI
from .config import SealingConfig
from .events import SectorSeedReady
from .graph import SEED_STATES
from .info import SectorInfo
from .input import SectorInput
from .sealer import Sealer
from .states import SectorState

log = logging.getLogger("sectorfsm.sealing")

S = SectorState
#: Sector handles kept (more than a 100-worker cluster has sectors at work at once).
_REFS_KEPT = 4096


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
        sector_input: SectorInput,
    ) -> None:
        self.miner = miner
        self.sector_size = sector_size
        self.clock = clock
        self.chain = chain
        self.sealer = sealer
        self.config = config
        #: Open deal sectors, piece assignment and WaitDeals timers (the handlers' way to them).
        self.input = sector_input
        #: Lotus getDealPerSectorLimit.
        self.deal_limit = 256 if sector_size < 64 << 30 else 512
        self.precommit_batcher = PreCommitBatcher(self)
        self.commit_batcher = CommitBatcher(self)
        self.group: StateGroup[SectorInfo] | None = None
        self._seeds: dict[int, tuple[int, Context]] = {}
        #: One handle per sector while it works: the index, queue and caches keyed by it then
        #: find it by identity (a new equal one ran the dataclass's `__eq__` at every lookup).
        self._refs: dict[int, SectorRef] = {}
        chain_reorg = getattr(chain, "on_reorg", None)
        if chain_reorg is not None:
            chain_reorg(self._reorged)

    def ref(self, info: SectorInfo) -> SectorRef:
        """The scheduler's handle on a sector."""
        ref = self._refs.get(info.number)
        size = info.sector_size or self.sector_size
        if ref is None or ref.size != size:
            if len(self._refs) >= _REFS_KEPT:  # (the oldest: sectors done, or left behind)
                del self._refs[next(iter(self._refs))]
            ref = self._refs[info.number] = SectorRef(self.miner, info.number, size)
        return ref

    # -- seeds ------------------------------------------------------------------------------------

    def watch_seed(self, number: int, seed_epoch: int, ctx: Context) -> None:
        """Re-deliver the seed to this sector if a reorg changes it (Lotus `ChainAt` revert)."""
        self._seeds[number] = (seed_epoch, ctx)

    def _reorged(self, from_epoch: int) -> None:
        for number, (seed_epoch, ctx) in list(self._seeds.items()):
            if seed_epoch < from_epoch:
                continue
            info = self.group.get(number) if self.group is not None else None
            if info is None or info.state not in SEED_STATES:
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

    def forget(self, number: int) -> None:
        """Drop in-memory helpers of a sector that has nothing more to do."""
        self._seeds.pop(number, None)
        self._refs.pop(number, None)
        self.input.close_sector(number)

    def close(self) -> None:
        """Cancel timers and batch timers (the engine is stopping)."""
        self.input.stop_timers()
        self.precommit_batcher.close()
        self.commit_batcher.close()
