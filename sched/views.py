"""Plain snapshots of workers, jobs and diagnoses (for `sectors workers/jobs/sched-diag`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..fsm.codec import packb, unpackb
from ..fsm.store import LmdbStore
from .queue import Request
from .rules import stage_cap
from .storage import SectorRef, StorageIndex
from .tasks import TaskType
from .workers import Worker


@dataclass(frozen=True, slots=True)
class _Snapshot:
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class WorkerSnapshot(_Snapshot):
    """A worker as an operator sees it."""

    name: str
    enabled: bool
    disabled_reason: str
    tasks: dict[str, int]
    phases: dict[str, int]
    cpus_used: int
    cpus: int
    mem_used: int
    mem_physical: int
    gpus_used: float
    gpus: int
    utilization: float
    free_space: int
    heartbeat_age_s: float
    policy_error: str | None
    #: Stage caps of its policy ("AP", "PC1", "PC2", "C2"; None: no cap); {}: no policy.
    caps: dict[str, int | None] = field(default_factory=dict)
    auto_pledge_diff: int = 0
    #: What a remote worker's backend says of it (host, address, free space, policy); None
    #: for an in-process worker.
    remote: dict[str, Any] | None = None


@runtime_checkable
class RemoteBackend(Protocol):
    """A worker backend on another machine, which can describe that machine."""

    def describe(self) -> dict[str, Any]:
        """Plain data for `sectors workers` (host, address, last heartbeat, free space...)."""
        ...


@dataclass(frozen=True, slots=True)
class JobSnapshot(_Snapshot):
    """A task holding a worker (assigned/preparing/running) or waiting in the queue."""

    sched_id: int
    sector: str
    task: str
    worker: str | None
    phase: str
    age_s: float
    #: The host of the remote worker the job runs on; None: in-process worker, or queued.
    host: str | None = None
    #: A file transfer the job waits on: `{"done", "total", "rate"}` (bytes, bytes/s).
    transfer: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class TaskDiag(_Snapshot):
    """Why each worker did not take one queued task."""

    sched_id: int
    sector: str
    task: str
    priority: int
    reasons: dict[str, str]


def worker_snapshot(w: Worker, index: StorageIndex, now: float) -> WorkerSnapshot:
    """Snapshot one worker."""
    led, res = w.ledger, w.ledger.resources
    return WorkerSnapshot(
        name=w.name,
        enabled=w.enabled,
        disabled_reason=w.disabled_reason,
        tasks={t.short: n for t, n in sorted(led.counts.items()) if n},
        phases={p.value: n for p, n in led.phase_counts().items()},
        cpus_used=led.cpu_used,
        cpus=res.cpus,
        mem_used=led.mem_min_used,
        mem_physical=res.mem_physical,
        gpus_used=led.gpu_used,
        gpus=len(res.gpus),
        utilization=round(led.utilization(), 4),
        free_space=index.free_space(w.name),
        heartbeat_age_s=round(now - w.last_heartbeat, 3),
        policy_error=w.watcher.error if w.watcher is not None else None,
        caps={t.short: stage_cap(w.policy, t) for t in _CAPPED} if w.watcher is not None else {},
        auto_pledge_diff=w.policy.auto_pledge_diff,
        remote=w.backend.describe() if isinstance(w.backend, RemoteBackend) else None,
    )


_CAPPED = (TaskType.ADD_PIECE, TaskType.PRE_COMMIT1, TaskType.PRE_COMMIT2, TaskType.COMMIT2)


@runtime_checkable
class TransferSource(Protocol):
    """A worker backend that knows the progress of the file transfers its jobs wait on."""

    def transfer(self, job_id: int) -> dict[str, Any] | None:
        """`{"done", "total", "rate"}` of job `job_id`'s running transfer, or None."""
        ...


def job_snapshot(
    sched_id: int,
    sector: SectorRef,
    task_type: TaskType,
    worker: str | None,
    phase: str,
    age_s: float,
    host: str | None = None,
    transfer: dict[str, Any] | None = None,
) -> JobSnapshot:
    """Snapshot one job."""
    return JobSnapshot(
        sched_id, str(sector), task_type.short, worker, phase, round(age_s, 3), host, transfer
    )


def _host(w: Worker) -> str | None:
    if not isinstance(w.backend, RemoteBackend):
        return None
    host = w.backend.describe().get("host")
    return str(host) if host else None


def _transfer(w: Worker, sched_id: int) -> dict[str, Any] | None:
    return w.backend.transfer(sched_id) if isinstance(w.backend, TransferSource) else None


class _Held(Protocol):
    sched_id: int
    sector: SectorRef
    task_type: TaskType
    started_at: float

    @property
    def worker(self) -> Worker: ...

    @property
    def phase(self) -> Any: ...


def job_snapshots(
    held: Iterable[_Held], queued: Iterable[Request], now: float
) -> list[JobSnapshot]:
    """Snapshot the jobs holding workers, then the queued requests."""
    out = [
        job_snapshot(
            j.sched_id,
            j.sector,
            j.task_type,
            j.worker.name,
            j.phase.value,
            now - j.started_at,
            _host(j.worker),
            _transfer(j.worker, j.sched_id),
        )
        for j in held
    ]
    out += [
        job_snapshot(r.sched_id, r.sector, r.task_type, None, "queued", now - r.enqueued_at)
        for r in queued
    ]
    return out


@dataclass(frozen=True, slots=True)
class Departed:
    """A remote worker that left the cluster: `sched-diag` says so instead of forgetting it."""

    name: str
    at: float
    why: str
    task_types: frozenset[TaskType]
    #: An in-process worker removed on purpose (e.g. `local_worker = false`) is not "lost".
    remote: bool


class _Clocked(Protocol):
    """What `DepartedLog` reads from its scheduler."""

    @property
    def index(self) -> StorageIndex: ...

    @property
    def clock(self) -> _Clock: ...


class _Clock(Protocol):
    def now(self) -> float: ...


def _ago(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


class DepartedLog:
    """Workers removed during this run, so `diag` can say why they take nothing.

    A remote worker that did the task and left is "lost N s ago"; a name whose storage
    paths the index still declares, with no worker of that name in the cluster (nor one
    that left during this run), is "not connected".
    """

    __slots__ = ("_sched", "gone")

    def __init__(self, sched: _Clocked) -> None:
        self._sched = sched
        self.gone: dict[str, Departed] = {}

    def record(self, w: Worker) -> None:
        """Worker `w` was removed from the scheduler just now."""
        backend = w.backend
        remote = isinstance(backend, RemoteBackend)
        lost = backend.describe().get("lost") if isinstance(backend, RemoteBackend) else None
        why = str(lost or "left the cluster")
        tasks = frozenset(w.spec.task_types)
        self.gone[w.name] = Departed(w.name, self._sched.clock.now(), why, tasks, remote)

    def reasons(self, task: TaskType, present: Iterable[str]) -> dict[str, str]:
        """Why workers the scheduler cannot reach do not take `task`, by name."""
        here = set(present)
        now = self._sched.clock.now()
        out: dict[str, str] = {}
        for d in self.gone.values():
            if d.remote and d.name not in here and task in d.task_types:
                out[d.name] = f"lost {_ago(now - d.at)} ago ({d.why})"
        for p in self._sched.index.paths.values():
            name = p.worker
            if name is None or name in here or name in self.gone or name in out:
                continue
            out[name] = "not connected: its storage paths are declared but it is not in the cluster"
        return out


SNAPSHOT_KEY = b"sched/snapshot"


def publish_snapshot(store: LmdbStore, snapshot: dict[str, Any]) -> None:
    """Stage the scheduler's latest snapshot (one record, replaced each time) for the store.

    It goes into the engine's next group commit rather than a transaction of its own, so
    publishing never blocks the event loop on a disk write (the daemon publishes every tick).
    """
    store.committer.put("meta", SNAPSHOT_KEY, packb(snapshot))


def load_snapshot(store: LmdbStore) -> dict[str, Any] | None:
    """The last published snapshot (its `at` field is when it was taken), or None."""
    with store.read() as txn:
        raw = txn.get(SNAPSHOT_KEY, db=store.db("meta"))
    if raw is None:
        return None
    data = unpackb(raw)
    return data if isinstance(data, dict) else None
