"""Proving-time events: faults, termination and removal.

Lotus: `extern/storage-sealing/fsm_events.go@v1.11.3` ("Faults" and "External events"). The
global `SectorTerminate` and `SectorRemove` that start these paths are in `global_events.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..info import SectorInfo
from .base import SectorEvent

# -- faults, termination, removal ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SectorFaulty(SectorEvent):
    """The sector's data is corrupted or gone."""


@dataclass(frozen=True, slots=True)
class SectorFaultReported(SectorEvent):
    """A fault was declared on chain."""

    report_msg: str = ""

    def apply(self, info: SectorInfo, now: float) -> None:
        """Remember the message."""
        info.fault_report_msg = self.report_msg


@dataclass(frozen=True, slots=True)
class SectorFaultedFinal(SectorEvent):
    """The fault declaration landed (no apply, as in Lotus)."""


@dataclass(frozen=True, slots=True)
class SectorTerminating(SectorEvent):
    """The termination message went out (None: already terminated)."""

    message: str | None = None

    def apply(self, info: SectorInfo, now: float) -> None:
        """Remember the message."""
        info.terminate_message = self.message


@dataclass(frozen=True, slots=True)
class SectorTerminated(SectorEvent):
    """The termination landed."""

    terminated_at: int = 0

    def apply(self, info: SectorInfo, now: float) -> None:
        """Remember the epoch."""
        info.terminated_at = self.terminated_at


@dataclass(frozen=True, slots=True)
class SectorTerminateFailed(SectorEvent):
    """Termination failed."""

    error: str = ""


@dataclass(frozen=True, slots=True)
class SectorRemoveFailed(SectorEvent):
    """Removing the sector's data failed."""

    error: str = ""


@dataclass(frozen=True, slots=True)
class SectorRemoved(SectorEvent):
    """The sector's data is gone."""
