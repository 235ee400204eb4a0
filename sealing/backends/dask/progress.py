"""Progress of the file transfers a job waits on, from the copying side to `sectors jobs`.

The side that copies (the destination worker for a fetch, the engine for piece data it sends)
feeds a `Reporter`: it publishes `{"job", "done", "total", "rate"}` at most once per
`interval`, yet always the latest value (a trailing report follows a burst), and once more
at the end with `"end": True`. A worker publishes through its Dask event log on
`PROGRESS_TOPIC`; the engine's `TransferBoard` (one per client) subscribes to that topic and
keeps the latest report of each running transfer, under the job tag it was started with.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

#: The Dask event topic a worker reports transfer progress on.
PROGRESS_TOPIC = "sectorfsm-transfer"
#: Seconds between two reports of one transfer (the last one is never held back longer).
INTERVAL = 0.5

Publish = Callable[[dict[str, Any]], None]


class Reporter:
    """Throttled progress of one transfer: `__call__(done, total)` as bytes are verified."""

    def __init__(
        self,
        job: str,
        publish: Publish,
        *,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Report transfer `job` through `publish`, at most once per `interval` seconds."""
        self.job = job
        self.publish = publish
        self.interval = interval
        self.clock = clock
        self._start: tuple[float, int] | None = None
        self._last = float("-inf")
        self._latest: dict[str, Any] | None = None
        self._pending: asyncio.TimerHandle | None = None

    def __call__(self, done: int, total: int) -> None:
        """`done` of `total` bytes are in place."""
        now = self.clock()
        if self._start is None:
            self._start = (now, done)  # bytes resumed from a part file are not this pull's rate
        t0, d0 = self._start
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        self._latest = {"job": self.job, "done": done, "total": total, "rate": round(rate)}
        if now - self._last >= self.interval:
            self._flush()
        elif self._pending is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop to wake us: the next call or `end` reports it
            wait = self.interval - (now - self._last)
            self._pending = loop.call_later(wait, self._flush)

    def _flush(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._latest is not None:
            self._last = self.clock()
            self.publish(self._latest)
            self._latest = None

    def end(self, error: str | None = None) -> None:
        """The transfer is over (`error`: why it failed): a last report, then no more."""
        last = self._latest
        self._latest = None
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self.publish({**(last or {"job": self.job}), "end": True, "error": error})


class TransferBoard:
    """The engine's view of running transfers: the latest report of each, by job tag."""

    _boards: ClassVar[weakref.WeakKeyDictionary[Any, TransferBoard]] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        """An empty board (`of(client)` gives the one fed by a client's subscription)."""
        self._rows: dict[str, dict[str, Any]] = {}

    @classmethod
    def of(cls, client: Any, *, create: bool = True) -> TransferBoard | None:
        """The board fed by `client`'s subscription to `PROGRESS_TOPIC` (made on first use)."""
        board = cls._boards.get(client)
        if board is None and create:
            board = cls._boards[client] = cls()
            client.subscribe_topic(PROGRESS_TOPIC, board.on_event)
        return board

    def on_event(self, event: Any) -> None:
        """A Dask topic event `(time, report)`: record it."""
        msg = event[1] if isinstance(event, tuple | list) and len(event) == 2 else event
        if isinstance(msg, dict):
            self.update(msg)

    def update(self, msg: dict[str, Any]) -> None:
        """Record one report; an `end` report removes its transfer."""
        job = msg.get("job")
        if not isinstance(job, str) or not job:
            return
        if msg.get("end"):
            self._rows.pop(job, None)
            return
        try:
            row = {k: int(msg[k]) for k in ("done", "total", "rate")}
        except (KeyError, TypeError, ValueError):
            return  # a malformed report: the view keeps the last good one
        self._rows[job] = row

    def get(self, job: str) -> dict[str, Any] | None:
        """The latest `{"done", "total", "rate"}` of transfer `job`, or None if none runs."""
        row = self._rows.get(job)
        return None if row is None else dict(row)
