"""`sectors demo`: the persisted FSM engine driving a toy, sealing-shaped lifecycle.

This is NOT the sealing pipeline (that is `sealing/`, driven by `sectors run`); it shows the
engine on its own: durable events, one step per machine, retries after step failures, restart
after a crash, and a virtual clock that runs simulated hours in seconds.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections import Counter as Tally
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fsm import Context, LmdbStore, Restart, StateGroup, StepFailed, VirtualClock

#: Simulated durations (seconds) of each stage's work, roughly a 32 GiB sector's.
STAGES: dict[str, float] = {
    "Packing": 20 * 60,
    "PreCommit1": 3 * 3600,
    "PreCommit2": 30 * 60,
    "WaitSeed": 75 * 60,
    "Committing": 40 * 60,
}
ORDER = [*STAGES, "Proving"]


@dataclass(slots=True)
class DemoSector:
    """One demo sector: its stage, retries, and when it started and reached Proving."""

    state: str = "Packing"
    retries: int = 0
    started_at: float = 0.0
    proving_at: float = 0.0


@dataclass(frozen=True, slots=True)
class StageDone:
    """The event that a demo sector finished `stage`."""

    stage: str


def _planner(fail_rate: float, seed: int) -> Any:
    rng = random.Random(seed)

    async def work(ctx: Context, st: DemoSector) -> None:
        await ctx.clock.sleep(STAGES[st.state])
        if st.state == "PreCommit2" and rng.random() < fail_rate:
            raise RuntimeError("simulated PC2 failure (demo)")
        ctx.send(StageDone(st.state))

    def planner(events: list[Any], st: DemoSector) -> tuple[Any, int]:
        for ev in events:
            if isinstance(ev, StageDone) and ev.stage == st.state:
                st.state = ORDER[ORDER.index(st.state) + 1]
            elif isinstance(ev, StepFailed):
                st.retries += 1  # retry the same stage
            elif not isinstance(ev, Restart | StageDone):
                raise ValueError(f"unexpected {type(ev).__name__} in {st.state}")
        return (None if st.state == "Proving" else work), len(events)

    return planner


async def run_demo(repo: Path | None, machines: int, fail_rate: float, seed: int) -> dict[str, Any]:
    """Drive `machines` demo sectors to Proving on virtual time; return a summary."""
    tmp = None
    if repo is None:
        tmp = tempfile.TemporaryDirectory(prefix="sectorfsm-demo-")
        repo = Path(tmp.name)
    clock = VirtualClock()
    start_sim = clock.now()
    wall0 = time.perf_counter()
    try:
        async with LmdbStore(repo) as store:
            group = StateGroup(
                store,
                "demo",
                _planner(fail_rate, seed),
                DemoSector,
                events=[StageDone],
                final=lambda s: s.state == "Proving",
                clock=clock,
            )
            await group.start()  # resumes whatever an interrupted run left behind
            existing = sum(1 for _ in group.list())
            await asyncio.gather(
                *(
                    group.begin(n, DemoSector(started_at=clock.now()))
                    for n in range(existing, machines)
                )
            )
            await asyncio.gather(*(group.send(n, Restart()) for n in range(existing, machines)))
            await group.idle()
            tally = Tally(st.state for _, st in group.list())
            retries = sum(st.retries for _, st in group.list())
            await group.stop()
            commits = store.committer.transactions
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {
        "states": dict(tally),
        "retries": retries,
        "simulated_hours": (clock.now() - start_sim) / 3600,
        "wall_seconds": time.perf_counter() - wall0,
        "commits": commits,
    }
