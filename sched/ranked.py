"""A cycle's ranking of one pool's workers for one kind of task, shared by its bursts.

`BalancedCycle` scores a pool's workers for every shape it places. Work on existing files
(PC2, C1) makes nearly every sector a shape of its own, so a cycle placing 30 PC2s scored the
same ~46 GPU boxes 30 times. Yet a worker's score (`BalancedAssigner.score_from`) is the same
for every sector whose files it does not hold: compute busy, transfer cost, stage load,
utilization, then the round-robin distance from the turn. `Ranked` sorts the pool once per
cycle on all of that but the turn, and `order` yields it in exact score order for any turn,
lazily: a burst that finds its worker among the first few looks at no more.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .assigners import Base

if TYPE_CHECKING:
    from .workers import Worker

#: (busy, transfer cost, stage load, utilization): the part of a score that sorts first.
Tie = tuple[bool, float, float, float]
#: (tie, rank, worker, its ledger version when ranked, its score base, its transfer cost).
Row = tuple[Tie, int, "Worker", int, Base, float]


@dataclass(slots=True)
class Ranked:
    """A pool's workers with room for one kind, sorted by score but for the turn."""

    #: Every worker of the pool by name, with room or not (who is in the pool).
    members: dict[str, Worker]
    #: How many assignments the cycle had made when the rows were scored.
    built_at: int
    rows: list[Row] = field(default_factory=list)
    ties: list[Tie] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)

    def add(self, tie: Tie, rank: int, w: Worker, base: Base, cost: float) -> None:
        """Rank `w` (call `seal` once all are added)."""
        self.rows.append((tie, rank, w, w.ledger.version, base, cost))

    def seal(self) -> None:
        """Sort the rows (by tie, then rank) for `order`."""
        rows = self.rows
        rows.sort(key=_tie_rank)
        self.ties = [r[0] for r in rows]
        self.ranks = [r[1] for r in rows]

    def without(self, names: Collection[str], built_at: int) -> Ranked:
        """A copy without the rows of `names` (to `add` them again once rescored).

        A copy, not a change: bursts of the cycle may be walking this ranking's `order`.
        """
        rows = [r for r in self.rows if r[2].name not in names]
        return Ranked(self.members, built_at, rows)

    def order(self, turn: int) -> Iterator[Row]:
        """The rows in score order at `turn`: in each tie group, ranks from the turn on first.

        `(rank - turn) % 2**30` is lowest for the first rank at or after the turn and highest
        for the ranks before it, in rank order both (ranks are below 2**30).
        """
        rows, ties, ranks = self.rows, self.ties, self.ranks
        lo, n = 0, len(rows)
        while lo < n:
            hi = bisect_right(ties, ties[lo], lo)
            mid = bisect_left(ranks, turn, lo, hi)
            for i in range(mid, hi):
                yield rows[i]
            for i in range(lo, mid):
                yield rows[i]
            lo = hi


def _tie_rank(row: Row) -> tuple[Tie, int]:
    return row[0], row[1]
