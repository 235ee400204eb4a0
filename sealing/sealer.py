"""The Sealer protocol, and the scheduled sealer that routes every call through `sched`.

A handler calls `Sealer` methods (Lotus's `SectorManager`: AddPiece, SealPreCommit1, ...).
`ScheduledSealer` turns each call into `sched.schedule(...)` with Lotus's task type and
selector, so the scheduler really places every compute step; the work itself is done by a
*backend* (`sim` here; `reference` and `command` run real files and executables). The sealer
also keeps the storage index in step with where each sector's files are, and persists it, so
a restarted engine knows where its sectors live.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ..fsm import LmdbStore
from ..fsm.codec import packb, unpackb
from ..sched import (
    DEAL_SECTOR_PRIORITY,
    AllocSelector,
    ExistingSelector,
    FileType,
    Job,
    Scheduler,
    SectorRef,
    TaskSelector,
    TaskType,
    fetch_prepare,
    space_needed,
)
from .info import PendingPiece, Piece

R = TypeVar("R")
FILES_DB = "sectorfiles"


@dataclass(frozen=True, slots=True)
class PreCommit2Out:
    """CommR and CommD, as CIDs."""

    sealed: str
    unsealed: str


class Sealer(Protocol):
    """What the handlers ask of a sealer (Lotus `SectorManager`, v1.11.3 calls)."""

    async def add_piece(
        self, sector: SectorRef, existing: list[int], size: int, piece: PendingPiece | None
    ) -> Piece:
        """Write a piece (None: zeros, a filler) after `existing` padded sizes."""
        ...

    async def seal_pre_commit1(
        self, sector: SectorRef, ticket: bytes, pieces: list[Piece], deals: bool
    ) -> bytes:
        """Run PreCommit1; returns its opaque output."""
        ...

    async def seal_pre_commit2(
        self, sector: SectorRef, pc1out: bytes, deals: bool
    ) -> PreCommit2Out:
        """Run PreCommit2; returns CommR and CommD."""
        ...

    async def seal_commit1(
        self,
        sector: SectorRef,
        ticket: bytes,
        seed: bytes,
        pieces: list[Piece],
        cids: PreCommit2Out,
        deals: bool,
    ) -> bytes:
        """Run Commit1; returns its opaque output."""
        ...

    async def seal_commit2(self, sector: SectorRef, c1out: bytes, deals: bool) -> bytes:
        """Run Commit2; returns the PoRep proof."""
        ...

    async def finalize_sector(self, sector: SectorRef, keep_unsealed: bool) -> None:
        """Drop the sealing scratch files; keep the unsealed copy if asked."""
        ...

    async def release_unsealed(self, sector: SectorRef) -> None:
        """Delete the unsealed copy."""
        ...

    async def remove(self, sector: SectorRef) -> None:
        """Delete every file of the sector."""
        ...


class Backend(Protocol):
    """The compute behind a `ScheduledSealer`; each call runs inside a scheduled job."""

    name: str

    async def add_piece(
        self, job: Job, existing: list[int], size: int, piece: PendingPiece | None
    ) -> Piece:
        """Write the piece; return it with its CommP."""
        ...

    async def pre_commit1(self, job: Job, ticket: bytes, pieces: list[Piece]) -> bytes:
        """PreCommit1."""
        ...

    async def pre_commit2(self, job: Job, pc1out: bytes) -> PreCommit2Out:
        """PreCommit2."""
        ...

    async def commit1(
        self, job: Job, ticket: bytes, seed: bytes, pieces: list[Piece], cids: PreCommit2Out
    ) -> bytes:
        """Commit1."""
        ...

    async def commit2(self, job: Job, c1out: bytes) -> bytes:
        """Commit2."""
        ...

    async def finalize(self, job: Job, keep_unsealed: bool) -> None:
        """Finalize."""
        ...

    async def release_unsealed(self, sector: SectorRef) -> None:
        """Delete the unsealed file (no scheduling needed: it is a delete)."""
        ...

    async def remove(self, sector: SectorRef) -> None:
        """Delete every file of the sector."""
        ...


class ScheduledSealer:
    """Routes each call through the scheduler and records where the files end up."""

    def __init__(self, sched: Scheduler, backend: Backend, store: LmdbStore) -> None:
        self.sched = sched
        self.backend = backend
        self.store = store
        self._db = store.db(FILES_DB)
        #: Per sector number: path id -> (file types, bytes accounted on that path).
        self._files: dict[int, dict[str, list[int]]] = {}

    # -- storage bookkeeping -------------------------------------------------------------

    def load(self, ref_of: Callable[[int], SectorRef]) -> None:
        """Re-declare every recorded sector file (after a restart) in the storage index."""
        with self.store.read() as txn:
            rows = list(txn.cursor(db=self._db))
        index = self.sched.index
        for key, raw in rows:
            number = int(key)
            ref = ref_of(number)
            record: dict[str, list[int]] = unpackb(raw)
            for path_id, (files, nbytes) in record.items():
                if path_id not in index.paths:
                    continue  # the path is gone from the config: the files are unreachable
                index.add_sector(ref, FileType(files), path_id)
                index.paths[path_id].used += nbytes
            self._files[number] = record

    def _add_files(self, ref: SectorRef, files: FileType, path_id: str | None) -> None:
        if path_id is None:
            return
        index = self.sched.index
        nbytes = space_needed(files, ref.size)
        index.add_sector(ref, files, path_id)
        if path_id in index.paths:
            index.paths[path_id].used += nbytes
        record = self._files.setdefault(ref.number, {})
        old = record.get(path_id, [0, 0])
        record[path_id] = [old[0] | int(files), old[1] + nbytes]
        self.store.committer.put(FILES_DB, str(ref.number).encode(), packb(record))
        self.sched.files_changed(ref)

    def _drop_files(self, ref: SectorRef, files: FileType) -> None:
        index = self.sched.index
        record = self._files.get(ref.number, {})
        for path_id, (kinds, nbytes) in list(record.items()):
            remaining = FileType(kinds) & ~files
            freed = nbytes - space_needed(remaining, ref.size) if remaining else nbytes
            if path_id in index.paths:
                index.paths[path_id].used -= max(0, freed)
            if remaining:
                record[path_id] = [int(remaining), nbytes - freed]
            else:
                del record[path_id]
        index.remove_sector(ref, files)
        key = str(ref.number).encode()
        if record:
            self.store.committer.put(FILES_DB, key, packb(record))
        else:
            self._files.pop(ref.number, None)
            self.store.committer.delete(FILES_DB, key)
        self.sched.files_changed(ref)

    def _fetch(self, files: FileType) -> Callable[[Job], Awaitable[None]]:
        """A `prepare` that moves `files` to the job's worker and records where they went."""
        move = fetch_prepare(self.sched, files)

        async def prepare(job: Job) -> None:
            await move(job)
            if job.placement.fetch_bytes and job.placement.path is not None:
                self._drop_files(job.sector, files)
                self._add_files(job.sector, files, job.placement.path)

        return prepare

    def holds(self, ref: SectorRef, files: FileType) -> bool:
        """True if the index knows of `files` of this sector anywhere."""
        return bool(self.sched.index.find_sector(ref, files))

    # -- scheduling ------------------------------------------------------------------------

    async def _run(
        self,
        ref: SectorRef,
        task: TaskType,
        selector: Any,
        work: Callable[[Job], Awaitable[R]],
        deals: bool,
        prepare: Callable[[Job], Awaitable[Any]] | None = None,
    ) -> R:
        priority = DEAL_SECTOR_PRIORITY if deals else 0
        return await self.sched.schedule(ref, task, selector, prepare, work, priority=priority)

    async def add_piece(
        self, sector: SectorRef, existing: list[int], size: int, piece: PendingPiece | None
    ) -> Piece:
        """AddPiece: a new sector allocates its unsealed file; later pieces go where it is."""
        first = not self.holds(sector, FileType.UNSEALED)
        selector: Any = (
            AllocSelector(FileType.UNSEALED) if first else ExistingSelector(FileType.UNSEALED)
        )

        async def work(job: Job) -> Piece:
            out = await self.backend.add_piece(job, existing, size, piece)
            if first:
                self._add_files(sector, FileType.UNSEALED, job.placement.path)
            return out

        return await self._run(sector, TaskType.ADD_PIECE, selector, work, piece is not None)

    async def seal_pre_commit1(
        self, sector: SectorRef, ticket: bytes, pieces: list[Piece], deals: bool
    ) -> bytes:
        """PreCommit1: allocate cache+sealed, with the unsealed file fetched if elsewhere."""

        async def work(job: Job) -> bytes:
            out = await self.backend.pre_commit1(job, ticket, pieces)
            if not self.holds(sector, FileType.CACHE):
                self._add_files(sector, FileType.CACHE | FileType.SEALED, job.placement.path)
            return out

        return await self._run(
            sector,
            TaskType.PRE_COMMIT1,
            _pc1_selector(self, sector),
            work,
            deals,
            self._fetch(FileType.UNSEALED),
        )

    async def seal_pre_commit2(
        self, sector: SectorRef, pc1out: bytes, deals: bool
    ) -> PreCommit2Out:
        """PreCommit2 where the cache is (fetching it is allowed, as in Lotus)."""
        files = FileType.CACHE | FileType.SEALED

        async def work(job: Job) -> PreCommit2Out:
            return await self.backend.pre_commit2(job, pc1out)

        return await self._run(
            sector,
            TaskType.PRE_COMMIT2,
            ExistingSelector(files, allow_fetch=True),
            work,
            deals,
            self._fetch(files),
        )

    async def seal_commit1(
        self,
        sector: SectorRef,
        ticket: bytes,
        seed: bytes,
        pieces: list[Piece],
        cids: PreCommit2Out,
        deals: bool,
    ) -> bytes:
        """Commit1 where the sealed files are."""

        async def work(job: Job) -> bytes:
            return await self.backend.commit1(job, ticket, seed, pieces, cids)

        files = FileType.CACHE | FileType.SEALED
        return await self._run(
            sector, TaskType.COMMIT1, ExistingSelector(files, allow_fetch=False), work, deals
        )

    async def seal_commit2(self, sector: SectorRef, c1out: bytes, deals: bool) -> bytes:
        """Commit2 on any worker that does C2 (a GPU task, no files)."""

        async def work(job: Job) -> bytes:
            return await self.backend.commit2(job, c1out)

        return await self._run(sector, TaskType.COMMIT2, TaskSelector(), work, deals)

    async def finalize_sector(self, sector: SectorRef, keep_unsealed: bool) -> None:
        """Finalize where the cache is; drops the unsealed copy unless kept."""

        async def work(job: Job) -> None:
            await self.backend.finalize(job, keep_unsealed)
            if not keep_unsealed:
                self._drop_files(sector, FileType.UNSEALED)

        if not self.holds(sector, FileType.CACHE):
            return  # already finalized and moved, or nothing was ever sealed
        await self._run(sector, TaskType.FINALIZE, ExistingSelector(FileType.CACHE), work, False)

    async def release_unsealed(self, sector: SectorRef) -> None:
        """Delete the unsealed copy (no worker needed)."""
        await self.backend.release_unsealed(sector)
        self._drop_files(sector, FileType.UNSEALED)

    async def remove(self, sector: SectorRef) -> None:
        """Delete every file of the sector and forget it in the index."""
        await self.backend.remove(sector)
        self._drop_files(sector, FileType.UNSEALED | FileType.SEALED | FileType.CACHE)


def _pc1_selector(sealer: ScheduledSealer, sector: SectorRef) -> Any:
    # Re-running PC1 on a sector that already has its cache reuses it in place.
    if sealer.holds(sector, FileType.CACHE):
        return ExistingSelector(FileType.CACHE | FileType.SEALED)
    return AllocSelector(FileType.CACHE | FileType.SEALED, fetch=FileType.UNSEALED)
