"""Workers: what each one declares, where its jobs run, and the scheduler's handle on it.

A `WorkerBackend` runs jobs. The scheduler never asks a backend whether it has room: its own
per-worker ledger is the only admission control, which is what a Dask cluster needs (Dask
would otherwise queue work on its own). Dask's `Future.cancel()` does not stop a running task,
so backends expose an explicit `kill(job_id)`, which the scheduler calls when a job is
cancelled.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .ledger import Ledger, WorkerResources
from .policy import WorkerPolicy
from .pushed import PolicySource
from .resources import ResourceOverrides
from .storage import StoragePath
from .tasks import TaskType

#: Task types a sealing worker accepts by default (Lotus `lotus-worker run` defaults).
SEALING_TASKS: frozenset[TaskType] = frozenset(
    {
        TaskType.ADD_PIECE,
        TaskType.PRE_COMMIT1,
        TaskType.PRE_COMMIT2,
        TaskType.COMMIT1,
        TaskType.COMMIT2,
        TaskType.FINALIZE,
        TaskType.FETCH,
        TaskType.UNSEAL,
        TaskType.REPLICA_UPDATE,
        TaskType.PROVE_REPLICA_UPDATE1,
        TaskType.PROVE_REPLICA_UPDATE2,
        TaskType.REGEN_SECTOR_KEY,
        TaskType.FINALIZE_UNSEALED,
        TaskType.FINALIZE_REPLICA_UPDATE,
        TaskType.DATA_CID,
    }
)


@runtime_checkable
class WorkerBackend(Protocol):
    """Where a worker's jobs run: in-process, simulated, or a distributed cluster."""

    async def submit(self, job_id: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` for job `job_id` and return its result (or raise its error)."""
        ...

    async def kill(self, job_id: int) -> None:
        """Stop job `job_id` if it is still running (best effort, idempotent)."""
        ...


class InProcessBackend:
    """Runs jobs in this process: coroutine functions on the loop, plain ones in a thread."""

    def __init__(self) -> None:
        self._tasks: dict[int, asyncio.Task[Any]] = {}

    async def submit(self, job_id: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Run the job; cancelling the caller cancels it."""
        coro = fn(*args) if asyncio.iscoroutinefunction(fn) else asyncio.to_thread(fn, *args)
        task = asyncio.ensure_future(coro)
        self._tasks[job_id] = task
        try:
            return await task
        finally:
            self._tasks.pop(job_id, None)

    async def kill(self, job_id: int) -> None:
        """Cancel the job's task (a thread keeps running until its function returns)."""
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()


@dataclass(slots=True)
class WorkerSpec:
    """What a worker declares when it joins."""

    name: str
    resources: WorkerResources
    task_types: frozenset[TaskType] = SEALING_TASKS
    paths: tuple[StoragePath, ...] = ()
    overrides: ResourceOverrides | None = None
    #: The worker's myscheduler.json (or .toml); re-read while the scheduler runs.
    policy_file: Path | None = None
    #: Seconds without a heartbeat before the worker is disabled.
    heartbeat_grace: float = 30.0
    #: Link speed in bytes per second, for the cost of fetching sector files here.
    bandwidth: float = 1.25e9
    #: Workers that never miss heartbeats (in-process) need none.
    needs_heartbeats: bool = True
    #: Work reaches it over a network (a `sectors worker`): it starts there only on a fresh
    #: heartbeat, and the cluster's heartbeat grace applies (`liveness.py`).
    remote: bool = False


def detect_resources(gpus: tuple[str, ...] = ()) -> WorkerResources:
    """This host's CPUs and memory (Linux /proc/meminfo, else sysconf); GPUs from config."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    total = swap = avail = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            value = int(rest.split()[0]) * 1024
            if key == "MemTotal":
                total = value
            elif key == "SwapTotal":
                swap = value
            elif key == "MemAvailable":
                avail = value
    except (OSError, ValueError, IndexError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        avail = total
    return WorkerResources(
        cpus=cpus, mem_physical=total, mem_swap=swap, gpus=gpus, mem_used=max(0, total - avail)
    )


def local_worker(
    name: str | None = None,
    *,
    gpus: tuple[str, ...] = (),
    task_types: frozenset[TaskType] = SEALING_TASKS,
    paths: tuple[StoragePath, ...] = (),
    policy_file: Path | None = None,
    overrides: ResourceOverrides | None = None,
) -> WorkerSpec:
    """A spec for an in-process worker on this host (resources detected, GPUs configured)."""
    return WorkerSpec(
        name=name or socket.gethostname(),
        resources=detect_resources(gpus),
        task_types=task_types,
        paths=paths,
        overrides=overrides,
        policy_file=policy_file,
        needs_heartbeats=False,
    )


@dataclass(slots=True)
class Worker:
    """The scheduler's handle on a worker: its spec, ledger, state and policy."""

    spec: WorkerSpec
    backend: WorkerBackend
    ledger: Ledger
    last_heartbeat: float
    enabled: bool = True
    #: Why the worker is disabled, for `workers()` and `diag()`.
    disabled_reason: str = ""
    watcher: PolicySource | None = None
    #: Ids of the jobs that hold resources here.
    jobs: set[int] = field(default_factory=set)
    #: The spec's name, read millions of times by a long simulation (a plain slot, no call).
    name: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.name = self.spec.name

    @property
    def policy(self) -> WorkerPolicy:
        """The policy in force (the last good one from its file, or no restrictions)."""
        return self.watcher.policy if self.watcher is not None else _NO_POLICY

    def supports(self, task_type: TaskType) -> bool:
        """True if the worker accepts this task type at all."""
        return task_type in self.spec.task_types

    async def run(self, job_id: int, fn: Callable[..., Awaitable[Any] | Any], *args: Any) -> Any:
        """Run `fn(*args)` on this worker's backend; cancelling kills the job there."""
        try:
            return await self.backend.submit(job_id, fn, *args)
        except asyncio.CancelledError:
            await asyncio.shield(self.backend.kill(job_id))
            raise


_NO_POLICY = WorkerPolicy()
