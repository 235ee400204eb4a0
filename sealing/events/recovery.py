"""Recovery events: every `SectorRetry*`, and deal-id recovery.

Lotus: `extern/storage-sealing/fsm_events.go@v1.11.3` ("Failed state recovery"), plus the
retries Lotus lists along the normal path (SubmitCommit, Finalize) so that all live here.

Ours, not Lotus's (listed in `graph.DEVIATIONS`): `SectorRetryWaitDeals` comes from Lotus
HEAD (AddPieceFailed retries through WaitDeals), and `SectorRetryNow` is the operator's
`retry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..info import SectorInfo
from .base import SectorEvent

# -- retries ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SectorRetryWaitDeals(SectorEvent):
    """Lotus HEAD: AddPieceFailed goes back to WaitDeals."""


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
class SectorRetrySubmitCommit(SectorEvent):
    """Send the commit again."""


@dataclass(frozen=True, slots=True)
class SectorRetryFinalize(SectorEvent):
    """Finalize again."""


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
