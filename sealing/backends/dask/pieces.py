"""Deal piece data sent from the engine to the worker that runs AddPiece: no shared filesystem.

Lotus's manager streams a piece's bytes to the worker's AddPiece over its RPC connection
(`extern/sector-storage/worker_local.go@v1.11.3`, the `storage.Data` reader that `lib/rpcenc`
carries); here the engine pushes the file through Dask's `client.run` (via the scheduler, so
no connection from the engine to the worker is assumed) into the worker's staging copy, which
AddPiece then reads as a local file. Like a fetch between workers (`transfer.py`):

* chunks (8 MiB by default, never the whole file in memory), each with a CRC-32 the worker
  checks before it writes, into `NAME.part` (the `partfile.py` format);
* the whole file's sha256, computed by the engine first, checked by the worker before the
  `.part` is renamed into place;
* a dropped connection is retried with backoff; a later send resumes after the verified bytes,
  and a staging copy that already holds the same bytes is kept as is;
* the worker writes only under its storage roots (the `FileServer` plugin's).
"""

from __future__ import annotations

import asyncio
import json
import os
import zlib
from pathlib import Path
from typing import Any

from distributed import Client
from distributed.worker import Worker

from .fileserver import CHUNK, MAX_CHUNK, TransferError, retry_pause, worker_target
from .partfile import fsync_dir, place, resume, sha256_of
from .progress import Reporter

#: The directory, under a worker storage path, that holds staged piece data.
STAGING = "pieces"


def _parts(target: Path) -> tuple[Path, Path]:
    return target.with_name(target.name + ".part"), target.with_name(target.name + ".part.src")


def _begin(target: Path, stamp: dict[str, Any], chunk: int) -> dict[str, Any]:
    same_size = target.is_file() and target.stat().st_size == stamp["size"]
    if same_size and sha256_of(target) == stamp["sha256"]:
        return {"kept": True, "offset": stamp["size"], "tid": ""}
    target.parent.mkdir(parents=True, exist_ok=True)
    part, stampfile = _parts(target)
    offset, tid = resume(part, stampfile, stamp, chunk)
    part.touch()  # a new send: each chunk opens it to write in place
    return {"kept": False, "offset": offset, "tid": tid}


async def receive_begin(
    dest: str, stamp: dict[str, Any], chunk: int, dask_worker: Worker
) -> dict[str, Any]:
    """For `client.run`: where a send of `stamp`'s file to `dest` resumes (or that it is in)."""
    target = worker_target(dask_worker, dest)
    return await asyncio.to_thread(_begin, target, stamp, chunk)


def _chunk(target: Path, tid: str, offset: int, data: bytes, crc: int) -> int:
    if zlib.crc32(data) != crc:
        raise TransferError(f"{target}: the chunk at {offset} arrived damaged")
    part, stampfile = _parts(target)
    if json.loads(stampfile.read_text()).get("tid") != tid:
        raise TransferError(f"{target}: another send of this file started meanwhile")
    with open(part, "r+b") as f:
        if os.fstat(f.fileno()).st_size < offset:
            raise TransferError(f"{target}: the chunk at {offset} leaves a gap")
        f.truncate(offset)  # a chunk sent again after a lost reply replaces its first copy
        f.seek(offset)
        f.write(data)
        return f.tell()


async def receive_chunk(
    dest: str, tid: str, offset: int, data: bytes, crc: int, dask_worker: Worker
) -> int:
    """For `client.run`: write one checked chunk of the staging copy; its new length."""
    target = worker_target(dask_worker, dest)
    return await asyncio.to_thread(_chunk, target, tid, offset, data, crc)


def _end(target: Path, sha256: str) -> int:
    part, stampfile = _parts(target)
    if sha256_of(part) != sha256:
        part.unlink(missing_ok=True)
        stampfile.unlink(missing_ok=True)
        raise TransferError(f"{target}: the whole file's sha256 does not match the engine's")
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    place(part, stampfile, target)
    return target.stat().st_size


async def receive_end(dest: str, sha256: str, dask_worker: Worker) -> int:
    """For `client.run`: check the staging copy's sha256 and rename it into place."""
    target = worker_target(dask_worker, dest)
    return await asyncio.to_thread(_end, target, sha256)


def _discard(target: Path) -> None:
    part, stampfile = _parts(target)
    for p in (target, part, stampfile):
        p.unlink(missing_ok=True)
    fsync_dir(target.parent)


async def discard(dest: str, dask_worker: Worker) -> None:
    """For `client.run`: delete a staging copy (and any unfinished part of it)."""
    target = worker_target(dask_worker, dest)
    await asyncio.to_thread(_discard, target)


async def _run(
    client: Client, address: str, attempts: float, backoff: float, fn: Any, *args: Any
) -> Any:
    """`fn(*args)` on the worker at `address`, retried on dropped connections."""
    failures = 0
    while True:
        try:
            answer = await client.run(fn, *args, workers=[address])
            return answer[address]
        except OSError as exc:  # CommClosedError and TimeoutError are OSErrors
            failures += 1
            await retry_pause(f"sending piece data to {address}", failures, attempts, backoff, exc)


async def send(
    client: Client,
    address: str,
    local: str,
    dest: str,
    *,
    chunk: int = CHUNK,
    attempts: int = 5,
    backoff: float = 0.2,
    progress: Reporter | None = None,
) -> dict[str, Any]:
    """Copy the engine's file `local` to `dest` on the worker at `address`; what was sent."""
    if chunk <= 0 or chunk > MAX_CHUNK:
        raise ValueError(f"chunk must be 1..{MAX_CHUNK} bytes, got {chunk}")
    try:
        st = await asyncio.to_thread(os.stat, local)
        digest = await asyncio.to_thread(sha256_of, Path(local))
    except FileNotFoundError:
        raise TransferError(f"piece data file {local} does not exist") from None
    except IsADirectoryError:
        raise TransferError(f"piece data file {local} is a directory") from None
    size = st.st_size
    stamp = {"source": f"engine:{local}", "size": size, "mtime_ns": st.st_mtime_ns}
    stamp["sha256"] = digest
    run = (client, address, attempts, backoff)
    start = await _run(*run, receive_begin, dest, stamp, chunk)
    offset, sent = int(start["offset"]), 0
    try:
        if progress is not None:
            progress(offset, size)
        if not start["kept"]:
            with open(local, "rb") as f:  # noqa: ASYNC230 (a chunk at a time, in a thread)
                while offset < size:
                    data = await asyncio.to_thread(os.pread, f.fileno(), chunk, offset)
                    if not data:
                        raise TransferError(f"piece data file {local} shrank while it was sent")
                    crc = zlib.crc32(data)
                    offset = await _run(*run, receive_chunk, dest, start["tid"], offset, data, crc)
                    sent += len(data)
                    if progress is not None:
                        progress(offset, size)
            await _run(*run, receive_end, dest, digest)
    except BaseException as exc:
        if progress is not None:
            progress.end(str(exc) or type(exc).__name__)
        raise
    if progress is not None:
        progress.end()
    return {"path": dest, "size": size, "sent": sent, "kept": bool(start["kept"])}
