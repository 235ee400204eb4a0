"""Calls that only pass work on hand back the coroutine doing it, not one wrapped around it.

Every await of a job (its placement, its fetch, each sleep of its work) resumes the chain of
coroutines that awaits it: a sealer call wrapping `Scheduler.schedule`, or the step wrapping
a handler, made each resume pass through one more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sealtools import miner, run

from sectorfsm.sched import FileType, Scheduler, SectorRef
from sectorfsm.sealing.info import SectorInfo
from sectorfsm.sealing.planner import run_handler
from sectorfsm.sealing.sealer import PreCommit2Out, SectorFilesLost
from sectorfsm.sealing.states import SectorState


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


def test_the_step_is_the_handlers_coroutine_unless_a_retry_is_pending(tmp_path: Path) -> None:
    ran: list[int] = []

    async def handler(sealing: Any, ctx: Any, info: SectorInfo) -> None:
        ran.append(info.number)

    async def main() -> None:
        async with miner(tmp_path) as m:
            info = SectorInfo(number=5, state=SectorState.Packing)
            step = run_handler(m.sealing, handler, None, info)  # type: ignore[arg-type]
            assert step.cr_code is handler.__code__  # type: ignore[attr-defined]
            await step
            info = SectorInfo(number=6, state=SectorState.PackingFailed)
            step = run_handler(m.sealing, handler, None, info)  # type: ignore[arg-type]
            assert step.cr_code is not handler.__code__  # type: ignore[attr-defined]
            await step  # no backoff to wait out: the handler runs
            assert ran == [5, 6]

    run(main)


def test_a_sector_keeps_one_handle_while_it_works(tmp_path: Path) -> None:
    # The index, the queue and their caches are keyed by it: the same object is found by
    # identity, where a new equal one ran the dataclass's `__eq__` at every lookup.
    async def main() -> None:
        async with miner(tmp_path) as m:
            info = SectorInfo(number=5, state=SectorState.Packing)
            ref = m.sealing.ref(info)
            assert ref == SectorRef(m.miner_id, 5, m.sector_size)
            assert m.sealing.ref(info) is ref
            info.sector_size = m.sector_size * 2  # (another size: another handle)
            assert m.sealing.ref(info).size == m.sector_size * 2
            m.sealing.forget(5)
            info.sector_size = 0
            again = m.sealing.ref(info)
            assert again == ref and again is not ref

    run(main)
