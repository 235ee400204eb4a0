"""The worker-side job registry: each sealing job runs once, in a child process we can kill.

Dask cannot stop a running task (`Future.cancel()` leaves its thread and its subprocess
running) and cannot re-attach a restarted client to running work: a resubmitted key waits
for the orphaned run and then runs again. So the work itself runs in a child process owned
by a `WorkerPlugin`, under a job id chosen by the engine (one per attempt, e.g. `PC1-s12-a3`),
with a record on the worker's disk. Lotus's manager keeps work IDs and call results for the
same reason (`extern/sector-storage/manager_calltracker.go@v1.11.3`).

* `run_job` is the Dask task the engine submits (pinned, `pure=False`, key per attempt): a
  coroutine, which the worker runs on its event loop, as the table's `run_async`. The
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

The table itself (records and children) is `table.py`; this module is its Dask side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dask.config
from distributed import Client, Future, Worker, WorkerPlugin, get_worker
from distributed.core import Status

from .jobrecord import JobRecord, JobState, check_job_id, encode_spec
from .table import KILL_GRACE, JobTable

#: The plugin's name on every worker.
PLUGIN = "sectors-jobs"
#: The Dask config key of the directory that holds job records (one subdirectory per worker name).
STATE_DIR_KEY = "sectors.jobs-dir"


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


async def run_job(job_id: str, func: str, args: list[Any], acks: Sequence[str] = ()) -> Any:
    """The Dask task: run (or attach to) job `job_id`; forget the acknowledged `acks` meanwhile.

    A coroutine, so the worker runs it on its event loop: a task thread would only wait.
    """
    return await table_of(get_worker()).run_async(job_id, func, args, acks)


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
