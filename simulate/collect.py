"""What one simulated run records, each at O(1) per event: no scan of the sectors anywhere.

Three feeds: the miner's state changes (an in-process listener on `Miner.changes`, called as
each change is durable, none dropped: sectors reaching Proving, failures and retries by
state), the scheduler's job listener (slot time per worker and stage, split
into sample buckets; queue wait per task type), and a sampler every `sample` seconds (disk use
per storage path, sectors per state from the kept counters).

A task's slot time is the time it holds its slot on the worker, as the bound counts it
(`bound.py`): its work plus the fetch of its input (the sim sealer reports each fetch's
duration) under `balanced`, whose ledger holds the slot from placement on; its work alone
under the `lotus` baseline, which fetches in a preparing pool apart from the active slot (the
GPU works on one C2 while the next PC2's files arrive). Counting a Lotus fetch as slot time
would put two GPU tasks on one GPU at once.

A task's queue wait is from the sector's last milestone (its last state change, or the end of
its previous task, whichever is later) to the task being placed on a worker: C2 waits from the
end of C1, not from the sector entering Committing. Under `lotus` it runs to the start of the
work, less the fetch: the time in a worker's window and, fetched, waiting for the active slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..sched import Job, TaskType
from ..sealing.backends.sim import SimBackend
from ..sealing.miner import Miner
from ..sealing.notify import StateChange
from ..sealing.states import FAILED_STATES, SectorState

__all__ = ["Collector", "percentile"]


@dataclass(slots=True)
class Collector:
    """Feeds one run's figures; `start` at t0, `sample` per tick, `stop` at the end."""

    miner: Miner
    t0: float
    sample: float
    #: Tasks fetch apart from their slot (`Bound.prepares_apart`: the `lotus` baseline).
    prepares_apart: bool = False
    #: When each sector reached Proving (seconds since t0), in order.
    proving: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)
    #: (worker, task) -> seconds of slot time per sample bucket.
    busy: dict[tuple[str, TaskType], dict[int, float]] = field(default_factory=dict)
    #: (worker, task) -> seconds of fetch time (the slot held while the input arrives).
    fetch_seconds: dict[tuple[str, TaskType], float] = field(default_factory=dict)
    tasks_done: dict[tuple[str, TaskType], int] = field(default_factory=dict)
    waits: dict[TaskType, list[float]] = field(default_factory=dict)
    #: path id -> bytes stored or reserved, per sample.
    disk: dict[str, list[int]] = field(default_factory=dict)
    #: state name -> sectors, per sample (only states that ever held a sector).
    states: dict[str, list[int]] = field(default_factory=dict)
    samples: int = 0
    #: Sectors seen to start, whoever created them.
    started: int = 0
    #: State changes not seen (a listener misses none: kept for the summary's field).
    missed: int = 0
    _milestone: dict[int, float] = field(default_factory=dict)
    #: Fetch seconds of jobs whose work has not ended yet, by scheduler id.
    _fetching: dict[int, float] = field(default_factory=dict)

    def start(self) -> None:
        """Listen to state changes and to the scheduler's finished jobs."""
        # A listener, not a subscription: no buffer, and no task woken per change.
        self.miner.changes.add_listener(self._changed)
        self.miner.sched.add_job_listener(self._job_done)
        backend = self.miner.sealer.backend
        if isinstance(backend, SimBackend):
            backend.on_fetch = self._fetched

    async def stop(self) -> None:
        """Stop listening to state changes."""
        self.miner.changes.remove_listener(self._changed)

    def now(self) -> float:
        """Seconds since the run began."""
        return self.miner.clock.now() - self.t0

    def _changed(self, change: StateChange) -> None:
        now = self.now()
        if change.sector not in self._milestone:
            self.started += 1  # (pledged by the plan, or by auto-pledge)
        self._milestone[change.sector] = now
        after: SectorState = change.after
        if after is SectorState.Proving:
            self.proving.append(now)
        if after in FAILED_STATES:
            self.failures[after.name] = self.failures.get(after.name, 0) + 1
        if change.before in FAILED_STATES and after not in FAILED_STATES:
            name = change.before.name
            self.retries[name] = self.retries.get(name, 0) + 1

    def _fetched(self, job: Job, seconds: float) -> None:
        self._fetching[job.sched_id] = self._fetching.get(job.sched_id, 0.0) + seconds

    def _job_done(self, job: Job, seconds: float) -> None:
        end = self.now()
        placed = job.started_at - self.t0
        key = (job.worker.name, job.task_type)
        fetch = self._fetching.pop(job.sched_id, 0.0)
        work_from = end - seconds
        since = self._milestone.get(job.sector.number, placed)
        if self.prepares_apart:
            self._add_busy(key, work_from, end)
            wait = work_from - since - fetch
        else:
            self._add_busy(key, work_from - fetch, end)
            wait = placed - since
        if fetch:
            self.fetch_seconds[key] = self.fetch_seconds.get(key, 0.0) + fetch
        self.tasks_done[key] = self.tasks_done.get(key, 0) + 1
        self.waits.setdefault(job.task_type, []).append(max(0.0, wait))
        self._milestone[job.sector.number] = end

    def _add_busy(self, key: tuple[str, TaskType], start: float, end: float) -> None:
        buckets = self.busy.setdefault(key, {})
        t = start
        while t < end:
            i = int(t // self.sample)
            edge = min(end, (i + 1) * self.sample)
            buckets[i] = buckets.get(i, 0.0) + (edge - t)
            t = edge

    def take_sample(self) -> None:
        """Record disk use per path and sectors per state now."""
        n = self.samples
        for pid, path in sorted(self.miner.sched.index.paths.items()):
            self.disk.setdefault(pid, [0] * n).append(path.stored + path.reserved)
        for state, count in self.miner.sector_counts().items():
            if count or state in self.states:
                self.states.setdefault(state, [0] * n).append(count)
        self.samples += 1

    def busy_between(self, key: tuple[str, TaskType], start: float, end: float) -> float:
        """Slot seconds of (worker, task) in whole sample buckets within [start, end)."""
        first, last = math.ceil(start / self.sample), int(end // self.sample)
        buckets = self.busy.get(key, {})
        return sum(buckets.get(i, 0.0) for i in range(first, last))


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank `q`-th percentile (0 < q <= 100) of `values` (0.0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
