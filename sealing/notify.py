"""State-change notifications for embedders (Lotus's `notifee`, `storage-sealing/fsm.go@v1.11.3`).

`Miner.subscribe()` returns a `Subscription`: an async iterator of `StateChange`s, one per
planner round that moved a sector to another state, delivered only once the commit that
recorded the change is durable (a change that a failed commit undid is never reported).

Each subscription has a bounded buffer, so a slow consumer never stalls the engine: when it is
full, changes are dropped and counted, and the consumer reads one `Gap(missed=N)` in their
place, in order, before the changes that came after. Without subscribers a round costs
nothing more than an attribute check.

In-process listeners (`StateChanges.add_listener`, used by the metrics) are different: they
are called synchronously, once per durable change, with nothing buffered or dropped, so they
must be quick (a counter increment) and must not block.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .states import SectorState

log = logging.getLogger("sectorfsm.sealing.notify")


@dataclass(frozen=True, slots=True)
class StateChange:
    """A sector moved from `before` to `after`; `event` is the last event the round applied."""

    sector: int
    before: SectorState
    after: SectorState
    event: str


def state_change(sector: int, before: SectorState, after: SectorState, event: str) -> StateChange:
    """`StateChange(sector, before, after, event)`, built as the planner does at every change."""
    # A frozen dataclass's `__init__` sets each field through `object.__setattr__`: its slots'
    # own setters take half the time, for one object per state change of every sector.
    change = _new(StateChange)
    _set_sector(change, sector)
    _set_before(change, before)
    _set_after(change, after)
    _set_event(change, event)
    return change


_new = object.__new__
_SLOTS: dict[str, Any] = dict(vars(StateChange))  # (each field's slot descriptor)
_set_sector = _SLOTS["sector"].__set__
_set_before = _SLOTS["before"].__set__
_set_after = _SLOTS["after"].__set__
_set_event = _SLOTS["event"].__set__


@dataclass(frozen=True, slots=True)
class Gap:
    """`missed` changes were dropped here because the subscriber's buffer was full."""

    missed: int


class Subscription:
    """An async iterator of `StateChange` and `Gap`; ends when the engine stops or on `close()`."""

    def __init__(self, maxsize: int, on_close: Callable[[Subscription], None]) -> None:
        self.maxsize = maxsize
        self._buffer: collections.deque[StateChange | Gap] = collections.deque()
        self._missed = 0
        self._closed = False
        self._wakeup: asyncio.Future[None] | None = None
        self._on_close = on_close

    def put(self, change: StateChange) -> None:
        """Buffer `change`, or count it as missed if the buffer is full (never blocks)."""
        if self._closed:
            return
        buffer = self._buffer
        if len(buffer) >= self.maxsize:
            self._missed += 1
            return
        if self._missed:
            # (the gap may take the buffer one past its size: it stands for what was dropped)
            buffer.append(Gap(self._missed))
            self._missed = 0
        buffer.append(change)
        self._wake()

    def close(self) -> None:
        """Stop receiving; iteration ends once what is buffered has been read."""
        if not self._closed:
            self._closed = True
            self._on_close(self)
            self._wake()

    def _wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> StateChange | Gap:
        while True:
            if self._buffer:
                return self._buffer.popleft()
            if self._missed:
                missed, self._missed = self._missed, 0
                return Gap(missed)
            if self._closed:
                raise StopAsyncIteration
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class StateChanges:
    """The subscriptions of one engine, fed by the planner through the committer."""

    def __init__(self, on_commit: Callable[..., None]) -> None:
        # `on_commit(callback, *args)`: the store's committer, so a change is delivered
        # only once the round that made it is durable.
        self._on_commit = on_commit
        self._subscriptions: list[Subscription] = []
        self._listeners: list[Callable[[StateChange], None]] = []

    @property
    def active(self) -> bool:
        """True when someone is listening (the planner skips all work otherwise)."""
        return bool(self._subscriptions or self._listeners)

    def add_listener(self, listener: Callable[[StateChange], None]) -> None:
        """Call `listener(change)` on the loop thread for every durable change (never dropped)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[StateChange], None]) -> None:
        """Undo `add_listener`."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def subscribe(self, maxsize: int = 1000) -> Subscription:
        """A new subscription buffering up to `maxsize` changes."""
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize: must be a positive integer, got {maxsize!r}")
        sub = Subscription(maxsize, self._subscriptions.remove)
        self._subscriptions.append(sub)
        return sub

    def staged(self, change: StateChange) -> None:
        """Deliver `change` once the commit being staged lands (and never if it fails)."""
        self._on_commit(self._committed, change)

    def _committed(self, change: StateChange, err: Any) -> None:
        if err is not None:
            return
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:  # one broken listener must not starve the others
                log.exception("state-change listener failed")
        for sub in self._subscriptions:
            sub.put(change)

    def close(self) -> None:
        """End every subscription (the engine is stopping)."""
        for sub in list(self._subscriptions):
            sub.close()
