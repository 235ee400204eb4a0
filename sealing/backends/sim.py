"""The `sim` sealer backend: realistic durations, deterministic outputs, no files.

Durations are per task for a 32 GiB sector (PreCommit1 hours, PreCommit2 and Commit2 tens of
minutes), doubled for 64 GiB and scaled linearly below, with a small floor so tiny sectors
still take a visible moment. Time passes on the scheduler's clock, so on a virtual clock a
day of sealing takes milliseconds.

Per-worker duration tables (option `durations`: `{worker: {task short name: seconds for a
32 GiB sector}}`, scaled like the defaults) model faster hardware for `sectors simulate`; a
worker can be lost (`lose_worker`): its running tasks fail at once, as a crashed box's would.
Fetches between workers take bytes / the slower link, and the bytes moved are counted per
(source, destination) pair in `fetched`.

Outputs are deterministic: CommD is the real unsealed CID of the pieces (computed from their
commitments, no data hashed), CommR and the proof come from `proofs.py`, so `DevnetChain`
verifies them and a wrong ticket or seed is caught.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...fsm import Clock
from ...fsm.codec import packb, unpackb
from ...sched import (
    FileType,
    Job,
    Scheduler,
    SectorRef,
    StoragePath,
    TaskType,
    WorkerResources,
    WorkerSpec,
    simulated_transfer,
)
from ...sched.fetch import Transfer
from .. import commp
from ..info import PendingPiece, Piece
from ..proofs import porep_proof, sealed_cid
from ..sealer import PreCommit2Out

_32G = 32 << 30

#: Seconds per task for a 32 GiB sector (roughly a 2021 AMD EPYC + RTX 3090 host).
DURATIONS_32G: dict[TaskType, float] = {
    TaskType.ADD_PIECE: 5 * 60,
    TaskType.PRE_COMMIT1: 3.5 * 3600,
    TaskType.PRE_COMMIT2: 25 * 60,
    TaskType.COMMIT1: 60,
    TaskType.COMMIT2: 30 * 60,
    TaskType.FINALIZE: 5 * 60,
}


class SimTaskError(RuntimeError):
    """A simulated task failure (fault injection)."""


@dataclass(slots=True)
class SimFaults:
    """Knobs the tests turn: fail the next N tasks of a type; corrupt some sectors' proofs."""

    fail_tasks: dict[TaskType, int] = field(default_factory=dict)
    corrupt_proofs: set[int] = field(default_factory=set)
    #: Use a wrong ticket when computing these sectors' CommR (caught at commit).
    wrong_ticket: set[int] = field(default_factory=set)
    #: Fail the next N removals.
    fail_remove: int = 0


#: Per worker name: seconds per task for a 32 GiB sector, where it differs from the defaults.
WorkerDurations = Mapping[str, Mapping[TaskType, float]]


def parse_durations(value: object) -> dict[str, dict[TaskType, float]]:
    """The `durations` option: `{worker: {task short name: seconds}}`; ValueError if malformed."""
    if not isinstance(value, Mapping):
        raise ValueError(f"sealer_options durations: must map workers to tables, got {value!r}")
    out: dict[str, dict[TaskType, float]] = {}
    for worker, table in value.items():
        if not isinstance(table, Mapping):
            raise ValueError(f"sealer_options durations.{worker}: must map task names to seconds")
        tasks: dict[TaskType, float] = {}
        for key, seconds in table.items():
            task = key if isinstance(key, TaskType) else TaskType.parse(str(key))
            ok = isinstance(seconds, int | float) and not isinstance(seconds, bool)
            if not ok or not 0 < seconds < 1e9:
                raise ValueError(
                    f"sealer_options durations.{worker}.{key}: must be seconds > 0, got {seconds!r}"
                )
            tasks[task] = float(seconds)
        out[str(worker)] = tasks
    return out


class SimBackend:
    """A backend that only takes time and returns deterministic commitments."""

    name = "sim"

    def __init__(
        self,
        clock: Clock,
        miner: int,
        *,
        time_scale: float = 1.0,
        floor: float = 0.01,
        durations: WorkerDurations | None = None,
    ):
        self.clock = clock
        self.miner = miner
        self.time_scale = time_scale
        self.floor = floor
        self.faults = SimFaults()
        #: Per-worker overrides of `DURATIONS_32G` (faster or slower hardware).
        self.durations: dict[str, dict[TaskType, float]] = {
            w: dict(t) for w, t in (durations or {}).items()
        }
        #: Tasks run, by type (for tests and the demo).
        self.runs: dict[TaskType, int] = {}
        #: Bytes fetched, per (source worker or "shared", destination worker).
        self.fetched: dict[tuple[str, str], int] = {}
        #: Called as `on_fetch(job, seconds)` after each fetch (`sectors simulate` counts them).
        self.on_fetch: Callable[[Job, float], None] | None = None
        self._sched: Scheduler | None = None
        #: Per worker, the asyncio tasks sleeping through its running jobs; `lose_worker`
        #: cancels them. (One shared future per worker waited on by every job cost O(running
        #: jobs) per job's end; a sleep task per job cost a task per job.)
        self._running: dict[str, set[asyncio.Task[Any]]] = {}
        #: Those `lose_worker` cancelled (told apart from a cancelled job).
        self._lost: set[asyncio.Task[Any]] = set()

    def duration(self, task: TaskType, sector_size: int, worker: str | None = None) -> float:
        """Simulated seconds for `task` on a sector of `sector_size` bytes (on `worker`)."""
        table = self.durations.get(worker, {}) if worker is not None else {}
        per_32g = table.get(task, DURATIONS_32G.get(task, 60.0))
        return max(self.floor, per_32g * sector_size / _32G * self.time_scale)

    def bind(self, sched: Scheduler, store: object) -> None:
        """Remember the scheduler: fetches are timed by its workers' links."""
        self._sched = sched

    def fetcher(self, files: FileType) -> Transfer:
        """A transfer that takes bytes / the slower link and counts the bytes per pair."""
        if self._sched is None:
            raise RuntimeError("the sim backend fetches only once bound to a scheduler")
        move = simulated_transfer(self._sched)

        async def transfer(job: Job, source: str | None, nbytes: int) -> None:
            began = self.clock.now()
            await move(job, source, nbytes)
            pair = (source or "shared", job.worker.name)
            self.fetched[pair] = self.fetched.get(pair, 0) + nbytes
            if self.on_fetch is not None:
                self.on_fetch(job, self.clock.now() - began)

        return transfer

    def lose_worker(self, worker: str) -> None:
        """Fail every task running on `worker` now, as a crash of the box would."""
        for sleeping in self._running.pop(worker, ()):
            self._lost.add(sleeping)
            sleeping.cancel()

    async def _work(self, job: Job) -> None:
        task = job.task_type
        worker = job.worker.name
        self.runs[task] = self.runs.get(task, 0) + 1
        me = asyncio.current_task()
        assert me is not None  # a job runs in a task
        running = self._running.setdefault(worker, set())
        running.add(me)
        try:
            await self.clock.sleep(self.duration(task, job.sector.size, worker))
        except asyncio.CancelledError:
            if me in self._lost:
                self._lost.discard(me)
                if me.uncancel() == 0:  # lost with its worker, and the job itself goes on
                    raise SimTaskError(
                        f"simulated {task.short} lost with worker {worker}"
                    ) from None
            raise  # (the job itself was cancelled)
        finally:
            running.discard(me)
        left = self.faults.fail_tasks.get(task, 0)
        if left > 0:
            self.faults.fail_tasks[task] = left - 1
            raise SimTaskError(f"simulated {task.short} failure for sector {job.sector}")

    async def add_piece(
        self, job: Job, existing: list[int], size: int, piece: PendingPiece | None
    ) -> Piece:
        """A filler gets the zero commitment; a deal piece keeps its declared CommP."""
        await self._work(job)
        if piece is None:
            return Piece(commp.zero_piece_cid(size), size, None)
        return Piece(piece.piece_cid, piece.size, piece.deal)

    async def pre_commit1(self, job: Job, ticket: bytes, pieces: list[Piece]) -> bytes:
        """Compute CommD from the pieces; carry it and the ticket to PC2."""
        await self._work(job)
        comm_d = _comm_d(job.sector.size, tuple((p.piece_cid, p.size) for p in pieces))
        if job.sector.number in self.faults.wrong_ticket:
            ticket = hashlib.sha256(b"wrong" + ticket).digest()
        return packb({"comm_d": comm_d, "ticket": ticket})

    async def pre_commit2(self, job: Job, pc1out: bytes) -> PreCommit2Out:
        """CommR from CommD, the ticket and the sector id."""
        await self._work(job)
        out = unpackb(pc1out)
        sector: SectorRef = job.sector
        return PreCommit2Out(
            sealed_cid(self.miner, sector.number, out["comm_d"], out["ticket"]), out["comm_d"]
        )

    async def commit1(
        self, job: Job, ticket: bytes, seed: bytes, pieces: list[Piece], cids: PreCommit2Out
    ) -> bytes:
        """Carry what the proof binds to."""
        await self._work(job)
        return packb(
            {"ticket": ticket, "seed": seed, "sealed": cids.sealed, "unsealed": cids.unsealed}
        )

    async def commit2(self, job: Job, c1out: bytes) -> bytes:
        """The deterministic proof (corrupted on request)."""
        await self._work(job)
        c1 = unpackb(c1out)
        proof = porep_proof(
            self.miner, job.sector.number, c1["sealed"], c1["unsealed"], c1["ticket"], c1["seed"]
        )
        if job.sector.number in self.faults.corrupt_proofs:
            proof = bytes([proof[0] ^ 0xFF]) + proof[1:]
        return proof

    async def finalize(self, job: Job, keep_unsealed: bool) -> None:
        """Only takes time."""
        await self._work(job)

    async def release_unsealed(self, sector: SectorRef) -> None:
        """Nothing to delete."""

    async def remove(self, sector: SectorRef) -> None:
        """Nothing to delete (fails on request)."""
        if self.faults.fail_remove > 0:
            self.faults.fail_remove -= 1
            raise SimTaskError(f"simulated removal failure for sector {sector}")


@functools.lru_cache(maxsize=256)
def _comm_d(sector_size: int, pieces: tuple[tuple[str, int], ...]) -> str:
    """CommD of the pieces: every CC sector of a size has the same, so it is computed once."""
    return commp.unsealed_cid(sector_size, pieces)


def sim_worker(name: str = "sim-worker", capacity: int = 1 << 50) -> WorkerSpec:
    """A simulated worker: big enough for any sector size, with one sealing+storage path."""
    return WorkerSpec(
        name=name,
        resources=WorkerResources(cpus=128, mem_physical=2 << 40, mem_swap=0, gpus=("sim-gpu",)),
        paths=(StoragePath(f"{name}-path", name, capacity, can_seal=True, can_store=True),),
        needs_heartbeats=False,
    )


class SimFactory:
    """The registry's `sim`: no files, one big simulated worker; options: `durations`."""

    name = "sim"
    keeps_files = False

    def check(
        self, repo: Path, options: Mapping[str, Any], workers: Sequence[WorkerSpec] | None
    ) -> None:
        """Only `durations` is read (per-worker task seconds); it needs no directories."""
        if "durations" in options:
            parse_durations(options["durations"])

    def create(
        self,
        *,
        clock: Clock,
        miner: int,
        repo: Path,
        options: Mapping[str, Any],
        time_scale: float,
    ) -> SimBackend:
        """A `SimBackend` whose durations are scaled by `time_scale`."""
        durations = parse_durations(options.get("durations", {}))
        return SimBackend(clock, miner, time_scale=time_scale, durations=durations)

    def default_workers(self, repo: Path) -> list[WorkerSpec]:
        """One `sim_worker`."""
        return [sim_worker()]
