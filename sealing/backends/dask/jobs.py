"""The worker-side job registry: each sealing job runs once, in a child process we can kill.

Dask cannot stop a running task (`Future.cancel()` leaves its thread and its subprocess
running) and cannot re-attach a restarted client to running work: a resubmitted key waits
for the orphaned run and then runs again. So the work itself runs in a child process owned
by a `WorkerPlugin`, under a job id chosen by the engine (one per attempt, e.g. `PC1-s12-a3`),
with a record on the worker's disk. Lotus's manager keeps work IDs and call results for the
same reason (`extern/sector-storage/manager_calltracker.go@v1.11.3`).

* `run_job` is the Dask task the engine submits (pinned, `pure=False`, key per attempt). The
  first run of an id starts the child and waits for it; a second run of the same id (the
  engine restarted and resubmitted) attaches to the running child, or returns the stored
  result, or raises the stored error. The child is never started twice.
* A result nobody collected stays on disk until `ack` deletes it.
* `kill` (through `client.run`, on the worker's event loop, 2-5 ms) sends SIGTERM to the
  child's process group, SIGKILL after a grace, and the waiting task raises `JobCancelled`.
* The child gets SIGKILL when the worker dies (`PR_SET_PDEATHSIG`); a worker that starts
  again finds the record still `running` and marks it failed: it is never re-run silently.
* Inside `sectors worker` (`hold_jobs`), the tables are per process, not per `Worker`: a
  Worker that closes because its scheduler went away detaches its waiting tasks and leaves
  the children running, and the next Worker of the process re-attaches to the same table.
* Jobs run in the warm children of the table's `Spawner` (`spawner.py`, `pool.py`: each in
  its own process group, `PR_SET_PDEATHSIG` on the spawner, which has it on the worker; a
  child runs one job at a time and then the next, as Lotus's long-lived `lotus-worker`
  does), started with the table on a worker, so no job (the first included) pays for a fresh
  interpreter or a fork; a fresh `python -m ...dask.child` is the fallback if it cannot start.
* A job's files are written without `fsync`: what survives what is in `jobrecord.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.config
from distributed import Client, Future, Worker, WorkerPlugin, get_worker
from distributed.core import Status

from .child import OUTPUT, RECORD, RESULT, SPEC, open_result, write_atomic
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

#: The plugin's name on every worker.
PLUGIN = "sectors-jobs"
#: The Dask config key of the directory that holds job records (one subdirectory per worker name).
STATE_DIR_KEY = "sectors.jobs-dir"
#: Seconds between SIGTERM and SIGKILL when a job is killed.
KILL_GRACE = 5.0
#: What `_result` gives for a result file that is missing or unreadable.
_LOST: Any = object()


@dataclass(slots=True)
class _Active:
    #: Its child; None while the job is claimed but not handed to a child yet.
    proc: SpawnedChild | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    #: Set before the child is signalled: how its end is recorded if it leaves no result.
    ending: tuple[JobState, str] | None = None
    #: One event per task waiting for this job: set when it ends or the waiters detach.
    waiters: list[threading.Event] = dataclasses.field(default_factory=list)
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

    def _dir(self, job_id: str) -> Path:
        return self.root / job_id

    def _path(self, job_id: str, name: str) -> str:
        return f"{self._root}/{job_id}/{name}"

    def _read(self, job_id: str) -> JobRecord | None:
        try:
            with open(self._path(job_id, RECORD), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            return JobRecord.decode(raw)
        except (ValueError, TypeError, KeyError) as exc:
            error = f"failed: its record on the worker is unreadable ({exc})"
            return JobRecord(job_id, "", JobState.FAILED, error=error)

    def _write(self, record: JobRecord, sync: bool = True) -> None:
        write_atomic(self._path(record.job_id, RECORD), record.encode(), sync)

    def records(self) -> list[JobRecord]:
        """Every job this worker has a record of, oldest first."""
        if not self.root.is_dir():
            return []
        dirs = (d for d in self.root.iterdir() if d.is_dir())
        found = [r for d in dirs if (r := self._read(d.name)) is not None]
        return sorted(found, key=lambda r: (r.started, r.job_id))

    def recover(self) -> None:
        """At worker start: a job left `running` by the previous worker process is failed.

        Its child died with that worker (`PR_SET_PDEATHSIG`); one whose result file was
        complete is done after all. Nothing is re-run.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self._sweeper.resume()  # acknowledged jobs the last process left undeleted
        with self._lock:
            for record in self.records():
                if record.state is not JobState.RUNNING or record.job_id in self._active:
                    continue
                kill_stray(record.pid, self._dir(record.job_id))
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

    # ------------------------------------------------------------------ running

    def run(self, job_id: str, func: str, args: list[Any], acks: Sequence[str] = ()) -> Any:
        """Run job `job_id` once and return its result (or raise its `JobError`).

        If the job is running, wait for it; if it finished, answer from its record. The
        finished jobs `acks` are forgotten once it started (their deletion, milliseconds on a
        busy disk, overlaps the job instead of delaying it).
        """
        check_job_id(job_id)
        spec = encode_spec(func, args)
        digest = hashlib.sha256(spec).hexdigest()
        wake = threading.Event()
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
        if starting:
            assert active is not None
            # Outside `_lock`: the reader that reports a child's end (and may hand this
            # job a newly forked child) records ends under it.
            self._start(job_id, active, func, spec, digest)
        self.forget(acks)
        if active is not None:
            wake.wait()
            if not active.done.is_set():
                raise JobDetached(job_id, "still runs, but its task ended: submit it again")
            return self.outcome(job_id, active.final)
        return self.outcome(job_id)

    def detach(self) -> None:
        """End every task waiting for a job; the children keep running."""
        with self._lock:
            for active in self._active.values():
                for wake in active.waiters:
                    wake.set()
                active.waiters.clear()

    def _claim(self, job_id: str) -> JobRecord | None:
        """The job's record, or None after making its directory (with `_lock` held).

        The directory is made first: for a new job (the usual case) it is the only call.
        """
        jobdir = self._path(job_id, "")
        try:
            os.mkdir(jobdir)
            return None
        except FileExistsError:
            pass
        except FileNotFoundError:  # the table's first job makes its root
            os.makedirs(jobdir, exist_ok=True)
            return None
        record = self._read(job_id)
        if record is None:  # left without a record by a crash: reuse its directory
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(job_id, RESULT))
        return record

    def _start(self, job_id: str, active: _Active, func: str, spec: bytes, digest: str) -> None:
        """Write the job's record, then hand the job to a warm child (or a fresh one)."""
        jobdir = self._dir(job_id)
        try:
            warm: WarmChild | None = self._spawner.reserve()
        except OSError:
            warm = None
        record = JobRecord(job_id, func, JobState.RUNNING, started=time.time(), digest=digest)
        record.pid = warm.pid if warm is not None else 0
        active.record = record
        # Written (with the child's pid) before the child has the job: a restarted worker
        # then never runs it again.
        self._write(record, sync=False)
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
            spawned = self._spawner.run(warm, jobdir, spec, on_end)
        else:  # no spawner: a fresh interpreter, which reads its spec from a file
            write_atomic(jobdir / SPEC, spec, sync=False)
            try:
                spawned = fresh_child(jobdir, on_end)
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
                record.error = (
                    f"failed ({describe_exit(rc)}): {last_line(self._dir(job_id) / OUTPUT)}"
                )
            # Failed and cancelled ends are synced: after a machine crash they must not read
            # as a job that never ran (a done one is its checksummed result, see jobrecord).
            self._write(record, sync=record.state is not JobState.DONE)
            self._active.pop(job_id, None)
            active.final = record
            active.done.set()
            for wake in active.waiters:
                wake.set()
            active.waiters.clear()

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
                self._dir(job_id).mkdir(parents=True, exist_ok=True)
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

        Its directory leaves the table at once; its files are deleted later (`sweeper.py`).
        """
        check_job_id(job_id)
        with self._lock:
            if job_id in self._active:
                raise JobSpecError(f"job {job_id} is running: kill it before acknowledging it")
            # Out of the table at once (one rename); deleted off the lock by the sweeper.
            return self._sweeper.drop(self._path(job_id, ""))

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


# ---------------------------------------------------------------------- on the worker


_tables: dict[Path, JobTable] = {}
_tables_lock = threading.Lock()
_held = False


@contextlib.contextmanager
def hold_jobs(wait: float = 5.0) -> Iterator[None]:
    """Keep job tables per process while inside: closing a Worker leaves its children running.

    For `sectors worker`, which replaces its Worker when the scheduler goes away. On exit
    every child of the process is killed (waiting up to `wait` s for their records).
    """
    global _held
    _held = True
    try:
        yield
    finally:
        _held = False
        with _tables_lock:
            tables = list(_tables.values())
            _tables.clear()
        for table in tables:
            table.close(wait)


def pool_config() -> PoolConfig:
    """The warm children's settings from the `sectors.child-pool` Dask config section.

    A bad value is a one-line `ValueError` naming the setting.
    """
    return PoolConfig.from_mapping(dask.config.get(CONFIG_KEY, None))


def open_table(base: Path, name: str) -> JobTable:
    """Worker `name`'s table under `base`, its spawner started (shared under `hold_jobs`)."""
    root = base / re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if not _held:
        table = JobTable(root)
    else:
        with _tables_lock:
            table = _tables.get(root) or _tables.setdefault(root, JobTable(root))
    table.warm()
    return table


class JobRegistry(WorkerPlugin):
    """The `WorkerPlugin` that holds a worker's `JobTable`.

    Records live in `state_dir/<worker name>` (default: the `sectors.jobs-dir` Dask config
    key, else the temp directory), so a worker restarted under the same name finds them.
    Idempotent: a restarted engine registering it again keeps the running table.
    """

    name = PLUGIN
    idempotent = True

    def __init__(self, state_dir: str | None = None) -> None:
        self.state_dir = state_dir
        self.table: JobTable | None = None

    def setup(self, worker: Worker) -> None:
        """Open this worker's records and fail the jobs its previous process left running."""
        base = self.state_dir or dask.config.get(STATE_DIR_KEY, None)
        root = Path(base) if base else Path(tempfile.gettempdir()) / PLUGIN
        self.table = open_table(root, str(worker.name))
        self.table.recover()

    def teardown(self, worker: Worker) -> None:
        """Kill the running children (under `hold_jobs`: only detach the waiting tasks)."""
        if self.table is None:
            return
        if _held:
            # Replaced by an engine registering the plugin again: its tasks still wait.
            if worker.status in (Status.closing, Status.closed):
                self.table.detach()
        else:
            self.table.close()


def table_of(worker: Worker) -> JobTable:
    """The worker's `JobTable`; a clear error if the plugin is not installed there."""
    plugin = worker.plugins.get(PLUGIN)
    if not isinstance(plugin, JobRegistry) or plugin.table is None:
        raise RuntimeError(f"the {PLUGIN} plugin is not installed on worker {worker.name}")
    return plugin.table


def run_job(job_id: str, func: str, args: list[Any], acks: Sequence[str] = ()) -> Any:
    """The Dask task: run (or attach to) job `job_id`; forget the acknowledged `acks` meanwhile."""
    return table_of(get_worker()).run(job_id, func, args, acks)


async def kill_job(job_id: str, grace: float, dask_worker: Worker) -> str:
    """For `client.run`: kill job `job_id` on this worker; its state after."""
    return str(await table_of(dask_worker).kill(job_id, grace))


def ack_job(job_id: str, dask_worker: Worker) -> bool:
    """For `client.run`: forget job `job_id` on this worker."""
    return table_of(dask_worker).ack(job_id)


def ack_jobs(job_ids: list[str], dask_worker: Worker) -> int:
    """For `client.run`: forget the finished jobs `job_ids` here; how many were known."""
    return table_of(dask_worker).forget(job_ids)


def list_jobs(dask_worker: Worker) -> list[dict[str, Any]]:
    """For `client.run`: every job record on this worker, as dicts."""
    return [dataclasses.asdict(r) for r in table_of(dask_worker).records()]


# ---------------------------------------------------------------------- on the engine


async def install(client: Client, state_dir: str | None = None) -> None:
    """Register the job registry on every worker, now and joining later (async client)."""
    await client.register_plugin(JobRegistry(state_dir))


def submit(
    client: Client,
    address: str,
    job_id: str,
    func: str,
    args: list[Any],
    acks: Sequence[str] = (),
) -> Future[Any]:
    """Submit job `job_id` (`func(*args)` in a child) pinned to the worker at `address`.

    The Dask key is the job id. `acks` (ids of finished jobs whose results the engine has
    recorded) ride along and are forgotten once the job started: no round trip of their
    own. Checks the job before anything reaches the cluster. Release a finished future
    before resubmitting its id: Dask hands a key that is still held back as the same task,
    error included, without running anything.
    """
    check_job_id(job_id)
    encode_spec(func, args)
    for ack_id in acks:
        check_job_id(ack_id)
    return client.submit(
        run_job,
        job_id,
        func,
        list(args),
        list(acks),
        key=job_id,
        workers=[address],
        allow_other_workers=False,
        pure=False,
    )


async def kill(client: Client, address: str, job_id: str, grace: float = KILL_GRACE) -> JobState:
    """Kill job `job_id` on the worker at `address` (async client); its state after."""
    check_job_id(job_id)
    answer = await client.run(kill_job, job_id, grace, workers=[address])
    return JobState(answer[address])


async def ack(client: Client, address: str, job_id: str) -> bool:
    """Delete job `job_id`'s record and result on the worker at `address` (async client)."""
    check_job_id(job_id)
    answer = await client.run(ack_job, job_id, workers=[address])
    return bool(answer[address])


async def ack_all(client: Client, address: str, job_ids: list[str]) -> int:
    """Forget the finished jobs `job_ids` on the worker at `address` in one round trip."""
    for job_id in job_ids:
        check_job_id(job_id)
    answer = await client.run(ack_jobs, list(job_ids), workers=[address])
    return int(answer[address])


async def jobs(client: Client, address: str) -> list[JobRecord]:
    """Every job record on the worker at `address` (async client)."""
    answer = await client.run(list_jobs, workers=[address])
    return [JobRecord(**{**r, "state": JobState(r["state"])}) for r in answer[address]]
