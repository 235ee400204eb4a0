"""Per-machine change notification: a waiter wakes only for the machine it watches.

`StateGroup.watch(id)` hands out a future that the engine resolves once a commit that planned
a round of that machine has landed (its new state is durable and readable), or when the group
stops. A commit wakes the watchers of the machines it wrote, and no one else: a thousand
waiters on a thousand machines cost one dictionary lookup per planned round, not a thousand
wake-ups per commit (which a store-wide event would, as every waiter re-read its machine).

A future is one-shot, like a go-statemachine `Group.Send` result: the waiter re-reads the
state, decides, and asks for a new future if it must keep waiting. A cancelled future (its
waiter timed out) is dropped at the next wake-up of that machine, or when the same machine is
watched again, so a machine that never changes again keeps at most the futures of its
current waiters.

A commit resolves each future with the count key (`StateGroup(count_by=...)`) of the state it
wrote, so a waiter for one state can tell from it alone that a commit moved the machine to
another state it does not care about, without reading and decoding the record; a future
resolved with None (a group without counts, a failed commit, the group stopping) says only
"re-read".
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from .keys import MachineId

if TYPE_CHECKING:
    from .machine import Machine


class MachineWatchers:
    """Futures per machine id, resolved by the commits that write that machine."""

    __slots__ = ("_by_id", "_names")

    def __init__(self, names: Mapping[bytes | None, str] | None = None) -> None:
        self._by_id: dict[MachineId, list[asyncio.Future[str | None]]] = {}
        #: `counts` entry -> count key (`GroupCounts.names`): what a commit's wake-up carries.
        self._names: Mapping[bytes | None, str] = names if names is not None else {}

    def __bool__(self) -> bool:
        return bool(self._by_id)

    def __len__(self) -> int:
        return sum(len(futures) for futures in self._by_id.values())

    def watch(self, machine_id: MachineId) -> asyncio.Future[str | None]:
        """A future resolved after the next commit that writes `machine_id` (or at stop)."""
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        futures = self._by_id.get(machine_id)
        if futures is None:
            self._by_id[machine_id] = [fut]
        else:
            if futures[0].done():  # (the oldest gave up waiting: drop every abandoned one)
                futures[:] = [f for f in futures if not f.done()]
            futures.append(fut)
        return fut

    def wake(self, machine_id: MachineId) -> None:
        """Resolve the futures watching `machine_id`."""
        futures = self._by_id.pop(machine_id, None)
        if futures is not None:
            _resolve(futures)

    def wake_machines(self, machines: Iterable[Machine]) -> None:
        """Resolve the futures watching any of `machines` (one commit's landed rounds).

        Each future gets the count key of the state its machine's round wrote.
        """
        by_id, names = self._by_id, self._names
        for m in machines:
            futures = by_id.pop(m.id, None)
            if futures is not None:
                _resolve(futures, names.get(m.counted))

    def wake_all(self) -> None:
        """Resolve every future (the group stops: waiters re-read and decide)."""
        by_id, self._by_id = self._by_id, {}
        for futures in by_id.values():
            _resolve(futures)


def _resolve(futures: list[asyncio.Future[str | None]], key: str | None = None) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_result(key)
