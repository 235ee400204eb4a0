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
explicit paths, so an external sealer (examples/command_sealer.py) can reuse them.
`ReferenceBackend` finds the paths (`Storage`), runs the functions in a thread and turns disk
errors into messages that name the storage path.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..fsm import Clock
from ..fsm.codec import packb, unpackb
from ..sched import FileType, SectorRef, TaskType
from . import commp, proofs
from .backends import KINDS, SectorPaths, Storage, check_stop, run_in_thread
from .info import PendingPiece, Piece
from .sealer import PreCommit2Out

if TYPE_CHECKING:
    from ..sched import Job

T = TypeVar("T")

#: Unpadded bytes read per step (1 MiB once padded): memory stays constant for any piece.
CHUNK_IN = commp.FR32_IN << 13
CHUNK_OUT = commp.FR32_OUT << 13
#: Cache files that finalize keeps (Lotus keeps p_aux, t_aux and tree-r-last).
KEEP_IN_CACHE = ("p_aux", "t_aux", "sc-02-data-tree-r-last.dat")
SEALED_MAGIC = b"sectorfsm-sealed"  # 16 bytes
_LEN = 4
_DIGEST = 32
_TRAILER = len(SEALED_MAGIC) + _DIGEST


class ReferenceSealerError(RuntimeError):
    """A sealing task of the reference backend cannot go on (the message says why)."""


class PieceDataError(ReferenceSealerError):
    """A deal piece's data file is missing, too large, or unusable."""


class SectorFileError(ReferenceSealerError):
    """A sector file is missing, corrupt, or disagrees with the sector's commitments."""


_MASK256 = (1 << 256) - 1


def _numpy() -> Any:
    """numpy if importable (the fast path), else None; imported lazily as commp does."""
    try:
        return importlib.import_module("numpy")
    except ImportError:
        return None


def fr32_unpad(padded: bytes | bytearray | memoryview) -> bytes:
    """Undo fr32 padding (a multiple of 128 bytes); fails if a padding bit is set."""
    n, rest = divmod(len(padded), commp.FR32_OUT)
    if rest:
        raise ValueError(f"fr32_unpad needs a multiple of 128 bytes, got {len(padded)}")
    np = _numpy() if commp.USE_NUMPY else None
    if np is not None and n >= 64:
        a = np.frombuffer(padded, dtype=np.uint8).reshape(n, commp.FR32_OUT)
        bad = np.flatnonzero(a[:, 31::32] & 0xC0)
        if bad.size:
            raise ValueError(f"not fr32 data: padding bits set in byte {int(bad[0]) * 32 + 31}")
        # Field element q of a block sits at bit 256q once padded and at bit 254q unpadded.
        out = np.empty((n, commp.FR32_IN), dtype=np.uint8)
        out[:, :31] = a[:, :31]
        out[:, 31] = a[:, 31] | (a[:, 32] << 6)
        np.bitwise_or(a[:, 32:63] >> 2, a[:, 33:64] << 6, out=out[:, 32:63])
        out[:, 63] = (a[:, 63] >> 2) | (a[:, 64] << 4)
        np.bitwise_or(a[:, 64:95] >> 4, a[:, 65:96] << 4, out=out[:, 64:95])
        out[:, 95] = (a[:, 95] >> 4) | (a[:, 96] << 2)
        np.bitwise_or(a[:, 96:127] >> 6, a[:, 97:128] << 2, out=out[:, 96:127])
        return bytes(out.data)
    parts = []
    view = memoryview(padded)
    for i in range(n):
        y = int.from_bytes(view[i * 128 : i * 128 + 128], "little")
        q = [(y >> (256 * k)) & _MASK256 for k in range(4)]
        if any(v >> 254 for v in q):
            raise ValueError(f"not fr32 data: padding bits set in block {i}")
        x = q[0] | q[1] << 254 | q[2] << 508 | q[3] << 762
        parts.append(x.to_bytes(commp.FR32_IN, "little"))
    return b"".join(parts)


def _data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Ranges of [start, end) that may hold data; holes of a sparse file are skipped."""
    seek_data = getattr(os, "SEEK_DATA", None)
    seek_hole = getattr(os, "SEEK_HOLE", None)
    pos = start
    while pos < end:
        if seek_data is None or seek_hole is None:
            yield pos, end
            return
        try:
            data = os.lseek(fd, pos, seek_data)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return  # nothing but a hole from pos to the end of the file
            yield pos, end  # not supported here: assume it is all data
            return
        if data >= end:
            return
        try:
            hole = os.lseek(fd, data, seek_hole)
        except OSError:
            hole = end
        if hole <= data:
            yield data, end
            return
        yield data, min(hole, end)
        pos = hole


def _pwrite_all(fd: int, buf: bytes, pos: int) -> int:
    view = memoryview(buf)
    while view:
        n = os.pwrite(fd, view, pos)
        view = view[n:]
        pos += n
    return pos


def _zeros(fd: int, start: int, end: int, stop: threading.Event | None, *, fix: bool) -> bool:
    """True if [start, end) reads as zeros; with `fix`, zero what is not (and return True)."""
    # Holes are skipped, so a filler stays sparse; writing only over non-zero bytes lets a
    # filler clear a failed piece's bytes without allocating the rest.
    for lo, hi in _data_extents(fd, start, end):
        pos = lo
        while pos < hi:
            check_stop(stop)
            buf = os.pread(fd, min(CHUNK_OUT, hi - pos), pos)
            if not buf:
                break
            if buf.count(0) != len(buf):
                if not fix:
                    return False
                _pwrite_all(fd, bytes(len(buf)), pos)
            pos += len(buf)
    return True


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _region_commp(fd: int, offset: int, size: int, stop: threading.Event | None) -> str:
    """The CommP of the padded bytes at [offset, offset + size) of a sector file."""
    unpadded = commp.unpadded_size(size)
    workers = _cpus() if unpadded >= commp.PARALLEL_MIN_BYTES else 1
    with commp.CommPHasher(workers=workers) as hasher:
        pos = offset
        while pos < offset + size:
            check_stop(stop)
            buf = os.pread(fd, min(CHUNK_OUT, offset + size - pos), pos)
            if not buf:
                break  # past the end of the file: zeros, as CommPHasher fills
            whole = len(buf) - len(buf) % commp.FR32_OUT
            hasher.update(fr32_unpad(buf[:whole]))
            pos += whole
        return hasher.cid(unpadded)


def _open_sector_file(path: Path, sector_size: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size < sector_size:
            os.ftruncate(fd, sector_size)  # sparse: no blocks until written
    except BaseException:
        os.close(fd)
        raise
    return fd


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


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
        fd = _open_sector_file(unsealed, sector_size)
        try:
            _zeros(fd, offset, offset + size, stop, fix=True)
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
        fd = _open_sector_file(unsealed, sector_size)
        try:
            cid, end = _copy_padded(src.fileno(), fd, offset, unpadded, data_path, stop)
            _zeros(fd, end, offset + size, stop, fix=True)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        src.close()
    return cid


def _copy_padded(
    src: int, fd: int, offset: int, unpadded: int, name: str, stop: threading.Event | None
) -> tuple[str, int]:
    """Stream data into the sector file, fr32-padded, hashing it on the way; (CommP, end)."""
    workers = _cpus() if unpadded >= commp.PARALLEL_MIN_BYTES else 1
    padder = commp.Fr32Padder()
    pos = offset
    with commp.CommPHasher(workers=workers) as hasher:
        while True:
            check_stop(stop)
            chunk = os.read(src, CHUNK_IN)
            if not chunk:
                break
            if hasher.length + len(chunk) > unpadded:
                raise PieceDataError(f"piece data file {name} grew past {unpadded} bytes")
            hasher.update(chunk)
            pos = _pwrite_all(fd, padder.update(chunk), pos)
        tail = -hasher.length % commp.FR32_IN
        if tail:  # the last block is zero-filled, as the CommP is
            pos = _pwrite_all(fd, padder.update(bytes(tail)), pos)
        padder.finish()
        return hasher.cid(unpadded), pos


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
            got = _region_commp(fd, start, size, stop)
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
    _sparse(cache / "sc-02-data-layer-1.dat", sector_size)
    _sparse(cache / "sc-02-data-tree-d.dat", 2 * sector_size - commp.NODE_SIZE)
    return packb({"v": 1, "comm_d": comm_d, "ticket": ticket, "sector_size": sector_size})


def _expect_zero(fd: int, start: int, end: int, path: Path, stop: threading.Event | None) -> None:
    if start < end and not _zeros(fd, start, end, stop, fix=False):
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
    _sparse(cache / "sc-02-data-tree-c.dat", sector_size)
    _sparse(cache / "sc-02-data-tree-r-last.dat", max(commp.NODE_SIZE, sector_size // 8))
    return comm_r, comm_d


def write_sealed(path: Path, record: dict[str, Any], sector_size: int) -> None:
    """Write a sparse sealed file recording `record` in its header and its digest at the end."""
    body = json.dumps(record, sort_keys=True).encode()
    head = SEALED_MAGIC + len(body).to_bytes(_LEN, "big") + body
    digest = hashlib.sha256(head).digest()
    if len(head) + _DIGEST + _TRAILER > sector_size:
        raise ReferenceSealerError(f"sealed record does not fit a {sector_size}-byte sector")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    # Written aside and renamed: a crash mid-write never leaves a half sealed file in place.
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _pwrite_all(fd, head + digest, 0)
        os.ftruncate(fd, sector_size)
        _pwrite_all(fd, SEALED_MAGIC + digest, sector_size - _TRAILER)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_sealed(path: Path, sector_size: int) -> dict[str, Any]:
    """The record of a sealed file, after re-checking its digest and trailer."""
    try:
        with open(path, "rb") as f:
            length = os.fstat(f.fileno()).st_size
            head = f.read(min(sector_size, 4096))
            f.seek(max(0, length - _TRAILER))
            trailer = f.read(_TRAILER)
    except FileNotFoundError:
        raise SectorFileError(f"sealed file {path} does not exist") from None
    if length != sector_size:
        raise SectorFileError(f"sealed file {path} is {length} bytes, not {sector_size}")
    start = len(SEALED_MAGIC) + _LEN
    if head[: len(SEALED_MAGIC)] != SEALED_MAGIC:
        raise SectorFileError(f"sealed file {path} is corrupt: no sealed-file header")
    n = int.from_bytes(head[len(SEALED_MAGIC) : start], "big")
    if start + n + _DIGEST > len(head):
        raise SectorFileError(f"sealed file {path} is corrupt: bad record length {n}")
    digest = head[start + n : start + n + _DIGEST]
    if hashlib.sha256(head[: start + n]).digest() != digest:
        raise SectorFileError(f"sealed file {path} is corrupt: record digest mismatch")
    if trailer != SEALED_MAGIC + digest:
        raise SectorFileError(f"sealed file {path} is corrupt: trailer does not match")
    try:
        record = json.loads(head[start : start + n])
    except ValueError as exc:
        raise SectorFileError(f"sealed file {path} is corrupt: {exc}") from None
    if not isinstance(record, dict) or not all(
        isinstance(record.get(k), str) for k in ("comm_r", "comm_d")
    ):
        raise SectorFileError(f"sealed file {path} is corrupt: no CommR/CommD in its record")
    return record


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
                _delete(entry)
    if not keep_unsealed and unsealed is not None:
        unsealed.unlink(missing_ok=True)


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


_KIND_TYPES = {"unsealed": FileType.UNSEALED, "sealed": FileType.SEALED, "cache": FileType.CACHE}


def scan_sector_files(
    roots: Mapping[str, Path], miner: int
) -> dict[tuple[str, int, FileType], int]:
    """`(path id, sector number, file type) -> bytes` of this miner's sector files on disk.

    Bytes are apparent sizes (a cache directory sums its files), the space the files take
    once fully written, as Lotus's overhead factors count it.
    """
    prefix = f"s-t0{miner}-"
    found: dict[tuple[str, int, FileType], int] = {}
    for pid, root in roots.items():
        for kind, ftype in _KIND_TYPES.items():
            try:
                entries = list(os.scandir(root / kind))
            except OSError:
                continue  # no such directory yet, or unreadable: nothing to count there
            for entry in entries:
                number = entry.name.removeprefix(prefix)
                if number == entry.name or not number.isdigit():
                    continue  # another miner's file, a temporary file, or not a sector file
                found[(pid, int(number), ftype)] = _apparent_size(Path(entry.path))
    return found


def _apparent_size(path: Path) -> int:
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
        return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir())
    except OSError:
        return 0  # deleted meanwhile


def remove_files(paths: Sequence[Path], *, stop: threading.Event | None = None) -> None:
    """Delete sector files and cache directories (and a sealed file left mid-write)."""
    for path in paths:
        _delete(path)
        _delete(path.with_name(f".{path.name}.tmp"))


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
