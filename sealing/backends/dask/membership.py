"""Remote workers joining and leaving: Dask's membership drives the engine's scheduler.

`open_cluster` runs a Dask scheduler inside the engine's process and event loop (`listen`),
or connects to one started with `dask scheduler` (`scheduler`). Either way an asyncio queue
is fed with membership events: by a `SchedulerPlugin` for the embedded scheduler (no
pickling, same loop), by the scheduler's `all` topic for an external one. Each event, and
a poll every `beat` seconds, reconciles the scheduler with Dask's worker list:

* join: the worker's identity (`startup_information["sectorfsm"]`) becomes a `WorkerSpec`
  added under the worker's name with a `DaskWorkerBackend` on its current address; a worker
  with a malformed identity (or none) is refused with a log line and a reason for the views;
  the sector files it reports go to `on_join` (the sealer reconciles its index with them:
  `ScheduledSealer.worker_joined`) before any task can be placed on it;
* heartbeat (`metrics["sectorfsm"]`): `sched.heartbeat`, free space per path into the
  storage index, and the policy the worker read from its own file;
* leave: `sched.remove_worker`, and the jobs still waiting on it fail at once;
* stale jobs: given the engine's attempt counters (`attempts`), the first heartbeat of each
  join (sent with the join itself) lists the worker's jobs, and those of superseded attempts
  that nobody waits on are killed and forgotten there (`stale.py`).

Dask's settings follow what was measured: `allowed-failures: 0` (a dead worker's task fails
in milliseconds and our FSM decides the retry), a short `worker-ttl`, no work stealing.
Dask starts an HTTP server with every scheduler, even with `dashboard=False`, on port 8787 of
every interface, without TLS or login (prometheus, info, json, proxy routes): ours gets no
routes and listens on loopback only, so the comm port is the cluster's one way in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import dask.config
from distributed import Client, Scheduler, Security
from distributed.diagnostics.plugin import SchedulerPlugin

from ....sched import Scheduler as SectorScheduler
from ....sched.pushed import PushedPolicy
from .backend import DaskWorkerBackend
from .identity import IDENTITY_KEY, METRICS_KEY, WorkerHeartbeat, WorkerIdentity
from .stale import Attempts, discard, superseded

log = logging.getLogger("sectorfsm.cluster")

#: Seconds between two reconciliations when no event arrives (heartbeats are read then).
BEAT = 1.0
#: Where Dask's HTTP server (which cannot be turned off) listens: loopback, any free port.
HTTP_ADDRESS = "127.0.0.1:0"

Infos = Callable[[], Awaitable[dict[str, dict[str, Any]]]]
#: `(worker name, its path ids, the files it holds as (path id, kind, name, size))`.
OnJoin = Callable[[str, list[str], list[tuple[str, str, str, int]]], None]


def dask_config(worker_ttl: float, *, secure: bool) -> dict[str, Any]:
    """The Dask settings the engine runs its cluster with."""
    config: dict[str, Any] = {
        "distributed.scheduler.allowed-failures": 0,
        "distributed.scheduler.worker-ttl": f"{worker_ttl:g}s",
        "distributed.scheduler.work-stealing": False,
        "distributed.scheduler.http.routes": [],
    }
    if secure:
        config["distributed.comm.require-encryption"] = True
    return config


class _Feed(SchedulerPlugin):
    """Puts the embedded scheduler's joins and leaves on the membership queue."""

    name = "sectors-membership"

    def __init__(self, queue: asyncio.Queue[tuple[str, str]]) -> None:
        self.queue = queue

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        """A worker joined."""
        self.queue.put_nowait(("join", worker))

    def remove_worker(
        self, scheduler: Scheduler, worker: str, *, stimulus_id: str, **kwargs: Any
    ) -> None:
        """A worker left (or was dropped)."""
        self.queue.put_nowait(("leave", worker))


@dataclass(slots=True)
class Membership:
    """Keeps the scheduler's remote workers in step with Dask's worker list."""

    sched: SectorScheduler
    client: Client
    infos: Infos
    say: Callable[[str], None] = print
    queue: asyncio.Queue[tuple[str, str]] = field(default_factory=asyncio.Queue)
    #: Address -> the backend of the worker there.
    members: dict[str, DaskWorkerBackend] = field(default_factory=dict)
    #: Address -> why the worker there was refused.
    refused: dict[str, str] = field(default_factory=dict)
    #: Told of each worker that joined and the sector files it reported.
    on_join: OnJoin | None = None
    #: The engine's current attempt of a sector's task: jobs of older ones are discarded.
    attempts: Attempts | None = None
    #: Addresses whose jobs were swept for stale ones since they joined.
    swept: set[str] = field(default_factory=set)
    #: Sweeps under way (killing a job waits for its child to end).
    sweeps: set[asyncio.Task[None]] = field(default_factory=set)

    async def run(self, beat: float = BEAT) -> None:
        """Reconcile on every event, and every `beat` seconds."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.queue.get(), beat)
            while not self.queue.empty():
                self.queue.get_nowait()
            try:
                await self.reconcile()
            except Exception:  # a bad round must not end membership for the engine's lifetime
                log.exception("cluster membership: reconcile failed")

    async def reconcile(self) -> None:
        """Apply every join, heartbeat and leave since the last call."""
        infos = await self.infos()
        for address in [a for a in self.members if a not in infos]:
            self._leave(address)
        for address in [a for a in self.refused if a not in infos]:
            del self.refused[address]
        for address, info in infos.items():
            if address in self.members:
                self._beat(self.members[address], info)
            elif address not in self.refused:
                self._join(address, info)

    def _join(self, address: str, info: dict[str, Any]) -> None:
        raw = info.get(IDENTITY_KEY)
        try:
            if raw is None:
                raise ValueError(f"declares no {IDENTITY_KEY!r} identity (not a `sectors worker`)")
            identity = WorkerIdentity.from_wire(_plain(raw))
            holder = next((b for b in self.members.values() if b.name == identity.name), None)
            if holder is not None:
                raise ValueError(f"name {identity.name!r} is used by {holder.address} already")
        except ValueError as exc:
            reason = f"refused: {exc}"
            self.refused[address] = reason
            log.error("worker %s at %s %s", info.get("name"), address, reason)
            self.say(f"worker {info.get('name')} at {address} {reason}")
            return
        backend = DaskWorkerBackend(self.client, address, identity, str(info.get("host", "")))
        self.sched.add_worker(identity.to_spec(), backend)
        self.members[address] = backend
        if self.on_join is not None:
            # Before this returns to the loop: no task is placed on the worker until its
            # files are in the index (and those it lost are out of it).
            held = [(f.path_id, f.kind, f.name, f.size) for f in identity.files]
            try:
                self.on_join(identity.name, [p.id for p in identity.paths], held)
            except Exception:  # the worker is in; a failed reconcile is logged, not fatal
                log.exception("worker %s: reconciling its files failed", identity.name)
        if identity.policy.file is not None:
            pushed = PushedPolicy(identity.policy.file)
            p = identity.policy
            pushed.update(p.fields, p.error, p.loaded_at)
            self.sched.use_policy(identity.name, pushed)
        tasks = ",".join(sorted(t.short for t in identity.tasks))
        self.say(f"worker {identity.name} joined from {address} ({tasks})")
        self._beat(backend, info)

    def _beat(self, backend: DaskWorkerBackend, info: dict[str, Any]) -> None:
        last_seen = float(info.get("last_seen") or 0.0)
        if backend.last_seen is not None and last_seen <= backend.last_seen:
            return
        raw = (info.get("metrics") or {}).get(METRICS_KEY)
        try:
            heartbeat = WorkerHeartbeat() if raw is None else WorkerHeartbeat.from_wire(_plain(raw))
        except ValueError as exc:
            log.error("worker %s: bad heartbeat ignored: %s", backend.name, exc)
            heartbeat = WorkerHeartbeat(policy=backend.policy)
        backend.beat(heartbeat, last_seen)
        if raw is not None:
            self._sweep(backend)
        if self.sched.find_worker(backend.name) is None:
            return
        self.sched.heartbeat(backend.name)
        for path in self.sched.index.worker_paths(backend.name):
            free = heartbeat.free.get(path.id)
            if free is not None:  # the disk's other users, as the index counts them
                path.used = max(0, path.capacity - free - path.stored - path.reserved)
        w = self.sched.worker(backend.name)
        if raw is not None and isinstance(w.watcher, PushedPolicy):
            p = heartbeat.policy
            if w.watcher.update(p.fields, p.error, p.loaded_at):
                log.info("worker %s: policy from %s in force", backend.name, p.file)

    def _sweep(self, backend: DaskWorkerBackend) -> None:
        """Once per join: kill and forget the worker's jobs of superseded attempts."""
        if self.attempts is None or backend.address in self.swept:
            return
        self.swept.add(backend.address)
        try:
            stale = superseded(backend.jobs, self.attempts, self._waited_on)
        except Exception:  # the counters are unreadable now: keep the jobs, try next beat
            log.exception("worker %s: looking for stale jobs failed", backend.name)
            self.swept.discard(backend.address)
            return
        if stale:
            task = asyncio.get_running_loop().create_task(self._discard(backend, stale))
            self.sweeps.add(task)
            task.add_done_callback(self.sweeps.discard)

    def _waited_on(self, job_id: str) -> bool:
        return any(b.waits_on(job_id) for b in self.members.values())

    async def _discard(self, backend: DaskWorkerBackend, stale: list[str]) -> None:
        try:
            ends = await discard(self.client, backend.address, stale)
        except Exception as exc:  # left again, or unreachable: its next join sweeps again
            log.warning("worker %s: could not discard stale jobs %s: %s", backend.name, stale, exc)
            self.swept.discard(backend.address)
            return
        said = ", ".join(f"{job_id} ({state})" for job_id, state in sorted(ends.items()))
        self.say(f"worker {backend.name}: discarded jobs of superseded attempts: {said}")

    def _leave(self, address: str) -> None:
        self.swept.discard(address)
        backend = self.members.pop(address)
        backend.lost("left the cluster")
        w = self.sched.find_worker(backend.name)
        if w is not None and w.backend is backend:
            self.sched.remove_worker(backend.name)
        self.say(f"worker {backend.name} left ({address})")

    def snapshot(self) -> dict[str, Any]:
        """The remote workers and the refused ones, for the views."""
        return {
            "members": {b.name: b.describe() for b in self.members.values()},
            "refused": dict(self.refused),
        }


@dataclass(slots=True)
class Cluster:
    """The engine's side of the cluster: a client, the scheduler's address, membership."""

    client: Client
    address: str
    membership: Membership
    #: The embedded Dask scheduler (None when connected to an external one).
    scheduler: Scheduler | None = None


def _listen_kwargs(listen: str) -> dict[str, Any]:
    parts = urlsplit(listen if "://" in listen else f"tcp://{listen}")
    return {"protocol": parts.scheme, "host": parts.hostname or "", "port": parts.port or 0}


@contextlib.asynccontextmanager
async def open_cluster(
    sched: SectorScheduler,
    *,
    listen: str | None = None,
    scheduler: str | None = None,
    security: Security | None = None,
    worker_ttl: float = 60.0,
    say: Callable[[str], None] = print,
    beat: float = BEAT,
    on_join: OnJoin | None = None,
    attempts: Attempts | None = None,
) -> AsyncIterator[Cluster]:
    """Run (`listen`) or join (`scheduler`) the Dask cluster; membership runs until exit.

    `on_join` hears of every worker that joins and the sector files it holds. With
    `attempts` (the dask sealer's `attempt`), a joining worker's jobs of superseded
    attempts are killed and forgotten.
    """
    if (listen is None) == (scheduler is None):
        raise ValueError("give exactly one of listen or scheduler")
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    with dask.config.set(dask_config(worker_ttl, secure=security is not None)):
        async with contextlib.AsyncExitStack() as stack:
            embedded: Scheduler | None = None
            if listen is not None:
                started = Scheduler(
                    **_listen_kwargs(listen),
                    dashboard=False,
                    dashboard_address=HTTP_ADDRESS,
                    security=security,
                )
                embedded = await stack.enter_async_context(started)
                started.add_plugin(_Feed(queue))
                address = started.address
            else:
                address = scheduler or ""
            client: Client = await stack.enter_async_context(
                Client(address, asynchronous=True, security=security)  # type: ignore[no-untyped-call]
            )
            infos = _embedded_infos(embedded) if embedded is not None else _remote_infos(client)
            if embedded is None:
                client.subscribe_topic(  # type: ignore[no-untyped-call]
                    "all", lambda event: _on_topic(queue, event)
                )
            membership = Membership(
                sched, client, infos, say, queue, on_join=on_join, attempts=attempts
            )
            task = asyncio.get_running_loop().create_task(membership.run(beat))
            try:
                await membership.reconcile()
                yield Cluster(client, address, membership, embedded)
            finally:
                for t in (task, *membership.sweeps):
                    t.cancel()
                await asyncio.gather(task, *membership.sweeps, return_exceptions=True)
                for backend in membership.members.values():
                    backend.lost("is out of reach: the engine is stopping", engine_stopping=True)


def _plain(value: Any) -> Any:
    """`value` with Dask's msgpack tuples back as the lists the worker sent."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _on_topic(queue: asyncio.Queue[tuple[str, str]], event: Any) -> None:
    msg = event[1] if isinstance(event, tuple | list) and len(event) == 2 else event
    if isinstance(msg, dict) and msg.get("action") in ("add-worker", "remove-worker"):
        queue.put_nowait((str(msg["action"]), str(msg.get("worker"))))


def _embedded_infos(scheduler: Scheduler) -> Infos:
    async def infos() -> dict[str, dict[str, Any]]:
        return {address: ws.identity() for address, ws in scheduler.workers.items()}

    return infos


def _remote_infos(client: Client) -> Infos:
    async def infos() -> dict[str, dict[str, Any]]:
        rpc = client.scheduler
        if rpc is None:
            raise RuntimeError("the client is not connected to a scheduler")
        identity = await rpc.identity()
        return dict(identity.get("workers", {}))

    return infos
