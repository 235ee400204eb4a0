"""The request queue: an indexed priority queue, grouped by the shape of the requests.

Lotus re-sorts its whole queue on every push and remove, and tests every queued task against
every worker window on every event. Here requests whose verdicts are necessarily identical
(same task type, sector size and file locations: their *shape*) share one heap, so a cycle only
ever tests the head of each shape, and removal is O(1) (lazy deletion).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .selectors import Placement, Selector
from .storage import SectorRef
from .tasks import TaskType, queue_key

Action = Callable[[Any], Awaitable[Any]]
Key = tuple[int, int, int, int, int]


@dataclass(eq=False, slots=True)
class Request:
    """One task waiting for (or holding) a worker."""

    sched_id: int
    sector: SectorRef
    task_type: TaskType
    priority: int
    selector: Selector
    prepare: Action | None
    work: Action
    key: tuple[int, int, int, int, int]
    enqueued_at: float
    #: Resolved by the scheduler with the chosen worker's name and placement.
    assigned: asyncio.Future[tuple[str, Placement]]
    shape: int = 0
    worker: str | None = None


@dataclass(slots=True)
class _Shape:
    heap: list[tuple[tuple[int, int, int, int, int], int]] = field(default_factory=list)
    live: int = 0


class RequestQueue:
    """Queued requests in Lotus's order (`tasks.queue_key`), grouped by shape."""

    def __init__(self) -> None:
        self._requests: dict[int, Request] = {}
        #: Queued request ids per sector, so `files_changed` does not scan the whole queue.
        self._by_sector: dict[SectorRef, set[int]] = {}
        #: Queued requests per task type (auto-pledge counts AP and PC1 after every cycle).
        self._by_type: dict[TaskType, dict[int, Request]] = {}
        self._shapes: dict[int, _Shape] = {}
        self._ids = itertools.count(1)
        # Shape keys are interned to small ints: a key (a tuple with a frozenset and a selector)
        # is hashed once per push instead of at every lookup of every cycle.
        self._shape_ids: dict[Hashable, int] = {}
        self._shape_keys: dict[int, Hashable] = {}
        self._shape_kinds: dict[int, tuple[TaskType, int]] = {}
        #: Per (task type, size): a heap of (head key, shape) covering every live shape of that
        #: kind (stale entries are skipped lazily), so a cycle can try shapes in order and stop.
        self._kind_heaps: dict[tuple[TaskType, int], list[tuple[Key, int]]] = {}
        self._next_shape = itertools.count(1)

    def next_id(self) -> int:
        """A fresh scheduling id."""
        return next(self._ids)

    def make_key(
        self, task_type: TaskType, priority: int, sector: SectorRef, sched_id: int
    ) -> tuple[int, int, int, int, int]:
        """The request's sort key."""
        return queue_key(task_type, priority, sector.number, sched_id)

    def intern(self, key: Hashable, kind: tuple[TaskType, int]) -> int:
        """The small-int id of a shape key (the same id while the shape has requests).

        `kind` is the (task type, sector size) every request of the shape shares.
        """
        sid = self._shape_ids.get(key)
        if sid is None:
            sid = self._shape_ids[key] = next(self._next_shape)
            self._shape_keys[sid] = key
            self._shape_kinds[sid] = kind
        return sid

    def kind(self, shape: int) -> tuple[TaskType, int]:
        """(task type, sector size) of a shape."""
        return self._shape_kinds[shape]

    def push(self, req: Request, shape: int) -> None:
        """Queue `req` under `shape` (an id from `intern`)."""
        req.shape = shape
        current = self.head(shape)
        self._requests[req.sched_id] = req
        self._by_sector.setdefault(req.sector, set()).add(req.sched_id)
        self._by_type.setdefault(req.task_type, {})[req.sched_id] = req
        group = self._shapes.get(shape)
        if group is None:
            group = self._shapes[shape] = _Shape()
        heapq.heappush(group.heap, (req.key, req.sched_id))
        group.live += 1
        if current is None or req.key < current.key:  # a new head for this shape
            kind = self._shape_kinds[shape]
            heapq.heappush(self._kind_heaps.setdefault(kind, []), (req.key, shape))

    def remove(self, sched_id: int) -> Request | None:
        """Take a request out of the queue (O(1)); None if it is not queued."""
        req = self._requests.pop(sched_id, None)
        if req is None:
            return None
        ids = self._by_sector.get(req.sector)
        if ids is not None:
            ids.discard(sched_id)
            if not ids:
                del self._by_sector[req.sector]
        self._by_type[req.task_type].pop(sched_id, None)
        group = self._shapes[req.shape]
        group.live -= 1
        if group.live == 0:
            del self._shapes[req.shape]
            del self._shape_ids[self._shape_keys.pop(req.shape)]
            del self._shape_kinds[req.shape]
            return req
        nxt = self.head(req.shape)
        if nxt is not None and req.key < nxt.key:  # it was the head: index the new one
            kind = self._shape_kinds[req.shape]
            heapq.heappush(self._kind_heaps.setdefault(kind, []), (nxt.key, req.shape))
        return req

    def kinds(self) -> list[tuple[TaskType, int]]:
        """The (task type, size) kinds that have queued requests."""
        return [k for k, h in self._kind_heaps.items() if h]

    def take_head_entry(self, kind: tuple[TaskType, int]) -> tuple[Key, int] | None:
        """Pop the most urgent valid (head key, shape) of a kind; `give_back` it after use."""
        heap = self._kind_heaps.get(kind)
        while heap:
            key, shape = heapq.heappop(heap)
            h = self.head(shape)
            if h is not None and h.key == key:
                return key, shape
        return None

    def give_back(self, kind: tuple[TaskType, int], key: Key, shape: int) -> None:
        """Return an entry taken with `take_head_entry` (dropped if it went stale)."""
        h = self.head(shape)
        if h is not None and h.key == key:
            heapq.heappush(self._kind_heaps.setdefault(kind, []), (key, shape))

    def head(self, shape: int) -> Request | None:
        """The first live request of `shape`."""
        group = self._shapes.get(shape)
        if group is None:
            return None
        heap = group.heap
        while heap:
            req = self._requests.get(heap[0][1])
            if req is not None and req.shape == shape:
                return req
            heapq.heappop(heap)  # removed earlier, or re-shaped
        return None

    def shape_count(self) -> int:
        """How many shapes have queued requests (a figure for benchmarks)."""
        return len(self._shapes)

    def get(self, sched_id: int) -> Request | None:
        """A queued request by id."""
        return self._requests.get(sched_id)

    def shape_size(self, shape: int) -> int:
        """How many requests share `shape`."""
        group = self._shapes.get(shape)
        return 0 if group is None else group.live

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[Request]:
        """Every queued request, most urgent first (O(n log n); for views, not cycles)."""
        return iter(sorted(self._requests.values(), key=lambda r: r.key))

    def of_types(self, types: Iterable[TaskType]) -> Iterator[Request]:
        """Queued requests of these task types, in no particular order (indexed by type)."""
        for t in types:
            yield from self._by_type.get(t, {}).values()

    def for_sector(self, sector: SectorRef) -> list[Request]:
        """Queued requests of one sector (indexed: cost independent of the queue length)."""
        return [self._requests[i] for i in sorted(self._by_sector.get(sector, ()))]
