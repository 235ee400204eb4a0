"""Exceptions raised by the FSM engine and its store."""

from __future__ import annotations


class FsmError(Exception):
    """Base class of every error raised by `sectorfsm.fsm`."""


class Terminated(Exception):
    """Raised by a planner to stop a machine for good; the state is persisted as final."""


class StoreError(FsmError):
    """The store could not be opened, read or written."""


class StoreFullError(StoreError):
    """The disk (or the configured map-size ceiling) is full; the write was not applied."""


class StoreLockedError(StoreError):
    """Another process already runs an engine on this repo."""


class StoreDamagedError(StoreError):
    """The store's files are damaged (truncated, emptied); it is refused, never reused."""


class RecordError(StoreError):
    """A stored record is corrupt, of an unknown type, or of another schema version."""


class UnknownMachineError(FsmError, KeyError):
    """No machine with this id exists in the group."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown machine"


class MachineExistsError(FsmError):
    """`begin` was called for an id that already exists."""


class DuplicateGroupError(FsmError):
    """A group of the same name already runs on this store."""


class GroupStoppedError(FsmError):
    """The group is stopped (or not started) and cannot run machines."""
