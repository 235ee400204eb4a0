"""The analytic bound: sectors per day of the stage with the least capacity, and why.

Per stage, each worker that runs it contributes `slots / seconds per sector`, where `slots` is
how many tasks of the stage it admits at once on an idle worker and the seconds per sector are
the task's duration plus the fetch that brings its input from another worker. A fetch is
counted where the worker does not run the stage that writes the input (AP for PC1's unsealed
file, PC1 for PC2's cache and sealed files); it takes bytes / the slower of the two links, and
at most `PARALLEL_FETCH_LIMIT` fetches run at once per worker. The bound is the least of the
stages: no placement by that scheduler finishes sectors faster. It ignores time spent on no
worker (chain delays, batching), which adds latency, not a rate limit.

What a slot is depends on the scheduler. The `balanced` one admits a task on its worker's
ledger (memory, swap, threads, GPUs, MAX_CONCURRENT, capped by the policy's `PreCommit1Max`,
...); while its files arrive the task holds its memory and a claim (one per slot) but not
the slot's compute, so the next task's fetch overlaps this one's work (a policy cap counts
fetching tasks too: there the bound stays an upper one, a little loose). The `lotus`
baseline, as Lotus,
fetches in a `preparing` pool apart from the `active` one the work runs in, each as large as
the worker (`startProcessingTask`, extern/sector-storage/sched_worker.go@v1.11.3), and knows
no policy file: there a slot is what Lotus's `CanHandleRequest` admits, and one slot carries a
sector per max(work, fetch), the next task's fetch overlapping this one's work.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from ..sched import (
    FileType,
    Ledger,
    Resources,
    TaskType,
    WorkerPolicy,
    WorkerResources,
    WorkerSpec,
    resource_spec,
)
from ..sched.config import PIPELINE_TASKS
from ..sched.fetch import PARALLEL_FETCH_LIMIT
from ..sched.filetypes import space_needed
from ..sched.lotus import ActiveResources
from ..sched.rules import stage_cap
from .sharing import ResourceBound, resource_bounds

__all__ = [
    "STAGES",
    "Bound",
    "StageBound",
    "WorkerStage",
    "bottleneck_sentence",
    "bound",
    "prepares_apart",
]

#: The pipeline's stages in order (GET is not a stage: fetches are counted in the stage).
STAGES = PIPELINE_TASKS
#: A stage's input that may come from another worker, and the stage that writes it.
_INPUT: dict[TaskType, tuple[FileType, TaskType]] = {
    TaskType.PRE_COMMIT1: (FileType.UNSEALED, TaskType.ADD_PIECE),
    TaskType.PRE_COMMIT2: (FileType.CACHE | FileType.SEALED, TaskType.PRE_COMMIT1),
}
#: More tasks at once than any real box runs: the stage is not limited there.
UNBOUNDED = 1000
#: Stages within this fraction of the least capacity limit together.
TIE = 0.01


@dataclass(frozen=True, slots=True)
class WorkerStage:
    """One worker's share of one stage."""

    worker: str
    #: Tasks at once (None: more than any box runs, not a limit).
    slots: int | None
    seconds: float
    fetch_seconds: float
    #: Sectors per day this worker can carry through the stage (None: unlimited).
    per_day: float | None
    #: The fetch limit (PARALLEL_FETCH_LIMIT over the fetch time) caps it, not the slots.
    link_bound: bool = False


@dataclass(frozen=True, slots=True)
class StageBound:
    """A stage's capacity: the sum of its workers'."""

    task: TaskType
    workers: tuple[WorkerStage, ...]
    per_day: float | None


@dataclass(frozen=True, slots=True)
class Bound:
    """Per-stage capacity and the least of them."""

    stages: dict[TaskType, StageBound]
    per_day: float
    #: The stages that limit (the least, and any within `TIE` of it), in pipeline order.
    limiting: tuple[TaskType, ...]
    #: Workers whose limiting slots leave no room for their other stages (shared memory,
    #: threads or GPUs): there the bound counts some resources twice and may be loose.
    shared: tuple[str, ...] = ()
    #: Resources that stages only one worker runs share there (`sharing.py`).
    resources: tuple[ResourceBound, ...] = ()
    #: The shared resource that limits below every stage, if one does.
    limiting_resource: ResourceBound | None = None
    #: Tasks fetch their input apart from their slot (the `lotus` baseline, see above).
    prepares_apart: bool = False

    def held(self, share: WorkerStage) -> float:
        """Seconds one slot of `share` is taken per sector (its work, and maybe its fetch)."""
        return _held(share.seconds, share.fetch_seconds, self.prepares_apart)


def prepares_apart(assigner: str) -> bool:
    """Whether `assigner` fetches a task's input outside the slot its work runs in.

    Both do: Lotus in its preparing pool, `balanced` as a claim beside the running slot.
    """
    return assigner in ("lotus", "balanced")


def _held(seconds: float, fetch: float, apart: bool) -> float:
    # Apart, the preparing pool (as large as the active one) fetches the next sector while
    # the active slot works on this one: the slower of the two sets the pace.
    return max(seconds, fetch) if apart else seconds + fetch


def max_slots(spec: WorkerSpec, task: TaskType, sector_size: int, policy: WorkerPolicy) -> int:
    """Tasks of one type an idle `spec` admits at once (its ledger), capped by its policy."""
    if task not in spec.task_types:
        return 0
    n = _ledger_slots(spec.resources, task, resource_spec(task, sector_size, spec.overrides))
    cap = stage_cap(policy, task)
    return n if cap is None else min(n, cap)


# A cluster declares many workers alike, and counting up to UNBOUNDED tasks into a ledger is
# the dearest part of a bound: each kind of worker is counted once.
@functools.lru_cache(maxsize=256)
def _ledger_slots(resources: WorkerResources, task: TaskType, need: Resources) -> int:
    """Tasks of `need` an idle ledger of `resources` admits at once (up to UNBOUNDED)."""
    ledger = Ledger(replace(resources, mem_used=0, mem_swap_used=0))
    n = 0
    while n < UNBOUNDED and ledger.refusal(task, need) is None:
        ledger.add(n, task, need)
        n += 1
    return n


def lotus_slots(spec: WorkerSpec, task: TaskType, sector_size: int) -> int:
    """Tasks of one type an idle `spec` admits at once under Lotus's `CanHandleRequest`.

    Lotus charges no base memory per task type and reads no policy file, so this may be more
    than `max_slots`.
    """
    if task not in spec.task_types:
        return 0
    active = ActiveResources()
    res = replace(spec.resources, mem_used=0, mem_swap_used=0)
    need = resource_spec(task, sector_size, spec.overrides)
    n = 0
    while n < UNBOUNDED and active.can_handle(task, need, res):
        active.add(task, need, res)
        n += 1
    return n


def bound(
    workers: Iterable[WorkerSpec],
    sector_size: int,
    seconds: Mapping[str, Mapping[TaskType, float]],
    policies: Mapping[str, WorkerPolicy],
    *,
    assigner: str = "balanced",
) -> Bound:
    """The bound for these workers under `assigner`; `seconds[worker][task]`: time per task."""
    specs = list(workers)
    apart = prepares_apart(assigner)
    lotus = assigner == "lotus"
    stages: dict[TaskType, StageBound] = {}
    for task in STAGES:
        shares = []
        for spec in specs:
            if lotus:
                slots = lotus_slots(spec, task, sector_size)
            else:
                slots = max_slots(spec, task, sector_size, policies.get(spec.name, WorkerPolicy()))
            if slots == 0:
                continue
            dur = seconds[spec.name][task]
            fetch = _fetch_seconds(spec, task, sector_size, specs)
            if slots >= UNBOUNDED:
                shares.append(WorkerStage(spec.name, None, dur, fetch, None))
                continue
            rate = slots / _held(dur, fetch, apart) * 86400
            link_bound = False
            if fetch > 0 and PARALLEL_FETCH_LIMIT / fetch * 86400 < rate:
                rate, link_bound = PARALLEL_FETCH_LIMIT / fetch * 86400, True
            shares.append(WorkerStage(spec.name, slots, dur, fetch, rate, link_bound))
        total: float | None = 0.0
        for share in shares:
            total = None if total is None or share.per_day is None else total + share.per_day
        stages[task] = StageBound(task, tuple(shares), total if shares else 0.0)
    finite = {t: s.per_day for t, s in stages.items() if s.per_day is not None}
    least = min(finite.values()) if finite else 0.0
    resources = tuple(
        resource_bounds(
            specs, sector_size, stages, prepares_apart=apart, fetch_holds_memory=not lotus
        )
    )
    tightest = min(resources, key=lambda r: r.per_day, default=None)
    if tightest is not None and tightest.per_day < least * (1 - TIE):
        limiting: tuple[TaskType, ...] = ()
        return Bound(stages, tightest.per_day, limiting, (), resources, tightest, apart)
    limiting = tuple(t for t, v in finite.items() if v <= least * (1 + TIE))
    shared = tuple(
        spec.name
        for spec in specs
        if not _fits_together(spec, sector_size, stages, limiting, lotus)
    )
    return Bound(stages, least, limiting, shared, resources, prepares_apart=apart)


def _fits_together(
    spec: WorkerSpec,
    sector_size: int,
    stages: Mapping[TaskType, StageBound],
    limiting: tuple[TaskType, ...],
    apart: bool,
) -> bool:
    """Whether `spec` admits its slots of the limiting stages at once plus one of each other.

    A box whose limiting slots leave no room for its other stages' tasks (a GPU shared by PC2
    and C2 when C2 limits) cannot reach the bound; other stages may share among themselves.
    """
    base: list[tuple[TaskType, int]] = []
    for task in limiting:
        share = next((w for w in stages[task].workers if w.worker == spec.name), None)
        if share is not None and share.slots is not None:
            base.append((task, share.slots))
    if not base:
        return True
    others = [t for t in STAGES if t in spec.task_types and t not in limiting]
    return (
        all(_admits(spec, sector_size, [*base, (t, 1)], apart) for t in others)
        if others
        else (_admits(spec, sector_size, base, apart))
    )


def _admits(
    spec: WorkerSpec, sector_size: int, wanted: list[tuple[TaskType, int]], apart: bool
) -> bool:
    """Whether an idle `spec` takes all of `wanted` at once (Lotus's rule when `apart`)."""
    res = replace(spec.resources, mem_used=0, mem_swap_used=0)
    ledger, active = Ledger(res), ActiveResources()
    n = 0
    for task, count in wanted:
        need = resource_spec(task, sector_size, spec.overrides)
        for _ in range(count):
            if apart:
                if not active.can_handle(task, need, res):
                    return False
                active.add(task, need, res)
            elif ledger.refusal(task, need) is not None:
                return False
            else:
                ledger.add(n, task, need)
            n += 1
    return True


def _fetch_seconds(
    spec: WorkerSpec, task: TaskType, sector_size: int, specs: list[WorkerSpec]
) -> float:
    """Seconds to bring the stage's input here, 0 when this worker writes it itself."""
    if task not in _INPUT:
        return 0.0
    files, writer = _INPUT[task]
    if writer in spec.task_types:
        return 0.0
    sources = [s.bandwidth for s in specs if writer in s.task_types and s is not spec]
    if not sources:
        return 0.0
    link = min(spec.bandwidth, max(sources))
    return space_needed(files, sector_size) / link


def bottleneck_sentence(
    b: Bound, busy: Mapping[tuple[str, TaskType], float]
) -> tuple[str, dict[str, object]]:
    """The bottleneck in words, and its figures: the stage, its busiest worker, one more slot.

    `busy[(worker, task)]` is the fraction of that worker's slots of the stage in use over
    the steady window. One more slot on the busiest worker of the limiting stage adds what
    the new least capacity gains over the old (0 when another stage limits as much).
    """
    if b.limiting_resource is not None:
        return _resource_sentence(b, b.limiting_resource, busy)
    if not b.limiting:
        return "no stage limits the rate (every stage is unbounded)", {}
    parts = []
    figures: dict[str, object] = {"stages": [t.short for t in b.limiting]}
    gains: dict[str, float] = {}
    for task in b.limiting:
        stage = b.stages[task]
        limited = [w for w in stage.workers if w.per_day is not None]
        top = max(limited, key=lambda w: (busy.get((w.worker, task), 0.0), w.per_day or 0.0))
        pct = round(100 * busy.get((top.worker, task), 0.0))
        gain = _one_more_slot(b, task, top)
        gains[task.short] = gain
        link = ""
        if top.fetch_seconds > 0:
            link = f" ({_hours(top.fetch_seconds)} of each task is the fetch of its input)"
        parts.append((task, top, pct, gain, link))
        figures[task.short] = {"worker": top.worker, "busy": pct / 100, "gain_per_day": gain}
    loose = ""
    if b.shared:
        # The per-stage figures assume each stage has its box to itself.
        loose = (
            f" (the bound may be loose: {', '.join(b.shared)} cannot run its limiting slots "
            "and its other stages at once)"
        )
    if len(parts) == 1:
        task, top, pct, gain, link = parts[0]
        what = "fetch slot" if top.link_bound else f"{task.short} slot"
        return (
            f"{task.short} on {top.worker} is the bottleneck: {pct}% busy{link}; "
            f"one more {what} adds ~{gain:.1f} sectors/day{loose}"
        ), figures
    names = " and ".join(f"{t.short} on {top.worker} ({pct}% busy)" for t, top, pct, _, _ in parts)
    return (
        f"{names} are balanced bottlenecks: one more slot of one alone adds "
        f"~{max(gains.values()):.1f} sectors/day; add to both{loose}"
    ), figures


def _resource_sentence(
    b: Bound, r: ResourceBound, busy: Mapping[tuple[str, TaskType], float]
) -> tuple[str, dict[str, object]]:
    """The worker resource its stages take turns on, as the bottleneck."""
    # Each stage's own slots there: a cap on one stage (PreCommit2Max) leaves the other's.
    slots = {(w.worker, t): w.slots for t in r.stages for w in b.stages[t].workers}
    held = sum(
        busy.get((r.worker, t), 0.0) * (slots.get((r.worker, t)) or 0) * need
        for t, need in zip(r.stages, r.needs, strict=True)
    )
    pct = round(100 * held / r.total) if r.total else 0
    amount, what = r.unit
    others = [s.per_day for s in b.stages.values() if s.per_day is not None]
    others += [o.per_day for o in b.resources if o is not r]
    more = r.per_day * (r.total + amount) / r.total
    gain = round(max(0.0, min([more, *others]) - b.per_day), 1)
    names = " and ".join(t.short for t in r.stages)
    text = (
        f"the {r.resource} of {r.worker} is the bottleneck ({names} take turns on it): "
        f"{pct}% busy; one more {what} there adds ~{gain:.1f} sectors/day"
    )
    figures: dict[str, object] = {
        "stages": [t.short for t in r.stages],
        "resource": {"worker": r.worker, "name": r.resource, "busy": pct / 100},
        "gain_per_day": gain,
    }
    return text, figures


def _one_more_slot(b: Bound, task: TaskType, share: WorkerStage) -> float:
    stage = b.stages[task]
    if stage.per_day is None or share.slots is None or share.per_day is None:
        return 0.0
    extra = 86400 / (share.fetch_seconds if share.link_bound else b.held(share))
    others = [s.per_day for t, s in b.stages.items() if t is not task and s.per_day is not None]
    new = min([stage.per_day + extra, *others])
    return round(max(0.0, new - b.per_day), 1)


def _hours(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min"


def describe_stage(stage: StageBound) -> str:
    """One line per stage for the console: capacity and its workers' slots."""
    cap = "unlimited" if stage.per_day is None else f"{stage.per_day:.1f}/day"
    each = ", ".join(
        f"{w.worker} x{w.slots if w.slots is not None else 'inf'}" for w in stage.workers
    )
    return f"{stage.task.short}: {cap} ({each})"
