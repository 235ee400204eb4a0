"""Helpers for the sealing tests: a virtual-clock Miner in a temp dir, and log inspection."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from conftest import run as run  # re-exported: the sealing tests import it from here

from sectorfsm.sealing.info import SectorInfo
from sectorfsm.sealing.miner import Miner

#: A CC sector's events from pledge to Proving (devnet config: batched precommits,
#: aggregated commits).
HAPPY = (
    "SectorStartCC",
    "SectorPacked",
    "SectorTicket",
    "SectorPreCommit1",
    "SectorPreCommit2",
    "SectorPreCommitBatch",
    "SectorPreCommitBatchSent",
    "SectorPreCommitLanded",
    "SectorSeedReady",
    "SectorCommitted",
    "SectorSubmitCommitAggregate",
    "SectorCommitAggregateSent",
    "SectorProving",
    "SectorFinalized",
)


@contextlib.asynccontextmanager
async def miner(tmp_path: Path, **kw: Any) -> AsyncIterator[Miner]:
    """A Miner on a virtual clock (unless told otherwise) in `tmp_path/repo`."""
    kw.setdefault("clock", "virtual")
    async with Miner.open(tmp_path / "repo", **kw) as m:
        yield m


def kinds(info: SectorInfo) -> list[str]:
    """The event names in a sector's log, in order (errors keep their full kind)."""
    return [e.kind.removeprefix("event;") for e in info.log]


def count(info: SectorInfo, name: str) -> int:
    """How often `name` appears in the sector's log."""
    return kinds(info).count(name)
