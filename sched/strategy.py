"""The seam between the scheduler and the way one cycle turns its queue into assignments.

A `Scheduler` owns the queue, the workers, their ledgers and the storage index; a cycle
strategy decides, when the scheduler runs a cycle, which queued requests go where. Two exist:
`BalancedCycle` (`balanced.py`, the default: it tests only what changed since the last cycle)
and `LotusMode` (`lotus.py`, Lotus's `trySched` ported as the benchmark baseline, which
replaces the whole cycle, not just the choice of worker).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .scheduler import Job
    from .workers import Worker


class CycleStrategy(Protocol):
    """What a `Scheduler` asks of the strategy it holds."""

    def cycle(self, changed: Sequence[Worker], new_shapes: set[int]) -> None:
        """Place what can be placed now.

        `changed`: the enabled workers whose ledger, policy or state changed since the last
        cycle; `new_shapes`: the queue shapes that got their first request since then.
        """

    async def before_work(self, job: Job) -> None:
        """Runs between a job's `prepare` and its `work` (may wait for room)."""

    def release(self, sched_id: int) -> None:
        """A task ended or was cancelled: drop whatever the strategy holds for it."""
