"""The sector state graph: Lotus v1.11.3's planner table (`fsmPlanners`), declared once.

Lotus: `extern/storage-sealing/fsm.go@v1.11.3` (the table, `planOne`, `planCommitting`, `final`) and
`extern/storage-sealing/fsm_events.go@v1.11.3` (the events); the deviations are in `DEVIATIONS`
below and in `docs/lotus-deviations.md`.

`EDGES` is the whole table. It is loaded into one `transitions` machine (`MACHINE`, with no
model attached: binding trigger methods to a million sectors would not scale), and the
planner, `update-state` validation and the statechart export all read it from there.

Edge kinds (Lotus's planner building blocks `on`, `apply`, `onReturning` and `planCommitting`):

* `on`: apply the event, go to `dest`, stop the batch.
* `apply`: apply the event, stay, keep planning the batch.
* `return`: apply, go to the state stored in `return_state` (RecoverDealIDs' `onReturning`).
* `continue`: Committing only: apply, go to `dest`, keep planning the batch.
* `no_apply`: Committing only: go to `dest` without calling `apply()`, stop.
* `seed`: Committing only: a changed seed re-runs Committing; an identical one is ignored.
* `resume`: ours: FailedUnrecoverable goes back to the failed state it gave up in.

Global events (`source="*"`) are accepted in every state. How a state plans its batch is in
`PLANNERS`: `plan_one`, `final` (only a global event is accepted) or `committing`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from transitions import Machine, Transition

from .events import EVENTS_BY_NAME
from .states import FAILED_STATES, SectorState

S = SectorState

#: Name of the engine's restart signal in the graph (Lotus `SectorRestart`).
RESTART = "SectorRestart"
#: Name of the engine's step-failure signal in the graph (ours; see DEVIATIONS).
STEP_FAILED = "StepFailed"

#: The documented, deliberate differences from Lotus v1.11.3. Tests skip exactly these.
DEVIATIONS: dict[str, str] = {
    "addpiece-retry": (
        "AddPieceFailed retries through WaitDeals (SectorRetryWaitDeals, as in Lotus HEAD); "
        "v1.11.3 leaves the sector stuck there."
    ),
    "backoff": (
        "Failed states retry with exponential backoff (base, factor, cap, budget) timed from "
        "a stored timestamp, not a flat minute after the last log entry."
    ),
    "unrecoverable": (
        "SectorRetriesExhausted (global) parks a sector whose budget is spent in "
        "FailedUnrecoverable, keeping its data; Lotus never enters that state."
    ),
    "retry-now": (
        "SectorRetryNow (the operator's `retry`) skips the backoff in a failed state and "
        "resumes a FailedUnrecoverable sector in the state it gave up in."
    ),
    "step-failed": (
        "A handler that raises is logged and re-run after the backoff (StepFailed, global); "
        "Lotus only logs it and the sector stalls until the next restart."
    ),
    "unexpected-event": (
        "An unexpected event is logged in the sector log and consumed, in every state "
        "including Committing and the final states; v1.11.3 stops the sector's machine."
    ),
    "addpiece-carries-pieces": (
        "SectorAddPiece carries the assigned pieces, so an assignment survives a crash."
    ),
    "log-marker": "Log truncation keeps a visible 'truncate' marker.",
    "commit-retry": (
        "Committing re-waits on a commit message only if it succeeded or is still pending; "
        "Lotus re-waits on a failed one too and loops through CommitFailed."
    ),
    "cancel": (
        "SectorRemove, SectorTerminate, SectorForceState and SectorRetryNow cancel a running "
        "step (and so its scheduled task) instead of waiting hours for it."
    ),
}

#: States the planner treats as Lotus's `final` (only a global event is accepted).
FINAL_PLANNER_STATES = frozenset(
    {S.FaultReported, S.FaultedFinal, S.Removed, S.FailedUnrecoverable}
)
#: Where RecoverDealIDs may return (Lotus `ReturnState`), for the export.
RETURN_STATES = (S.PreCommit1, S.PreCommitting, S.PreCommitFailed, S.CommitFailed)


@dataclass(frozen=True, slots=True)
class Edge:
    """One row of the planner table."""

    source: SectorState | None  # None: every state (a global event)
    event: str
    dest: SectorState | None  # None: stay, or decided at run time (return/resume)
    kind: str = "on"
    deviation: str | None = None


def _on(source: S, event: str, dest: S) -> Edge:
    return Edge(source, event, dest)


def _apply(source: S, event: str) -> Edge:
    return Edge(source, event, None, "apply")


# fmt: off
EDGES: tuple[Edge, ...] = (
    # Lotus's global events (`globalMutator`, fsm_events.go) and ours
    Edge(None, RESTART, None, "global"),
    Edge(None, "SectorFatalError", None, "global"),
    Edge(None, "SectorForceState", None, "global"),
    Edge(None, "SectorTerminate", S.Terminating, "global"),
    Edge(None, "SectorRemove", S.Removing, "global"),
    Edge(None, "SectorRetriesExhausted", S.FailedUnrecoverable, "global", "unrecoverable"),
    Edge(None, STEP_FAILED, None, "global", "step-failed"),

    _on(S.UndefinedSectorState, "SectorStart", S.WaitDeals),
    _on(S.UndefinedSectorState, "SectorStartCC", S.Packing),
    _on(S.Empty, "SectorAddPiece", S.AddPiece),
    _on(S.Empty, "SectorStartPacking", S.Packing),
    _on(S.WaitDeals, "SectorAddPiece", S.AddPiece),
    _on(S.WaitDeals, "SectorStartPacking", S.Packing),
    _on(S.AddPiece, "SectorPieceAdded", S.WaitDeals),
    _apply(S.AddPiece, "SectorStartPacking"),
    _apply(S.AddPiece, "SectorAddPiece"),
    _on(S.AddPiece, "SectorAddPieceFailed", S.AddPieceFailed),
    _on(S.Packing, "SectorPacked", S.GetTicket),
    _on(S.GetTicket, "SectorTicket", S.PreCommit1),
    _on(S.GetTicket, "SectorCommitFailed", S.CommitFailed),
    _on(S.PreCommit1, "SectorPreCommit1", S.PreCommit2),
    _on(S.PreCommit1, "SectorSealPreCommit1Failed", S.SealPreCommit1Failed),
    _on(S.PreCommit1, "SectorDealsExpired", S.DealsExpired),
    _on(S.PreCommit1, "SectorInvalidDealIDs", S.RecoverDealIDs),
    _on(S.PreCommit1, "SectorOldTicket", S.GetTicket),
    _on(S.PreCommit2, "SectorPreCommit2", S.PreCommitting),
    _on(S.PreCommit2, "SectorSealPreCommit2Failed", S.SealPreCommit2Failed),
    _on(S.PreCommit2, "SectorSealPreCommit1Failed", S.SealPreCommit1Failed),
    _on(S.PreCommitting, "SectorPreCommitBatch", S.SubmitPreCommitBatch),
    _on(S.PreCommitting, "SectorPreCommitted", S.PreCommitWait),
    _on(S.PreCommitting, "SectorSealPreCommit1Failed", S.SealPreCommit1Failed),
    _on(S.PreCommitting, "SectorChainPreCommitFailed", S.PreCommitFailed),
    _on(S.PreCommitting, "SectorPreCommitLanded", S.WaitSeed),
    _on(S.PreCommitting, "SectorDealsExpired", S.DealsExpired),
    _on(S.PreCommitting, "SectorInvalidDealIDs", S.RecoverDealIDs),
    _on(S.SubmitPreCommitBatch, "SectorPreCommitBatchSent", S.PreCommitBatchWait),
    _on(S.SubmitPreCommitBatch, "SectorSealPreCommit1Failed", S.SealPreCommit1Failed),
    _on(S.SubmitPreCommitBatch, "SectorChainPreCommitFailed", S.PreCommitFailed),
    _on(S.SubmitPreCommitBatch, "SectorPreCommitLanded", S.WaitSeed),
    _on(S.SubmitPreCommitBatch, "SectorDealsExpired", S.DealsExpired),
    _on(S.SubmitPreCommitBatch, "SectorInvalidDealIDs", S.RecoverDealIDs),
    _on(S.PreCommitBatchWait, "SectorChainPreCommitFailed", S.PreCommitFailed),
    _on(S.PreCommitBatchWait, "SectorPreCommitLanded", S.WaitSeed),
    _on(S.PreCommitBatchWait, "SectorRetryPreCommit", S.PreCommitting),
    _on(S.PreCommitWait, "SectorChainPreCommitFailed", S.PreCommitFailed),
    _on(S.PreCommitWait, "SectorPreCommitLanded", S.WaitSeed),
    _on(S.PreCommitWait, "SectorRetryPreCommit", S.PreCommitting),
    _on(S.WaitSeed, "SectorSeedReady", S.Committing),
    _on(S.WaitSeed, "SectorChainPreCommitFailed", S.PreCommitFailed),
    Edge(S.Committing, "SectorCommitted", S.SubmitCommit, "continue"),
    Edge(S.Committing, "SectorProofReady", S.CommitFinalize, "continue"),
    Edge(S.Committing, "SectorSeedReady", S.Committing, "seed"),
    Edge(S.Committing, "SectorComputeProofFailed", S.ComputeProofFailed, "no_apply"),
    Edge(S.Committing, "SectorSealPreCommit1Failed", S.SealPreCommit1Failed, "no_apply"),
    Edge(S.Committing, "SectorCommitFailed", S.CommitFailed, "no_apply"),
    Edge(S.Committing, "SectorRetryCommitWait", S.CommitWait, "no_apply"),
    _on(S.CommitFinalize, "SectorFinalized", S.SubmitCommit),
    _on(S.CommitFinalize, "SectorFinalizeFailed", S.CommitFinalizeFailed),
    _on(S.SubmitCommit, "SectorCommitSubmitted", S.CommitWait),
    _on(S.SubmitCommit, "SectorSubmitCommitAggregate", S.SubmitCommitAggregate),
    _on(S.SubmitCommit, "SectorCommitFailed", S.CommitFailed),
    _on(S.SubmitCommitAggregate, "SectorCommitAggregateSent", S.CommitAggregateWait),
    _on(S.SubmitCommitAggregate, "SectorCommitFailed", S.CommitFailed),
    _on(S.SubmitCommitAggregate, "SectorRetrySubmitCommit", S.SubmitCommit),
    _on(S.CommitWait, "SectorProving", S.FinalizeSector),
    _on(S.CommitWait, "SectorCommitFailed", S.CommitFailed),
    _on(S.CommitWait, "SectorRetrySubmitCommit", S.SubmitCommit),
    _on(S.CommitAggregateWait, "SectorProving", S.FinalizeSector),
    _on(S.CommitAggregateWait, "SectorCommitFailed", S.CommitFailed),
    _on(S.CommitAggregateWait, "SectorRetrySubmitCommit", S.SubmitCommit),
    _on(S.FinalizeSector, "SectorFinalized", S.Proving),
    _on(S.FinalizeSector, "SectorFinalizeFailed", S.FinalizeFailed),

    Edge(S.AddPieceFailed, "SectorRetryWaitDeals", S.WaitDeals, "on", "addpiece-retry"),
    Edge(S.AddPieceFailed, "SectorStartPacking", None, "apply", "addpiece-retry"),
    Edge(S.AddPieceFailed, "SectorAddPiece", None, "apply", "addpiece-retry"),
    _on(S.SealPreCommit1Failed, "SectorRetrySealPreCommit1", S.PreCommit1),
    _on(S.SealPreCommit2Failed, "SectorRetrySealPreCommit1", S.PreCommit1),
    _on(S.SealPreCommit2Failed, "SectorRetrySealPreCommit2", S.PreCommit2),
    _on(S.PreCommitFailed, "SectorRetryPreCommit", S.PreCommitting),
    _on(S.PreCommitFailed, "SectorRetryPreCommitWait", S.PreCommitWait),
    _on(S.PreCommitFailed, "SectorRetryWaitSeed", S.WaitSeed),
    _on(S.PreCommitFailed, "SectorSealPreCommit1Failed", S.SealPreCommit1Failed),
    _on(S.PreCommitFailed, "SectorPreCommitLanded", S.WaitSeed),
    _on(S.PreCommitFailed, "SectorDealsExpired", S.DealsExpired),
    _on(S.PreCommitFailed, "SectorInvalidDealIDs", S.RecoverDealIDs),
    _on(S.ComputeProofFailed, "SectorRetryComputeProof", S.Committing),
    _on(S.ComputeProofFailed, "SectorSealPreCommit1Failed", S.SealPreCommit1Failed),
    _on(S.CommitFinalizeFailed, "SectorRetryFinalize", S.CommitFinalize),
    _on(S.CommitFailed, "SectorSealPreCommit1Failed", S.SealPreCommit1Failed),
    _on(S.CommitFailed, "SectorRetryWaitSeed", S.WaitSeed),
    _on(S.CommitFailed, "SectorRetryComputeProof", S.Committing),
    _on(S.CommitFailed, "SectorRetryInvalidProof", S.Committing),
    _on(S.CommitFailed, "SectorRetryPreCommitWait", S.PreCommitWait),
    _on(S.CommitFailed, "SectorChainPreCommitFailed", S.PreCommitFailed),
    _on(S.CommitFailed, "SectorRetryPreCommit", S.PreCommitting),
    _on(S.CommitFailed, "SectorRetryCommitWait", S.CommitWait),
    _on(S.CommitFailed, "SectorRetrySubmitCommit", S.SubmitCommit),
    _on(S.CommitFailed, "SectorDealsExpired", S.DealsExpired),
    _on(S.CommitFailed, "SectorInvalidDealIDs", S.RecoverDealIDs),
    _on(S.CommitFailed, "SectorTicketExpired", S.Removing),
    _on(S.FinalizeFailed, "SectorRetryFinalize", S.FinalizeSector),
    Edge(S.RecoverDealIDs, "SectorUpdateDealIDs", None, "return"),
    _on(S.Proving, "SectorFaultReported", S.FaultReported),
    _on(S.Proving, "SectorFaulty", S.Faulty),
    _on(S.Terminating, "SectorTerminating", S.TerminateWait),
    _on(S.Terminating, "SectorTerminateFailed", S.TerminateFailed),
    _on(S.TerminateWait, "SectorTerminated", S.TerminateFinality),
    _on(S.TerminateWait, "SectorTerminateFailed", S.TerminateFailed),
    _on(S.TerminateFinality, "SectorTerminateFailed", S.TerminateFailed),
    _on(S.Removing, "SectorRemoved", S.Removed),
    _on(S.Removing, "SectorRemoveFailed", S.RemoveFailed),
    _on(S.Faulty, "SectorFaultReported", S.FaultReported),

    # ours: the operator's retry
    *(
        Edge(s, "SectorRetryNow", None, "apply", "retry-now")
        for s in sorted(FAILED_STATES - {S.FailedUnrecoverable})
    ),
    Edge(S.FailedUnrecoverable, "SectorRetryNow", None, "resume", "retry-now"),
)
# fmt: on

#: How each state plans a batch (Lotus's `planOne`, `final`, `planCommitting`). Every state has
#: an entry.
PLANNERS: dict[SectorState, str] = {
    s: "final" if s in FINAL_PLANNER_STATES else "committing" if s is S.Committing else "plan_one"
    for s in SectorState
}


class SectorTransition(Transition):
    """A `transitions` transition that also carries its planner edge."""

    def __init__(self, source: str, dest: str | None, *args: Any, edge: Edge, **kw: Any) -> None:
        super().__init__(source, dest, *args, **kw)  # type: ignore[arg-type]
        self.edge = edge


class _GraphMachine(Machine):
    transition_cls = SectorTransition


def _state_name(state: SectorState | None) -> str:
    return "*" if state is None else state.name


def _build() -> Any:
    machine = _GraphMachine(
        model=None,
        states=[s.name for s in SectorState],
        initial=S.UndefinedSectorState.name,
        auto_transitions=False,
        send_event=True,
    )
    for e in EDGES:
        machine.add_transition(
            e.event,
            _state_name(e.source),
            None if e.dest is None or e.kind in ("apply", "return", "resume") else e.dest.name,
            edge=e,
        )
    return machine


#: The one `transitions` machine holding the graph (no model: nothing is bound per sector).
MACHINE: Any = _build()


def _lookup() -> tuple[dict[tuple[SectorState, str], Edge], dict[str, Edge]]:
    per_state: dict[tuple[SectorState, str], Edge] = {}
    global_: dict[str, Edge] = {}
    for name, event in MACHINE.events.items():
        for source, transitions in event.transitions.items():
            edge = transitions[0].edge
            if edge.source is None:  # `transitions` expands "*" to every state
                global_[name] = edge
            else:
                per_state[(SectorState[source], name)] = edge
    return per_state, global_


_EDGES_BY_STATE, GLOBAL_EDGES = _lookup()


def edge(state: SectorState, event: str) -> Edge | None:
    """The edge `state --event-->`, or None (global events are in `GLOBAL_EDGES`)."""
    return _EDGES_BY_STATE.get((state, event))


def events_of(state: SectorState) -> list[str]:
    """Event names with an edge out of `state` (globals excluded)."""
    return [e for (s, e) in _EDGES_BY_STATE if s is state]


def export_transitions() -> Iterator[tuple[str, str, str]]:
    """Every edge as concrete `(source, event, dest)` names; globals have source `*`."""
    for e in EDGES:
        if e.source is None:
            yield "*", e.event, e.dest.name if e.dest is not None else "*"
        elif e.kind == "return":
            for r in RETURN_STATES:
                yield e.source.name, e.event, r.name
        elif e.kind == "resume":
            for f in sorted(FAILED_STATES - {S.FailedUnrecoverable}):
                yield e.source.name, e.event, f.name
        else:
            dest = e.source if e.dest is None else e.dest
            yield e.source.name, e.event, dest.name


def _check() -> None:
    unknown = {e.event for e in EDGES} - set(EVENTS_BY_NAME) - {RESTART, STEP_FAILED}
    if unknown:
        raise RuntimeError(f"graph names events that do not exist: {sorted(unknown)}")


_check()
