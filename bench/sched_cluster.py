"""Shared pieces of the scheduler benchmark (`bench_sched.py`): worker kinds and capacities.

Also the benchmark's log, and the loop-quiet check both parts use to tell when the scheduler
has finished reacting to an event.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

from sectorfsm.sched import (
    FileType,
    Ledger,
    Scheduler,
    TaskType,
    WorkerResources,
    resource_spec,
)

GIB = 1 << 30
TIB = 1 << 40
S32 = 32 << 30
MINER = 1000
START = time.perf_counter()

T = TaskType
CS = FileType.CACHE | FileType.SEALED
ALL_FILES = FileType.UNSEALED | FileType.SEALED | FileType.CACHE


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", file=sys.stderr, flush=True)


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


SEAL_BOX = frozenset({T.ADD_PIECE, T.PRE_COMMIT1, T.COMMIT1, T.FINALIZE})
MIXED_BOX = SEAL_BOX | {T.PRE_COMMIT2}
PC2_BOX = frozenset({T.PRE_COMMIT2, T.COMMIT1, T.FINALIZE})
C2_BOX = frozenset({T.COMMIT2})
