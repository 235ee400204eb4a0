"""Injectable clocks: all waiting in the engine and its domains goes through one of these.

`RealClock` is wall time. `VirtualClock` is simulated time that jumps straight to the next timer
as soon as every task on the event loop is waiting (and nothing holds the clock busy), so hours
of simulated sealing pass in milliseconds, in the same order they would in real time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """What the engine needs from a clock."""

    def now(self) -> float:
        """Seconds since the Unix epoch (wall or simulated)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of this clock's time."""
        ...

    async def sleep_until(self, when: float) -> None:
        """Wait until `now() >= when`."""
        ...

    def hold(self) -> None:
        """Mark real (off-loop) work in progress; a virtual clock will not jump meanwhile."""
        ...

    def release(self) -> None:
        """End one `hold()`."""
        ...


class RealClock:
    """Wall-clock time; `sleep` is `asyncio.sleep`."""

    def now(self) -> float:
        """Seconds since the Unix epoch."""
        return time.time()

    async def sleep(self, seconds: float) -> None:
        """Sleep for real."""
        await asyncio.sleep(max(0.0, seconds))

    async def sleep_until(self, when: float) -> None:
        """Sleep until the wall clock reaches `when`."""
        await asyncio.sleep(max(0.0, when - time.time()))

    def hold(self) -> None:
        """No-op: real time never waits for anyone."""

    def release(self) -> None:
        """No-op."""

    @contextmanager
    def busy(self) -> Iterator[None]:
        """No-op context manager, for symmetry with `VirtualClock.busy`."""
        yield


class VirtualClock:
    """Simulated time that advances to the next timer whenever the event loop is idle.

    Work that runs off the loop (threads, processes) must be wrapped in `busy()` (or
    `hold()`/`release()`); the engine does this for its commits. `advance()` moves time by
    hand, for tests that want to step through time explicitly (`auto_advance=False`).
    """

    def __init__(self, start: float = 1_600_000_000.0, *, auto_advance: bool = True) -> None:
        self._now = float(start)
        self.auto_advance = auto_advance
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._holds = 0
        self._released: asyncio.Event | None = None
        self._advancer: asyncio.Task[None] | None = None
        #: How many times time jumped (for tests and benchmarks).
        self.jumps = 0

    def now(self) -> float:
        """The simulated time, in seconds since the Unix epoch."""
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of simulated time."""
        # (Not through `sleep_until`: one coroutine per sleep rather than two.)
        when = self._now + seconds
        if when > self._now:
            await self._timer(when)
        else:
            await asyncio.sleep(0)

    async def sleep_until(self, when: float) -> None:
        """Wait until simulated time reaches `when`."""
        if when <= self._now:
            await asyncio.sleep(0)
            return
        await self._timer(when)

    def _timer(self, when: float) -> asyncio.Future[None]:
        """A future that the clock resolves when time reaches `when` (later than now)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._timers, (when, next(self._seq), fut))
        advancer = self._advancer
        if self.auto_advance and (advancer is None or advancer.done()):
            self._advancer = loop.create_task(self._run(loop), name="virtual-clock")
        return fut

    def hold(self) -> None:
        """Forbid time jumps until the matching `release()`."""
        self._holds += 1

    def release(self) -> None:
        """End one `hold()`."""
        self._holds -= 1
        if self._holds <= 0:
            self._holds = 0
            if self._released is not None:
                self._released.set()

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Hold the clock for the duration of the block."""
        self.hold()
        try:
            yield
        finally:
            self.release()

    @property
    def pending_timers(self) -> int:
        """Timers not yet fired (cancelled ones excluded)."""
        return sum(1 for _, _, f in self._timers if not f.done())

    def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`, firing every timer that falls due."""
        self._fire_until(self._now + max(0.0, seconds))

    def _fire_until(self, when: float) -> None:
        timers, pop, now = self._timers, heapq.heappop, self._now
        # (`set_result` only schedules the sleepers: none runs, nor reads the time, meanwhile.)
        while timers and timers[0][0] <= when:
            due, _, fut = pop(timers)
            if due > now:
                now = due
            if not fut.done():
                fut.set_result(None)
        self._now = when if when > now else now

    async def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            while self._timers and self._timers[0][2].done():
                heapq.heappop(self._timers)  # cancelled sleepers
            if not self._timers:
                return
            settled = 0
            # Other virtual clocks on this loop wait for idleness the same way: each one's
            # wake-up is a ready callback the others must not count, or they keep one
            # another busy for ever (a leftover clock of an engine that closed, say).
            settling = _SETTLING.setdefault(loop, set())
            settling.add(self)
            try:
                while settled < 3:
                    await asyncio.sleep(0)
                    if self._holds:
                        if self._released is None:
                            self._released = asyncio.Event()
                        self._released.clear()
                        settling.discard(self)
                        await self._released.wait()
                        settling.add(self)
                        settled = 0
                    elif _loop_is_idle(loop, len(settling) - 1):
                        settled += 1
                    else:
                        settled = 0
            finally:
                settling.discard(self)
            while self._timers and self._timers[0][2].done():
                heapq.heappop(self._timers)
            if not self._timers:
                return
            due = self._timers[0][0]
            self.jumps += 1
            self._fire_until(due)


#: The virtual clocks of each loop that are waiting for it to be idle.
_SETTLING: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[VirtualClock]] = (
    weakref.WeakKeyDictionary()
)


def _loop_is_idle(loop: asyncio.AbstractEventLoop, clocks: int = 0) -> bool:
    """True if no callback but the caller and `clocks` other settling clocks is ready."""
    # CPython's loops keep runnable callbacks in `_ready`; other loops get a conservative
    # answer from the caller's repeated yields instead.
    ready = getattr(loop, "_ready", None)
    return True if ready is None else len(ready) <= clocks
