"""Part 2 of the scheduler benchmark (`bench_sched.py`): placement quality on a virtual clock.

`simulate` runs one cluster shape under one assigner for some simulated days and returns
sectors per day against the analytic bound of the cluster.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

from sched_cluster import (
    ALL_FILES,
    C2_BOX,
    CS,
    MINER,
    MIXED_BOX,
    PC2_BOX,
    S32,
    SEAL_BOX,
    TIB,
    UNBOUNDED,
    Kind,
    T,
    fits_together,
    log,
    max_concurrent,
)

from sectorfsm.fsm import VirtualClock
from sectorfsm.sched import (
    AllocSelector,
    ExistingSelector,
    FileType,
    Job,
    Scheduler,
    SectorRef,
    StoragePath,
    TaskSelector,
    TaskType,
    WorkerSpec,
    fetch_prepare,
)
from sectorfsm.sched.selectors import Selector

# -- part 2: placement quality ------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    name: str
    task: TaskType
    #: Mean duration of one 32 GiB task, in seconds; each task draws uniformly within +-JITTER.
    seconds: float


STAGES = (
    Stage("AP", T.ADD_PIECE, 10 * 60),
    Stage("PC1", T.PRE_COMMIT1, 3.5 * 3600),
    Stage("PC2", T.PRE_COMMIT2, 25 * 60),
    Stage("C1", T.COMMIT1, 60),
    Stage("C2", T.COMMIT2, 20 * 60),
    Stage("FIN", T.FINALIZE, 5 * 60),
)
BY_NAME = {s.name: s for s in STAGES}
JITTER = 0.10
#: Between PC2 and C1 the sector waits for the chain (150 epochs of 30 s), on no worker.
WAIT_SEED_S = 150 * 30
PLEDGE_TICK_S = 30.0
SAMPLE_S = 300.0

TEN_GBIT = 10e9 / 8
ONE_GBIT = 1e9 / 8
SEAL_C1 = SEAL_BOX
AIO = MIXED_BOX


@dataclass(frozen=True)
class Shape:
    name: str
    description: str
    bandwidth: float
    kinds: tuple[Kind, ...]
    #: Every PC1 box can run PC2 on its own output: also run the pinned-PC2 control.
    pinned_control: bool = False


SHAPES = (
    Shape(
        "fast",
        "10 Gbit/s links; PC1-only boxes, PC1+PC2 boxes, PC2 boxes and C2 boxes",
        TEN_GBIT,
        (
            Kind("pc1", 6, 64, 1024, 0, SEAL_C1, 30),
            Kind("mixed", 4, 64, 768, 1, AIO, 30),
            Kind("pc2", 5, 48, 512, 4, PC2_BOX, 16),
            Kind("c2", 4, 48, 768, 4, C2_BOX, 1),
        ),
    ),
    Shape(
        "slow",
        "1 Gbit/s links; all-in-one AP/PC1/PC2 boxes of two sizes, and C2 boxes",
        ONE_GBIT,
        (
            Kind("aio-big", 6, 64, 1024, 2, AIO, 30),
            Kind("aio-small", 6, 32, 512, 1, AIO, 16),
            Kind("c2", 4, 48, 768, 4, C2_BOX, 1),
        ),
        pinned_control=True,
    ),
)


def analytic_bound(shape: Shape) -> dict[str, Any]:
    """Per stage: sum over capable workers of their max concurrency, / duration, per day.

    A worker's max concurrency for a stage is how many tasks of that stage its own ledger
    admits on an idle worker (memory, swap, threads, GPUs, MAX_CONCURRENT). The bound is the
    least of the stages: no placement can finish sectors faster. It ignores transfers and the
    WaitSeed delay (which occupies no worker).
    """
    slots: dict[str, int] = {}
    per_day: dict[str, float | None] = {}
    for st in STAGES:
        n = 0
        for k in shape.kinds:
            if st.task in k.tasks:
                n += k.count * max_concurrent(k.resources(), st.task)
        slots[st.name] = n
        unbounded = any(
            st.task in k.tasks and max_concurrent(k.resources(), st.task) >= UNBOUNDED
            for k in shape.kinds
        )
        per_day[st.name] = None if unbounded else n / st.seconds * 86400
    finite = {k: v for k, v in per_day.items() if v is not None}
    bottleneck = min(finite, key=lambda k: finite[k])
    # Each box must be able to run its max of PC1, PC2 and C2 at once, plus an AP and a C1, or
    # the per-stage bound double-counts shared resources (the shapes are built so it does not).
    for k in shape.kinds:
        combo: list[tuple[TaskType, int]] = [
            (t, max_concurrent(k.resources(), t))
            for t in (T.PRE_COMMIT1, T.PRE_COMMIT2, T.COMMIT2)
            if t in k.tasks
        ]
        combo += [(t, 1) for t in (T.ADD_PIECE, T.COMMIT1) if t in k.tasks]
        if not fits_together(k.resources(), combo):
            log(f"WARNING: {shape.name}/{k.name} cannot hold {combo} at once: bound is loose")
    return {
        "slots": slots,
        "stage_per_day": {k: (round(v, 1) if v is not None else None) for k, v in per_day.items()},
        "bottleneck": bottleneck,
        "bound_per_day": finite[bottleneck],
    }


@dataclass
class StageStats:
    requested: int = 0
    assigned: int = 0
    working: int = 0
    done: int = 0
    fetches: int = 0
    fetch_bytes: int = 0
    fetch_s: float = 0.0
    # Time-averaged over the measured window (from the sampler).
    samples: int = 0
    sum_queued: float = 0.0
    sum_held: float = 0.0
    sum_working: float = 0.0
    idle_with_queue: int = 0


@dataclass
class Sim:
    shape: Shape
    assigner: str
    days: float
    warmup_days: float
    seed: int
    #: False: PC2 only where PC1 wrote its files (the control run; Lotus's
    #: ExistingSelector(FTCache|FTSealed, allowFetch=false), myScheduler's ForceP2FromLocalP1).
    pc2_fetch: bool = True
    clock: VirtualClock = field(init=False)
    sched: Scheduler = field(init=False)
    stats: dict[str, StageStats] = field(init=False)
    finished: list[float] = field(default_factory=list)
    home: dict[str, str] = field(default_factory=dict)
    disk_peak: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.clock = VirtualClock(start=0.0)
        self.sched = Scheduler(clock=self.clock, assigner=self.assigner)
        self.stats = {s.name: StageStats() for s in STAGES}
        self.bound = analytic_bound(self.shape)
        b = BY_NAME[self.bound["bottleneck"]]
        self.b_stage = b
        self.b_slots = self.bound["slots"][b.name]
        self.b_rate = self.b_slots / b.seconds
        upstream = 0.0
        for st in STAGES:
            if st is b:
                break
            upstream += st.seconds
        #: Sectors pledged but not yet placed on the bottleneck stage: kept at this cap.
        self.pre_cap = math.ceil(self.b_rate * upstream * 1.2) + max(
            4, math.ceil(0.1 * self.b_slots)
        )
        self.pre_count = 0
        #: Sectors whose bottleneck task has finished but which have not finished FIN.
        self.post_count = 0
        self.post_at_warmup: int | None = None
        self.pledged = 0
        self.numbers = iter(range(1, 1 << 40))
        self.sector_tasks: set[asyncio.Task[None]] = set()
        for k in self.shape.kinds:
            for i in range(k.count):
                name = f"{k.name}-{i}"
                path = StoragePath(f"{name}-nvme", name, k.disk_tib * TIB)
                self.home[name] = path.id
                self.sched.add_worker(
                    WorkerSpec(
                        name,
                        k.resources(),
                        task_types=k.tasks,
                        paths=(path,),
                        bandwidth=self.shape.bandwidth,
                        needs_heartbeats=False,
                    )
                )
        self.fetchers = {f: fetch_prepare(self.sched, f) for f in (FileType.UNSEALED, CS)}

    # -- files on disk (the index tracks where; `used` is what a heartbeat would report) --------

    def _put(self, s: SectorRef, files: FileType, path_id: str) -> None:
        self.sched.index.add_sector(s, files, path_id)  # counts the files' bytes as stored
        p = self.sched.index.paths[path_id]
        frac = (p.used + p.stored + p.reserved) / p.capacity
        if frac > self.disk_peak.get(path_id, 0.0):
            self.disk_peak[path_id] = frac

    def _drop(self, s: SectorRef, files: FileType) -> None:
        self.sched.index.remove_sector(s, files)

    # -- one stage of one sector --------------------------------------------------------------

    async def stage(
        self, s: SectorRef, st: Stage, selector: Selector, needs: FileType, makes: FileType
    ) -> None:
        stats = self.stats[st.name]
        stats.requested += 1
        clock = self.clock

        async def prepare(job: Job) -> None:
            stats.assigned += 1
            if st is self.b_stage:
                self.pre_count -= 1
            if needs and job.placement.fetch_bytes and job.placement.path is not None:
                t = clock.now()
                await self.fetchers[needs](job)  # the library's GET: sleeps, moves the files
                stats.fetches += 1
                stats.fetch_bytes += job.placement.fetch_bytes
                stats.fetch_s += clock.now() - t

        async def work(job: Job) -> None:
            stats.working += 1
            try:
                await clock.sleep(st.seconds * self.rng.uniform(1 - JITTER, 1 + JITTER))
            finally:
                stats.working -= 1
            if makes:
                self._put(s, makes, job.placement.path or self.home[job.worker.name])
                self.sched.files_changed(s)

        try:
            await self.sched.schedule(s, st.task, selector, prepare, work)
        finally:
            stats.done += 1
        if st is self.b_stage:
            self.post_count += 1

    async def sector(self, s: SectorRef) -> None:
        await self.stage(s, BY_NAME["AP"], AllocSelector(FileType.UNSEALED), FileType.NONE,
                         FileType.UNSEALED)  # fmt: skip
        # PC1 next to its unsealed file if that box has room, else anywhere (fetching 32 GiB).
        await self.stage(s, BY_NAME["PC1"], ExistingSelector(FileType.UNSEALED, allow_fetch=True),
                         FileType.UNSEALED, CS)  # fmt: skip
        # PC2 where PC1 wrote cache+sealed (483 GiB), or anywhere, fetching them.
        await self.stage(s, BY_NAME["PC2"], ExistingSelector(CS, allow_fetch=self.pc2_fetch), CS,
                         FileType.NONE)  # fmt: skip
        await self.clock.sleep(WAIT_SEED_S)
        await self.stage(s, BY_NAME["C1"], ExistingSelector(CS), FileType.NONE, FileType.NONE)
        await self.stage(s, BY_NAME["C2"], TaskSelector(), FileType.NONE, FileType.NONE)
        await self.stage(s, BY_NAME["FIN"], ExistingSelector(CS), FileType.NONE, FileType.NONE)
        self._drop(s, ALL_FILES)  # moved to long-term storage
        self.sched.files_changed(s)
        self.finished.append(self.clock.now())
        self.post_count -= 1

    # -- the pledge stream and the sampler ----------------------------------------------------

    async def pledger(self) -> None:
        """Keep `pre_cap` sectors in front of the bottleneck; ramp up over one of its tasks."""
        b = self.b_stage
        while True:
            t = self.clock.now()
            allowance = (
                math.inf
                if t >= b.seconds
                else math.ceil(self.b_slots * t / b.seconds) + self.pre_cap
            )
            while self.pre_count < self.pre_cap and self.pledged < allowance:
                s = SectorRef(MINER, next(self.numbers), S32)
                self.pre_count += 1
                self.pledged += 1
                task = asyncio.get_running_loop().create_task(self.sector(s))
                self.sector_tasks.add(task)
                task.add_done_callback(self.sector_tasks.discard)
            await self.clock.sleep(PLEDGE_TICK_S)

    async def sampler(self, start: float) -> None:
        await self.clock.sleep_until(start)
        self.post_at_warmup = self.post_count
        while True:
            for name, st in self.stats.items():
                queued = st.requested - st.assigned
                held = st.assigned - st.done
                st.samples += 1
                st.sum_queued += queued
                st.sum_held += held
                st.sum_working += st.working
                if queued and held < self.bound["slots"][name]:
                    st.idle_with_queue += 1
            await self.clock.sleep(SAMPLE_S)

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        warm = self.warmup_days * 86400
        end = self.days * 86400
        pledger = loop.create_task(self.pledger())
        sampler = loop.create_task(self.sampler(warm))
        await self.clock.sleep_until(end)
        helpers = [pledger, sampler, *self.sector_tasks]
        for t in helpers:
            t.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        window_days = (end - warm) / 86400
        done = sum(1 for t in self.finished if warm <= t < end)
        # Sectors already past the bottleneck when the window opened (a backlog built during
        # start-up) may drain inside it; a net drain is not credited, so a transient cannot
        # push the figure above what the bottleneck produced in the window.
        drained = max(0, (self.post_at_warmup or 0) - self.post_count)
        per_day = (done - drained) / window_days
        bound = self.bound["bound_per_day"]
        stages: dict[str, Any] = {}
        for name, st in self.stats.items():
            n = max(1, st.samples)
            slots = self.bound["slots"][name]
            stages[name] = {
                "tasks": st.done,
                "fetches": st.fetches,
                "fetch_tib": round(st.fetch_bytes / TIB, 2),
                "mean_fetch_min": round(st.fetch_s / st.fetches / 60, 1) if st.fetches else 0.0,
                "avg_queued": round(st.sum_queued / n, 1),
                "avg_held": round(st.sum_held / n, 1),
                "avg_working": round(st.sum_working / n, 1),
                "slots": slots if slots < UNBOUNDED else None,
                "working_util": round(st.sum_working / n / slots, 3) if slots < UNBOUNDED else None,
                "idle_while_queued": round(st.idle_with_queue / n, 3),
            }
        return {
            "sectors_per_day": round(per_day, 1),
            "quality": round(per_day / bound, 4),
            "finished_in_window": done,
            "backlog_drained": drained,
            "raw_sectors_per_day": round(done / window_days, 1),
            "pledged": self.pledged,
            "disk_peak": round(max(self.disk_peak.values(), default=0.0), 3),
            "stages": stages,
        }


def simulate(
    shape: Shape, assigner: str, days: float, warmup_days: float, seed: int, pc2_fetch: bool = True
) -> dict[str, Any]:
    t = time.perf_counter()
    sim = Sim(shape, assigner, days, warmup_days, seed, pc2_fetch)
    out = asyncio.run(sim.run())
    out["wall_s"] = round(time.perf_counter() - t, 1)
    tag = assigner if pc2_fetch else f"{assigner}, PC2 pinned"
    log(
        f"quality[{shape.name}/{tag}]: {out['sectors_per_day']} sectors/day = "
        f"{out['quality']:.4f} of bound {sim.bound['bound_per_day']:.1f} "
        f"({sim.bound['bottleneck']}); {out['wall_s']} s"
    )
    for name, st in out["stages"].items():
        log(f"    {name:4s} {st}")
    return out
