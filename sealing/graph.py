"""The sector lifecycle in one place: Lotus v1.11.3's planner table, handlers and state sets.

Lotus: `extern/storage-sealing/fsm.go@v1.11.3` (the table, `planOne`, `planCommitting`, `final`
and the state -> handler switch at the end of `plan()`) and
`extern/storage-sealing/fsm_events.go@v1.11.3` (the events); the deviations are in `DEVIATIONS`
below and in `docs/lotus-deviations.md`. `SectorState` and its Lotus groups are in `states.py`
(Lotus's `sector_state.go`), with the two sets that the CLI's cheap read-only commands need
(`FAILED_STATES`, `DORMANT_STATES`); they are re-exported here with every other set.

`EDGES` is the whole table, `PLANNERS` how each state plans a batch, `handlers()` the step each
state runs. The table is also loaded into one `transitions` machine (`MACHINE`, with no model
attached: binding trigger methods to a million sectors would not scale). It is there for what
the library checks when it builds a machine (every source and dest is a declared state, no
trigger is declared twice for one source) and for the statechart export; the planner reads
the same edges from plain dicts built from it.

Edge kinds (Lotus's planner building blocks `on`, `apply`, `onReturning` and `planCommitting`)
are `EdgeKind`; the planner dispatches on them.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transitions import Machine, Transition

from ..fsm import Context
from .events import EVENTS_BY_NAME
from .info import SectorInfo
from .states import DORMANT_STATES as DORMANT_STATES
from .states import FAILED_STATES as FAILED_STATES
from .states import SectorState

if TYPE_CHECKING:
    from .pipeline import Sealing

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


class EdgeKind(enum.StrEnum):
    """How the planner applies one edge (Lotus's `on`, `apply`, `onReturning`, ...)."""

    #: Apply the event, go to `dest`, stop the batch.
    ON = "on"
    #: Apply the event, stay, keep planning the batch.
    APPLY = "apply"
    #: Apply, go to the state stored in `return_state` (RecoverDealIDs' `onReturning`).
    RETURN = "return"
    #: Committing only: apply, go to `dest`, keep planning the batch.
    CONTINUE = "continue"
    #: Committing only: go to `dest` without calling `apply()`, stop.
    NO_APPLY = "no_apply"
    #: Committing only: a changed seed re-runs Committing; an identical one is ignored.
    SEED = "seed"
    #: Ours: FailedUnrecoverable goes back to the failed state it gave up in.
    RESUME = "resume"
    #: Accepted in every state (`source` is None; Lotus's `globalMutator`).
    GLOBAL = "global"


#: Kinds whose target is not the edge's `dest`: they stay, or the target is decided at run time.
RUNTIME_DEST_KINDS = frozenset({EdgeKind.APPLY, EdgeKind.RETURN, EdgeKind.RESUME})


class PlannerKind(enum.StrEnum):
    """How a state plans a batch (Lotus's `planOne`, `final`, `planCommitting`)."""

    PLAN_ONE = "plan_one"
    #: Only a global event is accepted.
    FINAL = "final"
    COMMITTING = "committing"


# -- state sets ---------------------------------------------------------------------------------

#: States the planner treats as Lotus's `final` (only a global event is accepted).
FINAL_PLANNER_STATES = frozenset(
    {S.FaultReported, S.FaultedFinal, S.Removed, S.FailedUnrecoverable}
)
#: Where RecoverDealIDs may return (Lotus `ReturnState`), for the export.
RETURN_STATES = (S.PreCommit1, S.PreCommitting, S.PreCommitFailed, S.CommitFailed)
#: Where FailedUnrecoverable may resume (the failed state it gave up in), in a fixed order.
RESUME_STATES = tuple(sorted(FAILED_STATES - {S.FailedUnrecoverable}))
#: Lotus's toStatState staging bucket (v1.11.3), its MaxSealingSectors throttling input.
STAGING_STATES: frozenset[SectorState] = frozenset(
    {S.UndefinedSectorState, S.Empty, S.WaitDeals, S.AddPiece}
)
#: Lotus's sstSealing bucket (v1.11.3 `toStatState`).
SEALING_STATES: frozenset[SectorState] = frozenset(
    {
        S.Packing,
        S.GetTicket,
        S.PreCommit1,
        S.PreCommit2,
        S.PreCommitting,
        S.PreCommitWait,
        S.SubmitPreCommitBatch,
        S.PreCommitBatchWait,
        S.WaitSeed,
        S.Committing,
        S.CommitFinalize,
        S.SubmitCommit,
        S.CommitWait,
        S.SubmitCommitAggregate,
        S.CommitAggregateWait,
        S.FinalizeSector,
    }
)
#: Lotus's sstProving bucket without the remove states.
PROVING_STATES: frozenset[SectorState] = frozenset(
    {S.Proving, S.Terminating, S.TerminateWait, S.TerminateFinality, S.TerminateFailed}
)
#: The remove states Lotus counts as proving, reported on their own.
REMOVED_STATES: frozenset[SectorState] = frozenset({S.Removing, S.Removed})
#: States in which a SectorAddPiece is accepted. A new sector (UndefinedSectorState) takes
#: pieces only once its SectorStart is applied, and a CC one (SectorStartCC) never does.
TAKES_PIECES = frozenset({S.Empty, S.WaitDeals, S.AddPiece, S.AddPieceFailed})
#: States in which a deal sector stays open for new pieces (Lotus's `openSectors`); any other
#: state closes it.
OPEN_SECTOR_STATES = frozenset({S.WaitDeals, S.AddPiece, S.Empty})
#: States a sector will not leave on its own: `Miner.wait` stops there.
STUCK_STATES = frozenset({S.FailedUnrecoverable, S.Removed})
#: States that use the interactive seed: a reorg past its epoch re-delivers it.
SEED_STATES = frozenset({S.WaitSeed, S.Committing})


@dataclass(frozen=True, slots=True)
class Edge:
    """One row of the planner table."""

    source: SectorState | None  # None: every state (a global event)
    event: str
    dest: SectorState | None  # None: stay, or decided at run time (return/resume)
    kind: EdgeKind = EdgeKind.ON
    deviation: str | None = None


def _on(source: S, event: str, dest: S) -> Edge:
    return Edge(source, event, dest)


def _apply(source: S, event: str) -> Edge:
    return Edge(source, event, None, EdgeKind.APPLY)


K = EdgeKind

# fmt: off
EDGES: tuple[Edge, ...] = (
    # Lotus's global events (`globalMutator`, fsm_events.go) and ours
    Edge(None, RESTART, None, K.GLOBAL),
    Edge(None, "SectorFatalError", None, K.GLOBAL),
    Edge(None, "SectorForceState", None, K.GLOBAL),
    Edge(None, "SectorTerminate", S.Terminating, K.GLOBAL),
    Edge(None, "SectorRemove", S.Removing, K.GLOBAL),
    Edge(None, "SectorRetriesExhausted", S.FailedUnrecoverable, K.GLOBAL, "unrecoverable"),
    Edge(None, STEP_FAILED, None, K.GLOBAL, "step-failed"),

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
    Edge(S.Committing, "SectorCommitted", S.SubmitCommit, K.CONTINUE),
    Edge(S.Committing, "SectorProofReady", S.CommitFinalize, K.CONTINUE),
    Edge(S.Committing, "SectorSeedReady", S.Committing, K.SEED),
    Edge(S.Committing, "SectorComputeProofFailed", S.ComputeProofFailed, K.NO_APPLY),
    Edge(S.Committing, "SectorSealPreCommit1Failed", S.SealPreCommit1Failed, K.NO_APPLY),
    Edge(S.Committing, "SectorCommitFailed", S.CommitFailed, K.NO_APPLY),
    Edge(S.Committing, "SectorRetryCommitWait", S.CommitWait, K.NO_APPLY),
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

    Edge(S.AddPieceFailed, "SectorRetryWaitDeals", S.WaitDeals, K.ON, "addpiece-retry"),
    Edge(S.AddPieceFailed, "SectorStartPacking", None, K.APPLY, "addpiece-retry"),
    Edge(S.AddPieceFailed, "SectorAddPiece", None, K.APPLY, "addpiece-retry"),
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
    Edge(S.RecoverDealIDs, "SectorUpdateDealIDs", None, K.RETURN),
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
        Edge(s, "SectorRetryNow", None, K.APPLY, "retry-now")
        for s in RESUME_STATES
    ),
    Edge(S.FailedUnrecoverable, "SectorRetryNow", None, K.RESUME, "retry-now"),
)
# fmt: on

#: How each state plans a batch (Lotus's `planOne`, `final`, `planCommitting`). Every state has
#: an entry.
PLANNERS: dict[SectorState, PlannerKind] = {
    s: PlannerKind.FINAL
    if s in FINAL_PLANNER_STATES
    else PlannerKind.COMMITTING
    if s is S.Committing
    else PlannerKind.PLAN_ONE
    for s in SectorState
}

#: A state's handler: the step the planner returns for it.
Handler = Callable[["Sealing", Context, SectorInfo], Awaitable[None]]


@functools.cache
def handlers() -> Mapping[SectorState, Handler]:
    """The handler of each state (Lotus `plan()`'s closing switch); states not listed have none.

    The handler modules are imported on the first call, so what only reads the table (the
    statechart export, an offline `sectors pledge`) does not load the sealer, the scheduler
    and the chain they use.
    """
    from .handlers import failed, proving
    from .handlers import sealing as happy

    return {
        S.Empty: happy.handle_wait_deals,
        S.WaitDeals: happy.handle_wait_deals,
        S.AddPiece: happy.handle_add_piece,
        S.Packing: happy.handle_packing,
        S.GetTicket: happy.handle_get_ticket,
        S.PreCommit1: happy.handle_pre_commit1,
        S.PreCommit2: happy.handle_pre_commit2,
        S.PreCommitting: happy.handle_pre_committing,
        S.SubmitPreCommitBatch: happy.handle_submit_pre_commit_batch,
        S.PreCommitBatchWait: happy.handle_pre_commit_wait,
        S.PreCommitWait: happy.handle_pre_commit_wait,
        S.WaitSeed: happy.handle_wait_seed,
        S.Committing: happy.handle_committing,
        S.SubmitCommit: happy.handle_submit_commit,
        S.SubmitCommitAggregate: happy.handle_submit_commit_aggregate,
        S.CommitAggregateWait: happy.handle_commit_wait,
        S.CommitWait: happy.handle_commit_wait,
        S.CommitFinalize: happy.handle_finalize_sector,
        S.FinalizeSector: happy.handle_finalize_sector,
        S.AddPieceFailed: failed.handle_add_piece_failed,
        S.SealPreCommit1Failed: failed.handle_seal_pre_commit1_failed,
        S.SealPreCommit2Failed: failed.handle_seal_pre_commit2_failed,
        S.PreCommitFailed: failed.handle_pre_commit_failed,
        S.ComputeProofFailed: failed.handle_compute_proof_failed,
        S.CommitFailed: failed.handle_commit_failed,
        S.CommitFinalizeFailed: failed.handle_finalize_failed,
        S.FinalizeFailed: failed.handle_finalize_failed,
        S.DealsExpired: failed.handle_deals_expired,
        S.RecoverDealIDs: failed.handle_recover_deal_ids,
        S.Faulty: proving.handle_faulty,
        S.FaultReported: proving.handle_fault_reported,
        S.Terminating: proving.handle_terminating,
        S.TerminateWait: proving.handle_terminate_wait,
        S.TerminateFinality: proving.handle_terminate_finality,
        S.TerminateFailed: failed.handle_terminate_failed,
        S.Removing: proving.handle_removing,
        S.RemoveFailed: failed.handle_remove_failed,
    }


# -- the `transitions` machine (validation and export) --------------------------------------------


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
            None if e.dest is None or e.kind in RUNTIME_DEST_KINDS else e.dest.name,
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


#: Where edges whose target is decided at run time may lead, for the export.
_RUNTIME_DESTS: dict[EdgeKind, tuple[SectorState, ...]] = {
    EdgeKind.RETURN: RETURN_STATES,
    EdgeKind.RESUME: RESUME_STATES,
}


def export_transitions() -> Iterator[tuple[str, str, str]]:
    """Every edge as concrete `(source, event, dest)` names; globals have source `*`."""
    for e in EDGES:
        if e.source is None:
            yield "*", e.event, e.dest.name if e.dest is not None else "*"
        elif e.kind in _RUNTIME_DESTS:
            for dest in _RUNTIME_DESTS[e.kind]:
                yield e.source.name, e.event, dest.name
        else:
            yield e.source.name, e.event, (e.source if e.dest is None else e.dest).name


def _check() -> None:
    unknown = {e.event for e in EDGES} - set(EVENTS_BY_NAME) - {RESTART, STEP_FAILED}
    if unknown:
        raise RuntimeError(f"graph names events that do not exist: {sorted(unknown)}")


_check()
