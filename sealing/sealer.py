"""The scheduled sealer: it routes every `Sealer` call (`sealerapi.py`) through `sched`.

A handler calls `Sealer` methods (Lotus's `SectorManager`: AddPiece, SealPreCommit1, ...).
`ScheduledSealer` turns each call into `sched.schedule(...)` with Lotus's task type and
selector, so the scheduler really places every compute step; the work itself is done by a
*backend* (`sim` here; `reference` and `command` run real files and executables). The sealer
also keeps the storage index in step with where each sector's files are, and persists it, so
a restarted engine knows where its sectors live.

Files on a remote worker's paths are known only once that worker joins: their records are
kept meanwhile and applied then, and the index is reconciled with the files the worker
reports (`worker_joined`). A recorded file found gone is dropped, and the sector's next task
that needs it fails with the reason, as Lotus's does when its files cannot be found: the
sector goes down its `*Failed` state's retries.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from ..fsm import LmdbStore
from ..fsm.codec import packb
from ..sched import (
    DEAL_SECTOR_PRIORITY,
    AllocSelector,
    ExistingSelector,
    FileType,
    Job,
    MoveSelector,
    PinnedSelector,
    Scheduler,
    SectorRef,
    TaskSelector,
    TaskType,
    fetch_prepare,
    space_needed,
)
from .filesrecord import AwaitingWorker, files_bits, parse_files_record, split_bytes
from .info import PendingPiece, Piece
from .sealerapi import Backend as Backend
from .sealerapi import PreCommit2Out as PreCommit2Out
from .sealerapi import Sealer as Sealer

log = logging.getLogger("sectorfsm.sealing")
R = TypeVar("R")
FILES_DB = "sectorfiles"
#: A sector file's kind, as a worker names its directory, -> its type.
_KINDS = {f.dirname: f for f in (FileType.UNSEALED, FileType.SEALED, FileType.CACHE)}
#: Unions used at every task (a flag's `|` runs Python code each time).
_CACHE_SEALED = FileType.CACHE | FileType.SEALED
_FINALIZED = FileType.CACHE | FileType.UPDATE_CACHE
_ALL_FILES = FileType.UNSEALED | FileType.SEALED | FileType.CACHE


class SectorFilesLost(RuntimeError):
    """A task needs a sector file that was found gone (the message names file, path, when)."""


class ScheduledSealer:
    """Routes each call through the scheduler and records where the files end up."""

    def __init__(self, sched: Scheduler, backend: Backend, store: LmdbStore) -> None:
        self.sched = sched
        self.backend = backend
        self.store = store
        self._db = store.db(FILES_DB)
        #: Per sector number: path id -> (file types, bytes accounted on that path).
        self._files: dict[int, dict[str, list[int]]] = {}
        #: The part of those records on paths not declared yet (a remote worker's, until it
        #: joins): kept as they are, and applied to the index by `worker_joined`.
        self._pending: dict[int, dict[str, list[int]]] = {}
        #: Per sector number: file type -> why it is known to be gone (cleared once rewritten).
        self._lost: dict[int, dict[FileType, str]] = {}
        self._ref_of: Callable[[int], SectorRef] | None = None
        bind = getattr(backend, "bind", None)
        if bind is not None:  # a remote backend finds files through the index, records in store
            bind(sched, store)

    # -- storage bookkeeping -------------------------------------------------------------

    def load(self, ref_of: Callable[[int], SectorRef]) -> None:
        """Re-declare every recorded sector file (after a restart) in the storage index.

        Records on paths not declared yet are kept until their worker joins.
        """
        with self.store.read() as txn:
            rows = list(txn.cursor(db=self._db))
        index = self.sched.index
        unreadable: list[tuple[bytes, bytes, str]] = []
        for key, raw in rows:
            try:
                number, record = parse_files_record(key, raw)
            except ValueError as exc:
                unreadable.append((key, raw, str(exc)))
                continue
            ref = ref_of(number)
            for path_id, (files, nbytes) in record.items():
                if path_id not in index.paths:
                    # A remote worker's path (until it joins), or one gone from the config.
                    self._pending.setdefault(number, {})[path_id] = [files, nbytes]
                    continue
                index.add_sector(ref, FileType(files), path_id, split_bytes(files, nbytes, ref))
            self._files[number] = record
        self._ref_of = ref_of
        if unreadable:
            self._set_aside(unreadable)
        owners = getattr(getattr(self.backend, "storage", None), "owners", None)
        if owners is not None:  # files this store records are its own, marked or not
            owners.recorded = {(pid, n) for n, record in self._files.items() for pid in record}
        scan = getattr(self.backend, "scan_files", None)
        if scan is not None:
            scanned = {p for p in getattr(self.backend, "path_ids", ()) if p in index.paths}
            self._reconcile(scan(), ref_of, scanned, "", "the engine started")

    def worker_joined(
        self, worker: str, path_ids: Collection[str], held: Iterable[tuple[str, str, str, int]]
    ) -> None:
        """`worker` joined holding `held` (path id, kind, name, size) under `path_ids`.

        The records kept for its paths go into the index, which is then reconciled with
        what it reported: files gone are dropped (their sector's next task fails, naming
        them), files never recorded are logged and counted.
        """
        ref_of = self._ref_of
        if ref_of is None:
            return  # nothing loaded, so nothing recorded to reconcile
        index = self.sched.index
        mine = {pid for pid in path_ids if pid in index.paths}
        applied = []
        for number, pending in list(self._pending.items()):
            ref = ref_of(number)
            for pid in [p for p in pending if p in mine]:
                files, nbytes = pending.pop(pid)
                index.add_sector(ref, FileType(files), pid, split_bytes(files, nbytes, ref))
                applied.append(ref)
            if not pending:
                del self._pending[number]
        prefix = f"s-t0{ref_of(0).miner}-"
        on_disk: dict[tuple[str, int, FileType], int] = {}
        for pid, kind, name, size in held:
            digits, f = name.removeprefix(prefix), _KINDS.get(kind)
            if pid in mine and f is not None and digits != name and digits.isdigit():
                on_disk[(pid, int(digits), f)] = size
        log.info(
            "worker %s joined: %d files records applied, %d sector files reported",
            worker,
            len(applied),
            len(on_disk),
        )
        self._reconcile(on_disk, ref_of, mine, f" of worker {worker}", f"{worker} joined")
        for ref in applied:
            self.sched.files_changed(ref)  # tasks waiting for these files can be placed now

    def _set_aside(self, unreadable: list[tuple[bytes, bytes, str]]) -> None:
        """Move unreadable files records to quarantine (bytes kept) and go on without them.

        Safe to go on: the record only says where a sector's files are and what they take,
        and what it would have said is rebuilt from the disk (`scan_files`) where the backend
        can scan; a sector whose files cannot be found fails its next task with a reason, and
        owner markers keep any other sector from writing over them.
        """
        quarantine = self.store.db("quarantine")

        def move(txn: Any) -> None:
            for key, raw, why in unreadable:
                txn.put(FILES_DB.encode() + b"/" + key, packb([why, raw]), db=quarantine)
                txn.delete(key, db=self._db)

        self.store.write(move)
        for key, _, why in unreadable:
            log.error("sector files record %r set aside in quarantine: %s", key, why)

    def _reconcile(
        self,
        on_disk: Mapping[tuple[str, int, FileType], int],
        ref_of: Callable[[int], SectorRef],
        scanned: Collection[str],
        where: str,
        when: str,
    ) -> None:
        """Make the index agree with the disk on the `scanned` paths.

        Vanished files are dropped and remembered as lost (`where` names their worker,
        `when` the moment they were missed); unknown ones are counted. A recorded sealed
        file may be missing while its unfinalized cache is there: PreCommit1 reserves it
        and PreCommit2 writes it, so it stays counted.
        """
        index = self.sched.index
        changed: set[int] = set()
        for number in list(self._files):
            ref = ref_of(number)
            for pid, held in index.sector_bytes(ref).items():
                if pid not in scanned:
                    continue
                # A cache still counted at its sealing size: the sealed file is yet to come.
                sealing = held.get(FileType.CACHE, 0) > space_needed(
                    FileType.CACHE, ref.size, finalized=True
                )
                for f in held:
                    if (pid, number, f) in on_disk:
                        continue
                    if (
                        f is FileType.SEALED
                        and sealing
                        and (pid, number, FileType.CACHE) in on_disk
                    ):
                        continue
                    why = (
                        f"sector {ref}: its {f.dirname} file on path {pid}{where} is gone "
                        f"(not there when {when})"
                    )
                    log.warning("%s", why)
                    index.remove_sector(ref, f, pid)
                    self._lost.setdefault(number, {})[f] = why
                    changed.add(number)
        for (pid, number, f), nbytes in on_disk.items():
            ref = ref_of(number)
            if pid not in scanned or pid in index.find_sector(ref, f):
                continue
            log.warning("sector %s: found an unrecorded %s file on %s", ref, f.dirname, pid)
            index.add_sector(ref, f, pid, {f: nbytes})
            self._found(ref, f)
            changed.add(number)
        for number in sorted(changed):
            self._persist(ref_of(number))

    def _persist(self, ref: SectorRef, notify: bool = True) -> None:
        """Write the sector's files record from the index (which counts the bytes).

        `notify`: tell the scheduler the files changed (not when its own fetch just did).
        """
        record = {
            pid: [files_bits(held), sum(held.values())]
            for pid, held in self.sched.index.sector_bytes(ref).items()
        }
        for pid, kept in self._pending.get(ref.number, {}).items():
            record.setdefault(pid, kept)  # still to be applied (the index's own count wins)
        key = str(ref.number).encode()
        if record:
            self._files[ref.number] = record
            self.store.committer.put(FILES_DB, key, packb(record))
        elif self._files.pop(ref.number, None) is not None:
            self.store.committer.delete(FILES_DB, key)
        if notify:
            self.sched.files_changed(ref)

    def _add_files(
        self, ref: SectorRef, files: FileType, path_id: str | None, owner: int | None = None
    ) -> None:
        if path_id is None:
            return
        index = self.sched.index
        index.add_sector(ref, files, path_id)
        self._found(ref, files)
        if owner is not None:  # the task's reservation for these files is now stored bytes
            index.consume(owner, path_id, space_needed(files, ref.size))
        self._persist(ref)

    def _found(self, ref: SectorRef, files: FileType) -> None:
        """`files` of the sector exist again: they are no longer lost."""
        lost = self._lost.get(ref.number)
        if lost is None:
            return
        for f in files.each():
            lost.pop(f, None)
        if not lost:
            del self._lost[ref.number]

    def _require(self, ref: SectorRef, files: FileType) -> None:
        """Fail at once, with the reason, if one of `files` was found gone (and not since)."""
        lost = self._lost.get(ref.number)
        if not lost:
            return
        have = FileType.NONE
        for held in self.sched.index.find_sector(ref, files).values():
            have |= held
        for f in files.each():
            if f in lost and not f & have:
                raise SectorFilesLost(lost[f])

    def _drop_files(self, ref: SectorRef, files: FileType) -> None:
        self.sched.index.remove_sector(ref, files)
        self._persist(ref)

    def _fetch(self, files: FileType) -> Callable[[Job], Awaitable[None]]:
        """A `prepare` that moves `files` to the job's worker and records where they went."""
        make = getattr(self.backend, "fetcher", None)  # a backend that really moves files
        move = fetch_prepare(self.sched, files, make(files) if make is not None else None)

        async def prepare(job: Job) -> None:
            await move(job)
            if job.placement.fetch_bytes and job.placement.path is not None:
                # The index moved the files and their bytes, and the fetch told the scheduler.
                self._persist(job.sector, notify=False)

        return prepare

    def holds(self, ref: SectorRef, files: FileType) -> bool:
        """True if the index knows of `files` of this sector anywhere."""
        return self.sched.index.has_any(ref, files)

    # -- scheduling ------------------------------------------------------------------------

    def _run(
        self,
        ref: SectorRef,
        task: TaskType,
        selector: Any,
        work: Callable[[Job], Awaitable[R]],
        deals: bool,
        prepare: Callable[[Job], Awaitable[Any]] | None = None,
    ) -> Coroutine[Any, Any, R]:
        """The scheduler's coroutine for the task itself, not one wrapped around it.

        Every await of a job (its placement, its fetch, each sleep of its work) resumes the
        whole chain of coroutines above it: the calls that only pass a task on return this one.
        """
        priority = DEAL_SECTOR_PRIORITY if deals else 0
        running_on = getattr(self.backend, "running_on", None)
        pinned = running_on(ref.number, task.short) if running_on is not None else None
        if pinned is not None:  # an attempt still runs there (the engine restarted under it)
            selector = PinnedSelector(selector, pinned)
        if ref.number in self._pending:
            selector = AwaitingWorker(selector, lambda r: self._pending.get(r.number, {}))
        return self.sched.schedule(ref, task, selector, prepare, work, priority=priority)

    def add_piece(
        self,
        sector: SectorRef,
        existing: list[int],
        size: int,
        piece: PendingPiece | None,
        *,
        worker: str = "",
    ) -> Coroutine[Any, Any, Piece]:
        """AddPiece: a new sector allocates its unsealed file; later pieces go where it is.

        `worker` pins it to that worker (the sector's `ap_worker`): it waits for that one.
        """
        if existing:
            self._require(sector, FileType.UNSEALED)
        first = not self.holds(sector, FileType.UNSEALED)
        selector: Any = (
            AllocSelector(FileType.UNSEALED) if first else ExistingSelector(FileType.UNSEALED)
        )
        if worker:
            selector = PinnedSelector(selector, worker)

        async def work(job: Job) -> Piece:
            out = await self.backend.add_piece(job, existing, size, piece)
            if first:
                self._add_files(sector, FileType.UNSEALED, job.placement.path, job.sched_id)
            return out

        return self._run(sector, TaskType.ADD_PIECE, selector, work, piece is not None)

    def seal_pre_commit1(
        self, sector: SectorRef, ticket: bytes, pieces: list[Piece], deals: bool
    ) -> Coroutine[Any, Any, bytes]:
        """PreCommit1: allocate cache+sealed, with the unsealed file fetched if elsewhere."""
        self._require(sector, FileType.UNSEALED)

        async def work(job: Job) -> bytes:
            out = await self.backend.pre_commit1(job, ticket, pieces)
            cache, sealed = self.holds(sector, FileType.CACHE), self.holds(sector, FileType.SEALED)
            if not (cache and sealed):
                missing = FileType.SEALED if cache else FileType.CACHE if sealed else _CACHE_SEALED
                self._add_files(sector, missing, job.placement.path, job.sched_id)
            return out

        return self._run(
            sector,
            TaskType.PRE_COMMIT1,
            _pc1_selector(self, sector),
            work,
            deals,
            self._fetch(FileType.UNSEALED),
        )

    def seal_pre_commit2(
        self, sector: SectorRef, pc1out: bytes, deals: bool
    ) -> Coroutine[Any, Any, PreCommit2Out]:
        """PreCommit2 where the cache is (fetching it is allowed, as in Lotus)."""
        files = _CACHE_SEALED
        self._require(sector, files)

        return self._run(
            sector,
            TaskType.PRE_COMMIT2,
            ExistingSelector(files, allow_fetch=True),
            lambda job: self.backend.pre_commit2(job, pc1out),
            deals,
            self._fetch(files),
        )

    def seal_commit1(
        self,
        sector: SectorRef,
        ticket: bytes,
        seed: bytes,
        pieces: list[Piece],
        cids: PreCommit2Out,
        deals: bool,
    ) -> Coroutine[Any, Any, bytes]:
        """Commit1 where the sealed files are."""
        files = _CACHE_SEALED
        self._require(sector, files)
        return self._run(
            sector,
            TaskType.COMMIT1,
            ExistingSelector(files, allow_fetch=False),
            lambda job: self.backend.commit1(job, ticket, seed, pieces, cids),
            deals,
        )

    def seal_commit2(
        self, sector: SectorRef, c1out: bytes, deals: bool
    ) -> Coroutine[Any, Any, bytes]:
        """Commit2 on any worker that does C2 (a GPU task, no files)."""
        return self._run(
            sector,
            TaskType.COMMIT2,
            TaskSelector(),
            lambda job: self.backend.commit2(job, c1out),
            deals,
        )

    async def finalize_sector(self, sector: SectorRef, keep_unsealed: bool) -> None:
        """Finalize where the cache is; drops the unsealed copy unless kept."""

        async def work(job: Job) -> None:
            await self.backend.finalize(job, keep_unsealed)
            # What stays is what Lotus keeps: the sealed file and a small cache.
            self.sched.index.finalize_sector(sector, _FINALIZED)
            if not keep_unsealed:
                self.sched.index.remove_sector(sector, FileType.UNSEALED)
            self._persist(sector)

        self._require(sector, _CACHE_SEALED)
        if not self.holds(sector, FileType.CACHE):
            return  # already finalized and moved, or nothing was ever sealed
        await self._run(sector, TaskType.FINALIZE, ExistingSelector(FileType.CACHE), work, False)
        if getattr(self.backend, "moves_to_store", False):
            await self._move_to_store(sector, keep_unsealed)

    async def _move_to_store(self, sector: SectorRef, keep_unsealed: bool) -> None:
        """Move the finalized files to a long-term storage path (Lotus's `TTFetch` after FIN).

        As `FinalizeSector` in `extern/sector-storage/manager.go@v1.11.3`: a second task, on
        any worker that reaches a `store` path, fetches the sealed file and the cache there.
        """
        files = _CACHE_SEALED
        if keep_unsealed and self.holds(sector, FileType.UNSEALED):
            files |= FileType.UNSEALED
        index = self.sched.index
        if all(index.paths[pid].can_store for pid in index.find_sector(sector, files)):
            return
        move = self.backend.move_to_store  # type: ignore[attr-defined]

        async def work(job: Job) -> None:
            target = job.placement.path
            assert target is not None  # MoveSelector always names the storage path
            await move(job, files)
            index.move_sector(sector, files, target)
            here = index.sector_bytes(sector).get(target, {})
            index.consume(job.sched_id, target, sum(here[f] for f in files.each() if f in here))
            self._persist(sector)

        await self._run(sector, TaskType.FETCH, MoveSelector(files), work, False)

    async def release_unsealed(self, sector: SectorRef) -> None:
        """Delete the unsealed copy (no worker needed)."""
        await self.backend.release_unsealed(sector)
        self._drop_files(sector, FileType.UNSEALED)

    async def remove(self, sector: SectorRef) -> None:
        """Delete every file of the sector and forget it in the index."""
        await self.backend.remove(sector)
        # Files on a worker that never came back are its to report (then counted as unknown).
        self._pending.pop(sector.number, None)
        self._lost.pop(sector.number, None)
        self._drop_files(sector, _ALL_FILES)


def _pc1_selector(sealer: ScheduledSealer, sector: SectorRef) -> Any:
    # Re-running PC1 on a sector that already has its cache reuses it in place.
    if sealer.sched.index.holders(sector, _CACHE_SEALED):
        return ExistingSelector(_CACHE_SEALED)
    return AllocSelector(_CACHE_SEALED, fetch=FileType.UNSEALED)
