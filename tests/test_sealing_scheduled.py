"""`ScheduledSealer`: a call that only passes a task on hands back the scheduler's coroutine.

Every await of a job (its placement, its fetch, each sleep of its work) resumes the chain of
coroutines that awaits it; a sealer call wrapping `Scheduler.schedule` in one more coroutine
made each resume pass through it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sealtools import miner, run

from sectorfsm.sched import FileType, Scheduler, SectorRef
from sectorfsm.sealing.sealer import PreCommit2Out, SectorFilesLost


def test_calls_hand_back_the_schedulers_coroutine(tmp_path: Path) -> None:
    async def main() -> None:
        async with miner(tmp_path) as m:
            ref = SectorRef(m.miner_id, 99, m.sector_size)
            cids = PreCommit2Out("bsealed", "bunsealed")
            calls = [
                m.sealer.add_piece(ref, [], m.sector_size, None),
                m.sealer.seal_pre_commit2(ref, b"pc1", False),
                m.sealer.seal_commit1(ref, b"t", b"s", [], cids, False),
                m.sealer.seal_commit2(ref, b"c1", False),
            ]
            for coro in calls:
                assert coro.cr_code is Scheduler.schedule.__code__
                coro.close()  # never started: nothing was queued

    run(main)


def test_a_lost_file_fails_the_call_at_once(tmp_path: Path) -> None:
    # Checked when the call is made, as before: the handler's `await` raises it either way.
    async def main() -> None:
        async with miner(tmp_path) as m:
            ref = SectorRef(m.miner_id, 99, m.sector_size)
            m.sealer._lost[99] = {FileType.SEALED: "sealed file gone"}
            with pytest.raises(SectorFilesLost, match="sealed file gone"):
                await m.sealer.seal_pre_commit2(ref, b"pc1", False)

    run(main)
