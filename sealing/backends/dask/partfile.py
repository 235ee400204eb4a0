"""The `.part` files a transfer writes into before it renames the finished file into place.

`NAME.part` holds the bytes verified so far, written in order, and `NAME.part.src` a stamp
naming the source version they came from (and the transfer id): a later transfer of the same
version resumes after the verified bytes, any other starts over. Used by the pulling side
(`transfer.py`) and by the piece data the engine sends to a worker (`pieces.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from .fileserver import CHUNK, Hasher


def fsync_dir(path: Path) -> None:
    """Make a rename in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resume(part: Path, stampfile: Path, stamp: dict[str, Any], chunk: int) -> tuple[int, str]:
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


def open_part(part: Path, verified: int, chunk: int) -> tuple[BinaryIO, Hasher]:
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


def write_at(f: BinaryIO, offset: int, data: bytes | int, hasher: Hasher) -> None:
    """Write `data` at `offset`, or extend the file by a hole of `data` bytes."""
    if isinstance(data, int):
        f.truncate(offset + data)  # chunks arrive in order, so this extends by a hole
        hasher.update(bytes(data))
        return
    f.seek(offset)
    f.write(data)
    hasher.update(data)


def place(part: Path, stampfile: Path, dest: Path) -> None:
    """Rename the finished `part` over `dest` (atomic) and drop its stamp."""
    os.rename(part, dest)
    stampfile.unlink(missing_ok=True)
    fsync_dir(dest.parent)


def sha256_of(path: Path) -> str:
    """The sha256 of a local file, read a chunk at a time."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(CHUNK):
            hasher.update(data)
    return hasher.hexdigest()
