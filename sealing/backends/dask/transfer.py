"""Sector files moved worker to worker over Dask comms, without a shared filesystem.

Lotus's Fetch step (`extern/sector-storage/stores/remote.go@v1.11.3`) pulls a sector's files
from the worker that holds them over HTTP; here the source worker serves them through two comm
handlers that the `FileServer` worker plugin registers (`sectorfsm_stat`, `sectorfsm_read`, and
`sectorfsm_digest` as a fallback), and the destination worker pulls (`pull`, or `fetch_here` as
a Dask task pinned to the destination):

* only paths under the source worker's declared storage roots are served (no `..`, no absolute
  path elsewhere, no symlink leading out of a root);
* a file moves in chunks (8 MiB by default, never the whole file in memory) into `NAME.part`,
  each chunk checked by a CRC-32 the source computed from the bytes it read, the whole file by a
  sha256 the source computes as it serves the chunks in order; a good file is renamed into place
  (atomic on one filesystem) and a directory tree (a sector's `cache/`) arrives the same way,
  under `NAME.part/` until every file is in;
* a dropped connection, a timeout or a corrupted chunk is retried with exponential backoff, a
  bounded number of consecutive times; a later pull resumes from the `.part` file's verified
  length (its `NAME.part.src` stamp says which source version those bytes came from);
* a chunk that is a hole in a sparse source file (as most of an unsealed sector is) crosses as
  its length and stays a hole at the destination.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import stat
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol

from distributed import WorkerPlugin, get_worker
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
#: The event topic `fetch_here` reports progress on.
PROGRESS_TOPIC = "sectorfsm-transfer"
#: Backoff between retries doubles up to this many seconds.
MAX_BACKOFF = 5.0

Progress = Callable[[int, int], None]
#: A file of a directory tree: its path relative to the tree and its [size, mtime_ns].
_Entry = tuple[PurePosixPath, list[int]]


class TransferError(RuntimeError):
    """A transfer failed for good: the message says which file and why."""


class PathRefused(TransferError):
    """The path is not under one of the worker's storage roots."""


class SourceChanged(TransferError):
    """The source file changed (size or mtime) while it was being pulled."""


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def copy(self) -> _Hasher: ...
    def hexdigest(self) -> str: ...


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


@dataclass(slots=True)
class _Session:
    """A source's running sha256 over one transfer's chunks, served in order."""

    hasher: _Hasher = field(default_factory=hashlib.sha256)
    pos: int = 0
    covered: bool = True
    # The hasher before each recent chunk: a chunk whose reply was lost is served again.
    snaps: dict[int, _Hasher] = field(default_factory=dict)
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


# ------------------------------------------------------------------------------- the pulling side


@dataclass(slots=True)
class Fetched:
    """What one pull did: of `size` bytes in `files` files, `fetched` crossed the wire and
    `holes` were recreated as holes (sparse files)."""

    path: Path
    size: int
    fetched: int = 0
    holes: int = 0
    files: int = 0
    retries: int = 0
    sha256: str | None = None


class _Corrupt(Exception):
    """A chunk arrived damaged (retried like a dropped connection)."""


@dataclass(slots=True)
class _Pull:
    """One pull's connection, retry budget and progress."""

    rpc: Any
    attempts: int
    backoff: float
    timeout: float
    chunk: int
    progress: Progress | None
    result: Fetched
    done: int = 0
    failures: int = 0

    async def call(self, what: str, op: str, **kwargs: Any) -> Any:
        """Call handler `op` on the source, retrying dropped connections and timeouts."""
        while True:
            try:
                return await asyncio.wait_for(getattr(self.rpc, op)(**kwargs), self.timeout)
            except OSError as e:  # CommClosedError and TimeoutError are OSErrors
                await self.failed(what, e)

    async def failed(self, what: str, exc: BaseException) -> None:
        """Count a failure; back off, or give up with one clear error after too many."""
        self.failures += 1
        self.result.retries += 1
        if self.failures >= self.attempts:
            raise TransferError(
                f"{what}: gave up after {self.failures} failed attempts in a row: {exc}"
            ) from exc
        await asyncio.sleep(min(self.backoff * 2 ** (self.failures - 1), MAX_BACKOFF))

    def advanced(self, n: int) -> None:
        """`n` more bytes are verified: the failure count starts over."""
        self.failures = 0
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.result.size)


def _safe_rel(rel: str) -> PurePosixPath:
    """A relative path from a source's listing, refused if it could leave the tree."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\0" in rel:
        raise TransferError(f"the source listed a bad path {rel!r}")
    return p


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _resume(part: Path, stampfile: Path, stamp: dict[str, Any], chunk: int) -> tuple[int, str]:
    """The verified length of `part` for this source version (0 if none) and its transfer id."""
    try:
        old = json.loads(stampfile.read_text())
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and {k: old.get(k) for k in stamp} == stamp and part.exists():
        # Only verified chunks are written; rounding down drops a chunk a crash left half-written.
        verified = part.stat().st_size // chunk * chunk
        return verified, str(old.get("tid", uuid.uuid4().hex))
    tid = uuid.uuid4().hex
    part.unlink(missing_ok=True)
    stampfile.write_text(json.dumps({**stamp, "tid": tid}))
    return 0, tid


def _open_part(part: Path, verified: int, chunk: int) -> tuple[BinaryIO, _Hasher]:
    """`part` opened for writing after its `verified` bytes, and their sha256 (read again)."""
    f = open(part, "r+b" if verified else "w+b")  # noqa: SIM115 (the caller closes it)
    f.truncate(verified)
    hasher = hashlib.sha256()
    left = verified
    while left > 0:
        data = f.read(min(chunk, left))
        if not data:
            break
        hasher.update(data)
        left -= len(data)
    return f, hasher


def _write(f: BinaryIO, offset: int, data: bytes | int, hasher: _Hasher) -> None:
    """Write `data` at `offset`, or extend the file by a hole of `data` bytes."""
    if isinstance(data, int):
        f.truncate(offset + data)  # chunks arrive in order, so this extends by a hole
        hasher.update(bytes(data))
        return
    f.seek(offset)
    f.write(data)
    hasher.update(data)


def _place(part: Path, stampfile: Path, dest: Path) -> None:
    os.rename(part, dest)
    stampfile.unlink(missing_ok=True)
    _fsync_dir(dest.parent)


async def _pull_file(p: _Pull, src: str, ident: list[int], dest: Path) -> None:
    """Pull one file into `dest` through `dest.part`, resuming what an earlier pull verified."""
    try:
        await _pull_file_into(p, src, ident, dest)
    except OSError as e:  # local I/O only: `_Pull.call` turns the source's into TransferErrors
        raise TransferError(f"{dest}: cannot write the fetched file: {e}") from e


async def _pull_file_into(p: _Pull, src: str, ident: list[int], dest: Path) -> None:
    size = ident[0]
    part = dest.with_name(dest.name + ".part")
    stampfile = dest.with_name(dest.name + ".part.src")
    stamp = {"source": src, "size": size, "mtime_ns": ident[1]}
    verified, tid = await asyncio.to_thread(_resume, part, stampfile, stamp, p.chunk)
    f, hasher = await asyncio.to_thread(_open_part, part, verified, p.chunk)
    try:
        p.advanced(verified)
        offset, digest = verified, None
        while True:
            while offset < size:
                want = min(p.chunk, size - offset)
                rep = await p.call(
                    src, READ_OP, path=src, offset=offset, size=want, tid=tid, ident=ident
                )
                data, hole = rep["data"], rep["hole"]
                if len(data) + hole != want or zlib.crc32(data) != rep["crc32"]:
                    await p.failed(src, _Corrupt(f"chunk at {offset} arrived damaged"))
                    continue
                await asyncio.to_thread(_write, f, offset, data or hole, hasher)
                offset += want
                if hole:
                    p.result.holes += want
                else:
                    p.result.fetched += want
                digest = rep["sha256"] or None
                p.advanced(want)
            if digest is None:
                digest = (await p.call(src, DIGEST_OP, path=src, ident=ident))["sha256"]
            if hasher.hexdigest() == digest:
                break
            # Every chunk matched its CRC, so the damage is in the part file on disk: start over.
            await asyncio.to_thread(f.truncate, 0)
            hasher, offset, digest = hashlib.sha256(), 0, None
            p.done -= size
            await p.failed(src, _Corrupt("the whole file's sha256 does not match the source's"))
        await asyncio.to_thread(os.fsync, f.fileno())
    finally:
        f.close()
    await asyncio.to_thread(_place, part, stampfile, dest)
    p.result.files += 1
    p.result.sha256 = digest


def _prepare(target: Path) -> None:
    if target.exists():
        raise TransferError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)


def _stage_tree(staging: Path, dirs: list[PurePosixPath], files: list[_Entry]) -> list[bool]:
    """Create the tree's directories under `staging`; which files an earlier pull finished."""
    staging.mkdir(exist_ok=True)
    for rel in dirs:
        (staging / rel).mkdir(parents=True, exist_ok=True)
    # A file already renamed into place passed its whole-file check in an earlier pull.
    return [
        (there := staging / rel).is_file() and there.stat().st_size == ident[0]
        for rel, ident in files
    ]


def _finish_tree(staging: Path, target: Path) -> None:
    os.rename(staging, target)
    _fsync_dir(target.parent)


async def pull(
    rpc: Callable[[str], Any],
    source: str,
    path: str,
    dest: str | os.PathLike[str],
    *,
    chunk: int = CHUNK,
    attempts: int = 5,
    backoff: float = 0.2,
    request_timeout: float = 120.0,
    progress: Progress | None = None,
) -> Fetched:
    """Pull the file or directory tree `path` on worker `source` into `dest` on this machine.

    `rpc` is the local worker's connection pool (`worker.rpc`). `dest` must not exist yet.
    """
    if chunk <= 0 or chunk > MAX_CHUNK:
        raise ValueError(f"chunk must be 1..{MAX_CHUNK} bytes, got {chunk}")
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    target = Path(dest)
    p = _Pull(rpc(source), attempts, backoff, request_timeout, chunk, progress, Fetched(target, 0))
    await asyncio.to_thread(_prepare, target)
    info = await p.call(path, STAT_OP, path=path)
    if info["kind"] == "file":
        p.result.size = info["ident"][0]
        await _pull_file(p, info["path"], info["ident"], target)
        return p.result
    files = [(_safe_rel(f["rel"]), f["ident"]) for f in info["files"]]
    dirs = [_safe_rel(d) for d in info["dirs"]]
    p.result.size = sum(ident[0] for _, ident in files)
    staging = target.with_name(target.name + ".part")
    finished = await asyncio.to_thread(_stage_tree, staging, dirs, files)
    for (rel, ident), done in zip(files, finished, strict=True):
        if done:
            p.advanced(ident[0])
            p.result.files += 1
        else:
            await _pull_file(p, f"{info['path']}/{rel}", ident, staging / rel)
    p.result.sha256 = None
    await asyncio.to_thread(_finish_tree, staging, target)
    return p.result


async def fetch_here(
    source: str,
    path: str,
    dest: str,
    *,
    chunk: int = CHUNK,
    attempts: int = 5,
    backoff: float = 0.2,
    job: str = "",
) -> dict[str, Any]:
    """Dask task for the destination worker: pull `path` from `source` to `dest` under its roots.

    Progress goes to the worker's event log on topic `PROGRESS_TOPIC` (at most once a second,
    and at the end), tagged with `job`.
    """
    worker = get_worker()
    server = worker.plugins.get(PLUGIN_NAME)
    if not isinstance(server, FileServer):
        raise TransferError(f"worker {worker.address} has no {PLUGIN_NAME} plugin (no roots)")
    target = server.confine(dest)
    last = 0.0

    def report(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if done >= total or now - last >= 1.0:
            last = now
            worker.log_event(PROGRESS_TOPIC, {"job": job, "done": done, "total": total})

    got = await pull(
        worker.rpc,
        source,
        path,
        target,
        chunk=chunk,
        attempts=attempts,
        backoff=backoff,
        progress=report,
    )
    return {
        "path": str(got.path),
        "size": got.size,
        "fetched": got.fetched,
        "holes": got.holes,
        "files": got.files,
        "retries": got.retries,
        "sha256": got.sha256,
    }
