"""The 42 `SectorState`s of Lotus v1.11.3, grouped as Lotus groups them (its `sector_state.go`).

String values equal the names, so stored records, the CLI and `update-state` speak Lotus's
language. `FailedUnrecoverable` is reachable here (Lotus never enters it): see `graph.py`.

The lifecycle's state sets are in `graph.py`; the two defined here are the ones the CLI's
read-only commands need (`retry` checks FAILED_STATES, the store view DORMANT_STATES), which
must not load the graph, the events or the handlers. `graph.py` re-exports them.
"""

from __future__ import annotations

import enum


class SectorState(enum.StrEnum):
    """A sector's lifecycle state (Lotus `SectorState`)."""

    UndefinedSectorState = ""

    # happy path
    Empty = "Empty"  # deprecated in Lotus, kept for old records
    WaitDeals = "WaitDeals"
    AddPiece = "AddPiece"
    Packing = "Packing"
    GetTicket = "GetTicket"
    PreCommit1 = "PreCommit1"
    PreCommit2 = "PreCommit2"
    PreCommitting = "PreCommitting"
    PreCommitWait = "PreCommitWait"
    SubmitPreCommitBatch = "SubmitPreCommitBatch"
    PreCommitBatchWait = "PreCommitBatchWait"
    WaitSeed = "WaitSeed"
    Committing = "Committing"
    CommitFinalize = "CommitFinalize"
    CommitFinalizeFailed = "CommitFinalizeFailed"
    SubmitCommit = "SubmitCommit"
    CommitWait = "CommitWait"
    SubmitCommitAggregate = "SubmitCommitAggregate"
    CommitAggregateWait = "CommitAggregateWait"
    FinalizeSector = "FinalizeSector"
    Proving = "Proving"

    # error modes
    FailedUnrecoverable = "FailedUnrecoverable"
    AddPieceFailed = "AddPieceFailed"
    SealPreCommit1Failed = "SealPreCommit1Failed"
    SealPreCommit2Failed = "SealPreCommit2Failed"
    PreCommitFailed = "PreCommitFailed"
    ComputeProofFailed = "ComputeProofFailed"
    CommitFailed = "CommitFailed"
    PackingFailed = "PackingFailed"  # deprecated in Lotus
    FinalizeFailed = "FinalizeFailed"
    DealsExpired = "DealsExpired"
    RecoverDealIDs = "RecoverDealIDs"

    # faults
    Faulty = "Faulty"
    FaultReported = "FaultReported"
    FaultedFinal = "FaultedFinal"

    # terminate
    Terminating = "Terminating"
    TerminateWait = "TerminateWait"
    TerminateFinality = "TerminateFinality"
    TerminateFailed = "TerminateFailed"

    # remove
    Removing = "Removing"
    RemoveFailed = "RemoveFailed"
    Removed = "Removed"


S = SectorState

#: Lotus's grouping of the states, as in its const block, in display order
#: (`extern/storage-sealing/sector_state.go@v1.11.3`).
GROUPS: dict[str, tuple[SectorState, ...]] = {
    "undefined": (S.UndefinedSectorState,),
    "happy_path": (
        S.Empty,
        S.WaitDeals,
        S.AddPiece,
        S.Packing,
        S.GetTicket,
        S.PreCommit1,
        S.PreCommit2,
    ),
    "precommit": (S.PreCommitting, S.PreCommitWait),
    "batching": (S.SubmitPreCommitBatch, S.PreCommitBatchWait),
    "commit": (S.WaitSeed, S.Committing, S.CommitFinalize, S.CommitFinalizeFailed),
    "single_commit": (S.SubmitCommit, S.CommitWait),
    "aggregation": (S.SubmitCommitAggregate, S.CommitAggregateWait),
    "end_of_sealing": (S.FinalizeSector, S.Proving),
    "error_modes": (
        S.FailedUnrecoverable,
        S.AddPieceFailed,
        S.SealPreCommit1Failed,
        S.SealPreCommit2Failed,
        S.PreCommitFailed,
        S.ComputeProofFailed,
        S.CommitFailed,
        S.PackingFailed,
        S.FinalizeFailed,
        S.DealsExpired,
        S.RecoverDealIDs,
    ),
    "faults": (S.Faulty, S.FaultReported, S.FaultedFinal),
    "terminate": (S.Terminating, S.TerminateWait, S.TerminateFinality, S.TerminateFailed),
    "remove": (S.Removing, S.RemoveFailed, S.Removed),
}

#: Every state Lotus v1.11.3 accepts in `update-state` (`ExistSectorStateList`): all but Undefined.
EXISTING_STATES: tuple[SectorState, ...] = tuple(
    s for s in SectorState if s is not S.UndefinedSectorState
)

_GROUP_OF = {s: g for g, states in GROUPS.items() for s in states}

#: States whose handler retries after a cool-down (our backoff applies to them).
FAILED_STATES: frozenset[SectorState] = frozenset(GROUPS["error_modes"]) | {
    S.CommitFinalizeFailed,
    S.TerminateFailed,
    S.RemoveFailed,
}

#: States whose machines stay dormant on disk across restarts (nothing to resume).
DORMANT_STATES: frozenset[SectorState] = frozenset(
    {S.Proving, S.Removed, S.FailedUnrecoverable, S.FaultedFinal, S.FaultReported}
)


def group_of(state: SectorState) -> str:
    """The Lotus group a state belongs to (`happy_path`, `error_modes`, `remove`, ...)."""
    return _GROUP_OF[state]


def parse_state(text: str) -> SectorState:
    """A state from its exact name; a clear `ValueError` listing the valid ones otherwise."""
    try:
        state = SectorState(text)
    except ValueError:
        state = None
    if state is None or state is S.UndefinedSectorState:
        valid = ", ".join(s.value for s in EXISTING_STATES)
        raise ValueError(f"{text!r} is not a valid sector state; valid states are: {valid}")
    return state
