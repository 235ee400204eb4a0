"""The source side of worker-to-worker file transfers: the `FileServer` worker plugin.

It registers three comm handlers on the worker (`sectorfsm_stat`, `sectorfsm_read`,
`sectorfsm_digest`) that serve files under the worker's declared storage roots only (no `..`,
no absolute path elsewhere, no symlink leading out of a root), a chunk at a time with its
CRC-32, and the whole file's sha256 computed as the chunks are served in order. A chunk that
is a hole in a sparse file crosses as its length. The pulling side is `transfer.py`.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol

from distributed import WorkerPlugin
from distributed.worker import Worker

#: Bytes per chunk unless the caller says otherwise.
CHUNK = 8 << 20
#: The largest chunk a source serves: a client cannot make it hold a whole file in memory.
MAX_CHUNK = 64 << 20
#: The worker plugin's name and its comm handlers.
PLUGIN_NAME = "sectorfsm-files"
STAT_OP = "sectorfsm_stat"
READ_OP = "sectorfsm_read"
DIGEST_OP = "sectorfsm_digest"
#: Backoff between retries doubles up to this many seconds.
MAX_BACKOFF = 5.0


class TransferError(RuntimeError):
    """A transfer failed for good: the message says which file and why."""


class PathRefused(TransferError):
    """The path is not under one of the worker's storage roots."""


class SourceChanged(TransferError):
    """The source file changed (size or mtime) while it was being pulled."""


class Hasher(Protocol):
    """What of `hashlib.sha256()` the transfers use."""

    def update(self, data: bytes, /) -> None:
        """Add `data` to the digest."""
        ...

    def copy(self) -> Hasher:
        """An independent copy of the state so far."""
        ...

    def hexdigest(self) -> str:
        """The digest so far, in hex."""
        ...


def confine(roots: Iterable[Path], path: str) -> Path:
    """The real path of absolute `path` if it lies under one of `roots`, else `PathRefused`."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise PathRefused(f"bad path {path!r}")
    if not os.path.isabs(path):
        raise PathRefused(f"{path!r} is not an absolute path")
    if ".." in PurePosixPath(path).parts:
        raise PathRefused(f"{path!r}: '..' is not allowed")
    # realpath resolves symlinks, so a link inside a root that points elsewhere is caught here.
    real = Path(os.path.realpath(path))
    for root in roots:
        if real.is_relative_to(os.path.realpath(root)):
            return real
    raise PathRefused(f"{path!r} is outside this worker's storage roots")


async def retry_pause(
    what: str, failures: int, attempts: float, backoff: float, exc: BaseException
) -> None:
    """Back off after the `failures`-th failure in a row, or give up with one clear error."""
    if failures >= attempts:
        raise TransferError(
            f"{what}: gave up after {failures} failed attempts in a row: {exc}"
        ) from exc
    await asyncio.sleep(min(backoff * 2 ** (failures - 1), MAX_BACKOFF))


def worker_target(worker: Worker, dest: str) -> Path:
    """`dest` confined to the worker's storage roots (its `FileServer` plugin's)."""
    server = worker.plugins.get(PLUGIN_NAME)
    if not isinstance(server, FileServer):
        raise TransferError(f"worker {worker.address} has no {PLUGIN_NAME} plugin (no roots)")
    return server.confine(dest)


@dataclass(slots=True)
class _Session:
    """A source's running sha256 over one transfer's chunks, served in order."""

    hasher: Hasher = field(default_factory=hashlib.sha256)
    pos: int = 0
    covered: bool = True
    # The hasher before each recent chunk: a chunk whose reply was lost is served again.
    snaps: dict[int, Hasher] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def feed(self, offset: int, data: bytes) -> None:
        """Add the chunk at `offset` to the running digest, rewinding to a recent snapshot."""
        if offset == 0:
            self.hasher, self.pos, self.covered, self.snaps = hashlib.sha256(), 0, True, {}
        elif offset != self.pos:
            if offset in self.snaps:
                self.hasher, self.pos = self.snaps[offset].copy(), offset
            else:
                self.covered = False
        if not self.covered:
            return
        self.snaps[offset] = self.hasher.copy()
        for old in sorted(self.snaps)[:-2]:
            del self.snaps[old]
        self.hasher.update(data)
        self.pos = offset + len(data)


def _ident(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns]


def _hole(fd: int, offset: int, n: int) -> bool:
    """Whether the `n` bytes at `offset` hold no data (SEEK_DATA finds none before their end)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + n
    except OSError as e:
        # ENXIO: no data past `offset`; anything else: the filesystem cannot say, so read.
        return e.errno == errno.ENXIO


class FileServer(WorkerPlugin):
    """Worker plugin serving files under the worker's storage roots to other workers."""

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, roots: Iterable[str | os.PathLike[str]], *, max_sessions: int = 64) -> None:
        """Serve files under `roots` (directories); keep at most `max_sessions` digests going."""
        self.roots = tuple(Path(r) for r in roots)
        if not self.roots:
            raise ValueError("FileServer needs at least one storage root")
        self.max_sessions = max_sessions
        #: Every byte read from disk (chunks and fallback digests), and the largest single read.
        self.bytes_read = 0
        self.max_read = 0
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the configuration only (the plugin travels to workers by pickle)."""
        return {"roots": self.roots, "max_sessions": self.max_sessions}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild from `__getstate__`'s configuration, with fresh counters."""
        self.__init__(state["roots"], max_sessions=state["max_sessions"])  # type: ignore[misc]

    def setup(self, worker: Worker) -> None:
        """Register the comm handlers on `worker`."""
        worker.handlers[STAT_OP] = self.stat
        worker.handlers[READ_OP] = self.read
        worker.handlers[DIGEST_OP] = self.digest

    def teardown(self, worker: Worker) -> None:
        """Remove the comm handlers."""
        for op in (STAT_OP, READ_OP, DIGEST_OP):
            worker.handlers.pop(op, None)

    def confine(self, path: str) -> Path:
        """The real path of `path` if it is under one of this worker's roots."""
        return confine(self.roots, path)

    async def stat(self, path: str) -> dict[str, Any]:
        """Handler: a file's size and mtime, or a directory tree's files and subdirectories."""
        return await asyncio.to_thread(self._stat, self.confine(path))

    def _stat(self, real: Path) -> dict[str, Any]:
        try:
            st = real.stat()
        except FileNotFoundError:
            raise TransferError(f"{real}: no such file on the source worker") from None
        if stat.S_ISREG(st.st_mode):
            return {"kind": "file", "path": str(real), "ident": _ident(st)}
        if not stat.S_ISDIR(st.st_mode):
            raise TransferError(f"{real}: not a regular file or directory")
        files: list[dict[str, Any]] = []
        dirs: list[str] = []
        for top, subdirs, names in os.walk(real):
            for name in sorted(subdirs + names):
                full = Path(top, name)
                rel = full.relative_to(real).as_posix()
                st = full.lstat()
                if stat.S_ISLNK(st.st_mode):
                    raise TransferError(f"{full}: symlinks are not served in a directory tree")
                if stat.S_ISDIR(st.st_mode):
                    dirs.append(rel)
                elif stat.S_ISREG(st.st_mode):
                    files.append({"rel": rel, "ident": _ident(st)})
                else:
                    raise TransferError(f"{full}: not a regular file or directory")
        return {"kind": "dir", "path": str(real), "files": files, "dirs": dirs}

    async def read(self, path: str, offset: int, size: int, tid: str, ident: list[int]) -> Any:
        """Handler: `size` bytes at `offset`, their CRC-32, and the file's sha256 at the end."""
        if not isinstance(offset, int) or not isinstance(size, int) or offset < 0 or size <= 0:
            raise TransferError(f"bad read request: offset {offset!r}, size {size!r}")
        real = self.confine(path)
        return await asyncio.to_thread(self._read, real, offset, min(size, MAX_CHUNK), tid, ident)

    def _session(self, tid: str) -> _Session:
        with self._lock:
            session = self._sessions.pop(tid, None) or _Session()
            self._sessions[tid] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
            return session

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n
            self.max_read = max(self.max_read, n)

    def _read(self, real: Path, offset: int, size: int, tid: str, ident: list[int]) -> Any:
        session = self._session(tid)
        with session.lock, self._open(real, ident) as f:
            n = max(0, min(size, ident[0] - offset))
            if n and _hole(f.fileno(), offset, n):
                # A hole in a sparse file (an unsealed sector mostly is) crosses as its length.
                session.feed(offset, bytes(n))
                data, hole = b"", n
            else:
                f.seek(offset)
                data, hole = f.read(n), 0
                self._count(len(data))
                session.feed(offset, data)
            end = offset + len(data) + hole >= ident[0]
            digest = session.hasher.hexdigest() if end and session.covered else None
        return {"data": data, "hole": hole, "crc32": zlib.crc32(data), "sha256": digest}

    @staticmethod
    def _open(real: Path, ident: list[int]) -> BinaryIO:
        try:
            f = open(real, "rb")  # noqa: SIM115 (closed by the caller's with)
        except FileNotFoundError:
            raise TransferError(f"{real}: no such file on the source worker") from None
        if _ident(os.fstat(f.fileno())) != list(ident):
            f.close()
            raise SourceChanged(f"{real} changed on the source worker during the transfer")
        return f

    async def digest(self, path: str, ident: list[int]) -> dict[str, Any]:
        """Handler: the whole file's sha256, read again (when no in-order session has it)."""
        real = self.confine(path)
        return {"sha256": await asyncio.to_thread(self._digest, real, ident)}

    def _digest(self, real: Path, ident: list[int]) -> str:
        hasher = hashlib.sha256()
        with self._open(real, ident) as f:
            while data := f.read(CHUNK):
                self._count(len(data))
                hasher.update(data)
        return hasher.hexdigest()
