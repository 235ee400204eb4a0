"""Assigners: among the workers that can take a task now, which one gets it.

`balanced` (the default) keeps every worker busy: it prefers the worker that already holds the
sector's files (transfer cost first), then the one whose share of this stage is lowest
relative to how many it can run, then the least used; remaining ties rotate round-robin per
task type, so the choice is deterministic and stable across cycles (Lotus shuffles, then sorts
by a utilization read once per cycle, which sends bursts to one worker: lotus#7607, #7868).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .resources import Resources
from .selectors import Placement
from .tasks import TaskType
from .workers import Worker


@dataclass(frozen=True, slots=True)
class Candidate:
    """A worker that passed every check, with its placement and the task's needs there."""

    worker: Worker
    placement: Placement
    need: Resources
    #: How many tasks of this type the worker could hold at once (policy, caps, resources).
    slots: int
    #: It would wait there for compute (a claim that fetches meanwhile), not start at once.
    waits: bool = False


@dataclass(frozen=True, slots=True)
class Fit:
    """A worker's room for a task of one type and size, whatever its sector (`Scheduler.fit`)."""

    need: Resources
    #: Why the task could not start computing now (None: it could): it would wait, as a claim.
    busy: str | None
    slots: int


#: What an assigner's score takes from the worker alone (`Assigner.base`).
Base = tuple[float, float, int]


class Assigner(Protocol):
    """Scores candidates for a task; the lowest score gets it."""

    name: str

    def turn(self, task_type: TaskType) -> int:
        """The round-robin position for this task type (fixed for one cycle)."""
        ...

    def add_worker(self, name: str) -> None:
        """Give a worker its place in the round-robin when it joins (kept if it rejoins)."""
        ...

    def score(
        self, task_type: TaskType, c: Candidate, turn: int
    ) -> tuple[float, float, float, int]:
        """How good a placement is: lower is better."""
        ...

    def base(self, task_type: TaskType, worker: Worker, slots: int) -> Base:
        """The part of `score` that depends on the worker alone (while its ledger holds)."""
        ...

    def score_from(self, base: Base, cost_s: float, turn: int) -> tuple[float, float, float, int]:
        """`score` of a candidate with this `base` and transfer cost, at this turn.

        Never lower for a higher `cost_s`: the cycle ranks workers by the cost their selector
        will give before it asks for their verdicts, and asks only the best ones.
        """
        ...

    def chose(self, task_type: TaskType, c: Candidate) -> None:
        """Record the choice (advances the round-robin)."""
        ...


@dataclass(slots=True)
class BalancedAssigner:
    """Locality first, then the lowest stage load relative to capacity, then round-robin."""

    name: str = "balanced"
    _turn: dict[TaskType, int] = field(default_factory=dict)
    _order: dict[str, int] = field(default_factory=dict)

    def turn(self, task_type: TaskType) -> int:
        """Where the round-robin of this task type stands."""
        return self._turn.get(task_type, 0)

    def add_worker(self, name: str) -> None:
        """The round-robin goes in order of joining, whichever worker is scored first."""
        self._rank(name)

    def score(
        self, task_type: TaskType, c: Candidate, turn: int
    ) -> tuple[float, float, float, int]:
        """(transfer seconds, stage load / capacity, utilization, round-robin distance)."""
        return self.score_from(self.base(task_type, c.worker, c.slots), c.placement.cost_s, turn)

    def base(self, task_type: TaskType, worker: Worker, slots: int) -> Base:
        """(stage load / capacity, utilization, the worker's round-robin rank)."""
        ledger = worker.ledger
        return (
            round(ledger.counts[task_type] / max(1, slots), 6),
            round(ledger.utilization(), 6),
            self._rank(worker.name),
        )

    def score_from(self, base: Base, cost_s: float, turn: int) -> tuple[float, float, float, int]:
        """`score` from `base`: the cost first, the rank as a distance from the turn."""
        return (round(cost_s, 3), base[0], base[1], (base[2] - turn) % (1 << 30))

    def ties(self, base: Base, cost_s: float) -> tuple[tuple[float, float, float], int]:
        """`score_from` without the turn: what ranks first, and the rank that breaks ties.

        At a turn, the lowest score is the lowest first part, and among equal ones the first
        rank at or after the turn, else the lowest rank (the round-robin wraps round).
        """
        return (round(cost_s, 3), base[0], base[1]), base[2]

    def chose(self, task_type: TaskType, c: Candidate) -> None:
        """The next tie goes to the worker after this one."""
        self._turn[task_type] = self._rank(c.worker.name) + 1

    def _rank(self, name: str) -> int:
        # A stable number per worker, in order of joining (or of first sight, for a worker
        # scored without joining): the round-robin order. Not the order of first scoring, so
        # a cycle that ranks workers before asking their verdicts ranks them as one asking
        # every verdict would.
        rank = self._order.get(name)
        if rank is None:
            rank = self._order[name] = len(self._order)
        return rank


def slots_for(worker: Worker, need: Resources, cap: int | None) -> int:
    """How many tasks needing `need` fit on an idle `worker`, within `cap` and MaxConcurrent."""
    res = worker.spec.resources
    limits: list[int] = []
    if cap is not None:
        limits.append(cap)
    if need.max_concurrent > 0:
        limits.append(need.max_concurrent)
    if not res.ignore_resources:
        if need.min_memory + need.base_min_memory > 0:
            limits.append(
                max(1, (res.mem_physical - need.base_min_memory) // max(1, need.min_memory))
            )
        threads = need.threads(res.cpus, len(res.gpus))
        if threads > 0:
            limits.append(max(1, res.cpus // threads))
        if res.gpus and need.gpu_utilization > 0:
            limits.append(max(1, int(len(res.gpus) / need.gpu_utilization)))
    return max(1, min(limits)) if limits else 1 << 20


ASSIGNERS = {"balanced": BalancedAssigner}


def make_assigner(name: str) -> Assigner:
    """An assigner by name (`balanced`; `lotus` is a scheduler mode); a clear error otherwise."""
    try:
        return ASSIGNERS[name]()
    except KeyError:
        known = ", ".join(sorted([*ASSIGNERS, "lotus"]))
        raise ValueError(f"unknown assigner {name!r} (available: {known})") from None
