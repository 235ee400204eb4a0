"""`lotus`: a faithful port of Lotus's window scheduler with its utilization assigner.

The benchmark baseline (Lotus `storage/sealer/sched.go`, `sched_assigner_common.go`,
`sched_assigner_utilization.go`, `sched_worker.go` and `sched_resources.go`@b835fab70). Kept
deliberately as Lotus has it, overcommit included:

* each worker keeps `SCHED_WINDOWS` (2) windows open; every open window starts empty, sized
  to the whole idle worker, whatever the worker already runs;
* a cycle tests every queued task against every open window (`CanHandleRequest` on the empty
  window, then the selector), sorts the acceptable windows by worker utilization, and gives
  each task, in queue order, to the least-utilized window that still fits
  (`LowestUtilizationWS`);
* a worker compacts its windows, starts C1/C2 straight into `active` when they fit
  ("ready work"), otherwise moves the head task of its first window into `preparing`; after
  `prepare` a task waits until `active` can hold it. Window, preparing and active each count
  up to the whole worker, so a worker can be promised about 4x what it has.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .ledger import WorkerResources
from .queue import Request
from .resources import Resources, resource_spec
from .selectors import Placement
from .tasks import TaskType

if TYPE_CHECKING:
    from .scheduler import Job, Scheduler
    from .workers import Worker

SCHED_WINDOWS = 2
_READY_TYPES = (TaskType.COMMIT1, TaskType.COMMIT2)


@dataclass(slots=True)
class ActiveResources:
    """Lotus's `ActiveResources` (HEAD), with its `CanHandleRequest`, `Add` and `Free`."""

    mem_min: int = 0
    mem_max: int = 0
    gpu: float = 0.0
    cpu: int = 0
    counts: Counter[TaskType] = field(default_factory=Counter)

    def can_handle(self, tt: TaskType, need: Resources, res: WorkerResources) -> bool:
        """Whether one more task fits (MaxConcurrent, memory, swap, CPU, GPU)."""
        if need.max_concurrent > 0 and self.counts[tt] >= need.max_concurrent:
            return False
        if res.ignore_resources:
            return True
        if need.min_memory + need.base_min_memory > res.mem_physical - self.mem_min:
            return False
        vmem_used = max(self.mem_max, res.mem_used + res.mem_swap_used)
        if need.max_memory + need.base_min_memory > res.mem_physical + res.mem_swap - vmem_used:
            return False
        if self.cpu + need.threads(res.cpus, len(res.gpus)) > res.cpus:
            return False
        return not (
            res.gpus
            and need.gpu_utilization > 0
            and self.gpu + need.gpu_utilization > len(res.gpus)
        )

    def add(self, tt: TaskType, need: Resources, res: WorkerResources) -> float:
        """Take the resources; returns the utilization delta (as Lotus's `Add`)."""
        before = self.utilization(res)
        if need.gpu_utilization > 0:
            self.gpu += need.gpu_utilization
        self.cpu += need.threads(res.cpus, len(res.gpus))
        self.mem_min += need.min_memory
        self.mem_max += need.max_memory
        self.counts[tt] += 1
        return self.utilization(res) - before

    def free(self, tt: TaskType, need: Resources, res: WorkerResources) -> None:
        """Give them back."""
        if need.gpu_utilization > 0:
            self.gpu -= need.gpu_utilization
        self.cpu -= need.threads(res.cpus, len(res.gpus))
        self.mem_min -= need.min_memory
        self.mem_max -= need.max_memory
        self.counts[tt] -= 1

    def utilization(self, res: WorkerResources) -> float:
        """Lotus's `utilization`: the most used of CPU, RAM, RAM+swap and GPU."""
        u = self.cpu / res.cpus if res.cpus else 0.0
        if res.mem_physical:
            u = max(u, max(self.mem_min, res.mem_used) / res.mem_physical)
        vmem = res.mem_physical + res.mem_swap
        if vmem:
            u = max(u, max(self.mem_max, res.mem_used + res.mem_swap_used) / vmem)
        if res.gpus:
            u = max(u, self.gpu / len(res.gpus))
        return u


@dataclass(slots=True)
class _Window:
    allocated: ActiveResources = field(default_factory=ActiveResources)
    todo: list[tuple[Request, Resources, Placement]] = field(default_factory=list)


@dataclass(slots=True)
class _WorkerState:
    active: ActiveResources = field(default_factory=ActiveResources)
    preparing: ActiveResources = field(default_factory=ActiveResources)
    windows: list[_Window] = field(default_factory=list)
    requested: int = 0
    #: Prepared tasks waiting for `active` (Lotus's cond.Wait), in arrival order.
    waiting: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)


@dataclass(slots=True)
class _Held:
    worker: str
    task_type: TaskType
    need: Resources
    where: str  # "preparing" | "active"


class LotusMode:
    """The `CycleStrategy` that drives a `Scheduler`'s queue the way Lotus does (see above).

    It keeps its own windows and active/preparing pools; the workers' ledgers stay unused.
    """

    name = "lotus"

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self._state: dict[str, _WorkerState] = {}
        self._held: dict[int, _Held] = {}

    def _st(self, name: str) -> _WorkerState:
        st = self._state.get(name)
        if st is None:
            st = self._state[name] = _WorkerState()
        return st

    # -- the scheduling cycle (trySched) ----------------------------------------------------

    def cycle(self, changed: Sequence[Worker], new_shapes: set[int]) -> None:
        """One `trySched`: every queued task against every open window (whatever changed)."""
        sched = self.sched
        workers = sched.enabled_workers()
        open_windows: list[Worker] = []
        for w in workers:
            st = self._st(w.name)
            open_windows += [w] * (SCHED_WINDOWS - st.requested)
        queue = list(sched.queue)
        if open_windows and queue:
            self._try_sched(queue, open_windows)
        requested = sum(self._st(w.name).requested for w in workers)
        for w in workers:
            self._process(w)
        if len(sched.queue) and sum(self._st(w.name).requested for w in workers) < requested:
            # A drained window makes Lotus's worker request a new one, which runs trySched.
            sched.request_cycle()

    def _try_sched(self, queue: list[Request], open_windows: list[Worker]) -> None:
        sched = self.sched
        windows = [_Window() for _ in open_windows]
        util = {w.name: self._worker_utilization(w) for w in open_windows}
        for req in queue:
            acceptable: list[tuple[int, Resources, Placement]] = []
            for i, w in enumerate(open_windows):
                sched.checks += 1
                if not w.supports(req.task_type):
                    continue
                need = resource_spec(req.task_type, req.sector.size, w.spec.overrides)
                if not ActiveResources().can_handle(req.task_type, need, w.spec.resources):
                    continue
                verdict = req.selector.check(req.sector, w, sched.index)
                if isinstance(verdict, str):
                    continue
                acceptable.append((i, need, verdict))
            # Cmp: lower utilization first; same worker: older window first.
            acceptable.sort(key=lambda a: (util[open_windows[a[0]].name], a[0]))
            best: tuple[int, Resources, Placement] | None = None
            best_util = float("inf")
            for i, need, placement in acceptable:
                w = open_windows[i]
                if not windows[i].allocated.can_handle(req.task_type, need, w.spec.resources):
                    continue
                wu = util[w.name]
                if wu >= best_util:
                    break  # the list is sorted by utilization: nothing better follows
                best, best_util = (i, need, placement), wu
            if best is None:
                continue
            i, need, placement = best
            w = open_windows[i]
            util[w.name] += windows[i].allocated.add(req.task_type, need, w.spec.resources)
            windows[i].todo.append((req, need, placement))
            sched.queue.remove(req.sched_id)
        for i, wnd in enumerate(windows):
            if wnd.todo:
                st = self._st(open_windows[i].name)
                st.windows.append(wnd)
                st.requested += 1

    def _worker_utilization(self, w: Worker) -> float:
        st, res = self._st(w.name), w.spec.resources
        return (
            st.active.utilization(res)
            + st.preparing.utilization(res)
            + sum(wnd.allocated.utilization(res) for wnd in st.windows)
        )

    # -- the worker side (sched_worker.go) --------------------------------------------------

    def _process(self, w: Worker) -> None:
        st, res = self._st(w.name), w.spec.resources
        self._compact(st, res)
        if not st.waiting:  # prepared tasks have priority over ready work
            self._assign_ready(w, st, res)
        self._assign_preparing(w, st, res)

    def _compact(self, st: _WorkerState, res: WorkerResources) -> None:
        for i in range(1, len(st.windows)):
            lower, upper = st.windows[i - 1], st.windows[i]
            for item in list(upper.todo):
                req, need, _ = item
                if lower.allocated.can_handle(req.task_type, need, res):
                    lower.allocated.add(req.task_type, need, res)
                    upper.allocated.free(req.task_type, need, res)
                    upper.todo.remove(item)
                    lower.todo.append(item)
        kept = [wnd for wnd in st.windows if wnd.todo]
        st.requested -= len(st.windows) - len(kept)
        st.windows = kept

    def _assign_ready(self, w: Worker, st: _WorkerState, res: WorkerResources) -> None:
        while st.windows:
            first = st.windows[0]
            pick = next(
                (
                    it
                    for it in first.todo
                    if it[0].task_type in _READY_TYPES
                    and st.active.can_handle(it[0].task_type, it[1], res)
                ),
                None,
            )
            if pick is None:
                return
            first.todo.remove(pick)
            req, need, placement = pick
            st.active.add(req.task_type, need, res)
            self._start(w, req, need, placement, "active")
            self._pop_empty(st)

    def _assign_preparing(self, w: Worker, st: _WorkerState, res: WorkerResources) -> None:
        while st.windows:
            first = st.windows[0]
            pick = next(
                (it for it in first.todo if st.preparing.can_handle(it[0].task_type, it[1], res)),
                None,
            )
            if pick is None:
                return  # head of line: later windows wait
            first.todo.remove(pick)
            req, need, placement = pick
            st.preparing.add(req.task_type, need, res)
            self._start(w, req, need, placement, "preparing")
            self._pop_empty(st)

    def _pop_empty(self, st: _WorkerState) -> None:
        if st.windows and not st.windows[0].todo:
            st.windows.pop(0)
            st.requested -= 1

    def _start(
        self, w: Worker, req: Request, need: Resources, placement: Placement, where: str
    ) -> None:
        if req.assigned.done():  # cancelled while it sat in a window
            self._free(w, _Held(w.name, req.task_type, need, where))
            return
        self._held[req.sched_id] = _Held(w.name, req.task_type, need, where)
        req.worker = w.name
        req.assigned.set_result((w.name, placement))

    # -- hooks the scheduler calls ----------------------------------------------------------

    async def before_work(self, job: Job) -> None:
        """A prepared task waits until `active` can hold it, then moves there."""
        held = self._held.get(job.sched_id)
        if held is None or held.where == "active":
            return
        w = job.worker
        st, res = self._st(w.name), w.spec.resources
        while not st.active.can_handle(held.task_type, held.need, res):
            fut = asyncio.get_running_loop().create_future()
            st.waiting.append((job.sched_id, fut))
            try:
                await fut
            finally:
                st.waiting = [x for x in st.waiting if x[1] is not fut]
        st.active.add(held.task_type, held.need, res)
        st.preparing.free(held.task_type, held.need, res)
        held.where = "active"
        self.sched.request_cycle()

    def release(self, sched_id: int) -> None:
        """A task ended (or was cancelled): free what it held and let waiters retry."""
        held = self._held.pop(sched_id, None)
        if held is None:
            return
        w = self.sched.find_worker(held.worker)
        if w is not None:
            self._free(w, held)

    def _free(self, w: Worker, held: _Held) -> None:
        st, res = self._st(w.name), w.spec.resources
        pool = st.active if held.where == "active" else st.preparing
        pool.free(held.task_type, held.need, res)
        for _, fut in st.waiting:
            if not fut.done():
                fut.set_result(None)
