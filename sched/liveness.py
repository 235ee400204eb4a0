"""Heartbeat grace: silent remote workers are disabled, and get no work they have not started.

A remote worker that stops heartbeating (SIGSTOP, a hung host, a partition) is disabled once
its grace has passed, with the reason "no heartbeat for N s", and its next heartbeat enables
it again: Lotus's `checkSession` does the same on its pings (`extern/sector-storage/
sched_worker.go@v1.11.3`), and then re-queues the tasks still in the worker's windows, those
assigned to it but not started.

Here a task assigned to a remote worker (`WorkerSpec.remote`) is handed to it, its `work`
started, only while the worker's last heartbeat is at most `start_window` seconds old. A task
assigned in between waits in `ready`: it starts when a heartbeat arrives, or goes back to the
queue (and so to another worker) when its worker is disabled or removed. Such a task never
reached the worker, so it cannot run there as well when the worker resumes.

A job handed over before the silence showed (within `start_window` of the last heartbeat) is
RUNNING and stays with its worker; it is never re-queued by the grace, because the engine
cannot tell whether a frozen worker received it, and Dask's `Future.cancel()` does not stop a
task that started: withdrawing it could run it twice. Its fate is Dask's:

* the worker resumes before Dask's `worker-ttl`: the job finishes there and its result comes
  back to the task that waited for it, once;
* Dask drops the worker at `worker-ttl` first: the job fails at once (`allowed-failures: 0`,
  the backend's `RemoteWorkerLost`) and the sector's state machine retries it elsewhere under
  a new attempt, as for a worker that died.

Silence is only the workers' fault while the engine listens. If the engine's own loop stalls
(a swap storm, a long collection, the process stopped), the heartbeats wait unread in its
sockets, and the first check after it would disable every worker. So a monitor round that
wakes `STALL` seconds or more late restarts every worker's grace from that moment.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from ..fsm.clock import Clock
from .workers import InProcessBackend, Worker

log = logging.getLogger("sectorfsm.sched")

#: The longest `start_window`: a heartbeat older than this holds back new work.
MAX_START_WINDOW = 5.0

#: A monitor round this many seconds late means the engine itself stalled.
STALL = 1.0


def start_window(w: Worker) -> float | None:
    """How fresh `w`'s last heartbeat must be for work to start there (None: no limit)."""
    if not w.spec.remote or not w.spec.needs_heartbeats:
        return None
    return min(MAX_START_WINDOW, w.spec.heartbeat_grace / 2)


def late_reason(seconds: float) -> str:
    """The disabled reason of a worker silent for `seconds`."""
    return f"no heartbeat for {seconds:.0f} s"


def is_late_reason(reason: str) -> bool:
    """True if `reason` is the grace's own (a heartbeat lifts it, nothing else does)."""
    return reason.startswith("no heartbeat for ")


def _heartbeats(w: Worker) -> bool:
    return w.spec.needs_heartbeats and not isinstance(w.backend, InProcessBackend)


class Liveness:
    """Applies the heartbeat grace to the scheduler's workers and holds back unstarted work."""

    __slots__ = ("_clock", "_disable", "_resumed", "_waiters")

    def __init__(self, clock: Clock, disable: Callable[[str, str], None]) -> None:
        self._clock = clock
        self._disable = disable
        #: `clock.now()` when the engine last came back from a stall of its own.
        self._resumed = float("-inf")
        #: Worker name -> futures of the tasks waiting in `ready` for it.
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    def refresh_local(self, workers: Iterable[Worker]) -> None:
        """In-process workers live as long as the monitor runs: only remote ones fall silent."""
        now = self._clock.now()
        for w in workers:
            if isinstance(w.backend, InProcessBackend):
                w.last_heartbeat = now

    def resumed(self, stalled: float, workers: Iterable[Worker]) -> None:
        """The engine's loop stalled `stalled` s: every worker's grace starts again now."""
        self._resumed = self._clock.now()
        # Said only where it matters: a busy simulation has no worker that heartbeats.
        if any(_heartbeats(w) for w in workers):
            log.warning("engine stalled %.1f s: heartbeat graces start again", stalled)

    def check(self, workers: Iterable[Worker]) -> None:
        """Disable every worker past its heartbeat grace."""
        now = self._clock.now()
        for w in workers:
            late = now - w.last_heartbeat
            silent = min(late, now - self._resumed)  # silent while the engine listened
            if w.spec.needs_heartbeats and w.enabled and silent > w.spec.heartbeat_grace:
                log.warning("worker %s: no heartbeat for %.0f s: disabled", w.name, late)
                self._disable(w.name, late_reason(late))

    def wake(self, name: str) -> None:
        """Something changed for worker `name` (a heartbeat, disabled, removed): re-test."""
        for fut in self._waiters.pop(name, []):
            if not fut.done():
                fut.set_result(None)

    async def ready(self, w: Worker, present: Callable[[str], Worker | None]) -> bool:
        """Wait until work may start on `w`: True, or False if it was disabled or removed."""
        while True:
            if not w.enabled or present(w.name) is not w:
                return False
            window = start_window(w)
            if window is None or self._clock.now() - w.last_heartbeat <= window:
                return True
            fut = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(w.name, []).append(fut)
            try:
                await fut
            finally:
                waiting = self._waiters.get(w.name)
                if waiting is not None and fut in waiting:
                    waiting.remove(fut)
