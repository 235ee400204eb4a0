"""The `dask` sealer: the reference sealer's work, run on remote `sectors worker`s.

Every task runs in the job registry's child process on the worker the scheduler placed it on
(`DaskWorkerBackend.call`), as a function of `adapter.py` that names sector files by storage
path id, kind and name; the worker turns ids into its own directories. Where the files are is
the scheduler's storage index (kept and persisted by `ScheduledSealer`), so:

* a job id is `{task}-s{sector}-a{attempt}`; the attempt of each (sector, task) is stored in
  the engine's store (`ATTEMPTS_DB`) and advances when a try ended, so an engine that died
  while a job ran submits the same id again and gets that job's result, never a second run;
* the worker an attempt was submitted to is stored (durably, before the job exists) until the
  attempt ends: a restarted engine pins the task to that worker (`running_on`) and waits for
  it to rejoin, as Lotus's manager waits on work it tracks instead of scheduling it again
  (`extern/sector-storage/manager.go@v1.11.3`, `getWork`/`waitWork`);
* a result is acknowledged (the worker may forget it) only once the commit that records the
  event carrying it is durable (`store.committer.on_commit`);
* files a task needs on another worker are pulled worker to worker (`transfer.fetch_here`,
  pinned to the destination), then deleted at the source, as Lotus's Fetch moves them
  (`extern/sector-storage/manager.go@v1.11.3`, `schedFetch` with `AcquireMove`);
* after Finalize the sealed file and the finalized cache move to a `store = true` path
  (Lotus's second, `TTFetch` step of `FinalizeSector`), on whichever worker has one.

The module imports no Dask at import time: listing the sealers must stay cheap.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ....fsm.codec import packb, unpackb
from ....sched import FileType, SectorRef, WorkerSpec
from ...info import PendingPiece, Piece
from ...sealer import PreCommit2Out
from ..files import local_workers
from . import adapter

if TYPE_CHECKING:
    from ....fsm import Clock, LmdbStore
    from ....sched import Job, Scheduler
    from ....sched.workers import Worker
    from .backend import DaskWorkerBackend

log = logging.getLogger("sectorfsm.cluster")

#: Sub-database of the engine's store: `{sector}/{task}` -> the attempt its next job gets, and
#: `{sector}/{task}@` -> the worker that attempt was submitted to, until it ends.
ATTEMPTS_DB = "daskattempts"

Loc = list[str]


class DaskSealerError(RuntimeError):
    """A task the dask sealer cannot run as placed (no remote worker, files out of reach)."""


class DaskSealer:
    """A `Backend` whose every task runs on the remote worker the scheduler chose."""

    name = "dask"
    #: `ScheduledSealer` moves finalized sectors to a `store = true` path through `move_to_store`.
    moves_to_store = True

    def __init__(self, clock: Clock, miner: int) -> None:
        self.clock = clock
        self.miner = miner
        self._sched: Scheduler | None = None
        self._store: LmdbStore | None = None
        self._attempts: dict[str, int] = {}
        self._where: dict[str, str | None] = {}
        self._acks: set[asyncio.Task[None]] = set()
        #: Sector -> (the worker that left with its unsealed file, that file's path id).
        self._lost_unsealed: dict[int, tuple[str, str]] = {}

    def bind(self, sched: Scheduler, store: LmdbStore) -> None:
        """Called by `ScheduledSealer`: the storage index and the store the sealer records in."""
        self._sched = sched
        self._store = store
        store.db(ATTEMPTS_DB)  # opened now: the committer's write transaction cannot

    @property
    def sched(self) -> Scheduler:
        """The scheduler (a `DaskSealerError` until `bind`)."""
        if self._sched is None:
            raise DaskSealerError("the dask sealer is not bound to a scheduler")
        return self._sched

    @property
    def store(self) -> LmdbStore:
        """The engine's store (a `DaskSealerError` until `bind`)."""
        if self._store is None:
            raise DaskSealerError("the dask sealer is not bound to a store")
        return self._store

    # -- workers, files and job ids ---------------------------------------------------------

    def _remote(self, worker: Worker) -> DaskWorkerBackend:
        from .backend import DaskWorkerBackend

        backend = worker.backend
        if not isinstance(backend, DaskWorkerBackend):
            raise DaskSealerError(
                f"worker {worker.name} is not a remote `sectors worker`: the dask sealer "
                "runs sealing only there"
            )
        return backend

    def _remote_named(self, name: str | None) -> DaskWorkerBackend:
        w = self.sched.find_worker(name) if name is not None else None
        if w is None:
            raise DaskSealerError(f"worker {name} that holds the files is not connected")
        return self._remote(w)

    def _loc(self, job: Job, f: FileType) -> Loc:
        """Where the job's worker has (or, new, gets) the sector's file `f`."""
        index = self.sched.index
        here = [
            pid
            for pid in index.find_sector(job.sector, f)
            if index.paths[pid].worker == job.worker.name
        ]
        pid = here[0] if here else job.placement.path
        if pid is None:
            raise DaskSealerError(
                f"sector {job.sector}: no {f.dirname} file on worker {job.worker.name}, "
                "and no storage path was chosen there for one"
            )
        return [pid, f.dirname, str(job.sector)]

    def _attempt_key(self, number: int, task: str) -> str:
        return f"{number}/{task}"

    def attempt(self, number: int, task: str) -> int:
        """The attempt number the next job of `task` on sector `number` gets (1 at first)."""
        key = self._attempt_key(number, task)
        if key not in self._attempts:
            with self.store.read() as txn:
                raw = txn.get(key.encode(), db=self.store.db(ATTEMPTS_DB))
            self._attempts[key] = int(unpackb(raw)) if raw is not None else 1
        return self._attempts[key]

    def running_on(self, number: int, task: str) -> str | None:
        """The worker the current attempt of `task` on sector `number` was submitted to.

        None unless that attempt was submitted and has not ended (an engine restarted while
        it ran): the scheduler then pins the task there, so the same job id reaches the
        worker that holds its record and never starts on another one.
        """
        key = self._attempt_key(number, task)
        if key not in self._where:
            with self.store.read() as txn:
                raw = txn.get(f"{key}@".encode(), db=self.store.db(ATTEMPTS_DB))
            self._where[key] = str(unpackb(raw)) if raw is not None else None
        return self._where[key]

    async def _submitted_to(self, number: int, task: str, worker: str) -> None:
        """Record, durably, that the current attempt goes to `worker` (before it exists)."""
        if self.running_on(number, task) == worker:
            return  # an engine restarted under it: the record stands
        key = self._attempt_key(number, task)
        self._where[key] = worker
        self.store.committer.put(ATTEMPTS_DB, f"{key}@".encode(), packb(worker))
        await self.store.committer.waiter()

    def _spend(self, number: int, task: str) -> None:
        """The current attempt ended: the next one gets a new id (staged with the event)."""
        key = self._attempt_key(number, task)
        self._attempts[key] = self.attempt(number, task) + 1
        self.store.committer.put(ATTEMPTS_DB, key.encode(), packb(self._attempts[key]))
        if self.running_on(number, task) is not None:
            self._where[key] = None
            self.store.committer.delete(ATTEMPTS_DB, f"{key}@".encode())

    def _ack_after_commit(self, remote: DaskWorkerBackend, key: str) -> None:
        def committed(error: BaseException | None) -> None:
            if error is not None:
                return  # not recorded: the result must stay on the worker
            task = asyncio.ensure_future(remote.ack(key))
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)

        self.store.committer.on_commit(committed)

    async def _call(self, job: Job, fn: Callable[..., Any], *args: Any) -> Any:
        from .backend import EngineStopping, function_path

        remote = self._remote(job.worker)
        task, number = job.task_type.short, job.sector.number
        key = f"{task}-s{number}-a{self.attempt(number, task)}"
        await self._submitted_to(number, task, remote.name)
        self.clock.hold()  # real work elsewhere: a virtual clock must not jump meanwhile
        ended = True
        try:
            value = await remote.call(job.sched_id, key, function_path(fn), list(args))
        except EngineStopping:
            ended = False  # the job runs on: the restarted engine asks for the same id
            raise
        finally:
            self.clock.release()
            # From here until the handler sends its event nothing awaits: the attempt's end
            # and the acknowledgement are staged in the same commit as that event.
            if ended:
                self._spend(number, task)
                self._ack_after_commit(remote, key)
        return value

    async def _small(
        self, remote: DaskWorkerBackend, key: str, fn: Callable[..., Any], *args: Any
    ) -> Any:
        """A short task in the worker's own process (file moves, deletes), pinned there."""
        future = remote.client.submit(
            fn, *args, key=key, workers=[remote.address], allow_other_workers=False, pure=False
        )
        try:
            return await future
        finally:
            future.release()  # type: ignore[no-untyped-call]

    # -- the tasks --------------------------------------------------------------------------

    async def add_piece(
        self, job: Job, existing: list[int], size: int, piece: PendingPiece | None
    ) -> Piece:
        """AddPiece into the unsealed file on the worker (deal data sent there first)."""
        data = piece.data_path if piece is not None else None
        if piece is not None and data is None:
            raise DaskSealerError(f"piece {piece.piece_cid} has no data file to write")
        unsealed = self._loc(job, FileType.UNSEALED)
        staged = None
        if piece is not None and data is not None:
            staged = await self._stage_piece(job, unsealed[0], piece, data)
        try:
            cid = await self._call(
                job, adapter.add_piece, unsealed, job.sector.size, sum(existing), size, staged
            )
        finally:
            if staged is not None:
                await self._unstage_piece(job, staged)
        return Piece(str(cid), size, piece.deal if piece is not None else None)

    async def _stage_piece(self, job: Job, pid: str, piece: PendingPiece, data: str) -> str:
        """Send the piece's data file to the job's worker (path `pid`); the worker's copy."""
        from . import pieces
        from .fileserver import TransferError
        from .progress import Reporter, TransferBoard

        remote = self._remote(job.worker)
        name = f"{job.sector}-{piece.piece_cid}"
        staged = _worker_path(remote, [pid, pieces.STAGING, name])
        board = TransferBoard.of(remote.client)
        report = Reporter(remote.job_key(job.sched_id), board.update) if board else None
        self.clock.hold()  # real work elsewhere: a virtual clock must not jump meanwhile
        try:
            await pieces.send(remote.client, remote.address, data, staged, progress=report)
        except TransferError as exc:
            raise DaskSealerError(f"sector {job.sector}: piece {piece.piece_cid}: {exc}") from None
        finally:
            self.clock.release()
        return staged

    async def _unstage_piece(self, job: Job, staged: str) -> None:
        from . import pieces

        remote = self._remote(job.worker)
        try:
            await remote.client.run(pieces.discard, staged, workers=[remote.address])
        except Exception as exc:  # only space is lost: the next AddPiece of it replaces it
            log.warning("worker %s: could not delete staged piece %s: %s", remote.name, staged, exc)

    async def pre_commit1(self, job: Job, ticket: bytes, pieces: list[Piece]) -> bytes:
        """PreCommit1 on the worker (its unsealed file fetched there first if need be)."""
        spec = [[p.piece_cid, p.size] for p in pieces]
        unsealed, cache = self._loc(job, FileType.UNSEALED), self._loc(job, FileType.CACHE)
        lost = self._lost_unsealed.pop(job.sector.number, None)
        if lost is not None:
            await self._rebuild_unsealed(job, pieces, unsealed, *lost)
        out = await self._call(
            job, adapter.pre_commit1, unsealed, cache, job.sector.size, ticket, spec
        )
        return bytes(out)

    async def pre_commit2(self, job: Job, pc1out: bytes) -> PreCommit2Out:
        """PreCommit2 on the worker: writes the sealed file."""
        n = job.sector
        sealed, cache = self._loc(job, FileType.SEALED), self._loc(job, FileType.CACHE)
        comm_r, comm_d = await self._call(
            job, adapter.pre_commit2, self.miner, n.number, n.size, pc1out, sealed, cache
        )
        return PreCommit2Out(str(comm_r), str(comm_d))

    async def _rebuild_unsealed(
        self, job: Job, pieces: list[Piece], unsealed: Loc, holder: str, source: str
    ) -> None:
        """Write a lost unsealed file again on the job's worker: only filler pieces can be.

        A committed-capacity sector's unsealed file is its filler pieces, zeros, so PC1 can
        start over on another worker. Deal data exists only in the lost file: the index
        points at it again and PC1 fails until its worker is back (as Lotus's would).
        """
        if any(p.deal is not None for p in pieces):
            self.sched.index.move_sector(job.sector, FileType.UNSEALED, source)
            raise DaskSealerError(
                f"sector {job.sector}: its unsealed file, with deal data, is on worker "
                f"{holder}, which left the cluster"
            )
        from .backend import function_path

        remote = self._remote(job.worker)
        # Written from nothing, every filler stays a hole: zeros written over an older copy
        # on this worker would allocate the whole sector.
        steps: list[tuple[str, Callable[..., Any], list[Any]]] = [
            ("rm", adapter.remove, [[unsealed]])
        ]
        offset = 0
        for i, piece in enumerate(pieces):
            steps.append(
                (str(i), adapter.add_piece, [unsealed, job.sector.size, offset, piece.size, None])
            )
            offset += piece.size
        for step, fn, args in steps:
            key = f"AP-s{job.sector.number}-rebuild{step}-{secrets.token_hex(3)}"
            await remote.call(job.sched_id, key, function_path(fn), args)
            await remote.ack(key)
        log.warning(
            "sector %s: unsealed file lost with worker %s; filler pieces rewritten on %s",
            job.sector,
            holder,
            remote.name,
        )

    async def commit1(
        self, job: Job, ticket: bytes, seed: bytes, pieces: list[Piece], cids: PreCommit2Out
    ) -> bytes:
        """Commit1 from the sealed file on the worker."""
        sealed = self._loc(job, FileType.SEALED)
        return bytes(await self._call(job, adapter.commit1, sealed, job.sector.size, ticket, seed))

    async def commit2(self, job: Job, c1out: bytes) -> bytes:
        """Commit2 on the worker (no files)."""
        return bytes(await self._call(job, adapter.commit2, self.miner, job.sector.number, c1out))

    async def finalize(self, job: Job, keep_unsealed: bool) -> None:
        """Finalize the cache on the worker; drop the unsealed file there unless kept."""
        index = self.sched.index
        has_unsealed = any(
            index.paths[pid].worker == job.worker.name
            for pid in index.find_sector(job.sector, FileType.UNSEALED)
        )
        unsealed = self._loc(job, FileType.UNSEALED) if has_unsealed else None
        await self._call(
            job, adapter.finalize, self._loc(job, FileType.CACHE), unsealed, keep_unsealed
        )

    async def move_to_store(self, job: Job, files: FileType) -> None:
        """Move `files` of the job's sector to the job's path (the long-term storage one)."""
        if job.placement.path is None:
            raise DaskSealerError(f"sector {job.sector}: no storage path was chosen to move to")
        await self.move(job.sector, files, job.worker.name, job.placement.path, job.sched_id)

    def fetcher(self, files: FileType) -> Callable[[Job, str | None, int], Awaitable[None]]:
        """The transfer of `sched.fetch_prepare` for `files`: a real move, worker to worker."""

        async def transfer(job: Job, source: str | None, nbytes: int) -> None:
            if job.placement.path is None:
                return
            if files == FileType.UNSEALED and source and self.sched.find_worker(source) is None:
                # Its worker (`source`) left with it: PreCommit1 decides, knowing the pieces,
                # whether it can be rebuilt here (see `_rebuild_unsealed`).
                index = self.sched.index
                held = index.find_sector(job.sector, files)
                pid = next(p for p in held if index.paths[p].worker == source)
                self._lost_unsealed[job.sector.number] = (source, pid)
                return
            await self.move(job.sector, files, job.worker.name, job.placement.path, job.sched_id)

        return transfer

    async def move(
        self, sector: SectorRef, files: FileType, worker: str, path_id: str, job: int | None = None
    ) -> None:
        """Bring `files` of `sector` to path `path_id` of `worker`, deleting the source copy.

        A fetch reports its progress under the scheduler's job `job` (for `sectors jobs`).
        """
        from .progress import TransferBoard
        from .transfer import fetch_here

        index = self.sched.index
        dest = self._remote_named(worker)
        name = str(sector)
        for f in files.each():
            held = list(index.find_sector(sector, f))
            if not held or path_id in held:
                continue
            pid = next((p for p in held if index.paths[p].worker == worker), held[0])
            src = [pid, f.dirname, name]
            dst = [path_id, f.dirname, name]
            tag = f"{f.dirname}-s{sector.number}-{secrets.token_hex(4)}"
            if index.paths[pid].worker == worker:
                await self._small(dest, f"MV-{tag}", adapter.move_local, src, dst)
                continue
            source = self._remote_named(index.paths[pid].worker)
            TransferBoard.of(dest.client)  # subscribed before the first report can be sent
            got = await self._small(
                dest,
                f"GET-{tag}",
                partial(fetch_here, job=dest.job_key(job) if job is not None else ""),
                source.address,
                _worker_path(source, src),
                _worker_path(dest, dst),
            )
            log.info(
                "sector %s: fetched %s from %s to %s (%s bytes)",
                sector,
                f.dirname,
                source.name,
                dest.name,
                got.get("size"),
            )
            await self._small(source, f"RM-{tag}", adapter.remove, [src])

    async def release_unsealed(self, sector: SectorRef) -> None:
        """Delete the unsealed file on every worker that holds it."""
        await self._remove(sector, FileType.UNSEALED)

    async def remove(self, sector: SectorRef) -> None:
        """Delete every file of the sector, on every worker that holds one."""
        await self._remove(sector, FileType.UNSEALED | FileType.SEALED | FileType.CACHE)

    async def _remove(self, sector: SectorRef, files: FileType) -> None:
        index = self.sched.index
        per_worker: dict[str | None, list[Loc]] = {}
        for pid, held in index.find_sector(sector, files).items():
            for f in held.each():
                per_worker.setdefault(index.paths[pid].worker, []).append(
                    [pid, f.dirname, str(sector)]
                )
        for worker, locs in per_worker.items():
            remote = self._remote_named(worker)
            await self._small(
                remote, f"RM-s{sector.number}-{secrets.token_hex(4)}", adapter.remove, locs
            )


def _worker_path(remote: DaskWorkerBackend, loc: Loc) -> str:
    """The worker-side path of `loc`, from the directories the worker declared at join."""
    pid, kind, name = loc
    for p in remote.identity.paths:
        if p.id == pid:
            return f"{p.path.rstrip('/')}/{kind}/{name}"
    raise DaskSealerError(f"worker {remote.name} declares no storage path {pid!r}")


class DaskFactory:
    """The registry's `dask`: sealing on remote `sectors worker`s; needs `[cluster]`."""

    name = "dask"
    #: Its files are on the workers' disks, which the engine cannot scan.
    keeps_files = False

    def check(
        self, repo: Path, options: Mapping[str, Any], workers: Sequence[WorkerSpec] | None
    ) -> None:
        """A cluster is configured, no other option is given, no local worker is declared."""
        unknown = sorted(set(options) - {"cluster", "storage"})
        if unknown:
            raise ValueError(f"unknown option(s) for the dask sealer: {', '.join(unknown)}")
        if not options.get("cluster"):
            raise ValueError(
                "the dask sealer runs sealing on remote `sectors worker`s: it needs a "
                "[cluster] table in sectors.toml"
            )
        if workers:
            names = ", ".join(w.name for w in workers)
            raise ValueError(
                f"the dask sealer takes its workers from the cluster, not [[workers]] ({names})"
            )

    def create(
        self,
        *,
        clock: Clock,
        miner: int,
        repo: Path,
        options: Mapping[str, Any],
        time_scale: float,
    ) -> DaskSealer:
        """A `DaskSealer` (the remote workers join through `[cluster]`)."""
        return DaskSealer(clock, miner)

    def default_workers(self, repo: Path) -> list[WorkerSpec]:
        """The local worker `sectors run` drops unless `[cluster] local_worker` keeps it."""
        return local_workers(repo)
