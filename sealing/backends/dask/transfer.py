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
import hashlib
import logging
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from distributed import get_worker

from .fileserver import (
    CHUNK,
    DIGEST_OP,
    MAX_CHUNK,
    PLUGIN_NAME,
    READ_OP,
    STAT_OP,
    FileServer,
    PathRefused,
    SourceChanged,
    TransferError,
    confine,
    retry_pause,
    worker_target,
)
from .partfile import fsync_dir, open_part, place, resume, sha256_of, write_at
from .progress import PROGRESS_TOPIC, Reporter

__all__ = [
    "CHUNK",
    "PLUGIN_NAME",
    "PROGRESS_TOPIC",
    "FileServer",
    "Fetched",
    "PathRefused",
    "SourceChanged",
    "TransferError",
    "confine",
    "fetch_here",
    "pull",
]

log = logging.getLogger("sectorfsm.cluster")

Progress = Callable[[int, int], None]
#: A file of a directory tree: its path relative to the tree and its [size, mtime_ns].
_Entry = tuple[PurePosixPath, list[int]]


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
    #: The destination held the source's content already: nothing was copied.
    kept: bool = False
    #: The destination held other content, replaced by the source's.
    replaced: bool = False


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
        await retry_pause(what, self.failures, self.attempts, self.backoff, exc)

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
    verified, tid = await asyncio.to_thread(resume, part, stampfile, stamp, p.chunk)
    f, hasher = await asyncio.to_thread(open_part, part, verified, p.chunk)
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
                await asyncio.to_thread(write_at, f, offset, data or hole, hasher)
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
    await asyncio.to_thread(place, part, stampfile, dest)
    p.result.files += 1
    p.result.sha256 = digest


def _local(target: Path) -> tuple[str | None, dict[str, int]]:
    """What is at `target`: "file", "dir", "other" or None, and its files' sizes by rel path."""
    if not os.path.lexists(target):
        return None, {}
    if target.is_symlink() or not (target.is_file() or target.is_dir()):
        return "other", {}
    if target.is_file():
        return "file", {"": target.stat().st_size}
    files = {
        q.relative_to(target).as_posix(): q.stat().st_size
        for q in target.rglob("*")
        if q.is_file() or q.is_symlink()
    }
    return "dir", files


async def _same(p: _Pull, src: str, ident: list[int], local: Path, size: int | None) -> bool:
    """Whether `local` (of `size` bytes, None: absent) holds what `src` holds: size, sha256."""
    if size != ident[0]:
        return False
    theirs = (await p.call(src, DIGEST_OP, path=src, ident=ident))["sha256"]
    return bool(await asyncio.to_thread(sha256_of, local) == theirs)


async def _already_there(p: _Pull, info: dict[str, Any], target: Path) -> bool | None:
    """None if `target` is absent; True if it is already a copy of the source; else False.

    A retried fetch whose copy finished before a crash finds its file in place. A copy with
    other content is replaced (through the `.part` path, renamed over it at the end) only
    when it is the same sector file; a file of another name is never overwritten.
    """
    kind, sizes = await asyncio.to_thread(_local, target)
    if kind is None:
        return None
    name = PurePosixPath(info["path"]).name
    if name != target.name:
        raise TransferError(f"{target} exists and is not a copy of {name}: not overwritten")
    if kind != info["kind"]:
        raise TransferError(f"{target} exists and is not a {info['kind']} like {name}")
    if kind == "file":
        if await _same(p, info["path"], info["ident"], target, sizes[""]):
            return True
    else:
        wanted = {_safe_rel(f["rel"]).as_posix(): f["ident"] for f in info["files"]}
        good = [
            rel
            for rel, ident in wanted.items()
            if await _same(p, f"{info['path']}/{rel}", ident, target / rel, sizes.get(rel))
        ]
        if len(good) == len(wanted) and set(sizes) == set(wanted):
            return True
        await asyncio.to_thread(_salvage_tree, target, good)
    log.warning("%s exists with other content than %s on the source: replacing it", target, name)
    p.result.replaced = True
    return False


def _salvage_tree(target: Path, good: list[str]) -> None:
    """Keep the verified files of an old copy of a tree as finished files of its staging."""
    staging = target.with_name(target.name + ".part")
    if not staging.exists():
        for rel in good:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            os.rename(target / rel, staging / rel)
    shutil.rmtree(target)


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
    fsync_dir(target.parent)


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

    `rpc` is the local worker's connection pool (`worker.rpc`). A `dest` that exists already
    is kept if it holds the source's content (`kept`), else replaced (`replaced`), see
    `_already_there`.
    """
    if chunk <= 0 or chunk > MAX_CHUNK:
        raise ValueError(f"chunk must be 1..{MAX_CHUNK} bytes, got {chunk}")
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    target = Path(dest)
    p = _Pull(rpc(source), attempts, backoff, request_timeout, chunk, progress, Fetched(target, 0))
    info = await p.call(path, STAT_OP, path=path)
    files = [(_safe_rel(f["rel"]), f["ident"]) for f in info.get("files", [])]
    if info["kind"] == "file":
        p.result.size = info["ident"][0]
    else:
        p.result.size = sum(ident[0] for _, ident in files)
    if await _already_there(p, info, target):
        p.result.kept = True
        p.result.files = len(files) if info["kind"] == "dir" else 1
        p.advanced(p.result.size)
        return p.result
    await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
    if info["kind"] == "file":
        await _pull_file(p, info["path"], info["ident"], target)
        return p.result
    dirs = [_safe_rel(d) for d in info["dirs"]]
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

    Progress goes to the worker's event log on topic `PROGRESS_TOPIC` (see `progress.py`),
    tagged with `job`, and ends with a last report, also when the pull fails.
    """
    worker = get_worker()
    target = worker_target(worker, dest)
    report = Reporter(job, lambda msg: worker.log_event(PROGRESS_TOPIC, msg))
    try:
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
    except BaseException as exc:
        report.end(str(exc) or type(exc).__name__)
        raise
    report.end()
    return {
        "path": str(got.path),
        "size": got.size,
        "fetched": got.fetched,
        "holes": got.holes,
        "files": got.files,
        "retries": got.retries,
        "sha256": got.sha256,
        "kept": got.kept,
        "replaced": got.replaced,
    }
