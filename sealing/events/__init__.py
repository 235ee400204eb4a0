"""Every sector event of Lotus v1.11.3, with its `apply()` effects, and the registry.

Lotus: `extern/storage-sealing/fsm_events.go@v1.11.3`.

Events are frozen dataclasses. `apply(info, now)` mutates the SectorInfo the way Lotus's
`apply` does; global events implement `apply_global(info) -> bool` instead (True: stop the
batch). Events that carry an error have an `error` field; the log keeps it as the trace.

Each event class registers itself when it is defined (`base.py`), and importing this package
imports every module in it, so `ALL_EVENTS` (what the codec encodes) cannot miss one. The
modules follow the phases of a sector:

* `base.py`: `SectorEvent` and the registry.
* `lifecycle.py`: the happy path, from `SectorStart` to `SectorFinalized`, with its failures.
* `recovery.py`: every `SectorRetry*`, and deal-id recovery.
* `proving.py`: faults, termination and removal.
* `global_events.py`: the events every state accepts (`SectorForceState`, `SectorRemove`...).

A handler that raises reaches the planner as the engine's `StepFailed` (an engine event, not
one of these) and is retried with backoff.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from .base import (
    EVENTS_BY_NAME,
    SectorEvent,
    registered_events,
    registered_global_events,
)
from .global_events import (
    SectorFatalError,
    SectorForceState,
    SectorRemove,
    SectorRetriesExhausted,
    SectorTerminate,
)
from .lifecycle import (
    SectorAddPiece,
    SectorAddPieceFailed,
    SectorChainPreCommitFailed,
    SectorCommitAggregateSent,
    SectorCommitFailed,
    SectorCommitSubmitted,
    SectorCommitted,
    SectorComputeProofFailed,
    SectorDealsExpired,
    SectorFinalized,
    SectorFinalizeFailed,
    SectorOldTicket,
    SectorPacked,
    SectorPieceAdded,
    SectorPreCommit1,
    SectorPreCommit2,
    SectorPreCommitBatch,
    SectorPreCommitBatchSent,
    SectorPreCommitLanded,
    SectorPreCommitted,
    SectorProofReady,
    SectorProving,
    SectorSealPreCommit1Failed,
    SectorSealPreCommit2Failed,
    SectorSeedReady,
    SectorStart,
    SectorStartCC,
    SectorStartPacking,
    SectorSubmitCommitAggregate,
    SectorTicket,
    SectorTicketExpired,
)
from .proving import (
    SectorFaultedFinal,
    SectorFaultReported,
    SectorFaulty,
    SectorRemoved,
    SectorRemoveFailed,
    SectorTerminated,
    SectorTerminateFailed,
    SectorTerminating,
)
from .recovery import (
    SectorInvalidDealIDs,
    SectorRetryCommitWait,
    SectorRetryComputeProof,
    SectorRetryFinalize,
    SectorRetryInvalidProof,
    SectorRetryNow,
    SectorRetryPreCommit,
    SectorRetryPreCommitWait,
    SectorRetrySealPreCommit1,
    SectorRetrySealPreCommit2,
    SectorRetrySubmitCommit,
    SectorRetryWaitDeals,
    SectorRetryWaitSeed,
    SectorUpdateDealIDs,
)

__all__ = [
    "ALL_EVENTS",
    "EVENTS_BY_NAME",
    "GLOBAL_EVENTS",
    "SectorEvent",
    "SectorAddPiece",
    "SectorAddPieceFailed",
    "SectorChainPreCommitFailed",
    "SectorCommitAggregateSent",
    "SectorCommitFailed",
    "SectorCommitSubmitted",
    "SectorCommitted",
    "SectorComputeProofFailed",
    "SectorDealsExpired",
    "SectorFatalError",
    "SectorFaultReported",
    "SectorFaultedFinal",
    "SectorFaulty",
    "SectorFinalizeFailed",
    "SectorFinalized",
    "SectorForceState",
    "SectorInvalidDealIDs",
    "SectorOldTicket",
    "SectorPacked",
    "SectorPieceAdded",
    "SectorPreCommit1",
    "SectorPreCommit2",
    "SectorPreCommitBatch",
    "SectorPreCommitBatchSent",
    "SectorPreCommitLanded",
    "SectorPreCommitted",
    "SectorProofReady",
    "SectorProving",
    "SectorRemove",
    "SectorRemoveFailed",
    "SectorRemoved",
    "SectorRetriesExhausted",
    "SectorRetryCommitWait",
    "SectorRetryComputeProof",
    "SectorRetryFinalize",
    "SectorRetryInvalidProof",
    "SectorRetryNow",
    "SectorRetryPreCommit",
    "SectorRetryPreCommitWait",
    "SectorRetrySealPreCommit1",
    "SectorRetrySealPreCommit2",
    "SectorRetrySubmitCommit",
    "SectorRetryWaitDeals",
    "SectorRetryWaitSeed",
    "SectorSealPreCommit1Failed",
    "SectorSealPreCommit2Failed",
    "SectorSeedReady",
    "SectorStart",
    "SectorStartCC",
    "SectorStartPacking",
    "SectorSubmitCommitAggregate",
    "SectorTerminate",
    "SectorTerminateFailed",
    "SectorTerminated",
    "SectorTerminating",
    "SectorTicket",
    "SectorTicketExpired",
    "SectorUpdateDealIDs",
]

# A module added here but not imported above still registers its events.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

if TYPE_CHECKING:
    #: Every sector event type, for the engine's codec. Order is irrelevant (tags are names).
    ALL_EVENTS: tuple[type[SectorEvent], ...]
    #: The events every state accepts.
    GLOBAL_EVENTS: tuple[type[SectorEvent], ...]
else:

    def __getattr__(name: str) -> tuple[type[SectorEvent], ...]:
        # Read from the registry on each import, so an event defined after this package (by a
        # plugin or a test) is in the codec built after it.
        if name == "ALL_EVENTS":
            return registered_events()
        if name == "GLOBAL_EVENTS":
            return registered_global_events()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
