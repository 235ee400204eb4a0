"""A worker's job table: the records on its disk and the children that run its jobs now.

The Dask side (the plugin that holds a table, the task the engine submits, the engine's
calls) is `jobs.py`, which says why jobs run this way; what survives what is in
`jobrecord.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import dask.config

from .child import (
    JOB_FILES,
    OUTPUT,
    RECORD,
    RESULT,
    SPEC,
    child_output,
    job_file,
    open_result,
    write_atomic,
)
from .jobrecord import (
    JobCancelled,
    JobDetached,
    JobFailed,
    JobRecord,
    JobSpecError,
    JobState,
    check_job_id,
    encode_spec,
)
from .pool import CONFIG_KEY, PoolConfig
from .procs import describe_exit, kill_stray, last_line, signal_child
from .spawner import SpawnedChild, Spawner, WarmChild, fresh_child
from .sweeper import Sweeper

#: Seconds between SIGTERM and SIGKILL when a job is killed.
KILL_GRACE = 5.0
#: What `_result` gives for a result file that is missing or unreadable.
_LOST: Any = object()


class _Wake(Protocol):
    def set(self) -> None: ...


class LoopWake:
    """Wakes a coroutine waiting on its event loop for a job, from any thread."""

    __slots__ = ("_future", "_loop")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._future: asyncio.Future[None] = self._loop.create_future()

    def set(self) -> None:
        """Resolve the wait (on its loop's next turn; nothing once the loop is closed)."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    async def wait(self) -> None:
        """Until `set`."""
        await self._future


@dataclass(slots=True)
class _Active:
    #: Its child; None while the job is claimed but not handed to a child yet.
    proc: SpawnedChild | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    #: Set before the child is signalled: how its end is recorded if it leaves no result.
    ending: tuple[JobState, str] | None = None
    #: One per task waiting for this job (a thread's event or a coroutine's `LoopWake`):
    #: set when it ends or the waiters detach.
    waiters: list[_Wake] = dataclasses.field(default_factory=list)
    #: Its record as it ended: its waiters answer from it even if a discard (kill, then
    #: forget) deleted the record before they woke.
    final: JobRecord | None = None
    #: Its record as it started (the table's copy: what `_finish` completes, unread).
    record: JobRecord | None = None


class JobTable:
    """The jobs of one worker: records under `root`, children running now in memory."""

    def __init__(self, root: Path, pool: PoolConfig | None = None) -> None:
        self.root = root
        self._root = str(root)  # the hot paths join strings: pathlib was a tenth of their CPU
        self._made = False  # whether `root` is known to exist
        self._tidied = False  # whether `_tidy` ran (once: before this table's first job)
        self._lock = threading.Lock()
        self._active: dict[str, _Active] = {}
        self._spawner = Spawner(pool if pool is not None else pool_config())
        self._sweeper = Sweeper(f"{self._root}+trash")  # `+` is never in a worker's name

    def warm(self) -> None:
        """Start the job spawner now, before any job (a no-op while it runs)."""
        self._spawner.warm()

    def spawner_pid(self) -> int | None:
        """The pid of the table's spawner process while it runs."""
        return self._spawner.pid

    # ------------------------------------------------------------------ records

    def _prefix(self, job_id: str) -> str:
        """The path of job `job_id`'s files without their name (`child.job_file`)."""
        return f"{self._root}/{job_id}"

    def _path(self, job_id: str, name: str) -> str:
        return f"{self._root}/{job_id}.{name}"

    def _read(self, job_id: str, settle: bool = True) -> JobRecord | None:
        """The job's record; with `settle`, a finished `running` one reads as `done`.

        A job that ends well gets no `done` record (one write less per job): every other
        end writes its record before the job leaves `_active`, so a `running` record of a
        job this table no longer runs is done (its result says how, or is lost with a power
        loss). `recover` reads unsettled records: their children may live on.
        """
        try:
            with open(self._path(job_id, RECORD), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            record = JobRecord.decode(raw)
        except (ValueError, TypeError, KeyError) as exc:
            error = f"failed: its record on the worker is unreadable ({exc})"
            return JobRecord(job_id, "", JobState.FAILED, error=error)
        if settle and record.state is JobState.RUNNING and job_id not in self._active:
            record.state, record.exit_code = JobState.DONE, 0
            with contextlib.suppress(OSError):
                # File times come from the kernel's coarse clock, which can lag
                # `time.time()` (the start) by a tick: a job never ends before it starts.
                mtime = os.stat(self._path(job_id, RESULT)).st_mtime
                record.finished = max(mtime, record.started)
        return record

    def _write(self, record: JobRecord, sync: bool = True) -> None:
        write_atomic(self._path(record.job_id, RECORD), record.encode(), sync)

    def _write_first(self, record: JobRecord) -> None:
        """Write a new job's first record in place, unsynced: one file, no rename.

        A kill can leave it empty (between the open and the one write of these few hundred
        bytes), which reads as an unreadable record: a failed job, never one run twice,
        since no child has the job yet.
        """
        path = self._path(record.job_id, RECORD)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # not new after all (a kill's record): replace it whole
            write_atomic(path, record.encode(), sync=False)
            return
        try:
            view = memoryview(record.encode())
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def records(self, settle: bool = True) -> list[JobRecord]:
        """Every job this worker has a record of, oldest first (`settle`: see `_read`)."""
        try:
            names = os.listdir(self._root)
        except OSError:
            return []
        suffix = f".{RECORD}"
        ids = (n[: -len(suffix)] for n in names if n.endswith(suffix))
        found = [r for job_id in ids if (r := self._read(job_id, settle)) is not None]
        return sorted(found, key=lambda r: (r.started, r.job_id))

    def recover(self) -> None:
        """At worker start: a job left `running` by the previous worker process is failed.

        Its child died with that worker (`PR_SET_PDEATHSIG`); one whose result file was
        complete is done after all. Nothing is re-run.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self._made = True
        self._sweeper.resume()  # acknowledged jobs the last process left undeleted
        with self._lock:
            if not self._tidied and not self._active:
                self._tidy()
            self._tidied = True
            for record in self.records(settle=False):
                if record.state is not JobState.RUNNING or record.job_id in self._active:
                    continue
                kill_stray(record.pid, self._prefix(record.job_id))
                if self._result(record.job_id) is not _LOST:
                    record.state = JobState.DONE
                else:
                    record.state = JobState.FAILED
                    record.error = (
                        "failed: its worker stopped while it ran (the child died with it); "
                        "not re-run"
                    )
                record.finished = time.time()
                self._write(record)

    def _tidy(self) -> None:
        """Before any job runs here: drop half-written temporary files and files beside no
        record, and move the jobs of a worker from before the flat layout (a directory per
        job) to files of the root.

        Never again later: under `hold_jobs` each new Worker of the process recovers the same
        table while its jobs run, and their children write such files.
        """
        for entry in os.scandir(self._root):
            if entry.name.endswith(".tmp") and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                for name in JOB_FILES:
                    with contextlib.suppress(OSError):
                        if not os.path.lexists(self._path(entry.name, name)):
                            os.rename(f"{entry.path}/{name}", self._path(entry.name, name))
                self._sweeper.drop(entry.path, entry.path)
            elif (
                (job := entry.name.rpartition("."))[2] in JOB_FILES
                and job[2] != RECORD
                and not os.path.lexists(self._path(job[0], RECORD))
            ):  # a job's file beside no record: left by a worker killed mid-ack
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)

    # ------------------------------------------------------------------ running

    def run(self, job_id: str, func: str, args: list[Any], acks: Sequence[str] = ()) -> Any:
        """Run job `job_id` once and return its result (or raise its `JobError`).

        If the job is running, wait for it; if it finished, answer from its record. The
        finished jobs `acks` are forgotten once it started (their deletion, milliseconds on a
        busy disk, overlaps the job instead of delaying it).
        """
        wake = threading.Event()
        spec, digest, active, starting = self._enter(job_id, func, args, wake)
        if starting:
            assert active is not None
            # Outside `_lock`: the reader that reports a child's end (and may hand this
            # job a newly forked child) records ends under it.
            self._start(job_id, active, func, spec, digest, self._reserve())
        self.forget(acks)
        if active is None:
            return self.outcome(job_id)
        wake.wait()
        return self._woken(job_id, active)

    async def run_async(
        self, job_id: str, func: str, args: list[Any], acks: Sequence[str] = ()
    ) -> Any:
        """`run` on an event loop: the same job, waited for without a thread.

        A Dask worker runs a coroutine task on its loop: no hop to a task thread and back,
        and the child's end wakes the loop directly. What could block for long (waiting for
        a child to be forked, the fresh-interpreter fallback) runs in a thread. Cancelling
        the caller stops the wait, not the job.
        """
        wake = LoopWake()
        spec, digest, active, starting = self._enter(job_id, func, args, wake)
        if starting:
            assert active is not None
            warm = self._spawner.take_idle()
            if warm is not None:
                self._start(job_id, active, func, spec, digest, warm)
            else:
                await asyncio.to_thread(self._start_reserved, job_id, active, func, spec, digest)
        self.forget(acks)
        if active is None:
            return self.outcome(job_id)
        try:
            await wake.wait()
        except asyncio.CancelledError:
            with self._lock, contextlib.suppress(ValueError):
                active.waiters.remove(wake)
            raise
        return self._woken(job_id, active)

    def _enter(
        self, job_id: str, func: str, args: list[Any], wake: _Wake
    ) -> tuple[bytes, str, _Active | None, bool]:
        """Check the job and find it: its spec, digest, `_Active` (None: finished) and
        whether the caller starts it (then `wake` waits on it)."""
        check_job_id(job_id)
        spec = encode_spec(func, args)
        digest = hashlib.sha256(spec).hexdigest()
        starting = False
        with self._lock:
            active = self._active.get(job_id)
            if active is None:
                record = self._claim(job_id)
                if record is None:  # ours to start: a second run meanwhile attaches to it
                    active = self._active[job_id] = _Active()
                    starting = True
                elif record.digest and record.digest != digest:
                    raise JobSpecError(
                        f"job id {job_id} already names another job ({record.func}); "
                        "use a new id per attempt"
                    )
            if active is not None:
                active.waiters.append(wake)
        return spec, digest, active, starting

    def _woken(self, job_id: str, active: _Active) -> Any:
        """The answer of a task woken from its wait for `active`."""
        if not active.done.is_set():
            raise JobDetached(job_id, "still runs, but its task ended: submit it again")
        return self.outcome(job_id, active.final)

    def _reserve(self) -> WarmChild | None:
        """A warm child for a job, forked if none is idle; None if the spawner cannot."""
        try:
            return self._spawner.reserve()
        except OSError:
            return None

    def _start_reserved(
        self, job_id: str, active: _Active, func: str, spec: bytes, digest: str
    ) -> None:
        self._start(job_id, active, func, spec, digest, self._reserve())

    def detach(self) -> None:
        """End every task waiting for a job; the children keep running."""
        with self._lock:
            for active in self._active.values():
                for wake in active.waiters:
                    wake.set()
                active.waiters.clear()

    def _claim(self, job_id: str) -> JobRecord | None:
        """The job's record, or None for a new job (with `_lock` held)."""
        if not self._made:  # the table's first job makes its root
            os.makedirs(self._root, exist_ok=True)
            self._made = True
        record = self._read(job_id)
        if record is None:
            self._sweeper.settle(job_id)  # an acknowledged job's files, if any are left
            with contextlib.suppress(FileNotFoundError):  # a result without a record is no
                os.unlink(self._path(job_id, RESULT))  # result of this job
        return record

    def _start(
        self,
        job_id: str,
        active: _Active,
        func: str,
        spec: bytes,
        digest: str,
        warm: WarmChild | None,
    ) -> None:
        """Write the job's record, then hand the job to `warm` (None: a fresh child)."""
        prefix = self._prefix(job_id)
        record = JobRecord(job_id, func, JobState.RUNNING, started=time.time(), digest=digest)
        record.pid = warm.pid if warm is not None else 0
        active.record = record
        # Written (with the child's pid) before the child has the job: a restarted worker
        # then never runs it again.
        self._write_first(record)
        with self._lock:
            ending = active.ending is not None
        if ending:  # killed or closed before it started: it never runs
            if warm is not None:
                self._spawner.release(warm)
            self._finish(job_id, active, -signal.SIGKILL)
            return

        def on_end(rc: int) -> None:
            self._finish(job_id, active, rc)

        # Not under `_lock`: a child that died since its reservation ends the job at once.
        if warm is not None:
            spawned = self._spawner.run(warm, prefix, spec, on_end)
        else:  # no spawner: a fresh interpreter, which reads its spec from a file
            write_atomic(job_file(prefix, SPEC), spec, sync=False)
            try:
                spawned = fresh_child(prefix, on_end)
            except OSError as exc:
                active.ending = (JobState.FAILED, f"failed: cannot start its child: {exc}")
                self._finish(job_id, active, -1)
                return
            record.pid = spawned.pid
            self._write(record, sync=False)
        with self._lock:
            active.proc = spawned
            ending = active.ending is not None
        if ending:  # killed in the instant it was handed over
            signal_child(spawned, signal.SIGKILL)

    def _finish(self, job_id: str, active: _Active, rc: int) -> None:
        with self._lock:
            record = active.record or self._read(job_id) or JobRecord(job_id, "", JobState.RUNNING)
            record.exit_code, record.finished = rc, time.time()
            if rc == 0 and os.path.exists(self._path(job_id, RESULT)):
                record.state, record.error = JobState.DONE, ""
            elif active.ending is not None:
                record.state, record.error = active.ending
            else:
                record.state = JobState.FAILED
                record.error = f"failed ({describe_exit(rc)}): {self._last_words(job_id, record)}"
            if rc < 0 and active.proc is not None:  # its warm child died: so goes its output
                with contextlib.suppress(OSError):
                    os.unlink(child_output(self._root, record.pid))
            # A done job's record stays `running`: its result says it is done (`_read`).
            # Failed and cancelled ends are synced: after a machine crash they must not read
            # as a job that never ran (a done one is its checksummed result, see jobrecord).
            if record.state is not JobState.DONE:
                self._write(record)
            self._active.pop(job_id, None)
            active.final = record
            active.done.set()
            for wake in active.waiters:
                wake.set()
            active.waiters.clear()

    def _last_words(self, job_id: str, record: JobRecord) -> str:
        """The last line a failed job printed: in its output file, or else (its warm child
        died mid-job) in that child's."""
        path = self._path(job_id, OUTPUT)
        if record.pid > 0 and not os.path.exists(path):
            path = child_output(self._root, record.pid)
        return last_line(path)

    def outcome(self, job_id: str, record: JobRecord | None = None) -> Any:
        """A finished job's result, or its error raised; `JobError` if it is unknown.

        `record` is the job's record as it ended, when the caller holds it (else it is read).
        """
        record = record if record is not None else self._read(job_id)
        if record is None:
            raise JobFailed(job_id, "failed: this worker has no record of it (acknowledged?)")
        if record.state is JobState.DONE:
            result = self._result(job_id)
            if result is _LOST:
                raise JobFailed(
                    job_id,
                    "failed: its result on the worker is missing or unreadable "
                    "(the worker machine restarted?)",
                )
            return result
        if record.state is JobState.CANCELLED:
            raise JobCancelled(job_id, record.error)
        if record.state is JobState.FAILED:
            raise JobFailed(job_id, record.error)
        raise JobFailed(job_id, "failed: still marked running but no child runs it")

    def _result(self, job_id: str) -> Any:
        """The job's decoded result, or `_LOST` if its file is missing or torn."""
        try:
            with open(self._path(job_id, RESULT), "rb") as f:
                return open_result(f.read())
        except (OSError, ValueError):  # msgpack's errors are ValueErrors too
            return _LOST

    # ------------------------------------------------------------------ control

    async def kill(self, job_id: str, grace: float = KILL_GRACE) -> JobState:
        """Kill a running job (SIGTERM, SIGKILL after `grace` s); the job's state after.

        A job not started yet gets a `cancelled` record, so a late run of it raises
        `JobCancelled` instead of starting it. A finished job keeps its record.
        """
        check_job_id(job_id)
        with self._lock:
            active = self._active.get(job_id)
            if active is None:
                record = self._read(job_id)
                if record is not None:
                    return record.state
                os.makedirs(self._root, exist_ok=True)
                now = time.time()
                error = "cancelled before it started"
                self._write(JobRecord(job_id, "", JobState.CANCELLED, 0, now, now, error=error))
                return JobState.CANCELLED
            active.ending = (JobState.CANCELLED, "cancelled: killed by request")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if active.proc is not None:  # else its starter sees `ending` and never runs it
                signal_child(active.proc, sig)
            if await asyncio.to_thread(active.done.wait, grace):
                break
        record = self._read(job_id)
        return record.state if record is not None else JobState.CANCELLED

    def ack(self, job_id: str) -> bool:
        """Forget a finished job (its result was collected); False if there is no record.

        Its record leaves the table at once; its files are deleted later (`sweeper.py`).
        """
        check_job_id(job_id)
        with self._lock:
            if job_id in self._active:
                raise JobSpecError(f"job {job_id} is running: kill it before acknowledging it")
            # Out of the table at once (one rename); deleted off the lock by the sweeper.
            files = [self._path(job_id, name) for name in JOB_FILES if name != RECORD]
            return self._sweeper.drop(job_id, self._path(job_id, RECORD), files)

    def forget(self, job_ids: Iterable[str]) -> int:
        """`ack` each finished job of `job_ids`; a running or badly named one is skipped.

        How many had a record.
        """
        known = 0
        for job_id in job_ids:
            with contextlib.suppress(JobSpecError):
                known += self.ack(job_id)
        return known

    def close(self, wait: float = 0.0) -> None:
        """The worker is closing: SIGKILL every child; their jobs are recorded failed.

        Waits up to `wait` seconds for the records to be written.
        """
        with self._lock:
            running = list(self._active.values())
            for active in running:
                active.ending = (JobState.FAILED, "failed: its worker closed while it ran")
        for active in running:
            if active.proc is not None:  # else its starter sees `ending` and never runs it
                signal_child(active.proc, signal.SIGKILL)
        deadline = time.monotonic() + wait
        for active in running:
            active.done.wait(max(0.0, deadline - time.monotonic()))
        self._spawner.close()


def pool_config() -> PoolConfig:
    """The warm children's settings from the `sectors.child-pool` Dask config section.

    A bad value is a one-line `ValueError` naming the setting.
    """
    return PoolConfig.from_mapping(dask.config.get(CONFIG_KEY, None))
