"""The child process of one job on a Dask worker: `python -m ...dask.child PREFIX`.

A job's files sit side by side in its table's directory, named `PREFIX.NAME` with `PREFIX`
the directory and the job id (`job_file`): no directory per job, whose creation and removal
cost more CPU than the rest of a trivial job's files together (a fresh directory's first
file costs an ext4 inode allocation in another block group). It reads `PREFIX.spec`
(msgpack: an importable function path `module:name` and its arguments; a warm child of the
spawner's pool gets those bytes from the worker instead), calls the function and writes its
result to `PREFIX.result` (`seal_result`; atomically: a result file is complete or absent,
short of a power loss of the machine, see `jobs.py`). A failure prints its traceback to
stderr (the worker keeps the tail) and exits 1. Nothing else: the registry in `jobs.py` owns
the job record.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

SPEC = "spec"
#: The job's record, which only the registry (`jobs.py`) writes.
RECORD = "record"
RESULT = "result"
#: The job's stdout and stderr (the worker keeps its last line for a failure).
OUTPUT = "output"
#: Every file a job may have.
JOB_FILES = (RESULT, OUTPUT, SPEC, RECORD)


def child_output(root: str, pid: int) -> str:
    """The stdout and stderr of warm child `pid` serving the table at `root`.

    One file per child, emptied at each job, instead of a new file per job (its creation was
    a tenth of a trivial job's CPU): a job that fails gets it as its own output file. A `+`
    is never in a job id, so no job's file has this name.
    """
    return f"{root}/+child-{pid}.{OUTPUT}"


def job_file(prefix: str, name: str) -> str:
    """The path of the job's file `name` (`RECORD`, `RESULT`, ...) for its path `prefix`.

    Job ids may hold dots, yet `ID.NAME` names one job's file only: no name (nor its
    `.tmp`) ends with `.` and another name.
    """
    return f"{prefix}.{name}"


def resolve(path: str) -> Callable[..., Any]:
    """The function named by `module:qualname` (imported here, in the child)."""
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{path} is not callable")
    return obj  # type: ignore[no-any-return]


def seal_result(result: Any) -> bytes:
    """`result` as the result file holds it: msgpack, then its CRC-32 (4 bytes, big-endian).

    The checksum tells a result torn by a power loss (unsynced blocks read back as zeros or
    nothing) from a real one, which msgpack alone cannot for short values.
    """
    payload: bytes = msgpack.packb(result, use_bin_type=True)
    return payload + zlib.crc32(payload).to_bytes(4, "big")


def open_result(raw: bytes) -> Any:
    """The result that `seal_result` wrote as `raw`; `ValueError` if it is torn."""
    payload, crc = raw[:-4], raw[-4:]
    if len(raw) < 5 or zlib.crc32(payload).to_bytes(4, "big") != crc:
        raise ValueError("result file torn (checksum mismatch)")
    return msgpack.unpackb(payload, raw=False, strict_map_key=False)


def write_atomic(path: str | Path, data: bytes, sync: bool = True) -> None:
    """Write `data` to `path` so that a reader sees all of it or no file.

    `sync=False` skips the fsync: the file then survives a crash of our processes but
    not of the machine (for what a later durable write makes redundant).
    """
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:  # one call for these small files; a loop for a short write
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def main(argv: list[str], spec: bytes | None = None) -> int:
    """Run the job of path prefix `argv[1]` (spec given, or read from its spec file); 0 once
    its result is written."""
    prefix = argv[1]
    try:
        raw = Path(job_file(prefix, SPEC)).read_bytes() if spec is None else spec
        func, args = msgpack.unpackb(raw, raw=False)
        result = resolve(func)(*args)
        # Not synced: the page cache keeps it across a kill of any of our processes, and
        # after a power loss the registry reads a lost or torn result as a failed job.
        write_atomic(job_file(prefix, RESULT), seal_result(result), sync=False)
    except BaseException:  # whatever it was, the worker shows its last line
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
