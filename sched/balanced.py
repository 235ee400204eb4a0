"""`balanced`: the default cycle strategy, incremental and near-linear in queue + workers.

Invariant after every cycle: no queued request can be placed on any enabled worker. A cycle
therefore only has to test what changed: requests of a new shape against every worker, and
the head of every shape against the workers whose ledger, policy or state changed. That keeps
one decision near-linear in queue + workers, where Lotus tests every queued task against every
window on every event. Which worker wins among those that can take a task is the scheduler's
`Assigner`'s choice (`assigners.py`).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .assigners import Candidate
from .queue import Key, Request
from .resources import resource_spec
from .tasks import TaskType

if TYPE_CHECKING:
    from .scheduler import Job, Scheduler
    from .workers import Worker


@dataclass(slots=True)
class _Burst:
    """Scored candidates of one shape during one cycle."""

    turn: int
    heap: list[tuple[tuple[float, float, float, int], int, int, Candidate]] = field(
        default_factory=list
    )
    seq: int = 0


class BalancedCycle:
    """The default `CycleStrategy`: re-test only the new shapes and the changed workers."""

    name = "balanced"

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.queue = sched.queue
        self._fit_memo: dict[tuple[str, int, TaskType, int], bool] = {}

    def cycle(self, changed: Sequence[Worker], new_shapes: set[int]) -> None:
        """One cycle over the new shapes and, for the changed workers, every kind's heads."""
        # Valid for one cycle: resources refreshed by heartbeats do not bump ledger versions.
        self._fit_memo.clear()
        if not len(self.queue):
            return
        sched = self.sched
        # Only heads that something could take now: every new shape, and, per (task type,
        # size) that a changed worker could hold, that kind's shapes in priority order from the
        # queue's index, for as long as some changed worker can still hold that kind.
        queue = self.queue
        heap: list[tuple[Key, int, int, tuple[TaskType, int] | None]] = []
        seq = 0
        for shape in new_shapes:
            head = queue.head(shape)
            if head is not None:
                seq += 1
                heap.append((head.key, seq, shape, None))
        borrowed: list[tuple[tuple[TaskType, int], Key, int]] = []

        def advance(kind: tuple[TaskType, int]) -> None:
            nonlocal seq
            if not any(self._may_fit(w, *kind) for w in changed):
                return  # nothing of this kind fits the changed workers any more
            entry = queue.take_head_entry(kind)
            if entry is not None:
                borrowed.append((kind, *entry))
                seq += 1
                heapq.heappush(heap, (entry[0], seq, entry[1], kind))

        if changed:
            for k in queue.kinds():
                advance(k)
        heapq.heapify(heap)
        from_index: set[int] = set()
        bursts: dict[int, _Burst] = {}
        while heap:
            _, _, shape, kind = heapq.heappop(heap)
            if kind is not None:
                advance(kind)  # line up the kind's next shape before this one changes anything
                if shape in from_index or shape in new_shapes:
                    continue  # a duplicate index entry, or handled as a new shape
                from_index.add(shape)
            if shape not in new_shapes and not self._any_fit(shape, changed):
                continue  # the changed workers filled up meanwhile
            req = queue.head(shape)
            if req is None:
                continue
            burst = bursts.get(shape)
            if burst is None:
                pool = sched.workers_for(req.task_type) if shape in new_shapes else changed
                burst = bursts[shape] = self._burst(req, pool)
            chosen = self._pick(req, burst)
            if chosen is None:
                continue  # this shape is blocked everywhere it was tested
            sched.assign(req, chosen)
            nxt = queue.head(shape)
            if nxt is not None:
                self._offer(nxt, chosen.worker, burst)  # it may well take another
                seq += 1
                heapq.heappush(heap, (nxt.key, seq, shape, None))
        for kind, key, shape in borrowed:
            queue.give_back(kind, key, shape)

    def _burst(self, req: Request, pool: Sequence[Worker]) -> _Burst:
        """Score every worker of the pool once for this shape (reused while the cycle lasts)."""
        burst = _Burst(self.sched.assigner.turn(req.task_type))
        for w in pool:
            self._offer(req, w, burst)
        return burst

    def _offer(self, req: Request, w: Worker, burst: _Burst) -> None:
        sched = self.sched
        if not self._may_fit(w, req.task_type, req.sector.size):
            sched.checks += 1
            return  # the usual answer in a deep queue: no need to say why in words
        verdict = sched.verdict(req, w)
        if isinstance(verdict, Candidate):
            score = sched.assigner.score(req.task_type, verdict, burst.turn)
            burst.seq += 1
            heapq.heappush(burst.heap, (score, burst.seq, w.ledger.version, verdict))

    def _pick(self, req: Request, burst: _Burst) -> Candidate | None:
        # Within a cycle only the workers that got a task change: re-score just those.
        while burst.heap:
            _, _, version, cand = heapq.heappop(burst.heap)
            w = cand.worker
            if version == w.ledger.version:
                self.sched.assigner.chose(req.task_type, cand)
                return cand
            self._offer(req, w, burst)
        return None

    def _may_fit(self, w: Worker, task_type: TaskType, size: int) -> bool:
        """A cheap, memoized yes/no on the worker and its ledger alone (no messages)."""
        key = (w.name, w.ledger.version, task_type, size)
        fits = self._fit_memo.get(key)
        if fits is None:
            if not (w.enabled and w.supports(task_type)):
                fits = False
            else:
                need = resource_spec(task_type, size, w.spec.overrides)
                fits = w.ledger.refusal(task_type, need) is None
            self._fit_memo[key] = fits
        return fits

    def _any_fit(self, shape: int, workers: Sequence[Worker]) -> bool:
        task_type, size = self.queue.kind(shape)
        return any(self._may_fit(w, task_type, size) for w in workers)

    async def before_work(self, job: Job) -> None:
        """Nothing to wait for: the ledger admitted the whole task when it was assigned."""

    def release(self, sched_id: int) -> None:
        """Nothing held here: the scheduler frees the worker's ledger itself."""
