"""Global events: accepted in every state (Lotus's `globalMutator`).

Lotus: `extern/storage-sealing/fsm_events.go@v1.11.3`. Each implements
`apply_global(info) -> bool` instead of `apply` (True: stop the batch).

Ours, not Lotus's (listed in `graph.DEVIATIONS`): `SectorRetriesExhausted` gives a sector up
to FailedUnrecoverable when its retry budget is spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..info import SectorInfo
from ..states import SectorState
from .base import SectorEvent


@dataclass(frozen=True, slots=True)
class SectorFatalError(SectorEvent):
    """Logged only; nothing sends it (as in Lotus)."""

    is_global: ClassVar[bool] = True
    error: str = ""

    def apply_global(self, info: SectorInfo) -> bool:
        """Leave the state unchanged and stop the batch."""
        return True


@dataclass(frozen=True, slots=True)
class SectorForceState(SectorEvent):
    """`update-state`: move the sector to any state."""

    is_global: ClassVar[bool] = True
    state: SectorState = SectorState.UndefinedSectorState

    def apply_global(self, info: SectorInfo) -> bool:
        """Set the state."""
        info.state = self.state
        return True


@dataclass(frozen=True, slots=True)
class SectorTerminate(SectorEvent):
    """Terminate the sector on chain (API `SectorTerminate`).

    `retry` (ours) marks the one TerminateFailed sends, so it counts against the budget.
    """

    is_global: ClassVar[bool] = True
    retry: bool = False

    def apply_global(self, info: SectorInfo) -> bool:
        """Go to Terminating."""
        info.state = SectorState.Terminating
        return True


@dataclass(frozen=True, slots=True)
class SectorRemove(SectorEvent):
    """Remove the sector and its data (API `SectorRemove`, and handlers that give up).

    `retry` (ours) marks the one RemoveFailed sends, so it counts against the budget.
    """

    is_global: ClassVar[bool] = True
    retry: bool = False

    def apply_global(self, info: SectorInfo) -> bool:
        """Go to Removing."""
        info.state = SectorState.Removing
        return True


@dataclass(frozen=True, slots=True)
class SectorRetriesExhausted(SectorEvent):
    """Ours: the retry budget is spent; park the sector, keeping its data, until `retry`."""

    is_global: ClassVar[bool] = True
    error: str = ""

    def apply_global(self, info: SectorInfo) -> bool:
        """Remember where the sector failed, then go to FailedUnrecoverable."""
        if info.state is not SectorState.FailedUnrecoverable:
            info.unrecoverable_from = info.state.value
        info.state = SectorState.FailedUnrecoverable
        info.last_err = self.error
        return True
