"""A rejected or stray event never re-runs work (compute jobs are counted in the sealer)."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sealtools import miner, run

from sectorfsm.fsm import LmdbStore, StepFailed
from sectorfsm.sched import Job, TaskType
from sectorfsm.sealing import SectorState, SectorStuckError, commp, requests
from sectorfsm.sealing.backends import sim as sim_module
from sectorfsm.sealing.backends.sim import SimBackend
from sectorfsm.sealing.events import (
    SectorAddPiece,
    SectorEvent,
    SectorFatalError,
    SectorFinalized,
    SectorPacked,
    SectorProving,
    SectorRetryNow,
    SectorStartPacking,
)
from sectorfsm.sealing.info import SectorInfo
from sectorfsm.sealing.input import pending_piece
from sectorfsm.sealing.miner import Miner
from sectorfsm.sealing.planner import Planner
from sectorfsm.sealing.states import FAILED_STATES
from sectorfsm.sealing.store_view import store_path

DAY = 86400.0
#: Tasks a sector runs once per attempt (AddPiece runs once per piece or filler written).
ONCE = (TaskType.PRE_COMMIT1, TaskType.PRE_COMMIT2, TaskType.COMMIT1, TaskType.COMMIT2)


class CountingSim(SimBackend):
    """The sim backend, counting every compute job it runs by (sector, task, what)."""

    jobs: Counter[tuple[int, TaskType, Any]]
    tickets: dict[int, set[bytes]]

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.jobs = Counter()
        self.tickets = {}
        CountingSim.last = self

    last: CountingSim

    async def add_piece(self, job: Job, existing: list[int], size: int, piece: Any) -> Any:
        """Counted by where the piece is written (its offset) and its size."""
        self.jobs[(job.sector.number, job.task_type, (sum(existing), size))] += 1
        return await super().add_piece(job, existing, size, piece)

    async def pre_commit1(self, job: Job, ticket: bytes, pieces: Any) -> bytes:
        """Counted, and the ticket it sealed with noted."""
        self.jobs[(job.sector.number, job.task_type, None)] += 1
        self.tickets.setdefault(job.sector.number, set()).add(ticket)
        return await super().pre_commit1(job, ticket, pieces)

    async def pre_commit2(self, job: Job, pc1out: bytes) -> Any:
        """Counted."""
        self.jobs[(job.sector.number, job.task_type, None)] += 1
        return await super().pre_commit2(job, pc1out)

    async def commit1(self, job: Job, *args: Any) -> bytes:
        """Counted."""
        self.jobs[(job.sector.number, job.task_type, None)] += 1
        return await super().commit1(job, *args)

    async def commit2(self, job: Job, c1out: bytes) -> bytes:
        """Counted."""
        self.jobs[(job.sector.number, job.task_type, None)] += 1
        return await super().commit2(job, c1out)

    async def finalize(self, job: Job, keep_unsealed: bool) -> None:
        """Counted."""
        self.jobs[(job.sector.number, job.task_type, None)] += 1
        await super().finalize(job, keep_unsealed)

    def doubled(self) -> dict[tuple[int, TaskType, Any], int]:
        """Jobs that ran more than once."""
        return {k: n for k, n in self.jobs.items() if n > 1}


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> type[CountingSim]:
    """Make `Miner.open(sealer="sim")` use the counting backend."""
    monkeypatch.setattr(sim_module, "SimBackend", CountingSim)
    return CountingSim


def _queue_offline(repo: Path, pledges: int, pieces: int) -> None:
    """What `sectors pledge` and `sectors add-piece` do while no engine runs."""
    with LmdbStore(store_path(repo)) as store:
        assert requests.pledge_offline(store, pledges) is not None
        for i in range(pieces):
            cid = commp.piece_cid(b"offline piece %d" % i * 10)
            requests.submit(store, {"op": "add_piece", "piece_cid": cid, "size": 256})


def test_offline_pledge_then_pieces_runs_each_task_once(
    tmp_path: Path, counting: type[CountingSim]
) -> None:
    """Issue 12 item 1: the pieces never go into the CC sector, and nothing runs twice."""

    async def body() -> None:
        async with miner(tmp_path, sector_size="2KiB"):
            pass  # creates the repo (its identity), nothing else
        _queue_offline(tmp_path / "repo", pledges=1, pieces=3)
        async with miner(tmp_path, sector_size="2KiB") as m:
            sim = counting.last
            await m.wait(1, SectorState.Proving, timeout=DAY)
            cc = m.status(1)
            assert cc.pieces and all(p.deal is None for p in cc.pieces), "CC took deal pieces"
            deal_sectors = [i.number for i in m.list() if i.number != 1]
            assert deal_sectors, "the pieces went nowhere"
            for n in deal_sectors:
                await m.wait(n, SectorState.Proving, timeout=DAY)
            await m.idle()
            assert sim.doubled() == {}
            for n in (1, *deal_sectors):
                assert len(sim.tickets[n]) == 1
                for task in ONCE:
                    assert sim.jobs[(n, task, None)] == 1, (n, task)
            assert not any("unexpected event" in e.message for e in cc.log)

    run(body)


# -- property: stray events never add compute jobs ---------------------------------------------

S = SectorState
#: The states whose handler runs each task (at most one job per run).
TASK_STATES: dict[TaskType, tuple[SectorState, ...]] = {
    TaskType.ADD_PIECE: (S.Packing, S.AddPiece),
    TaskType.PRE_COMMIT1: (S.PreCommit1,),
    TaskType.PRE_COMMIT2: (S.PreCommit2,),
    TaskType.COMMIT1: (S.Committing,),
    TaskType.COMMIT2: (S.Committing,),
    TaskType.FINALIZE: (S.FinalizeSector, S.CommitFinalize),
}
STRAYS = (
    "add-piece-empty",
    "add-piece-with-piece",
    "duplicate-result",
    "retry",
    "start-packing",
    "packed",
    "proving",
    "finalized",
    "fatal",
)
injections_st = st.lists(
    st.tuples(st.floats(0, 120), st.integers(0, 3), st.sampled_from(STRAYS)),
    min_size=1,
    max_size=12,
)


class Attempts:
    """Counts, per sector, each run of a state's handler the sector is owed.

    A run is owed when the sector enters the state, or when a StepFailed in it asks for a
    retry: counted from the planner's inputs and outputs, never from the steps it returned.
    """

    def __init__(self) -> None:
        self.runs: Counter[tuple[int, SectorState]] = Counter()
        self.results: defaultdict[int, list[SectorEvent]] = defaultdict(list)

    def wrap(self, plan: Any) -> Any:
        def counted(planner: Planner, events: list[Any], info: SectorInfo) -> Any:
            before = info.state
            step, processed = plan(planner, events, info)
            done = events[:processed]
            if info.state is not before or any(isinstance(e, StepFailed) for e in done):
                self.runs[(info.number, info.state)] += 1
            self.results[info.number].extend(
                e for e in done if isinstance(e, SectorEvent) and not e.is_global
            )
            return step, processed

        return counted

    def owed(self, number: int, task: TaskType) -> int:
        """Runs owed of the handlers that run `task`."""
        return sum(self.runs[(number, state)] for state in TASK_STATES[task])


def _stray(m: Miner, attempts: Attempts, number: int, kind: str) -> object | None:
    if kind == "add-piece-empty":
        return SectorAddPiece([])
    if kind == "add-piece-with-piece":
        cid = commp.piece_cid(b"stray piece for %d" % number * 4)
        return SectorAddPiece([pending_piece(m.chain, m.sector_size, cid, 128, None)])
    if kind == "duplicate-result":
        seen = attempts.results[number]
        return seen[-1] if seen else None
    return {
        "retry": SectorRetryNow(),
        "start-packing": SectorStartPacking(),
        "packed": SectorPacked(),
        "proving": SectorProving(),
        "finalized": SectorFinalized(),
        "fatal": SectorFatalError("stray fatal error"),
    }[kind]


async def _inject(m: Miner, attempts: Attempts, plan: list[tuple[float, int, str]]) -> None:
    t0 = m.clock.now()
    for at, which, kind in sorted(plan):
        await m.clock.sleep_until(t0 + at)
        numbers = [int(mid) for mid, _ in m.group.list()]
        number = numbers[which % len(numbers)]
        event = _stray(m, attempts, number, kind)
        if event is not None:
            await m.group.send(number, event)


def _settled(info: SectorInfo) -> str | None:
    """Why the sector's end is wrong, or None if it is Proving or failed with a reason."""
    if info.state is S.Proving:
        return None
    if info.state in FAILED_STATES | {S.FailedUnrecoverable} and info.last_err:
        return None
    return f"sector {info.number} ended in {info.state.name} ({info.last_err!r})"


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(plan=injections_st)
@example(plan=[(0.0, 0, "add-piece-empty")])  # rejected in Packing: re-ran the fillers
@example(plan=[(62.0, 1, "retry")])  # a retry outside a failed state: cancelled PC1
@example(plan=[(61.0, 0, "add-piece-with-piece")])  # the piece opens a new sector
def test_stray_events_never_add_compute_jobs(plan: list[tuple[float, int, str]]) -> None:
    """Random stray events at random moments: at most one job per (sector, task, run owed)."""
    attempts = Attempts()

    async def body(repo: Path) -> None:
        # Scaled so the sim's tasks take seconds: strays land while handlers compute.
        async with Miner.open(repo, clock="virtual", sim_time_scale=20000) as m:
            sim = CountingSim.last
            await m.pledge()
            await m.add_piece(commp.piece_cid(b"a deal" * 20), 128)
            injector = asyncio.ensure_future(_inject(m, attempts, plan))
            try:
                await injector
                numbers: list[int] = []
                while numbers != (numbers := [int(mid) for mid, _ in m.group.list()]):
                    # (A stray piece may open a new sector while the others settle.)
                    for number in numbers:
                        with contextlib.suppress(SectorStuckError):
                            await m.wait(number, S.Proving, timeout=30 * DAY)
                    await m.idle()
            finally:
                injector.cancel()
            problems = [p for p in map(_settled, m.list()) if p]
            assert problems == []
            for (number, task, what), runs in sim.jobs.items():
                owed = attempts.owed(number, task)
                if task is TaskType.ADD_PIECE:
                    assert runs <= max(owed, 1), (number, task, what, runs, owed)
                    continue
                total = sum(n for (k, t, _), n in sim.jobs.items() if (k, t) == (number, task))
                assert total <= owed, (number, task, total, owed, m.status(number).log)

    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as tmp:
        mp.setattr(sim_module, "SimBackend", CountingSim)
        mp.setattr(Planner, "plan", attempts.wrap(Planner.plan))
        run(lambda: body(Path(tmp) / "repo"))
