"""The `reference` sealer's sector-file format: fr32 bytes, sparse regions, the sealed record.

The unsealed file holds each piece's bytes fr32-padded (`commp.Fr32Padder`) at its offset,
and zeros elsewhere, left as holes where the file system allows, so a committed-capacity
sector takes no blocks. The sealed file is sparse too: a header (`SEALED_MAGIC`, a length, a
JSON record with CommR and CommD, its sha256) and a trailer (`SEALED_MAGIC` and the digest
again) around a hole. Every function here is synchronous and takes explicit paths or file
descriptors; a `stop` event, when given, is checked between chunks (`files.check_stop`).
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import commp
from .files import check_stop

#: Unpadded bytes read per step (1 MiB once padded): memory stays constant for any piece.
CHUNK_IN = commp.FR32_IN << 13
CHUNK_OUT = commp.FR32_OUT << 13
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


def zeros(fd: int, start: int, end: int, stop: threading.Event | None, *, fix: bool) -> bool:
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


def region_commp(fd: int, offset: int, size: int, stop: threading.Event | None) -> str:
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


def open_sector_file(path: Path, sector_size: int) -> int:
    """A descriptor of the sector file, created (sparse, full size) if new."""
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


def sparse(path: Path, size: int) -> None:
    """Write `path` as a file of `size` bytes that takes no blocks (a stand-in)."""
    with open(path, "wb") as f:
        f.truncate(size)


def copy_padded(
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
