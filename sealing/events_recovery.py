"""Recovery events: retries, deal-id recovery, faults, termination and removal.

Lotus: `extern/storage-sealing/fsm_events.go@v1.11.3`.

Split from `events.py` only for size; `events` re-exports all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .event_base import SectorEvent
from .info import SectorInfo

# -- retries ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SectorRetrySealPreCommit1(SectorEvent):
    """Run PreCommit1 again."""


@dataclass(frozen=True, slots=True)
class SectorRetrySealPreCommit2(SectorEvent):
    """Run PreCommit2 again."""


@dataclass(frozen=True, slots=True)
class SectorRetryPreCommit(SectorEvent):
    """Precommit again."""


@dataclass(frozen=True, slots=True)
class SectorRetryWaitSeed(SectorEvent):
    """Wait for the seed again."""


@dataclass(frozen=True, slots=True)
class SectorRetryPreCommitWait(SectorEvent):
    """Wait for the precommit message again."""


@dataclass(frozen=True, slots=True)
class SectorRetryCommitWait(SectorEvent):
    """Wait for the commit message again."""


@dataclass(frozen=True, slots=True)
class SectorRetryComputeProof(SectorEvent):
    """Compute the proof again."""

    def apply(self, info: SectorInfo, now: float) -> None:
        """Count an invalid proof."""
        info.invalid_proofs += 1


@dataclass(frozen=True, slots=True)
class SectorRetryInvalidProof(SectorEvent):
    """The chain rejected the proof: compute it again."""

    def apply(self, info: SectorInfo, now: float) -> None:
        """Count an invalid proof."""
        info.invalid_proofs += 1


@dataclass(frozen=True, slots=True)
class SectorRetryNow(SectorEvent):
    """Ours: the operator's `retry` (skip the backoff; resume a FailedUnrecoverable sector)."""

    def apply(self, info: SectorInfo, now: float) -> None:
        """Reset the backoff and the retry budget."""
        info.retry_at = 0.0
        info.retries = 0


# -- deals ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SectorInvalidDealIDs(SectorEvent):
    """A deal id no longer matches its piece: recover the ids, then return."""

    return_state: str = ""

    def apply(self, info: SectorInfo, now: float) -> None:
        """Remember where to return."""
        info.return_state = self.return_state


@dataclass(frozen=True, slots=True)
class SectorUpdateDealIDs(SectorEvent):
    """Recovered deal ids, by piece index."""

    updates: dict[int, int] = field(default_factory=dict)

    def apply(self, info: SectorInfo, now: float) -> None:
        """Rewrite the deal ids."""
        for index, deal_id in self.updates.items():
            deal = info.pieces[index].deal
            if deal is not None:
                deal.deal_id = deal_id


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
