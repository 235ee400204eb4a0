"""Part 1 of the scheduler benchmark (`bench_sched.py`): decision cost on 1,000 workers.

`decisions` runs one assigner on one scenario and emits one JSON object per measurement;
`run_decisions` runs it in a child process with a deadline and sums it up.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import queue as thread_queue
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sched_cluster import (
    C2_BOX,
    CS,
    MINER,
    MIXED_BOX,
    PC2_BOX,
    S32,
    SEAL_BOX,
    TIB,
    Kind,
    T,
    log,
    max_concurrent,
)

from sectorfsm.sched import (
    AllocSelector,
    ExistingSelector,
    FileType,
    Job,
    Placement,
    Scheduler,
    SectorRef,
    StorageIndex,
    StoragePath,
    TaskSelector,
    TaskType,
    WorkerSpec,
)
from sectorfsm.sched.selectors import Selector
from sectorfsm.sched.strategy import CycleStrategy
from sectorfsm.sched.workers import Worker

# -- part 1: decision cost ----------------------------------------------------------------------


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


def _loop_quiet(loop: asyncio.AbstractEventLoop) -> bool:
    """True if no callback is ready to run on `loop`."""
    # asyncio has no public way to ask; CPython's loops keep runnable callbacks in `_ready`
    # (fsm's VirtualClock and the tests' `settle` ask the same way).
    return not getattr(loop, "_ready", ())


async def _settle(loop: asyncio.AbstractEventLoop) -> None:
    """Return once no other callback is ready: the scheduler has finished reacting."""
    idle = 0
    while idle < 3:
        await asyncio.sleep(0)
        idle = idle + 1 if _loop_quiet(loop) else 0


async def _stable(sched: Scheduler, loop: asyncio.AbstractEventLoop) -> None:
    """Settle, then poke the scheduler until a cycle no longer takes anything from the queue.

    The `lotus` port can leave a window open without scheduling into it until the next event
    (see bench/README.md); during setup that next event is this poke.
    """
    while True:
        n = len(sched.queue)
        await _settle(loop)
        sched.request_cycle()
        await _settle(loop)
        if len(sched.queue) == n:
            return


class TimedCycle:
    """Wraps a scheduler's cycle strategy and adds up the time spent in its cycles."""

    def __init__(self, inner: CycleStrategy) -> None:
        self.inner = inner
        self.seconds = 0.0
        # The hooks go straight through: only the cycle is timed, at no cost to the rest.
        self.before_work = inner.before_work
        self.release = inner.release

    def cycle(self, changed: Sequence[Worker], new_shapes: set[int]) -> None:
        """The wrapped strategy's cycle, timed."""
        t = time.perf_counter()
        self.inner.cycle(changed, new_shapes)
        self.seconds += time.perf_counter() - t


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
    timed = TimedCycle(sched.strategy)
    sched.strategy = timed

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
            "shapes": sched.queue.shape_count(),
            "fill_s": fill_s,
            "queue_s": queue_s,
        }
    )
    log(
        f"  {assigner}: setup done: {len(names)} workers, {held} held jobs, "
        f"{len(sched.queue)} queued in {sched.queue.shape_count()} shapes "
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
            q0, c0, cy0, n0 = len(sched.queue), sched.checks, timed.seconds, sched.cycles
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
                    "cycle_ms": (timed.seconds - cy0) * 1e3,
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
    # The parent stops this process once it has read "done" (see `run_decisions`).
    asyncio.run(
        decisions(a.assigner, scenario, a.workers, a.queued, a.releases, a.burst, a.seed, emit)
    )


#: The script whose `--child decisions ...` runs `child_main` in a fresh process.
BENCH_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_sched.py")


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
        sys.executable, BENCH_SCRIPT, "--child", "decisions", "--assigner", assigner,
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
    if proc.poll() is None:
        if not finished:
            log(f"{tag}: budget of {budget_s:.0f} s spent, stopping the child (figures so far)")
        # Done or out of time, nothing more is wanted from the child: killing it skips the
        # teardown of its tens of thousands of cancelled tasks.
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
