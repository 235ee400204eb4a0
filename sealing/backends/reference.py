"""The `reference` sealer backend: real sector files and real data commitments, NOT a PoRep.

What is real: the files, in Lotus's layout under each storage path (`unsealed/s-t0<miner>-<n>`,
`sealed/s-t0<miner>-<n>`, `cache/s-t0<miner>-<n>/`); the Fr32-padded piece bytes in the
unsealed file; each piece's CommP, computed from its data; and CommD, which PreCommit1 checks
against what the unsealed file really holds.

What is not: there is no SDR, no replica encoding and no SNARK. The sealed file is a sparse
sector-size file whose header and trailer record CommR (`proofs.sealed_cid`) and a sha256
digest of that record; the cache holds sparse stand-ins for the layer and tree files. Commit1
re-reads the sealed file's record, and the proof is `proofs.porep_proof` bound to the CommR
found there, so a corrupted or replaced sealed file, a wrong ticket or a wrong seed gives a
proof `DevnetChain` rejects, as it would reject a real one.

The functions that touch files (`write_piece`, `pre_commit1`, ...) are synchronous and take
explicit paths, so an external sealer (examples/command_sealer.py) can reuse them; the bytes
they read and write are `sectorfile.py`'s format. `ReferenceBackend` finds the paths
(`Storage`), runs the functions in a thread and turns disk errors into messages that name the
storage path.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ...fsm import Clock
from ...fsm.codec import packb, unpackb
from ...sched import FileType, SectorRef, TaskType, WorkerSpec
from .. import commp, proofs
from ..info import PendingPiece, Piece
from ..sealer import PreCommit2Out
from .files import (
    KINDS,
    SectorPaths,
    Storage,
    check_roots,
    check_stop,
    check_storage,
    delete,
    local_workers,
    remove_files,
    run_in_thread,
    scan_sector_files,
)
from .sectorfile import (
    PieceDataError,
    ReferenceSealerError,
    SectorFileError,
    copy_padded,
    open_sector_file,
    read_sealed,
    region_commp,
    sparse,
    write_sealed,
    zeros,
)

if TYPE_CHECKING:
    from ...sched import Job

T = TypeVar("T")

#: Cache files that finalize keeps (Lotus keeps p_aux, t_aux and tree-r-last).
KEEP_IN_CACHE = ("p_aux", "t_aux", "sc-02-data-tree-r-last.dat")

# ---------------------------------------------------------------------------- the tasks


def write_piece(
    unsealed: Path,
    sector_size: int,
    offset: int,
    size: int,
    data_path: str | None,
    *,
    stop: threading.Event | None = None,
) -> str:
    """AddPiece: write a piece's fr32-padded bytes (None: zeros) at `offset`; its CommP."""
    unpadded = commp.unpadded_size(size)
    if offset % size or offset + size > sector_size:
        raise ReferenceSealerError(
            f"a {size}-byte piece cannot go at offset {offset} of a {sector_size}-byte sector"
        )
    if data_path is None:
        fd = open_sector_file(unsealed, sector_size)
        try:
            zeros(fd, offset, offset + size, stop, fix=True)
        finally:
            os.close(fd)
        return commp.zero_piece_cid(size)
    try:
        src = open(data_path, "rb")  # noqa: SIM115 - closed below, after the sector file
    except FileNotFoundError:
        raise PieceDataError(f"piece data file {data_path} does not exist") from None
    except IsADirectoryError:
        raise PieceDataError(f"piece data file {data_path} is a directory") from None
    try:
        length = os.fstat(src.fileno()).st_size
        if length > unpadded:
            raise PieceDataError(
                f"piece data file {data_path} is {length} bytes, more than the piece's "
                f"unpadded size {unpadded} (padded {size})"
            )
        fd = open_sector_file(unsealed, sector_size)
        try:
            cid, end = copy_padded(src.fileno(), fd, offset, unpadded, data_path, stop)
            zeros(fd, end, offset + size, stop, fix=True)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        src.close()
    return cid


def pre_commit1(
    unsealed: Path,
    cache: Path,
    sector_size: int,
    ticket: bytes,
    pieces: Sequence[tuple[str, int]],
    *,
    stop: threading.Event | None = None,
) -> bytes:
    """PreCommit1: CommD of the pieces, checked against the unsealed file; the opaque output."""
    comm_d = commp.unsealed_cid(sector_size, pieces)
    try:
        fd = os.open(unsealed, os.O_RDONLY)
    except FileNotFoundError:
        raise SectorFileError(f"unsealed file {unsealed} does not exist") from None
    try:
        length = os.fstat(fd).st_size
        if length < sector_size:
            raise SectorFileError(f"unsealed file {unsealed} is {length} bytes, not {sector_size}")
        end = 0
        for i, (cid, size) in enumerate(pieces):
            start = -(-end // size) * size  # each piece is aligned to its own size
            _expect_zero(fd, end, start, unsealed, stop)
            end = start + size
            # Zero pieces (fillers) are checked by looking for data, not by hashing, so a
            # committed-capacity sector costs no gigabytes of hashing.
            if cid == commp.zero_piece_cid(size):
                _expect_zero(fd, start, end, unsealed, stop)
                continue
            got = region_commp(fd, start, size, stop)
            if got != cid:
                raise SectorFileError(
                    f"piece {i} ({cid}): bytes {start}..{end} of {unsealed} hash to {got}"
                )
        _expect_zero(fd, end, sector_size, unsealed, stop)
    finally:
        os.close(fd)
    cache.mkdir(parents=True, exist_ok=True)
    aux = {"comm_d": comm_d, "ticket": ticket.hex(), "pieces": [list(p) for p in pieces]}
    (cache / "t_aux").write_text(json.dumps(aux, sort_keys=True) + "\n")
    # Sparse stand-ins for the SDR layer and tree-d (they take no blocks).
    sparse(cache / "sc-02-data-layer-1.dat", sector_size)
    sparse(cache / "sc-02-data-tree-d.dat", 2 * sector_size - commp.NODE_SIZE)
    return packb({"v": 1, "comm_d": comm_d, "ticket": ticket, "sector_size": sector_size})


def _expect_zero(fd: int, start: int, end: int, path: Path, stop: threading.Event | None) -> None:
    if start < end and not zeros(fd, start, end, stop, fix=False):
        raise SectorFileError(
            f"bytes {start}..{end} of {path} should be zero (a filler) but are not"
        )


def pre_commit2(
    miner: int,
    number: int,
    sector_size: int,
    pc1out: bytes,
    sealed: Path,
    cache: Path,
    *,
    stop: threading.Event | None = None,
) -> tuple[str, str]:
    """PreCommit2: CommR from CommD and the ticket; writes the sealed file. (CommR, CommD)."""
    try:
        out = unpackb(pc1out)
        comm_d, ticket, size = out["comm_d"], bytes(out["ticket"]), out["sector_size"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ReferenceSealerError(
            f"PreCommit1 output is not the reference backend's: {exc!r}"
        ) from None
    if size != sector_size:
        raise ReferenceSealerError(f"PreCommit1 output is for {size}-byte sectors")
    check_stop(stop)
    comm_r = proofs.sealed_cid(miner, number, comm_d, ticket)
    record = {
        "v": 1,
        "miner": miner,
        "number": number,
        "sector_size": sector_size,
        "comm_d": comm_d,
        "comm_r": comm_r,
        "ticket": ticket.hex(),
    }
    write_sealed(sealed, record, sector_size)
    cache.mkdir(parents=True, exist_ok=True)
    digest = proofs.digest_of(comm_r)
    p_aux = (
        hashlib.sha256(b"comm_c" + digest).digest() + hashlib.sha256(b"r_last" + digest).digest()
    )
    (cache / "p_aux").write_bytes(p_aux)
    sparse(cache / "sc-02-data-tree-c.dat", sector_size)
    sparse(cache / "sc-02-data-tree-r-last.dat", max(commp.NODE_SIZE, sector_size // 8))
    return comm_r, comm_d


def commit1(
    sealed: Path,
    sector_size: int,
    ticket: bytes,
    seed: bytes,
    *,
    stop: threading.Event | None = None,
) -> bytes:
    """Commit1: what the proof binds, with CommR and CommD as the sealed file records them."""
    check_stop(stop)
    record = read_sealed(sealed, sector_size)
    sealed, unsealed = record["comm_r"], record["comm_d"]
    return packb({"v": 1, "sealed": sealed, "unsealed": unsealed, "ticket": ticket, "seed": seed})


def commit2(miner: int, number: int, c1out: bytes) -> bytes:
    """Commit2: the deterministic proof (`proofs.porep_proof`) of Commit1's output."""
    try:
        c1 = unpackb(c1out)
        sealed, unsealed = c1["sealed"], c1["unsealed"]
        ticket, seed = bytes(c1["ticket"]), bytes(c1["seed"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ReferenceSealerError(
            f"Commit1 output is not the reference backend's: {exc!r}"
        ) from None
    return proofs.porep_proof(miner, number, sealed, unsealed, ticket, seed)


def finalize(
    cache: Path, unsealed: Path | None, keep_unsealed: bool, *, stop: threading.Event | None = None
) -> None:
    """Finalize: delete the cache scratch (keep p_aux, t_aux, tree-r-last); drop unsealed."""
    if cache.is_dir():
        for entry in cache.iterdir():
            if entry.name not in KEEP_IN_CACHE:
                delete(entry)
    if not keep_unsealed and unsealed is not None:
        unsealed.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- the backend


@dataclass(slots=True)
class ReferenceFaults:
    """Knobs the tests turn (as `SimFaults`): failures, a wrong ticket or seed, bad proofs."""

    fail_tasks: dict[TaskType, int] = field(default_factory=dict)
    #: Seal these sectors with a wrong ticket (CommR then cannot match the chain's ticket).
    wrong_ticket: set[int] = field(default_factory=set)
    #: Prove these sectors with a wrong seed.
    wrong_seed: set[int] = field(default_factory=set)
    corrupt_proofs: set[int] = field(default_factory=set)
    fail_remove: int = 0


class ReferenceBackend:
    """Real files and commitments under the storage paths `roots` (path id -> directory)."""

    name = "reference"

    def __init__(self, clock: Clock, miner: int, roots: Mapping[str, Path]) -> None:
        self.clock = clock
        self.miner = miner
        self.storage = Storage(roots)
        self.faults = ReferenceFaults()
        #: Tasks run, by type (for tests).
        self.runs: dict[TaskType, int] = {}

    @property
    def path_ids(self) -> tuple[str, ...]:
        """The storage path ids this backend has directories for."""
        return tuple(self.storage.roots)

    def scan_files(self) -> dict[tuple[str, int, FileType], int]:
        """This miner's sector files on disk (see `scan_sector_files`)."""
        return scan_sector_files(self.storage.roots, self.miner)

    def _start(self, job: Job) -> None:
        task = job.task_type
        self.runs[task] = self.runs.get(task, 0) + 1
        left = self.faults.fail_tasks.get(task, 0)
        if left > 0:
            self.faults.fail_tasks[task] = left - 1
            raise ReferenceSealerError(f"injected {task.short} failure for sector {job.sector}")

    async def _run(self, paths: SectorPaths, kind: str, fn: Callable[..., T], *args: Any) -> T:
        with self.storage.errors(paths, kind, f"{fn.__name__.strip('_')} on {paths.of(kind)}"):
            return await run_in_thread(self.clock, fn, *args)

    async def add_piece(
        self, job: Job, existing: list[int], size: int, piece: PendingPiece | None
    ) -> Piece:
        """Write the piece into the unsealed file; a deal piece's CommP comes from its data."""
        self._start(job)
        if piece is not None and piece.data_path is None:
            raise PieceDataError(
                f"piece {piece.piece_cid} has no data file; the reference sealer writes real bytes"
            )
        paths = self.storage.locate(job.sector, job.placement)
        data = piece.data_path if piece is not None else None
        sector_size, offset = job.sector.size, sum(existing)
        cid = await self._run(
            paths, "unsealed", write_piece, paths.unsealed, sector_size, offset, size, data
        )
        return Piece(cid, size, piece.deal if piece is not None else None)

    async def pre_commit1(self, job: Job, ticket: bytes, pieces: list[Piece]) -> bytes:
        """Check the unsealed file against CommD; write the cache metadata."""
        self._start(job)
        paths = self.storage.locate(job.sector, job.placement, fetch=("unsealed",))
        if job.sector.number in self.faults.wrong_ticket:
            ticket = hashlib.sha256(b"wrong" + ticket).digest()
        spec = [(p.piece_cid, p.size) for p in pieces]
        return await self._run(
            paths, "cache", pre_commit1, paths.unsealed, paths.cache, job.sector.size, ticket, spec
        )

    async def pre_commit2(self, job: Job, pc1out: bytes) -> PreCommit2Out:
        """Write the sealed file recording CommR."""
        self._start(job)
        paths = self.storage.locate(job.sector, job.placement, fetch=("cache", "sealed"))
        args = (self.miner, job.sector.number, job.sector.size, pc1out, paths.sealed, paths.cache)
        sealed, unsealed = await self._run(paths, "sealed", pre_commit2, *args)
        return PreCommit2Out(sealed, unsealed)

    async def commit1(
        self, job: Job, ticket: bytes, seed: bytes, pieces: list[Piece], cids: PreCommit2Out
    ) -> bytes:
        """Re-read the sealed file: the proof binds the CommR found there, not the one asked."""
        self._start(job)
        paths = self.storage.locate(job.sector, job.placement)
        if job.sector.number in self.faults.wrong_seed:
            seed = hashlib.sha256(b"wrong" + seed).digest()
        return await self._run(
            paths, "sealed", commit1, paths.sealed, job.sector.size, ticket, seed
        )

    async def commit2(self, job: Job, c1out: bytes) -> bytes:
        """The proof (corrupted on request)."""
        self._start(job)
        proof = commit2(self.miner, job.sector.number, c1out)
        if job.sector.number in self.faults.corrupt_proofs:
            proof = bytes([proof[0] ^ 0xFF]) + proof[1:]
        return proof

    async def finalize(self, job: Job, keep_unsealed: bool) -> None:
        """Drop the cache scratch, and the unsealed file unless kept."""
        self._start(job)
        paths = self.storage.locate(job.sector, job.placement)
        await self._run(paths, "cache", finalize, paths.cache, paths.unsealed, keep_unsealed)

    async def release_unsealed(self, sector: SectorRef) -> None:
        """Delete the unsealed file wherever it is."""
        await run_in_thread(self.clock, remove_files, self.storage.everywhere(sector, "unsealed"))

    async def remove(self, sector: SectorRef) -> None:
        """Delete the unsealed, sealed and cache files on every path."""
        if self.faults.fail_remove > 0:
            self.faults.fail_remove -= 1
            raise ReferenceSealerError(f"injected removal failure for sector {sector}")
        paths = [p for kind in KINDS for p in self.storage.everywhere(sector, kind)]
        await run_in_thread(self.clock, remove_files, paths)
        self.storage.forget(sector)  # (after the files: a crash between keeps them claimed)


class ReferenceFactory:
    """The registry's `reference`: real files under the storage paths; only `storage` options."""

    name = "reference"
    keeps_files = True

    def check(
        self, repo: Path, options: Mapping[str, Any], workers: Sequence[WorkerSpec] | None
    ) -> None:
        """The storage directories are given well, and no other option is."""
        check_storage(repo, options, workers)
        unknown = sorted(set(options) - {"storage"})
        if unknown:
            raise ValueError(f"unknown option(s) for the reference sealer: {', '.join(unknown)}")

    def create(
        self,
        *,
        clock: Clock,
        miner: int,
        repo: Path,
        options: Mapping[str, Any],
        time_scale: float,
    ) -> ReferenceBackend:
        """A `ReferenceBackend`, its storage directories created."""
        roots = check_storage(repo, options, None)
        check_roots(roots)
        return ReferenceBackend(clock, miner, roots)

    def default_workers(self, repo: Path) -> list[WorkerSpec]:
        """One local worker whose one path is `<repo>/storage` (`files.local_workers`)."""
        return local_workers(repo)
