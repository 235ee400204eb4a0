"""Selectors: which workers may take a task, and what placing it there costs.

Lotus's selectors answer yes/no (`Ok`) and compare two workers (`Cmp`). Here a selector
answers, for one worker, either a refusal in an operator's words or a placement: the storage
path to reserve and the cost in seconds of moving the sector's files there. The assigner
weighs that cost, so keeping work where the sector's files are is a preference, not just a
filter (Lotus: `storage/sealer/selector_*.go@b835fab70`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

from .filetypes import FileType, space_needed
from .resources import describe_bytes
from .storage import SectorRef, StorageIndex
from .workers import Worker


@dataclass(frozen=True, slots=True)
class Placement:
    """A worker that can take the task: what to reserve there, and the transfer it implies."""

    #: Storage path to reserve `reserve` bytes on (None: nothing to reserve).
    path: str | None = None
    reserve: int = 0
    #: Bytes to fetch from other workers, and how long that takes on this worker's link.
    fetch_bytes: int = 0
    cost_s: float = 0.0


Verdict = Placement | str


class Selector(Protocol):
    """Decides, worker by worker, where a task may run."""

    def check(self, sector: SectorRef, worker: Worker, index: StorageIndex) -> Verdict:
        """A `Placement` on `worker`, or the reason it cannot take the task."""
        ...

    def shape(self, sector: SectorRef) -> object | None:
        """Tasks of one shape get the same verdicts; None when it depends on the sector."""
        ...


def _no_room(
    what: str, files: FileType, sector: SectorRef, worker: Worker, index: StorageIndex
) -> str:
    need = space_needed(files, sector.size)
    free = index.free_space(worker.name)
    return f"no {what} path with {describe_bytes(need)} free ({describe_bytes(max(0, free))} free)"


@dataclass(frozen=True, slots=True)
class AllocSelector:
    """New files (AP, PC1): the worker needs a local sealing path with room for them.

    With `fetch` (PC1's unsealed file), a worker that does not hold those files must also
    receive them: their size is reserved on the same path and their transfer is the cost,
    as Lotus moves the unsealed file to the PC1 worker (`schedFetch(FTUnsealed, Move)`).
    """

    alloc: FileType
    sealing: bool = True
    fetch: FileType = FileType.NONE

    def check(self, sector: SectorRef, worker: Worker, index: StorageIndex) -> Verdict:
        """Place on the worker's roomiest path, reserving the files' full size."""
        need = space_needed(self.alloc, sector.size)
        moved = 0
        elsewhere = self.fetch and worker.name not in index.holders(sector, self.fetch)
        if elsewhere and index.has_any(sector, self.fetch):
            moved = space_needed(self.fetch, sector.size)
        path = index.best_alloc(
            worker.name,
            self.alloc | self.fetch if moved else self.alloc,
            sector.size,
            sealing=self.sealing,
        )
        if path is None:
            return _no_room(
                "sealing" if self.sealing else "storage",
                self.alloc | self.fetch if moved else self.alloc,
                sector,
                worker,
                index,
            )
        return Placement(path.id, need + moved, moved, moved / worker.spec.bandwidth)

    def shape(self, sector: SectorRef) -> object | None:
        """Depends only on the sector size (and on where the files are, with `fetch`)."""
        if self.fetch:
            return None
        return ("alloc", self.alloc, self.sealing, sector.size)


@dataclass(frozen=True, slots=True)
class ExistingSelector:
    """Work on existing files (PC2, C1, FIN): where they are, or anywhere they can be fetched."""

    files: FileType
    allow_fetch: bool = False

    def check(self, sector: SectorRef, worker: Worker, index: StorageIndex) -> Verdict:
        """Free on a holder; with `allow_fetch`, elsewhere at the cost of moving the files."""
        holders = index.holders(sector, self.files)
        if worker.name in holders:
            return Placement()
        if not holders and not index.has_any(sector, self.files):
            return f"sector {sector} has no {_names(self.files)} file anywhere"
        if not self.allow_fetch:
            where = ", ".join(sorted(holders)) or "long-term storage"
            return f"sector {_names(self.files)} is on {where}"
        path = index.best_alloc(worker.name, self.files, sector.size)
        if path is None:
            return _no_room("sealing", self.files, sector, worker, index)
        size = space_needed(self.files, sector.size)
        return Placement(path.id, size, size, size / worker.spec.bandwidth)

    def shape(self, sector: SectorRef) -> object | None:
        """Depends on where this sector's files are."""
        return None


@dataclass(frozen=True, slots=True)
class TaskSelector:
    """No files involved (C2): any worker of the type, specialised workers first."""

    def check(self, sector: SectorRef, worker: Worker, index: StorageIndex) -> Verdict:
        """Always placeable; a worker that does fewer kinds of work costs a little less."""
        return Placement(cost_s=len(worker.spec.task_types) * 1e-6)

    def shape(self, sector: SectorRef) -> object | None:
        """Independent of the sector."""
        return ("task",)


@dataclass(frozen=True, slots=True)
class MoveSelector:
    """Move finalized files to long-term storage: a worker that reaches a storage path."""

    files: FileType
    allow_remote: bool = True

    def check(self, sector: SectorRef, worker: Worker, index: StorageIndex) -> Verdict:
        """Prefer the holder of the files; others only if `allow_remote`."""
        holds = worker.name in index.holders(sector, self.files)
        if not holds and not self.allow_remote:
            return f"sector {_names(self.files)} is not on this worker (remote finalize is off)"
        target = max(
            (
                p
                for p in index.paths.values()
                if p.can_store and (p.worker is None or p.worker == worker.name)
            ),
            key=lambda p: p.available * p.weight,
            default=None,
        )
        need = space_needed(self.files, sector.size, finalized=True)
        if target is None or target.available < need:
            return f"no long-term storage path with {describe_bytes(need)} free"
        cost = 0.0 if holds else need / worker.spec.bandwidth
        return Placement(target.id, need, 0 if holds else need, cost)

    def shape(self, sector: SectorRef) -> object | None:
        """Depends on where this sector's files are."""
        return None


@dataclass(frozen=True, slots=True)
class PinnedSelector:
    """Only `worker` may take the task (`pledge --per-worker`, auto-pledge); `inner` places it."""

    inner: Selector
    worker: str

    def check(self, sector: SectorRef, worker: Worker, index: StorageIndex) -> Verdict:
        """Refuse every other worker; on the pinned one, `inner` decides."""
        if worker.name != self.worker:
            return f"sector is pinned to worker {self.worker}"
        return self.inner.check(sector, worker, index)

    def shape(self, sector: SectorRef) -> object | None:
        """The inner shape, per pinned worker."""
        inner = self.inner.shape(sector)
        return None if inner is None else ("pinned", self.worker, inner)


def placeable_on(
    selector: Selector, sector: SectorRef, index: StorageIndex
) -> frozenset[str] | None:
    """The only workers `selector` could place `sector`'s task on; None: it does not narrow.

    A pinned task, or work on existing files that may not be fetched, refuses every other
    worker: a caller that only wants candidates need not ask the others one by one.
    """
    if isinstance(selector, PinnedSelector):
        inner = placeable_on(selector.inner, sector, index)
        pinned = frozenset((selector.worker,))
        return pinned if inner is None else inner & pinned
    if isinstance(selector, ExistingSelector) and not selector.allow_fetch:
        return index.holders(sector, selector.files)
    if isinstance(selector, MoveSelector) and not selector.allow_remote:
        return index.holders(sector, selector.files)
    return None


def cost_floor(
    selector: Selector, sector: SectorRef, index: StorageIndex
) -> Callable[[Worker], float] | None:
    """Per worker, the transfer cost `check` gives if it places the task there; None: unknown.

    The cost depends only on whether the worker holds the sector's files and on its link, so
    a caller ranking workers can know it before asking `check` (which also looks for room).
    Selectors whose placement reads state shared between workers (`MoveSelector`'s shared
    storage paths) get None: their verdicts are not asked lazily.
    """
    if isinstance(selector, PinnedSelector):
        return cost_floor(selector.inner, sector, index)
    if isinstance(selector, TaskSelector):
        return lambda w: len(w.spec.task_types) * 1e-6
    if isinstance(selector, ExistingSelector):
        holders = index.holders(sector, selector.files)
        size = space_needed(selector.files, sector.size)
        return lambda w: 0.0 if w.name in holders else size / w.spec.bandwidth
    if isinstance(selector, AllocSelector):
        if not selector.fetch or not index.has_any(sector, selector.fetch):
            return lambda w: 0.0
        holders = index.holders(sector, selector.fetch)
        moved = space_needed(selector.fetch, sector.size)
        return lambda w: 0.0 if w.name in holders else moved / w.spec.bandwidth
    return None


#: `cost_class`'s answer: a key, the workers that pay nothing, and what the others pay.
CostClass = tuple[Hashable, frozenset[str], Callable[[Worker], float]]


def cost_class(selector: Selector, sector: SectorRef, index: StorageIndex) -> CostClass | None:
    """`cost_floor` split in two: the holders (cost 0) and every other worker's cost.

    Two sectors of one key cost the same on every worker that holds neither's files, so a
    ranking of workers by that cost serves every sector of the key (None: `cost_floor` is).
    """
    if isinstance(selector, PinnedSelector):
        return cost_class(selector.inner, sector, index)
    if isinstance(selector, TaskSelector):
        return ("task",), frozenset(), lambda w: len(w.spec.task_types) * 1e-6
    files = FileType.NONE
    if isinstance(selector, ExistingSelector):
        files = selector.files
    elif isinstance(selector, AllocSelector):
        if selector.fetch and index.has_any(sector, selector.fetch):
            files = selector.fetch
    else:
        return None
    if not files:
        return ("bytes", 0), frozenset(), lambda w: 0.0
    size = space_needed(files, sector.size)
    return ("bytes", size), index.holders(sector, files), lambda w: size / w.spec.bandwidth


def _names(files: FileType) -> str:
    return "+".join(f.dirname for f in files.each())
