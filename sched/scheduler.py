"""The scheduler: queue, workers, storage index and a cycle strategy that places tasks.

The scheduler keeps the state (queue, workers and their ledgers, the storage index) and
records what changed since the last cycle: workers whose ledger, policy or state changed
(`_dirty`) and shapes that got their first request (`_unchecked`). Its `CycleStrategy`
(`strategy.py`) decides, once per cycle, what goes where: `BalancedCycle` by default, which
tests only what changed, or `LotusMode`, the Lotus baseline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..fsm.clock import Clock, RealClock
from ..fsm.store import LmdbStore
from .assigners import Assigner, Candidate, Fit, make_assigner
from .balanced import BalancedCycle
from .gate import PolicyGate
from .ledger import Ledger, Phase, WorkerResources
from .liveness import STALL, Liveness, is_late_reason
from .lotus import LotusMode
from .needs import NeedsMemo
from .policy import PolicyWatcher
from .pushed import PolicySource
from .queue import Request, RequestQueue
from .rules import stage_cap
from .selectors import Placement, Selector
from .storage import SectorRef, StorageIndex
from .strategy import CycleStrategy
from .tasks import TaskType
from .views import (
    DepartedLog,
    JobSnapshot,
    TaskDiag,
    WorkerSnapshot,
    job_snapshots,
    publish_snapshot,
    worker_snapshot,
)
from .waits import Durations, local_wait, local_wait_refusal, prefetch_refusal
from .workers import InProcessBackend, Worker, WorkerBackend, WorkerSpec

log = logging.getLogger("sectorfsm.sched")
R = TypeVar("R")


class SchedulerError(Exception):
    """Bad use of the scheduler (unknown worker, duplicate name, stopped scheduler)."""


@dataclass(slots=True)
class Job:
    """A task that holds a worker: what `prepare` and `work` receive."""

    sched_id: int
    sector: SectorRef
    task_type: TaskType
    worker: Worker
    placement: Placement
    phase: Phase
    started_at: float
    #: When `work` began (None while preparing), for the run-time estimates.
    work_started: float | None = None

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the job's worker backend (cancelling the job kills it there)."""
        return await self.worker.run(self.sched_id, fn, *args)


class Scheduler:
    """Places sealing tasks on workers; see the module docstring for the cycle."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        assigner: str = "balanced",
        index: StorageIndex | None = None,
        policy_poll_interval: float = 1.0,
    ) -> None:
        self.clock: Clock = clock or RealClock()
        lotus = assigner == "lotus"
        self.assigner: Assigner = make_assigner("balanced" if lotus else assigner)
        self.index = index or StorageIndex()
        #: Each worker's policy state (disk units, AllowDelay) and the policy's refusals.
        self.gate = PolicyGate(self.index)
        self.policy_poll_interval = policy_poll_interval
        self.queue = RequestQueue()
        self._workers: dict[str, Worker] = {}
        self._by_type: dict[TaskType, list[Worker]] = {}
        self._jobs: dict[int, Job] = {}
        #: The worker whose ledger holds each assigned task, and its sector.
        self._held: dict[int, Worker] = {}
        self._held_task: dict[int, tuple[SectorRef, TaskType]] = {}
        #: Per task type, `tasks_of`'s tuple of every held task, built once at assignment.
        self._held_of_type: dict[
            TaskType, dict[int, tuple[SectorRef, TaskType, str | None, bool]]
        ] = {}
        self._cycle_listeners: list[Callable[[], None]] = []
        self._policy_errors: dict[str, str | None] = {}
        self._needs = NeedsMemo()  # `fit`'s static half, per worker and kind
        #: Learned run time of each task type's work, for `waits.local_wait`.
        self.durations = Durations()
        self._dirty: set[str] = set()
        self._unchecked: set[int] = set()
        self._kicked = False
        self._monitor: asyncio.Task[None] | None = None
        #: One pending "the delay is over, test this worker again" per delayed worker.
        self._wakers: dict[str, asyncio.Task[None]] = {}
        #: The miner-side policy (`testOpenSource.json`) of workers without a file of their own.
        self.miner_policy: PolicyWatcher | None = None
        self._job_listeners: list[Callable[[Job, float], None]] = []
        self.departed = DepartedLog(self)  # `diag` says "lost N s ago" for a remote worker
        self.liveness = Liveness(self.clock, self.disable)
        #: The heartbeat grace of remote workers (`[cluster] heartbeat_grace`); None: theirs.
        self.remote_grace: float | None = None
        #: Figures for benchmarks and tests.
        self.cycles = 0
        self.checks = 0
        #: The `lotus` baseline replaces the whole cycle, not just the choice of worker.
        self.strategy: CycleStrategy = LotusMode(self) if lotus else BalancedCycle(self)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the heartbeat and policy monitor."""
        if self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        """Stop the monitor; queued requests stay queued."""
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
            self._monitor = None
        for waker in self._wakers.values():
            waker.cancel()
        await asyncio.gather(*self._wakers.values(), return_exceptions=True)
        self._wakers.clear()

    # -- workers ----------------------------------------------------------------------------

    def add_worker(self, spec: WorkerSpec, backend: WorkerBackend | None = None) -> Worker:
        """Register a worker (its paths join the storage index); re-adding replaces it."""
        if spec.name in self._workers:
            self.remove_worker(spec.name)
        if spec.remote and self.remote_grace is not None:
            spec.heartbeat_grace = self.remote_grace
        watcher = PolicyWatcher(spec.policy_file) if spec.policy_file is not None else None
        if watcher is None:
            watcher = self.miner_policy
        else:
            watcher.poll()
            if watcher.error:
                log.error("worker %s: %s", spec.name, watcher.error)
        w = Worker(
            spec,
            backend or InProcessBackend(),
            Ledger(spec.resources),
            self.clock.now(),
            watcher=watcher,
        )
        self._workers[spec.name] = w
        self.assigner.add_worker(spec.name)
        for t in spec.task_types:
            self._by_type.setdefault(t, []).append(w)
        for p in spec.paths:
            self.index.declare(p)
        self._touch(w.name)
        return w

    def remove_worker(self, name: str) -> None:
        """Forget a worker; its running jobs keep running until they return."""
        w = self._workers.pop(name, None)
        if w is None:
            raise SchedulerError(f"no worker named {name!r}")
        w.enabled = False
        w.disabled_reason = "removed"
        self.departed.record(w)
        for t in w.spec.task_types:
            self._by_type[t].remove(w)
        self.gate.forget_units(name)
        self.liveness.wake(name)
        waker = self._wakers.pop(name, None)
        if waker is not None:
            waker.cancel()

    def use_miner_policy(self, path: Path) -> PolicyWatcher:
        """Apply the policy file at `path` to every worker without its own, now and later."""
        watcher = PolicyWatcher(path)
        if watcher.error:
            log.error("miner policy: %s", watcher.error)
        self.miner_policy = watcher
        for w in self._workers.values():
            if w.spec.policy_file is None:
                w.watcher = watcher
                self.gate.forget_units(w.name)
                self._touch(w.name)
        return watcher

    def use_policy(self, name: str, source: PolicySource) -> None:
        """Make `source` (e.g. what a remote worker pushes) the policy of worker `name`."""
        w = self._worker(name)
        w.watcher = source
        self.gate.forget_units(name)
        self._touch(name)

    def heartbeat(self, name: str, resources: WorkerResources | None = None) -> None:
        """A sign of life from a worker, optionally with fresh resource figures."""
        w = self._worker(name)
        w.last_heartbeat = self.clock.now()
        if resources is not None:
            w.ledger.resources = resources
            w.spec.resources = resources
        if not w.enabled and is_late_reason(w.disabled_reason):
            log.info("worker %s is back", name)
            w.enabled, w.disabled_reason = True, ""
        self.liveness.wake(name)
        self._touch(name)

    def disable(self, name: str, reason: str) -> None:
        """Take no new work on `name` (its assigned, unstarted tasks go back to the queue)."""
        w = self._worker(name)
        w.enabled, w.disabled_reason = False, reason
        self.liveness.wake(name)

    def enable(self, name: str) -> None:
        """Undo `disable`."""
        w = self._worker(name)
        w.enabled, w.disabled_reason = True, ""
        self._touch(name)

    def enabled_workers(self) -> list[Worker]:
        """The workers that take new work, in the order they were added."""
        return [w for w in self._workers.values() if w.enabled]

    def workers_for(self, task_type: TaskType) -> Sequence[Worker]:
        """The registered workers that do `task_type`, enabled or not."""
        return self._by_type.get(task_type, ())

    def find_worker(self, name: str) -> Worker | None:
        """A registered worker by name, or None."""
        return self._workers.get(name)

    def files_changed(self, sector: SectorRef) -> None:
        """Sector files moved (the index changed): re-evaluate that sector's queued tasks."""
        for req in self.queue.for_sector(sector):
            self.queue.remove(req.sched_id)
            self._enqueue(req)
        self.request_cycle()

    # -- scheduling -------------------------------------------------------------------------

    async def schedule(
        self,
        sector: SectorRef,
        task_type: TaskType,
        selector: Selector,
        prepare: Callable[[Job], Awaitable[Any]] | None,
        work: Callable[[Job], Awaitable[R]],
        *,
        priority: int = 0,
    ) -> R:
        """Queue a task, wait for a worker, run `prepare` then `work`; return work's result.

        Cancelling the caller removes a queued task, or cancels a running one (its backend
        job is killed). Errors of `prepare`/`work` go back to the caller unchanged.
        """
        loop = asyncio.get_running_loop()
        sched_id = self.queue.next_id()
        req = Request(
            sched_id,
            sector,
            task_type,
            priority,
            selector,
            prepare,
            work,
            self.queue.make_key(task_type, priority, sector, sched_id),
            self.clock.now(),
            loop.create_future(),
        )
        while True:
            self._enqueue(req)
            self.request_cycle()
            try:
                worker_name, placement = await req.assigned
                w = self._workers.get(worker_name)
                ready = w is not None and await self.liveness.ready(w, self._workers.get)
            except asyncio.CancelledError:
                if self.queue.remove(sched_id) is None and req.assigned.done():
                    self._release(sched_id)
                raise
            if w is not None and ready:
                break
            # The worker went away, or went silent, before the task started: queue it again.
            self._release(sched_id)
            req.assigned = loop.create_future()
        job = Job(sched_id, sector, task_type, w, placement, Phase.PREPARING, self.clock.now())
        self._jobs[sched_id] = job
        try:
            if prepare is not None:
                if sched_id in w.ledger.entries:
                    w.ledger.set_phase(sched_id, Phase.PREPARING)
                await prepare(job)
            await self.strategy.before_work(job)
            job.phase = Phase.RUNNING
            job.work_started = self.clock.now()
            if sched_id in w.ledger.entries:
                w.ledger.set_phase(sched_id, Phase.RUNNING)
            result = await work(job)
            self.durations.observe(task_type, self.clock.now() - job.work_started)
            return result
        finally:
            self._release(sched_id)
            if job.work_started is not None:
                self._job_done(job, self.clock.now() - job.work_started)

    def add_job_listener(self, listener: Callable[[Job, float], None]) -> None:
        """Call `listener(job, seconds)` when a job's work ends, done or failed (metrics)."""
        self._job_listeners.append(listener)

    def _job_done(self, job: Job, seconds: float) -> None:
        for listener in self._job_listeners:
            try:
                listener(job, seconds)
            except Exception:  # an observer must not turn a finished job into a failed one
                log.exception("job listener failed")

    def cancel(self, sched_id: int) -> bool:
        """Cancel a queued task by id (its `schedule` call raises CancelledError)."""
        req = self.queue.get(sched_id)
        if req is None:
            return False
        req.assigned.cancel()
        self.queue.remove(sched_id)
        return True

    def _enqueue(self, req: Request) -> None:
        key: Hashable = (req.task_type, req.sector.size, req.selector.shape(req.sector))
        if key[2] is None:  # type: ignore[index]
            # Verdicts depend on where this sector's files are, not on which sector it is.
            key = (req.task_type, req.sector.size, req.selector, self.index.locations(req.sector))
        shape = self.queue.intern(key, (req.task_type, req.sector.size))
        if self.queue.shape_size(shape) == 0:
            self._unchecked.add(shape)
        self.queue.push(req, shape)

    def _release(self, sched_id: int) -> None:
        self._jobs.pop(sched_id, None)
        self.strategy.release(sched_id)
        held = self._held_task.pop(sched_id, None)
        if held is not None:
            self._held_of_type[held[1]].pop(sched_id, None)
        w = self._held.pop(sched_id, None)
        if w is not None:
            w.jobs.discard(sched_id)
            w.ledger.free(sched_id)
            self._start_delay(w)
            self._touch(w.name)
        self.index.release(sched_id)
        self.request_cycle()

    def _start_delay(self, w: Worker) -> None:
        """Start `w`'s AllowDelay, and test it again once the delay is over."""
        now = self.clock.now()
        self.gate.released(w.name, now)
        delay = w.policy.allow_delay if w.watcher is not None else 0.0
        if delay <= 0:
            return
        old = self._wakers.pop(w.name, None)
        if old is not None:
            old.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._wakers[w.name] = loop.create_task(self._wake(w.name, now + delay))

    async def _wake(self, name: str, when: float) -> None:
        await self.clock.sleep_until(when)
        self._wakers.pop(name, None)
        if name in self._workers:
            self._touch(name)

    def worker_changed(self, name: str) -> None:
        """Test worker `name` again at the next cycle (its ledger changed outside a cycle)."""
        self._touch(name)

    def _touch(self, name: str) -> None:
        self._dirty.add(name)
        self.request_cycle()

    def request_cycle(self) -> None:
        """Run a cycle soon (once, however many times it is asked before it runs)."""
        if not self._kicked:
            try:
                asyncio.get_running_loop().call_soon(self._cycle)
            except RuntimeError:
                return  # no loop yet: the first schedule() asks again
            self._kicked = True

    def _cycle(self) -> None:
        self._kicked = False
        self.cycles += 1
        changed = [w for n in self._dirty if (w := self._workers.get(n)) is not None and w.enabled]
        new_shapes, self._unchecked = self._unchecked, set()
        self._dirty.clear()
        self.strategy.cycle(changed, new_shapes)
        for listener in self._cycle_listeners:  # cheap and never raising: they defer work
            listener()

    def add_cycle_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every scheduling cycle (auto-pledge re-evaluates there)."""
        self._cycle_listeners.append(listener)

    def tasks_of(
        self, types: frozenset[TaskType]
    ) -> list[tuple[SectorRef, TaskType, str | None, bool]]:
        """`(sector, type, worker, held)`: held ones name their worker, queued ones their pin.

        Queued tasks first, then held ones, in no particular order; indexed by task type, so
        a caller after every cycle pays for the tasks of `types`, not for the whole queue.
        """
        out = [
            (r.sector, r.task_type, getattr(r.selector, "worker", None), False)
            for r in self.queue.of_types(types)
        ]
        for t in types:
            out.extend(self._held_of_type.get(t, {}).values())
        return out

    def fit(self, w: Worker, task_type: TaskType, sector_size: int) -> Fit | str:
        """`w`'s room for `task_type` tasks of this size, or its ledger's refusal in words."""
        cap = stage_cap(w.watcher.policy, task_type) if w.watcher is not None else None
        kept = self._needs.get(w, task_type, sector_size, cap)
        refusal = w.ledger.claim_refusal(task_type, kept.need)
        if refusal is not None:
            return refusal
        return Fit(kept.need, w.ledger.start_refusal(task_type, kept.need), kept.slots)

    def verdict(self, req: Request, w: Worker, fit: Fit | None = None) -> Candidate | str:
        """Whether `w` can take `req` now: a candidate, or the reason it cannot, in words.

        `fit`: `self.fit(w, ...)` for this task's type and size, from a caller that asked it
        since `w`'s ledger last changed (a cycle asks it once per worker, not per sector).
        """
        self.checks += 1
        if not w.enabled:
            return w.disabled_reason or "disabled"
        if not w.supports(req.task_type):
            return f"does not do {req.task_type.short}"
        if w.watcher is not None:  # no policy file: no operator restrictions
            refusal = self.gate.refusal(w, req.task_type, req.sector, self.clock.now())
            if refusal is not None:
                return refusal
        if fit is None:
            found = self.fit(w, req.task_type, req.sector.size)
            if isinstance(found, str):
                return found
            fit = found
        placement = req.selector.check(req.sector, w, self.index)
        if isinstance(placement, str):
            return placement
        if (refusal := prefetch_refusal(self, req, w, fit.busy, placement)) is not None:
            return refusal
        if placement.fetch_bytes:
            wait = local_wait(self, req)
            if (refusal := local_wait_refusal(wait, placement.cost_s)) is not None:
                return refusal
        return Candidate(w, placement, fit.need, fit.slots, fit.busy is not None)

    def job(self, sched_id: int) -> Job | None:
        """The job of a task that holds a worker, by id (None: queued or gone)."""
        return self._jobs.get(sched_id)

    def assign(self, req: Request, c: Candidate) -> None:
        """Give `req` to the candidate's worker: its ledger holds the task from now on."""
        self.queue.remove(req.sched_id)
        w = c.worker
        fits = w.ledger.refusal(req.task_type, c.need) is None  # else a claim: fetch, then wait
        w.ledger.add(req.sched_id, req.task_type, c.need, computing=fits)
        w.jobs.add(req.sched_id)
        self._held[req.sched_id] = w
        self._held_task[req.sched_id] = (req.sector, req.task_type)
        held = (req.sector, req.task_type, w.name, True)
        self._held_of_type.setdefault(req.task_type, {})[req.sched_id] = held
        if c.placement.path is not None and c.placement.reserve:
            self.index.reserve(req.sched_id, c.placement.path, c.placement.reserve)
        req.worker = w.name
        if not req.assigned.done():
            req.assigned.set_result((w.name, c.placement))

    # -- monitoring -------------------------------------------------------------------------

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.policy_poll_interval
            await asyncio.sleep(self.policy_poll_interval)
            if (stalled := loop.time() - due) >= STALL:
                self.liveness.resumed(stalled, self._workers.values())
            self.liveness.refresh_local(self._workers.values())
            self.check_workers()

    def check_workers(self) -> None:
        """Disable workers past their heartbeat grace and pick up policy edits."""
        # The miner policy is shared by many workers: read it once, tell each of them.
        polled: dict[int, bool] = {}
        for w in list(self._workers.values()):
            if w.watcher is not None:
                key = id(w.watcher)
                if key not in polled:
                    polled[key] = w.watcher.poll()
                if polled[key]:
                    log.info("worker %s: policy reloaded from %s", w.name, w.watcher.path)
                    self._touch(w.name)
                error = w.watcher.error
                if error != self._policy_errors.get(w.name):
                    self._policy_errors[w.name] = error
                    if error:
                        log.error(
                            "worker %s: policy edit rejected, keeping the last good policy: %s",
                            w.name,
                            error,
                        )
        self.liveness.check(list(self._workers.values()))

    # -- views ------------------------------------------------------------------------------

    def workers(self) -> list[WorkerSnapshot]:
        """Every worker with its load, state and policy status."""
        now = self.clock.now()
        return [worker_snapshot(w, self.index, now) for w in self._workers.values()]

    def jobs(self) -> list[JobSnapshot]:
        """Every task holding a worker, and every queued one."""
        return job_snapshots(self._jobs.values(), self.queue, self.clock.now())

    def diag(self, limit: int | None = None) -> list[TaskDiag]:
        """For each queued task (most urgent first), why each worker did not take it."""
        out: list[TaskDiag] = []
        for n, req in enumerate(self.queue):
            if limit is not None and n >= limit:
                break
            reasons: dict[str, str] = {}
            for w in self._workers.values():
                v = self.verdict(req, w)
                reasons[w.name] = "could take it now" if isinstance(v, Candidate) else v
            reasons.update(self.departed.reasons(req.task_type, self._workers))
            out.append(
                TaskDiag(req.sched_id, str(req.sector), req.task_type.short, req.priority, reasons)
            )
        return out

    def snapshot(self) -> dict[str, Any]:
        """Workers, jobs and diagnosis as plain data, for the CLI to read from the store."""
        return {
            "at": time.time(),
            "workers": [v.to_dict() for v in self.workers()],
            "jobs": [j.to_dict() for j in self.jobs()],
            "diag": [d.to_dict() for d in self.diag(limit=200)],
        }

    def worker(self, name: str) -> Worker:
        """A registered worker by name."""
        return self._worker(name)

    def publish(self, store: LmdbStore) -> dict[str, Any]:
        """Stage `snapshot()` into the store's next commit, for `sectors workers/jobs/...`."""
        snapshot = self.snapshot()
        publish_snapshot(store, snapshot)
        return snapshot

    def _worker(self, name: str) -> Worker:
        try:
            return self._workers[name]
        except KeyError:
            raise SchedulerError(f"no worker named {name!r}") from None
