"""The planner's log entries: one kind string per event class, shared by its entries."""

from __future__ import annotations

from pathlib import Path

from sealtools import miner, run

from sectorfsm.sealing.events import SectorProving
from sectorfsm.sealing.info import SectorInfo
from sectorfsm.sealing.planner import Planner
from sectorfsm.sealing.states import SectorState


def test_entries_of_one_event_share_their_kind(tmp_path: Path) -> None:
    """Every round logs its events: the kind is looked up per class, not formatted per entry."""

    async def body() -> None:
        async with miner(tmp_path) as m:
            planner = Planner(m.sealing)
            infos = [SectorInfo(state=SectorState.CommitWait, number=n) for n in (3, 4)]
            for info in infos:
                planner.plan([SectorProving()], info)
                assert info.state is SectorState.FinalizeSector
            first, second = (info.log[-1] for info in infos)
            assert first.kind == "event;SectorProving"
            assert first.kind is second.kind

    run(body)
