"""A generic, persisted finite-state-machine engine in the style of go-statemachine.

Quick tour::

    store = LmdbStore("repo")
    group = StateGroup(store, "orders", planner, OrderState, events=[Paid, Shipped])
    await group.start()
    await group.begin(1, OrderState())
    await group.send(1, Paid(amount=10))     # returns once the event is durable
    await group.idle()
    await group.stop()

See `StateGroup` for the exact semantics, and `Committer` (reached as `store.committer`) for
staging domain writes into the engine's current commit.
"""

from typing import TYPE_CHECKING, Any

from .clock import Clock, RealClock, VirtualClock
from .codec import RecordCodec
from .commit import Committer
from .errors import (
    FsmError,
    GroupStoppedError,
    MachineExistsError,
    RecordError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    Terminated,
    UnknownMachineError,
)
from .events import Restart, StepFailed
from .group import Planner, StateGroup
from .keys import MachineId
from .machine import Context, MachineInfo, Step
from .records import GroupRecords
from .store import LmdbStore

if TYPE_CHECKING:
    from .sync import SyncEngine, SyncGroup


def __getattr__(name: str) -> Any:
    # The sync facade pulls in anyio's thread portal; only hosts that use it pay for it.
    if name in ("SyncEngine", "SyncGroup"):
        from . import sync

        return getattr(sync, name)
    raise AttributeError(f"module 'sectorfsm.fsm' has no attribute {name!r}")


__all__ = [
    "Clock",
    "Committer",
    "Context",
    "FsmError",
    "GroupRecords",
    "GroupStoppedError",
    "LmdbStore",
    "MachineExistsError",
    "MachineId",
    "MachineInfo",
    "Planner",
    "RealClock",
    "RecordCodec",
    "RecordError",
    "Restart",
    "StateGroup",
    "Step",
    "StepFailed",
    "StoreError",
    "StoreFullError",
    "StoreLockedError",
    "SyncEngine",
    "SyncGroup",
    "Terminated",
    "UnknownMachineError",
    "VirtualClock",
]
