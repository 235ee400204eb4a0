"""`balanced`: the default cycle strategy, incremental and near-linear in queue + workers.

Invariant after every cycle: no queued request can be placed on any enabled worker. A cycle
therefore only has to test what changed: requests of a new shape against every worker, and
the head of every shape against the workers whose ledger, policy or state changed. That keeps
one decision near-linear in queue + workers, where Lotus tests every queued task against every
window on every event. Which worker wins among those that can take a task is the scheduler's
`Assigner`'s choice (`assigners.py`).

Prefetch: a task may be placed on a worker whose compute is busy, as a claim on its ledger
(memory, no compute), and fetch its files there meanwhile; once prepared it takes compute,
the earliest waiter that fits first (`before_work`). Only a fetch that has to happen anyway
is prefetched (`waits.py`). Lotus stacks whole-worker windows for this and
ends up with tasks fetched and waiting on a busy worker while others idle (lotus#8655); here
the claims are bounded to one worker's worth of compute (one waiting task per slot), and a
task only goes to a worker where it must wait when no enabled worker can start it now (a
worker that can is always preferred, and the balanced invariant re-tests every freed worker)
and no worker that holds its files and runs its type could take it instead.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .assigners import BalancedAssigner, Base, Candidate, Fit
from .gate import PoolRules
from .queue import Key, Request
from .ranked import Ranked, Row
from .selectors import CostClass, cost_class, cost_floor, placeable_on
from .tasks import TaskType
from .waits import holders_doing

if TYPE_CHECKING:
    from .scheduler import Job, Scheduler
    from .workers import Worker


Score = tuple[bool, tuple[float, float, float, int]]
#: A burst's heap entry: score, order of arrival, the worker's ledger version when scored,
#: the worker, its candidate (None: ranked by `floor`, verdict not asked yet), and whether it
#: is the head of the burst's `Ranked` order (whose next row comes in when it goes out).
Entry = tuple[Score, int, int, "Worker", Candidate | None, bool]


@dataclass(slots=True)
class _Burst:
    """Scored workers of one shape during one cycle.

    An entry without a candidate is ranked by the score its verdict would give if it passed
    (`floor`, the selector's transfer cost known before `check`): its verdict is asked only
    when it comes out on top, so a shape that any of 46 GPU boxes could take asks one or two
    of them, not all. With `floor` None every entry is a candidate, asked when offered.
    """

    turn: int
    floor: Callable[[Worker], float] | None
    heap: list[Entry] = field(default_factory=list)
    seq: int = 0
    #: The enabled holders of the shape's files that do its type (`waits.holders_doing`).
    doers: list[Worker] | None = None
    #: The rest of the pool in score order (`Ranked.order`), fed into `heap` one at a time,
    #: less the workers in `apart` (the holders of the shape's files, scored on their own).
    rows: Iterator[Row] | None = None
    apart: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Room:
    """A worker's `Fit` for one kind in one cycle, and its assigner's score base there."""

    fit: Fit
    #: `AllowDelay` holds the kind off the worker (`PolicyGate.delayed`; a cycle's clock).
    delayed: bool
    base: Base | None = None


class BalancedCycle:
    """The default `CycleStrategy`: re-test only the new shapes and the changed workers."""

    name = "balanced"

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.queue = sched.queue
        self._fit_memo: dict[tuple[str, int, TaskType, int], _Room | None] = {}
        #: Per kind, the workers of its type that had room when the cycle first asked.
        self._open: dict[tuple[TaskType, int], list[Worker]] = {}
        #: Per worker, the prepared tasks waiting for its compute, in arrival order.
        self._waiting: dict[str, list[int]] = {}
        self._wakeups: dict[int, asyncio.Future[None]] = {}
        #: The worker of every task past its `prepare`, so `release` knows whom to wake.
        self._worker_of: dict[int, str] = {}
        #: This cycle's changed workers, and per pool (the changed workers: True, or every
        #: worker of a type: False) and type its `PoolRules` (policies hold within a cycle).
        self._changed: Sequence[Worker] = ()
        self._changed_pos: dict[str, int] | None = None
        self._rules: dict[tuple[TaskType, bool], PoolRules] = {}
        #: Per kind, the changed workers not yet seen without room for it this cycle (room
        #: only shrinks within a cycle: one without room is not asked again).
        self._live: dict[tuple[TaskType, int], list[Worker]] = {}
        #: Per pool, kind and cost class, its workers ranked once a cycle (`ranked.py`).
        self._ranked: dict[tuple[bool, TaskType, int, object], Ranked] = {}
        #: The workers given a task this cycle, in order (their rankings are out of date).
        self._assigned: list[Worker] = []

    def cycle(self, changed: Sequence[Worker], new_shapes: set[int]) -> None:
        """One cycle over the new shapes and, for the changed workers, every kind's heads."""
        # Valid for one cycle: resources refreshed by heartbeats do not bump ledger versions.
        self._fit_memo.clear()
        self._open.clear()
        self._rules.clear()
        self._live.clear()
        self._ranked.clear()
        self._assigned.clear()
        self._changed, self._changed_pos = changed, None
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
            if not self._changed_fit(kind):
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
            if shape not in new_shapes and not self._changed_fit(queue.kind(shape)):
                continue  # the changed workers filled up meanwhile
            req = queue.head(shape)
            if req is None:
                continue
            burst = bursts.get(shape)
            if burst is None:
                burst = bursts[shape] = self._burst(req, None if shape in new_shapes else changed)
            chosen = self._pick(req, burst)
            if chosen is None:
                continue  # this shape is blocked everywhere it was tested
            sched.assign(req, chosen)
            self._assigned.append(chosen.worker)
            nxt = queue.head(shape)
            if nxt is not None:
                self._offer(nxt, chosen.worker, burst)  # it may well take another
                seq += 1
                heapq.heappush(heap, (nxt.key, seq, shape, None))
        for kind, key, shape in borrowed:
            queue.give_back(kind, key, shape)

    def _burst(self, req: Request, changed: Sequence[Worker] | None) -> _Burst:
        """Score every worker of the pool once for this shape (reused while the cycle lasts).

        The pool: the `changed` workers, or (None) every worker of the type, for a new shape.
        """
        sched = self.sched
        task = req.task_type
        # Without asking one by one, leave out the workers that refuse this sector anyway:
        # those its selector rules out, and those whose policy wants its files local.
        only = placeable_on(req.selector, req.sector, sched.index)
        workers: Sequence[Worker]
        if only is None:
            # The pool's policy lookups once per cycle, not once per sector (`PoolRules`).
            key = (task, changed is not None)
            rules = self._rules.get(key)
            if rules is None:
                pool = sched.workers_for(task) if changed is None else changed
                rules = self._rules[key] = sched.gate.pool_rules(pool, task)
            local = sched.gate.local_of(rules, req.sector)
            whole = len(local) == len(rules.pos)
        else:
            if changed is None:  # by name: a pinned task looks up one worker, not every one
                found = (sched.find_worker(n) for n in sorted(only))
                workers = [w for w in found if w is not None and w.supports(task)]
            else:
                workers = self._changed_named(only)
            local = sched.gate.local_enough(workers, task, req.sector)
            whole = False
        if changed is None and whole:
            # No policy wants the files local: of every worker, those with room at all.
            local = self._open_pool(task, req.sector.size)
        # Ranking before asking pays off only with workers to choose between: a freed
        # worker tested alone for the head of every shape just asks its verdict.
        floor = cost_floor(req.selector, req.sector, sched.index) if len(local) > 1 else None
        burst = _Burst(sched.assigner.turn(task), floor)
        if floor is not None and whole:  # the whole pool: the same for every shape
            costs = cost_class(req.selector, req.sector, sched.index)
            if costs is not None and isinstance(sched.assigner, BalancedAssigner):
                self._rank_burst(req, burst, local, changed is None, costs)
                return burst
        for w in local:
            self._offer(req, w, burst, files_checked=True)
        return burst

    def _rank_burst(
        self, req: Request, burst: _Burst, pool: Sequence[Worker], fresh: bool, costs: CostClass
    ) -> None:
        """Offer `pool` as `_burst` would, from the cycle's ranking of it (`ranked.py`).

        The holders of the sector's files (cost 0) are offered on their own; the rest come
        in score order as the heap asks. Workers given a task since the ranking are scored
        again into a copy first.
        """
        task, size = req.task_type, req.sector.size
        key, holders, cost_of = costs
        kind = (fresh, task, size, key)
        done = len(self._assigned)
        ranked = self._ranked.get(kind)
        if ranked is None:
            ranked = Ranked({w.name: w for w in pool}, done)
            self._rank(ranked, pool, task, size, cost_of)
            self._ranked[kind] = ranked
        elif ranked.built_at < done:
            members = ranked.members
            again = {w.name: w for w in self._assigned[ranked.built_at :] if w.name in members}
            if again:
                ranked = ranked.without(again, done)
                self._rank(ranked, again.values(), task, size, cost_of)
            else:
                ranked.built_at = done
            self._ranked[kind] = ranked
        members, apart = ranked.members, burst.apart
        for name in sorted(holders):
            w = members.get(name)
            if w is not None:
                apart.add(name)
                self._offer(req, w, burst, files_checked=True)
        burst.rows = ranked.order(burst.turn)
        self._next_row(req, burst)

    def _rank(
        self,
        ranked: Ranked,
        workers: Iterable[Worker],
        task: TaskType,
        size: int,
        cost_of: Callable[[Worker], float],
    ) -> None:
        """Add `workers` with room for the kind to `ranked` by their score at no transfer."""
        assigner = self.sched.assigner
        assert isinstance(assigner, BalancedAssigner)
        before = len(ranked.rows)
        n = 0
        for w in workers:
            n += 1
            room = self._room(w, task, size)
            if room is None or room.delayed:
                continue
            if room.base is None:
                room.base = assigner.base(task, w, room.fit.slots)
            cost = cost_of(w)
            tie, rank = assigner.ties(room.base, cost)
            ranked.add((room.fit.busy is not None, *tie), rank, w, room.base, cost)
        self.sched.checks += n - (len(ranked.rows) - before)
        ranked.seal()

    def _next_row(self, req: Request, burst: _Burst) -> None:
        """Put the burst's next ranked worker into its heap (`_offer`'s checks, in order)."""
        rows = burst.rows
        if rows is None:
            return
        sched = self.sched
        for tie, _, w, version, base, cost in rows:
            if w.name in burst.apart:
                continue
            if version != w.ledger.version:
                # Assigned to after the burst began: offered afresh where its old score was.
                self._offer(req, w, burst)
                continue
            if tie[0] and self._other_holder(req, w, burst):
                sched.checks += 1
                continue
            score = (tie[0], sched.assigner.score_from(base, cost, burst.turn))
            burst.seq += 1
            heapq.heappush(burst.heap, (score, burst.seq, version, w, None, True))
            return
        burst.rows = None

    def _offer(
        self, req: Request, w: Worker, burst: _Burst, *, files_checked: bool = False
    ) -> None:
        sched = self.sched
        task, gate = req.task_type, sched.gate
        room = self._room(w, task, req.sector.size)
        if (
            room is None
            or room.delayed
            or (not files_checked and gate.files_block(w, task, req.sector))
            # Busy here, and a holder of its files does it: the task waits for that one.
            or (room.fit.busy is not None and self._other_holder(req, w, burst))
        ):
            sched.checks += 1
            return  # the usual answer in a deep queue: no need to say why in words
        fit = room.fit
        if burst.floor is not None:
            # A worker that can start the task now beats one where it would wait for compute.
            if room.base is None:
                room.base = sched.assigner.base(task, w, fit.slots)
            cost = burst.floor(w)
            score = (fit.busy is not None, sched.assigner.score_from(room.base, cost, burst.turn))
            burst.seq += 1
            heapq.heappush(burst.heap, (score, burst.seq, w.ledger.version, w, None, False))
            return
        self._push(req, w, fit, burst)

    def _push(self, req: Request, w: Worker, fit: Fit, burst: _Burst) -> None:
        """Ask `w`'s verdict and rank it if it is a candidate."""
        sched = self.sched
        verdict = sched.verdict(req, w, fit)
        if isinstance(verdict, Candidate):
            score = (verdict.waits, sched.assigner.score(req.task_type, verdict, burst.turn))
            burst.seq += 1
            heapq.heappush(burst.heap, (score, burst.seq, w.ledger.version, w, verdict, False))

    def _pick(self, req: Request, burst: _Burst) -> Candidate | None:
        # Within a cycle only the workers that got a task change: re-score just those.
        while burst.heap:
            _, _, version, w, cand, head = heapq.heappop(burst.heap)
            if head:
                self._next_row(req, burst)
            if version != w.ledger.version:
                self._offer(req, w, burst)
            elif cand is None:
                # On top by the score it would get: its verdict now says whether it gets it.
                # Nothing it reads but its own ledger changes within a cycle (`cost_floor`).
                fit = self._fit(w, req.task_type, req.sector.size)
                if fit is not None:
                    self._push(req, w, fit, burst)
            else:
                self.sched.assigner.chose(req.task_type, cand)
                return cand
        return None

    def _fit(self, w: Worker, task_type: TaskType, size: int) -> Fit | None:
        """`Scheduler.fit` if the worker and its policy could take such a task, else None."""
        room = self._room(w, task_type, size)
        return None if room is None else room.fit

    def _room(self, w: Worker, task_type: TaskType, size: int) -> _Room | None:
        """`_fit` with the assigner's score base, memoized.

        Valid for one cycle while the worker's ledger version holds: its policy counts and
        disk figures change within a cycle only with an assignment there, which bumps it.
        """
        key = (w.name, w.ledger.version, task_type, size)
        memo = self._fit_memo
        if key in memo:
            return memo[key]
        room: _Room | None = None
        if w.enabled and w.supports(task_type) and not self.sched.gate.blocks(w, task_type, size):
            found = self.sched.fit(w, task_type, size)
            if not isinstance(found, str):
                # The release that starts a delay comes between cycles, never within one.
                delayed = self.sched.gate.delayed(w, task_type, self.sched.clock.now())
                room = _Room(found, delayed)
        memo[key] = room
        return room

    def _open_pool(self, task_type: TaskType, size: int) -> list[Worker]:
        """The workers of `task_type` with room for such a task, once per kind and cycle.

        Room only shrinks within a cycle (it assigns, nothing is released until it returns),
        so a worker without room at the first ask has none for the rest of the cycle: later
        shapes of the kind need not ask it again. Those still listed are asked as usual.
        """
        kind = (task_type, size)
        pool = self._open.get(kind)
        if pool is None:
            every = self.sched.workers_for(task_type)
            pool = self._open[kind] = [
                w for w in every if self._room(w, task_type, size) is not None
            ]
            self.sched.checks += len(every) - len(pool)
        return pool

    def _other_holder(self, req: Request, w: Worker, burst: _Burst) -> bool:
        """`waits.other_holder(...) is not None`, with the holders listed once per burst."""
        doers = burst.doers
        if doers is None:
            doers = burst.doers = holders_doing(self.sched, req)
        return any(h is not w for h in doers)

    def _changed_fit(self, kind: tuple[TaskType, int]) -> bool:
        """True if a changed worker may still fit a task of `kind` (`_room`, any of them).

        Those found without room are dropped for the rest of the cycle, so asking again
        after every assignment costs one lookup, not one per changed worker.
        """
        live = self._live.get(kind)
        if live is None:
            live = self._live[kind] = list(self._changed)
        gone = 0
        for w in live:
            if self._room(w, *kind) is not None:
                break
            gone += 1
        if gone:
            del live[:gone]
        return bool(live)

    def _changed_named(self, names: frozenset[str]) -> list[Worker]:
        """The changed workers named in `names`, in the changed list's order."""
        pos = self._changed_pos
        if pos is None:
            pos = self._changed_pos = {w.name: i for i, w in enumerate(self._changed)}
        changed = self._changed
        return [changed[i] for i in sorted(pos[n] for n in names if n in pos)]

    async def before_work(self, job: Job) -> None:
        """Take compute on the job's worker once its files are there: the earliest that fits."""
        led, name, sid = job.worker.ledger, job.worker.name, job.sched_id
        entry = led.entries.get(sid)
        if entry is None:
            return
        self._worker_of[sid] = name
        if entry.computing:
            return
        waiting = self._waiting.setdefault(name, [])
        waiting.append(sid)
        try:
            while not self._my_turn(job, waiting):
                fut = self._wakeups[sid] = asyncio.get_running_loop().create_future()
                await fut
        finally:
            self._wakeups.pop(sid, None)
            waiting.remove(sid)
            self._wake(name)  # the next in line may fit beside this one
        led.acquire(sid)
        self.sched.worker_changed(name)  # its claim's room is free for another task

    def _my_turn(self, job: Job, waiting: list[int]) -> bool:
        # The earliest waiter that fits goes: a C2 waiting for the GPU holds back no PC1
        # behind it, and a later task never takes the compute an earlier one fits in.
        led = job.worker.ledger
        for sid in waiting:
            e = led.entries.get(sid)
            if e is not None and led.compute_refusal(e.task_type, e.need) is None:
                return sid == job.sched_id
        return False

    def release(self, sched_id: int) -> None:
        """A task ended: the prepared tasks waiting on its worker try for its compute."""
        name = self._worker_of.pop(sched_id, None)
        if name is not None:
            # The ledger is freed right after this returns, before any waiter runs again.
            self._wake(name)

    def _wake(self, name: str) -> None:
        for sid in self._waiting.get(name, ()):
            fut = self._wakeups.pop(sid, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
