"""A job of the worker-side registry as its disk knows it: states, errors, record, spec.

The registry itself is `jobs.py`; these are the parts the engine and the worker share.

What survives what. A job's files (its `running` record, written before its child gets the
job; its result, written by the child; a `failed` or `cancelled` record if it ended so: one
that ends well keeps its `running` record, read as done beside its result, see `table.py`)
are written to a temporary file and renamed, without `fsync`: the page cache is the
kernel's, so all of them survive a kill (-9 included) of the worker, its spawner, its
children or the engine, and every guarantee of the registry holds across those. Only a power
loss or a kernel crash of the worker machine can lose or tear them, and that kills the job's
child too: after the reboot a job with no record runs again when it is submitted again (its
first run died unfinished with the machine, as a Lotus worker's call does), and a result
that is missing or torn (it carries a CRC-32) makes its job failed, never a wrong result.
Failed and cancelled records are still synced (rare, and they must not turn back into a
run); an acknowledgement may be undone by a crash, leaving a finished job's files until the
engine discards them. An `fsync` cost 0.3-4 ms of wall time per file here, most of a trivial
job's time, to survive a machine crash that the job itself does not survive.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass
from typing import Any

import msgpack

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_FUNC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


class JobState(enum.StrEnum):
    """Where a job is: running, or finished one of three ways."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobSpecError(ValueError):
    """A job that cannot be started as asked (bad id, function path or arguments)."""


class JobError(RuntimeError):
    """A job that did not give a result; `str()` is one line the engine can show."""

    def __init__(self, job_id: str, detail: str) -> None:
        super().__init__(f"job {job_id} {detail}")
        self.job_id = job_id
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        """Rebuild from the two fields (Dask pickles the error back to the engine)."""
        return (type(self), (self.job_id, self.detail))


class JobFailed(JobError):
    """The child failed, or died with its worker; `detail` ends with its stderr's last line."""


class JobCancelled(JobError):
    """The job was killed by request (or cancelled before it started)."""


@dataclass(slots=True)
class JobRecord:
    """A job as its worker's disk knows it."""

    job_id: str
    func: str
    state: JobState
    #: The child's pid (also its process group); 0 before it started.
    pid: int = 0
    started: float = 0.0
    finished: float = 0.0
    exit_code: int | None = None
    #: One line: why it failed or was cancelled.
    error: str = ""
    #: sha256 of the function path and arguments, so an id is never reused for other work.
    digest: str = ""

    def encode(self) -> bytes:
        """The record as msgpack."""
        # Not `dataclasses.asdict`: its deep copy was a tenth of a job's bookkeeping.
        fields = {name: getattr(self, name) for name in _RECORD_FIELDS}
        return msgpack.packb(fields, use_bin_type=True)  # type: ignore[no-any-return]

    @classmethod
    def decode(cls, raw: bytes) -> JobRecord:
        """A record from `encode`'s bytes."""
        fields = msgpack.unpackb(raw, raw=False)
        fields["state"] = JobState(fields["state"])
        return cls(**fields)


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(JobRecord))


class JobDetached(JobError):
    """The worker that waited for the job closed; the job still runs (resubmit to attach)."""


def check_job_id(job_id: object) -> str:
    """`job_id` if it can name a job directory, else a one-line `JobSpecError`."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise JobSpecError(
            f"bad job id {job_id!r}: use 1-128 letters, digits, '.', '_' or '-' (e.g. PC1-s12-a3)"
        )
    return job_id


def encode_spec(func: object, args: object) -> bytes:
    """The child's spec file for `func(*args)`, or a one-line `JobSpecError`."""
    if not isinstance(func, str) or not _FUNC.fullmatch(func):
        raise JobSpecError(f"bad job function {func!r}: give an importable 'module:function'")
    if not isinstance(args, list | tuple):
        raise JobSpecError(f"bad job arguments for {func}: a list, not {type(args).__name__}")
    try:
        return msgpack.packb([func, list(args)], use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise JobSpecError(f"job arguments for {func} are not msgpack-encodable: {exc}") from None
