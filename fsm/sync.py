"""A blocking facade for hosts that are not async: the engine runs on a loop in a thread.

Example::

    with SyncEngine() as engine:
        group = engine.group(StateGroup(store, "orders", planner, OrderState, events=[Paid]))
        group.start()
        group.begin(1, OrderState())
        group.send(1, Paid(10))
        group.idle()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from .group import StateGroup
from .keys import MachineId
from .machine import MachineInfo

S = TypeVar("S")
R = TypeVar("R")


class SyncEngine:
    """Owns an asyncio loop in a background thread; close it (or use `with`) when done."""

    def __init__(self) -> None:
        self._cm: AbstractContextManager[BlockingPortal] | None = start_blocking_portal("asyncio")
        self._portal: BlockingPortal | None = self._cm.__enter__()
        self._groups: list[SyncGroup[Any]] = []

    def group(self, group: StateGroup[S]) -> SyncGroup[S]:
        """Wrap `group` so its async methods can be called from this (non-async) thread."""
        wrapped = SyncGroup(self, group)
        self._groups.append(wrapped)
        return wrapped

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run the coroutine function `fn(*args)` on the engine loop and return its result."""
        if self._portal is None:
            raise RuntimeError("this SyncEngine is closed")
        return self._portal.call(fn, *args)

    def close(self) -> None:
        """Stop every wrapped group that is still running, then stop the loop thread."""
        if self._portal is None or self._cm is None:
            return
        try:
            for g in self._groups:
                if g.group.started:
                    self.call(g.group.stop)
        finally:
            self._cm.__exit__(None, None, None)
            self._portal = None
            self._cm = None

    def __enter__(self) -> SyncEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncGroup(Generic[S]):
    """Blocking versions of `StateGroup`'s methods; reads go straight to the store."""

    def __init__(self, engine: SyncEngine, group: StateGroup[S]) -> None:
        self.engine = engine
        self.group = group

    def start(self) -> None:
        """Blocking `StateGroup.start`."""
        self.engine.call(self.group.start)

    def stop(self) -> None:
        """Blocking `StateGroup.stop`."""
        self.engine.call(self.group.stop)

    def begin(self, machine_id: MachineId, initial_state: S) -> None:
        """Blocking `StateGroup.begin`."""
        self.engine.call(self.group.begin, machine_id, initial_state)

    def send(self, machine_id: MachineId, event: object) -> None:
        """Blocking `StateGroup.send`: returns once the event is durable."""
        self.engine.call(self.group.send, machine_id, event)

    def idle(self) -> None:
        """Blocking `StateGroup.idle`."""
        self.engine.call(self.group.idle)

    def get(self, machine_id: MachineId) -> S | None:
        """The persisted state, or None."""
        return self.group.get(machine_id)

    def has(self, machine_id: MachineId) -> bool:
        """True if the machine exists."""
        return self.group.has(machine_id)

    def info(self, machine_id: MachineId) -> MachineInfo[S] | None:
        """State plus engine bookkeeping, or None."""
        return self.group.info(machine_id)

    def list(self, filter: Callable[[S], bool] | None = None) -> Iterator[tuple[MachineId, S]]:
        """Page through `(id, state)` pairs."""
        return self.group.list(filter)
