"""The scheduler's handle on one remote `sectors worker`: a `WorkerBackend` over Dask.

Each job is submitted through the worker's job registry (`jobs.submit`), pinned to the
worker's current address with a key of its own per attempt, so it runs in a child process
there that `kill` really stops (`Future.cancel()` would leave it running). When membership
sees the worker leave, every job still waiting on it fails at once, so its sector retries
elsewhere instead of waiting for Dask to notice.

A finished job's Dask future is released with the client's next submit (`Releases`), not
on its own: the client sends to the scheduler at most once per 10 ms (its `BatchedSend`),
so a release sent alone a few loop turns before the next job's submit held that submit back
for the rest of the interval, about 10 ms per job when jobs ran one after the other.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import weakref
from collections.abc import Callable
from typing import Any

from distributed import Client, Future
from distributed.scheduler import KilledWorker

from . import jobs
from .acks import AckBatch
from .identity import PolicyReport, WorkerHeartbeat, WorkerIdentity
from .progress import TransferBoard

log = logging.getLogger("sectorfsm.cluster")

#: Seconds a finished job's future waits for a submit to carry its release.
RELEASE_DELAY = 0.5


class RemoteWorkerLost(RuntimeError):
    """The worker a job ran on left the cluster before the job finished."""


class EngineStopping(asyncio.CancelledError):
    """The engine stops while a job runs: the job runs on, and its attempt stays open.

    A cancellation, not an error: the step that waited ends without an event (its sector
    stays in its state), so the restarted engine runs that step again, asks for the same job
    id and collects the job, as it does after a kill -9. Killing the job instead would throw
    away hours of PreCommit1 at every `systemctl restart`.
    """


class Releases:
    """Finished futures of one client, released in the same step as its next submit.

    Both then leave in one message to the scheduler. Futures no submit carried within
    `RELEASE_DELAY` seconds are released then: an idle engine holds no result for long.
    """

    __slots__ = ("_delay", "_futures", "_timer")

    def __init__(self, delay: float = RELEASE_DELAY) -> None:
        self._delay = delay
        self._futures: list[Future[Any]] = []
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, client: Client) -> Releases:
        """The releases pending on `client` (one queue per client: it is one stream)."""
        found = _RELEASES.get(client)
        if found is None:
            found = _RELEASES[client] = cls()
        return found

    def add(self, future: Future[Any]) -> None:
        """Release `future` with the next submit, or within `RELEASE_DELAY` s."""
        self._futures.append(future)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self.flush)

    def pending(self) -> int:
        """How many futures wait for their release."""
        return len(self._futures)

    def flush(self) -> int:
        """Release every pending future now (right before a submit); how many."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        futures, self._futures = self._futures, []
        for future in futures:
            try:
                future.release()  # type: ignore[no-untyped-call]
            except Exception as exc:  # a closed client has dropped its futures already
                log.debug("release of %s: %s", future.key, exc)
        return len(futures)


_RELEASES: weakref.WeakKeyDictionary[Client, Releases] = weakref.WeakKeyDictionary()


def function_path(fn: Callable[..., Any]) -> str:
    """`module:qualname` of a module-level function (what the worker's child imports)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname:
        raise ValueError(f"{fn!r} is not a module-level function: a remote worker cannot run it")
    return f"{module}:{qualname}"


class DaskWorkerBackend:
    """Runs a worker's jobs on its machine, through Dask and the worker's job registry."""

    def __init__(self, client: Client, address: str, identity: WorkerIdentity, host: str) -> None:
        self.client = client
        self.address = address
        self.identity = identity
        self.host = host
        #: Per engine start: a job id never names work of an earlier run of the engine.
        self.epoch = secrets.token_hex(3)
        self.last_seen: float | None = None
        self.free: dict[str, int] = {}
        self.policy: PolicyReport = identity.policy
        self.jobs: dict[str, str] = {}
        self.lost_reason: str | None = None
        #: Lost because the engine stops (not the worker): waiting jobs end as `EngineStopping`.
        self.engine_stopping = False
        #: One per job waited on here: resolved by the job's end, or by `lost`.
        self._wakes: set[asyncio.Future[None]] = set()
        self._running: dict[int, str] = {}
        self.acks = AckBatch(client, address)

    @property
    def releases(self) -> Releases:
        """The futures of finished jobs on this backend's client, awaiting their release."""
        return Releases.of(self.client)

    @property
    def name(self) -> str:
        """The worker's name."""
        return self.identity.name

    def job_key(self, job_id: int) -> str:
        """The Dask key and registry id of the scheduler's job `job_id` on this worker.

        Its first word is the same for every job: Dask groups keys by it (`key_split`), and
        a word per job (`j17-...`) made a task prefix per job in the scheduler and in the
        worker's metrics, each kept for good and sent on with every heartbeat.
        """
        return f"job-{job_id}-{self.epoch}"

    def waits_on(self, key: str) -> bool:
        """Whether a call of the engine waits on job `key` here now."""
        return key in self._running.values()

    def beat(self, heartbeat: WorkerHeartbeat, last_seen: float) -> None:
        """Record what the worker said on its latest heartbeat."""
        self.last_seen = last_seen
        self.free = dict(heartbeat.free)
        self.policy = heartbeat.policy
        self.jobs = dict(heartbeat.jobs)

    def lost(self, reason: str, *, engine_stopping: bool = False) -> None:
        """The worker left: fail every job waiting on it, and refuse new ones.

        With `engine_stopping`, it is the engine that goes: the jobs are left running.
        """
        self.lost_reason = reason
        self.engine_stopping = engine_stopping
        for wake in self._wakes:
            if not wake.done():
                wake.set_result(None)
        self.acks.drop()

    async def submit(self, job_id: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` in a child process on the worker; its result or its error."""
        key = self.job_key(job_id)
        value = await self.call(job_id, key, function_path(fn), list(args))
        # The result is in the engine's hands now: the worker may forget it.
        await self.ack(key)
        return value

    async def call(self, job_id: int, key: str, func: str, args: list[Any]) -> Any:
        """Run job `key` (`func(*args)`) on the worker and return its result, NOT acked.

        The worker keeps the result until `ack(key)`, so an engine that dies before it
        recorded the result gets it again by submitting the same key. Cancelling the caller
        kills the job there.
        """
        if self.lost_reason is not None:
            raise RemoteWorkerLost(f"worker {self.name} {self.lost_reason}")
        if self.releases.flush():
            # Dask applies a release on the next loop turn: after it, this submit follows it
            # in the same message, and a resubmitted id gets a new future, not the old one.
            await asyncio.sleep(0)
            if self.lost_reason is not None:
                raise RemoteWorkerLost(f"worker {self.name} {self.lost_reason}")
        acks = self.acks.take()  # they ride with this job: no round trip of their own
        try:
            future = jobs.submit(self.client, self.address, key, func, args, acks)
        except Exception:  # refused before it left: the acks wait for the next job
            self.acks.put_back(acks)
            raise
        self._running[job_id] = key

        async def result() -> Any:
            return await future

        # No task per job to watch for `lost`, and none to cancel and reap when the job
        # ends: the job's end and `lost` resolve the same future.
        waiting = asyncio.ensure_future(result())
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wakes.add(wake)

        def ended(_: object) -> None:
            if not wake.done():
                wake.set_result(None)

        waiting.add_done_callback(ended)
        try:
            await wake
            if self.engine_stopping:  # whatever the job did: a restarted engine collects it
                raise EngineStopping(f"worker {self.name}: the engine stops; job {key} runs on")
            if not waiting.done():
                raise RemoteWorkerLost(f"worker {self.name} {self.lost_reason}")
            try:
                return waiting.result()
            except KilledWorker:  # Dask's message names the address only: say which worker
                raise RemoteWorkerLost(
                    f"worker {self.name} ({self.address}) died while running job {key}"
                ) from None
        except EngineStopping:
            raise
        except asyncio.CancelledError:
            await asyncio.shield(self.kill(job_id))
            raise
        finally:
            self._wakes.discard(wake)
            if not waiting.done():  # lost, or the caller cancelled
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
            elif not waiting.cancelled():
                waiting.exception()  # seen, whichever way this call ended
            self._running.pop(job_id, None)
            self.releases.add(future)

    async def ack(self, key: str) -> None:
        """Let the worker forget job `key`'s record and result (best effort).

        Queued (`acks.py`): the worker's next job carries it, or it is sent within
        `ACK_DELAY` s with whatever else is queued.
        """
        if self.lost_reason is not None:
            return
        self.acks.add(key)

    async def kill(self, job_id: int) -> None:
        """Kill the job's child on the worker (nothing if it already ended or the worker left)."""
        key = self._running.get(job_id)
        if key is None or self.lost_reason is not None:
            return
        try:
            await jobs.kill(self.client, self.address, key)
        except Exception as exc:  # the worker may be gone: then so is the child (PDEATHSIG)
            log.warning("worker %s: could not kill job %s: %s", self.name, key, exc)

    def transfer(self, job_id: int) -> dict[str, Any] | None:
        """The running file transfer of the scheduler's job `job_id` here (done, total, rate)."""
        board = TransferBoard.of(self.client, create=False)
        return None if board is None else board.get(self.job_key(job_id))

    def describe(self) -> dict[str, Any]:
        """Host, address, heartbeat, free space and policy, for `sectors workers`."""
        return {
            "host": self.host,
            "address": self.address,
            "backend": self.identity.backend,
            "last_heartbeat": self.last_seen,
            "heartbeat_age_s": None
            if self.last_seen is None
            else round(max(0.0, time.time() - self.last_seen), 3),
            "free": dict(self.free),
            "policy": self.policy.to_wire(),
            "jobs": dict(self.jobs),
            "lost": self.lost_reason,
        }
