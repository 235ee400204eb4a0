#!/usr/bin/env python
"""Benchmark of the sealing-task scheduler (`sectorfsm.sched`): decision cost and placement quality.

Run ``python bench/bench_sched.py [--quick]``. Progress goes to stderr; the last line of stdout
is one JSON object with every figure (see the "Scheduler benchmark" section of bench/README.md).

Two parts:

1. **Decision cost.** 1,000 workers full with long-running held jobs and 10,000 queued tasks
   of many shapes (PC2 on files held by 750 different workers, PC1 with an alloc selector, PC1
   next to its unsealed file, and in the `saturated` scenario C2). In the headline `backlog`
   scenario the C2 boxes are half busy and nothing queued fits anywhere. One held job at a
   time is finished, and the wall time from that event until the event loop is quiet again
   (the scheduler has reacted and the next task has started) is one *release*. Each release
   on the `balanced` scheduler assigns exactly one task; its p50 is `decision_ms`. The same
   workload runs on the `lotus` baseline in a separate process with a deadline, and
   `speedup_vs_lotus` is the ratio of the two costs per decision (time over tasks assigned).
2. **Placement quality.** Heterogeneous clusters on a virtual clock run a synthetic
   AP -> PC1 -> PC2 -> (WaitSeed) -> C1 -> C2 -> FIN chain per 32 GiB sector, with file
   movement over links of a given speed. Sectors finished per day after warm-up, divided by the
   analytic upper bound (the stage with the least capacity), is the quality of an assigner.

Internal: ``--child decisions ...`` runs part 1 for one assigner and prints one JSON line per
measurement (the parent reads them with a deadline).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import queue as thread_queue
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sectorfsm.fsm import VirtualClock
from sectorfsm.sched import (
    AllocSelector,
    ExistingSelector,
    FileType,
    Job,
    Ledger,
    Placement,
    Scheduler,
    SectorRef,
    StorageIndex,
    StoragePath,
    TaskSelector,
    TaskType,
    WorkerResources,
    WorkerSpec,
    fetch_prepare,
    resource_spec,
)
from sectorfsm.sched.selectors import Selector
from sectorfsm.sched.workers import Worker

GIB = 1 << 30
TIB = 1 << 40
S32 = 32 << 30
MINER = 1000
_T0 = time.perf_counter()

T = TaskType
CS = FileType.CACHE | FileType.SEALED
ALL_FILES = FileType.UNSEALED | FileType.SEALED | FileType.CACHE


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def lotus_available() -> bool:
    """True if this checkout has the `lotus` baseline assigner."""
    try:
        Scheduler(assigner="lotus")
    except ValueError:
        return False
    return True


# -- cluster description ------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A kind of worker box; a cluster shape has `count` of each."""

    name: str
    count: int
    cpus: int
    mem_gib: int
    gpus: int
    tasks: frozenset[TaskType]
    disk_tib: int

    def resources(self) -> WorkerResources:
        return WorkerResources(
            cpus=self.cpus,
            mem_physical=self.mem_gib * GIB,
            gpus=tuple(f"gpu{i}" for i in range(self.gpus)),
        )


#: Concurrency above this counts as unbounded (FIN needs no resources at all).
UNBOUNDED = 4096


def max_concurrent(res: WorkerResources, task: TaskType, size: int = S32) -> int:
    """Tasks of one type an idle worker admits at once, by the scheduler's own ledger."""
    ledger, need, n = Ledger(res), resource_spec(task, size), 0
    while n < UNBOUNDED and ledger.refusal(task, need) is None:
        ledger.add(n, task, need)
        n += 1
    return n


def fits_together(res: WorkerResources, tasks: Iterable[tuple[TaskType, int]]) -> bool:
    """True if the ledger admits all these tasks at the same time."""
    ledger, n = Ledger(res), 0
    for task, count in tasks:
        need = resource_spec(task, S32)
        for _ in range(count):
            if ledger.refusal(task, need) is not None:
                return False
            ledger.add(n, task, need)
            n += 1
    return True


# -- part 1: decision cost ----------------------------------------------------------------------

SEAL_BOX = frozenset({T.ADD_PIECE, T.PRE_COMMIT1, T.COMMIT1, T.FINALIZE})
MIXED_BOX = SEAL_BOX | {T.PRE_COMMIT2}
PC2_BOX = frozenset({T.PRE_COMMIT2, T.COMMIT1, T.FINALIZE})
C2_BOX = frozenset({T.COMMIT2})

#: The 1k-worker cluster of the decision benchmark, as fractions of the worker count.
DECISION_MIX = (
    (Kind("pc1", 0, 64, 1024, 0, SEAL_BOX, 30), 0.50),
    (Kind("mixed", 0, 64, 1024, 2, MIXED_BOX, 30), 0.25),
    (Kind("pc2", 0, 48, 512, 4, PC2_BOX, 16), 0.15),
    (Kind("c2", 0, 48, 768, 4, C2_BOX, 1), 0.10),
)


@dataclass(frozen=True)
class Scenario:
    """What is queued, and which worker kinds keep spare capacity no queued task can use."""

    name: str
    #: The queued tasks: (label, share of the queue).
    queue_mix: tuple[tuple[str, float], ...]
    #: (kind, fraction of its capacity held); other kinds are full.
    partial: tuple[tuple[str, float], ...]


SCENARIOS = {
    # A PC1/PC2 backlog while the C2 boxes have headroom (C2 tasks never wait): the usual
    # shape of a deep queue. Lotus keeps the C2 boxes' windows open, and tests every queued
    # task against them in every cycle.
    "backlog": Scenario(
        "backlog",
        (("PC2 existing+fetch", 0.40), ("PC1 alloc", 0.30), ("PC1 existing+fetch", 0.30)),
        (("c2", 0.5),),
    ),
    # Every worker class full and every stage backlogged: Lotus's windows are all full, so a
    # cycle tests the queue against at most the one window that just drained.
    "saturated": Scenario(
        "saturated",
        (
            ("C2 task", 0.15),
            ("PC2 existing+fetch", 0.35),
            ("PC1 alloc", 0.25),
            ("PC1 existing+fetch", 0.25),
        ),
        (),
    ),
}
FILL_TYPES = (T.COMMIT2, T.PRE_COMMIT2, T.PRE_COMMIT1)  # queue order: most urgent first
FILL_PRIORITY = 1000


def _percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return math.nan
    i = min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))
    return s[i]


async def _settle(loop: asyncio.AbstractEventLoop) -> None:
    """Return once no other callback is ready: the scheduler has finished reacting."""
    idle = 0
    while idle < 3:
        await asyncio.sleep(0)
        idle = idle + 1 if not loop._ready else 0  # type: ignore[attr-defined]


async def _stable(sched: Scheduler, loop: asyncio.AbstractEventLoop) -> None:
    """Settle, then poke the scheduler until a cycle no longer takes anything from the queue.

    The `lotus` port can leave a window open without scheduling into it until the next event
    (see bench/README.md); during setup that next event is this poke.
    """
    while True:
        n = len(sched.queue)
        await _settle(loop)
        sched._kick()
        await _settle(loop)
        if len(sched.queue) == n:
            return


@dataclass(frozen=True, slots=True)
class Pinned:
    """Bench-only selector for held jobs: only `worker` takes them (cheap to evaluate)."""

    worker: str

    def check(self, sector: SectorRef, worker: Worker, index: StorageIndex) -> Placement | str:
        return Placement() if worker.name == self.worker else f"pinned to {self.worker}"

    def shape(self, sector: SectorRef) -> object | None:
        return ("pinned", self.worker)


async def decisions(
    assigner: str,
    scenario: Scenario,
    n_workers: int,
    n_queued: int,
    releases: int,
    burst: int,
    seed: int,
    emit: Callable[[dict[str, Any]], None],
) -> None:
    """Part 1 for one assigner; every figure goes out through `emit`."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    sched = Scheduler(assigner=assigner)
    cycle_s = [0.0]
    orig_cycle = sched._cycle

    def timed_cycle() -> None:
        t = time.perf_counter()
        orig_cycle()
        cycle_s[0] += time.perf_counter() - t

    sched._cycle = timed_cycle  # type: ignore[method-assign]

    kinds: list[Kind] = []
    for kind, share in DECISION_MIX:
        kinds += [kind] * round(share * n_workers)
    kinds = kinds[:n_workers]
    names = [f"{k.name}-{i:04d}" for i, k in enumerate(kinds)]
    paths = {
        n: StoragePath(f"{n}-nvme", n, k.disk_tib * TIB) for n, k in zip(names, kinds, strict=True)
    }
    for p in paths.values():
        sched.index.declare(p)
    running: dict[str, deque[asyncio.Event]] = {n: deque() for n in names}
    number = iter(range(1, 1 << 40))
    tasks: list[asyncio.Task[Any]] = []

    async def hold(job: Job) -> None:
        ev = asyncio.Event()
        running[job.worker.name].append(ev)
        await ev.wait()

    def submit(
        sector: SectorRef, task: TaskType, selector: Selector, priority: int = 0
    ) -> asyncio.Task[Any]:
        t = loop.create_task(sched.schedule(sector, task, selector, None, hold, priority=priority))
        tasks.append(t)
        return t

    # Fill: a batch of workers at a time, queue their held jobs (pinned to them, more than they
    # can take), add the workers, let the scheduler fill them, cancel the rest. `lotus` keeps
    # active + preparing + 2 windows per worker, so it takes up to 4x; one worker at a time
    # would cost it ~10 cycles of O(workers) each per worker, so it gets batches of 20.
    t_setup = time.perf_counter()
    held = 0
    partial = dict(scenario.partial)
    batch = 20 if assigner == "lotus" else 1
    pairs = list(zip(names, kinds, strict=True))
    for start in range(0, len(pairs), batch):
        group = pairs[start : start + batch]
        submitted = 0
        for name, kind in group:
            pin = Pinned(name)
            for task in FILL_TYPES:
                if task in kind.tasks:
                    cap = max_concurrent(kind.resources(), task)
                    n = 4 * cap + 2 if kind.name not in partial else int(cap * partial[kind.name])
                    for _ in range(n):
                        submit(SectorRef(MINER, next(number), S32), task, pin, FILL_PRIORITY)
                        submitted += 1
        await _settle(loop)
        for name, kind in group:
            sched.add_worker(
                WorkerSpec(
                    name,
                    kind.resources(),
                    task_types=kind.tasks,
                    paths=(paths[name],),
                    needs_heartbeats=False,
                )
            )
        await _stable(sched, loop)
        leftovers = len(sched.queue)
        for r in list(sched.queue):
            sched.cancel(r.sched_id)
        await _stable(sched, loop)
        held += submitted - leftovers
        if (start + len(group)) % 200 == 0:
            log(f"  {assigner}: {start + len(group)} workers added, {held} held jobs")
    fill_s = time.perf_counter() - t_setup

    # The queue: many shapes, none of which fits anywhere now.
    holders = [n for n, k in zip(names, kinds, strict=True) if T.PRE_COMMIT1 in k.tasks]
    t_queue = time.perf_counter()
    alloc_pc1 = AllocSelector(CS)
    pc1_near = ExistingSelector(FileType.UNSEALED, allow_fetch=True)
    pc2_sel = ExistingSelector(CS, allow_fetch=True)

    def queue_one(label: str) -> None:
        s = SectorRef(MINER, next(number), S32)
        if label == "C2 task":
            submit(s, T.COMMIT2, TaskSelector())
        elif label == "PC2 existing+fetch":
            sched.index.add_sector(s, CS, paths[rng.choice(holders)].id)
            submit(s, T.PRE_COMMIT2, pc2_sel)
        elif label == "PC1 alloc":
            submit(s, T.PRE_COMMIT1, alloc_pc1)
        else:
            sched.index.add_sector(s, FileType.UNSEALED, paths[rng.choice(holders)].id)
            submit(s, T.PRE_COMMIT1, pc1_near)

    for label, share in scenario.queue_mix:
        for _ in range(round(share * n_queued)):
            queue_one(label)
    await _settle(loop)
    labels = [lb for lb, _ in scenario.queue_mix]
    while len(sched.queue) < n_queued:  # some found room: top up
        queue_one(rng.choice(labels))
        await _settle(loop)
    queue_s = time.perf_counter() - t_queue
    gc.collect()
    gc.freeze()  # setup objects are long-lived, as in a scheduler that has run for a while
    emit(
        {
            "event": "setup",
            "assigner": assigner,
            "scenario": scenario.name,
            "workers": len(names),
            "held": held,
            "queued": len(sched.queue),
            "shapes": len(sched.queue._shapes),
            "fill_s": fill_s,
            "queue_s": queue_s,
        }
    )
    log(
        f"  {assigner}: setup done: {len(names)} workers, {held} held jobs, "
        f"{len(sched.queue)} queued in {len(sched.queue._shapes)} shapes "
        f"(fill {fill_s:.1f} s, queue {queue_s:.1f} s)"
    )

    # Releases: pick a worker, finish at least `burst` of its running jobs one at a time (a
    # worker draining a batch), and go on until a release pulls work from the queue again (at
    # most 4x `burst`). `lotus` only takes new work when a whole window has drained, so this
    # measures it in its steady state, where every task that ends eventually brings one in.
    busy = [n for n, k in pairs if running[n] and k.name not in partial]
    done = 0
    while done < releases:
        name = rng.choice(busy)
        for j in range(4 * burst):
            if not running[name]:
                break
            ev = running[name].popleft()
            q0, c0, cy0, n0 = len(sched.queue), sched.checks, cycle_s[0], sched.cycles
            t = time.perf_counter()
            ev.set()
            await _settle(loop)
            dt = time.perf_counter() - t
            done += 1
            assigned = q0 - len(sched.queue)
            emit(
                {
                    "event": "release",
                    "ms": dt * 1e3,
                    "assigned": assigned,
                    "checks": sched.checks - c0,
                    "cycle_ms": (cycle_s[0] - cy0) * 1e3,
                    "cycles": sched.cycles - n0,
                }
            )
            if j + 1 >= burst and assigned:
                break

    # Moving one sector's files costs a scan of the whole queue (`files_changed`).
    some = next(iter(sched.queue)).sector
    fc = []
    for _ in range(20):
        t = time.perf_counter()
        sched.files_changed(some)
        fc.append(time.perf_counter() - t)
        await _settle(loop)
    emit({"event": "files_changed", "ms": statistics.median(fc) * 1e3})
    emit({"event": "done"})
    for t2 in tasks:
        t2.cancel()
    gc.unfreeze()


def child_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("part")
    p.add_argument("--assigner", required=True)
    p.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--queued", type=int, required=True)
    p.add_argument("--releases", type=int, required=True)
    p.add_argument("--burst", type=int, required=True)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)

    def emit(obj: dict[str, Any]) -> None:
        print(json.dumps(obj), flush=True)

    scenario = SCENARIOS[a.scenario]
    asyncio.run(
        decisions(a.assigner, scenario, a.workers, a.queued, a.releases, a.burst, a.seed, emit)
    )
    os._exit(0)  # skip tearing down tens of thousands of cancelled tasks


def run_decisions(
    assigner: str,
    scenario: str,
    *,
    workers: int,
    queued: int,
    releases: int,
    burst: int,
    budget_s: float,
) -> dict[str, Any]:
    """Part 1 for one assigner in a child process, stopped after `budget_s` if need be."""
    args = [
        sys.executable, os.path.abspath(__file__), "--child", "decisions", "--assigner", assigner,
        "--scenario", scenario, "--workers", str(workers), "--queued", str(queued),
        "--releases", str(releases), "--burst", str(burst),
    ]  # fmt: skip
    tag = f"decisions[{scenario}/{assigner}]"
    log(f"{tag}: {workers} workers, {queued} queued, budget {budget_s:.0f} s")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    lines: thread_queue.Queue[str | None] = thread_queue.Queue()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    start = time.perf_counter()
    deadline = start + budget_s
    setup: dict[str, Any] | None = None
    rel: list[dict[str, Any]] = []
    files_changed_ms: float | None = None
    finished = False
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        try:
            line = lines.get(timeout=min(left, 5.0))
        except thread_queue.Empty:
            continue
        if line is None:
            break
        ev = json.loads(line)
        if ev["event"] == "setup":
            setup = ev
        elif ev["event"] == "release":
            rel.append(ev)
            if len(rel) % 50 == 0:
                log(f"{tag}: {len(rel)} releases")
        elif ev["event"] == "files_changed":
            files_changed_ms = ev["ms"]
        elif ev["event"] == "done":
            finished = True
            break
    if proc.poll() is None and not finished:
        log(f"{tag}: budget of {budget_s:.0f} s spent, stopping the child (figures so far)")
        proc.kill()
    if proc.wait() not in (0, -9) and not finished:
        log(f"{tag}: the child failed with exit code {proc.returncode}")
    out: dict[str, Any] = {
        "assigner": assigner,
        "scenario": scenario,
        "complete": finished,
        "setup": setup,
        "releases": len(rel),
        "files_changed_ms": files_changed_ms,
    }
    if rel:
        ms = [r["ms"] for r in rel]
        assigned = sum(r["assigned"] for r in rel)
        out.update(
            release_p50_ms=statistics.median(ms),
            release_p95_ms=_percentile(ms, 0.95),
            release_mean_ms=statistics.fmean(ms),
            cycle_p50_ms=statistics.median(r["cycle_ms"] for r in rel),
            assigned=assigned,
            assigned_per_release=assigned / len(rel),
            cost_per_decision_ms=sum(ms) / assigned if assigned else None,
            checks_per_decision=sum(r["checks"] for r in rel) / assigned if assigned else None,
            cycles_per_release=sum(r["cycles"] for r in rel) / len(rel),
        )
    log(f"{tag}: {json.dumps({k: v for k, v in out.items() if k != 'setup'})}")
    return out


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


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller run, at most 5 minutes")
    p.add_argument("--out", help="also write the JSON to this file")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--skip-decisions", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--skip-quality", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    quick = a.quick
    has_lotus = lotus_available()
    if not has_lotus:
        log("NOTE: this checkout has no `lotus` assigner; every lotus figure is null")
    result: dict[str, Any] = {"bench": "sched", "quick": quick}

    # Part 1.
    cfg: dict[str, Any] = {
        "workers": 1000,
        "queued": 10000,
        "burst": 16,
        "releases": 96 if quick else 400,
        "lotus_releases": 32 if quick else 128,
        # Per child process; quick's worst case is 2 x (45 + 75) s plus ~45 s of simulation.
        "budget_s": 45.0 if quick else 300.0,
        "lotus_budget_s": 75.0 if quick else 300.0,
        "scenarios": ["backlog", "saturated"],
    }
    result["decision_config"] = cfg
    decisions_out: dict[str, Any] = {}
    if not a.skip_decisions:
        for sc in cfg["scenarios"]:
            ours = run_decisions(
                "balanced",
                sc,
                workers=cfg["workers"],
                queued=cfg["queued"],
                releases=cfg["releases"],
                burst=cfg["burst"],
                budget_s=cfg["budget_s"],
            )
            theirs = None
            if has_lotus:
                theirs = run_decisions(
                    "lotus",
                    sc,
                    workers=cfg["workers"],
                    queued=cfg["queued"],
                    releases=cfg["lotus_releases"],
                    burst=cfg["burst"],
                    budget_s=cfg["lotus_budget_s"],
                )
            decisions_out[sc] = _decision_figures(ours, theirs)
    result["decisions"] = decisions_out
    head = decisions_out.get("backlog", {})
    for key in (
        "decision_ms",
        "decision_p95_ms",
        "decision_cycle_ms",
        "decision_cost_ms",
        "checks_per_decision",
        "speedup_vs_lotus",
        "lotus_decision_cost_ms",
    ):
        result[key] = head.get(key)
    if "saturated" in decisions_out:
        result["speedup_vs_lotus_saturated"] = decisions_out["saturated"].get("speedup_vs_lotus")
        result["decision_ms_saturated"] = decisions_out["saturated"].get("decision_ms")

    # Part 2.
    days, warm = (2.5, 1.0) if quick else (5.0, 1.0)
    result["quality_config"] = {
        "days": days,
        "warmup_days": warm,
        "stage_minutes": {s.name: s.seconds / 60 for s in STAGES},
        "jitter": JITTER,
        "wait_seed_minutes": WAIT_SEED_S / 60,
    }
    shapes: dict[str, Any] = {}
    if not a.skip_quality:
        for shape in SHAPES:
            bound = analytic_bound(shape)
            log(
                f"quality[{shape.name}]: bound {bound['bound_per_day']:.1f}/day at "
                f"{bound['bottleneck']}; stages {bound['stage_per_day']}; slots {bound['slots']}"
            )
            entry: dict[str, Any] = {"description": shape.description, **bound}
            entry["bound_per_day"] = round(bound["bound_per_day"], 1)
            entry["workers"] = {k.name: k.count for k in shape.kinds}
            entry["balanced"] = simulate(shape, "balanced", days, warm, a.seed)
            entry["lotus"] = simulate(shape, "lotus", days, warm, a.seed) if has_lotus else None
            if shape.pinned_control:
                # Control: the same cluster with PC2 bound to the PC1 box (no fetch). If this
                # reaches the bound, the loss above is placement, not the cluster or the bench.
                entry["balanced_pc2_pinned"] = simulate(
                    shape, "balanced", days, warm, a.seed, pc2_fetch=False
                )
                entry["lotus_pc2_pinned"] = (
                    simulate(shape, "lotus", days, warm, a.seed, pc2_fetch=False)
                    if has_lotus
                    else None
                )
            shapes[shape.name] = entry
    result["shapes"] = shapes
    if shapes:
        result["quality_balanced"] = min(e["balanced"]["quality"] for e in shapes.values())
        result["quality_lotus"] = (
            min(e["lotus"]["quality"] for e in shapes.values()) if has_lotus else None
        )
        for name, e in shapes.items():
            result[f"quality_balanced_{name}"] = e["balanced"]["quality"]
            result[f"quality_lotus_{name}"] = e["lotus"]["quality"] if e["lotus"] else None
            if "balanced_pc2_pinned" in e:
                result[f"quality_balanced_{name}_pc2_pinned"] = e["balanced_pc2_pinned"]["quality"]
                pinned = e["lotus_pc2_pinned"]
                result[f"quality_lotus_{name}_pc2_pinned"] = pinned["quality"] if pinned else None
    result["python"] = platform.python_version()
    result["cpus"] = os.cpu_count()
    result["wall_s"] = round(time.perf_counter() - _T0, 1)
    line = json.dumps(result)
    if a.out:
        with open(a.out, "w") as f:
            f.write(line + "\n")
    print(line)


def _decision_figures(ours: dict[str, Any], theirs: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON figures of one scenario: ours, the baseline's, and the ratio."""
    mine = ours.get("cost_per_decision_ms")
    t = theirs or {}
    speedup: float | None = None
    if mine and t.get("cost_per_decision_ms"):
        speedup = t["cost_per_decision_ms"] / mine
    elif theirs is not None:
        log("NOTE: the lotus run assigned nothing within its budget: speedup_vs_lotus is null")
    return {
        "decision_ms": _round(ours.get("release_p50_ms")),
        "decision_p95_ms": _round(ours.get("release_p95_ms")),
        "decision_cycle_ms": _round(ours.get("cycle_p50_ms")),
        "decision_cost_ms": _round(mine),
        "checks_per_decision": _round(ours.get("checks_per_decision"), 1),
        "assignments_per_release": _round(ours.get("assigned_per_release")),
        "files_changed_ms": _round(ours.get("files_changed_ms")),
        "setup": ours.get("setup"),
        "speedup_vs_lotus": _round(speedup, 1),
        "lotus_decision_cost_ms": _round(t.get("cost_per_decision_ms")),
        "lotus_release_p50_ms": _round(t.get("release_p50_ms")),
        "lotus_release_p95_ms": _round(t.get("release_p95_ms")),
        "lotus_cycle_p50_ms": _round(t.get("cycle_p50_ms")),
        "lotus_checks_per_decision": _round(t.get("checks_per_decision"), 1),
        "lotus_decisions": t.get("assigned"),
        "lotus_releases": t.get("releases"),
        "lotus_complete": t.get("complete"),
        "lotus_setup": t.get("setup"),
    }


def _round(v: float | None, nd: int = 3) -> float | None:
    return None if v is None else round(v, nd)


if __name__ == "__main__":
    main()
