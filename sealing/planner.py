"""The sector planner: folds a batch of events into SectorInfo and returns the next handler.

`Planner` is what the sectors' `StateGroup` calls. It follows Lotus's `plan()`
(`extern/storage-sealing/fsm.go@v1.11.3`) on the table and handler map in `graph.py`, with the
deviations listed there: an unexpected event is logged and consumed (the sector keeps going),
a handler that raised is retried with backoff, and a spent retry budget parks the sector in
FailedUnrecoverable.

A round returns the state's handler only if it asks for a (new) run: the state changed, the
engine's `Restart` or `StepFailed` was consumed, an operator's `update-state`, `remove`,
`terminate` or (in a failed state) `retry` was (they cancel a running handler), or Committing
got a new seed.
A round that only rejects, ignores or folds in events returns None, so a stray event never
re-runs a handler that is running or done (Lotus returns no handler for a rejected event, but
re-runs it for an ignored one).

Deal pieces sent to a sector that no longer takes them are re-routed to another sector
(through `input.py`) in the same commit.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..fsm import Context, Restart, Step, StepFailed
from . import graph
from .events import (
    SectorAddPiece,
    SectorEvent,
    SectorForceState,
    SectorRemove,
    SectorRetriesExhausted,
    SectorRetryNow,
    SectorTerminate,
)
from .graph import FAILED_STATES, EdgeKind, Handler, PlannerKind
from .info import MESSAGE_LIMIT, LogEntry, SectorInfo, log_append
from .notify import StateChanges, state_change
from .states import SectorState

if TYPE_CHECKING:
    from .pipeline import Sealing

log = logging.getLogger("sectorfsm.sealing")

S = SectorState
#: Events that ask for the current state's handler to run again, even in the same state
#: (`SectorRetryNow` only in a failed state: anywhere else it is rejected, and cancels nothing).
_RERUNS = (Restart, StepFailed, SectorForceState, SectorRemove, SectorTerminate)


class PlanError(Exception):
    """A batch the planner refuses (logged in the sector log; the event is consumed)."""


class Planner:
    """The sectors' planner: plans a batch of events and returns the state's handler to run."""

    def __init__(self, sealing: Sealing, changes: StateChanges | None = None) -> None:
        self.sealing = sealing
        #: Each state's step (stateless: one per state, not one per round).
        self._steps: dict[SectorState, Step] = {
            state: functools.partial(run_handler, sealing, handler)
            for state, handler in graph.handlers().items()
        }
        #: Subscribers to state changes (`Miner.subscribe`), told once a round is durable.
        self.changes = changes

    def __call__(self, events: list[Any], info: SectorInfo) -> tuple[Step | None, int]:
        """Plan one batch: `(step or None, number of events consumed)`, re-routing stray pieces.

        Pieces sent to a sector that does not take them (a CC sector, one that started
        packing, or a new one before its SectorStart applies: that round plans nothing after
        it) go to another sector, in this commit.
        """
        if info.state in graph.TAKES_PIECES:
            return self.plan(events, info)
        stray = [i for i, e in enumerate(events) if isinstance(e, SectorAddPiece) and e.pieces]
        if not stray:
            return self.plan(events, info)
        if info.state is not S.UndefinedSectorState:
            self.sealing.input.leave(info.number)  # (a new deal sector stays open)
        emptied = [SectorAddPiece([]) if i in stray else e for i, e in enumerate(events)]
        step, processed = self.plan(emptied, info)
        # Only once the round is planned (it may raise and be re-planned), and only for the
        # events it consumed: the others come back in a later round.
        for i in stray:
            if i < processed:
                self.sealing.input.assign(events[i].pieces)
        return step, processed

    def plan(self, events: list[Any], info: SectorInfo) -> tuple[Step | None, int]:
        """Plan one batch as Lotus's `plan()` does: `(step or None, events consumed)`."""
        sealing = self.sealing
        now = sealing.clock.now()
        before = info.state
        retries_before = info.retries
        seed_before = (info.seed_epoch, info.seed_value)
        try:
            processed = _PLANNERS[graph.PLANNERS[info.state]](events, info, now)
            error = None
        except PlanError as exc:
            processed, error = exc.args[1], str(exc.args[0])
        # A Restart right behind this batch is served by it: the round either starts the
        # handler of the state it leaves the sector in, or (consuming the Restart) re-runs it.
        while processed < len(events) and isinstance(events[processed], Restart):
            processed += 1
        for ev in events[:processed]:
            _log_event(info, ev, now)
        if error is not None:
            log.warning("sector %d: %s", info.number, error)
            log_append(info, LogEntry(int(now), "error;PlanError", f"state machine error: {error}"))
        _bookkeep(sealing, events[:processed], info, before, retries_before, now)
        if info.state is S.PackingFailed:
            info.state = S.DealsExpired  # as Lotus's plan() does (PackingFailed is deprecated)
        changes = self.changes
        if changes is not None and changes.active and info.state is not before and processed:
            changes.staged(
                state_change(info.number, before, info.state, _name(events[processed - 1]))
            )
        step = self.step(info)
        if (
            info.state is before
            and (info.seed_epoch, info.seed_value) == seed_before
            and not any(isinstance(ev, _RERUNS) for ev in events[:processed])
            and not (
                before in FAILED_STATES
                and any(isinstance(ev, SectorRetryNow) for ev in events[:processed])
            )
        ):
            return None, processed  # nothing asks for a new run (see the module docstring)
        return step, processed

    def step(self, info: SectorInfo) -> Step | None:
        """The step for the sector's (new) state, or None when there is nothing to do."""
        step = self._steps.get(info.state)
        if step is None:
            self.sealing.forget(info.number)
            return None
        if info.state not in graph.OPEN_SECTOR_STATES:
            self.sealing.input.leave(info.number)
        return step


def _global(ev: Any, info: SectorInfo) -> bool | None:
    """Apply a global event; None if `ev` is not one. Returns whether it stops the batch."""
    if isinstance(ev, Restart):
        return False
    if isinstance(ev, StepFailed):
        info.last_err = ev.error
        return True
    if isinstance(ev, SectorEvent) and ev.is_global:
        return ev.apply_global(info)
    return None


def _unexpected(info: SectorInfo, ev: Any, i: int) -> PlanError:
    return PlanError(
        f"planner for state {info.state.name} received unexpected event {_name(ev)}", i + 1
    )


def _plan_one(events: list[Any], info: SectorInfo, now: float) -> int:
    for i, ev in enumerate(events):
        if _global(ev, info) is not None:
            return i + 1
        e = graph.edge(info.state, _name(ev))
        if e is None:
            if getattr(ev, "ignorable", False):
                continue
            raise _unexpected(info, ev, i)
        ev.apply(info, now)
        match e.kind:
            case EdgeKind.APPLY:
                continue
            case EdgeKind.RETURN:
                if not info.return_state:
                    raise PlanError("return state not set", i + 1)
                info.state, info.return_state = S(info.return_state), ""
            case EdgeKind.RESUME:
                target = info.unrecoverable_from
                info.state = S(target) if target else S.SealPreCommit1Failed
                info.unrecoverable_from = ""
            case _:
                assert e.dest is not None
                info.state = e.dest
        return i + 1
    return len(events)


def _plan_final(events: list[Any], info: SectorInfo, now: float) -> int:
    ev = events[0]
    if _global(ev, info) is not None:
        return 1
    e = graph.edge(info.state, _name(ev))
    if e is not None and e.kind is EdgeKind.RESUME:
        return _plan_one(events[:1], info, 0.0)
    raise PlanError(f"didn't expect any events in state {info.state.name}, got {_name(ev)}", 1)


def _plan_committing(events: list[Any], info: SectorInfo, now: float) -> int:
    # Lotus planCommitting: a changed seed re-runs Committing; proof events keep the batch going.
    for i, ev in enumerate(events):
        stop = _global(ev, info)
        if stop is not None:
            if stop:
                return i + 1
            continue
        # Lotus switches on the event type alone, even after an event moved the state on.
        e = graph.edge(S.Committing, _name(ev))
        if e is None:
            raise PlanError(f"planCommitting got event of unknown type {_name(ev)}", i + 1)
        if e.kind is EdgeKind.SEED:
            if ev.seed_epoch == info.seed_epoch and ev.seed_value == info.seed_value:
                continue  # the same seed again: nothing changed
            ev.apply(info, now)
            info.state = S.Committing
            return i + 1
        if e.kind is EdgeKind.CONTINUE:
            ev.apply(info, now)
        assert e.dest is not None
        info.state = e.dest
        if e.kind is EdgeKind.NO_APPLY:
            return i + 1
    return len(events)


#: How each planner kind plans a batch: `(events, info, now) -> events consumed`.
_PLANNERS: dict[PlannerKind, Callable[[list[Any], SectorInfo, float], int]] = {
    PlannerKind.PLAN_ONE: _plan_one,
    PlannerKind.FINAL: _plan_final,
    PlannerKind.COMMITTING: _plan_committing,
}


def _bookkeep(
    sealing: Sealing,
    events: list[Any],
    info: SectorInfo,
    before: SectorState,
    retries_before: int,
    now: float,
) -> None:
    """Retry accounting: the backoff clock, the budget, resets, and the last error."""
    policy = sealing.config.retry
    step_failed = False
    resumed = False
    for e in events:
        if isinstance(e, StepFailed):
            step_failed = True
        elif isinstance(e, SectorRetryNow):
            resumed = True
        elif getattr(e, "error", ""):
            info.last_err = e.error  # the latest failure, for `status` and the give-up message
    if info.state is S.Proving and before is not S.Proving:
        info.retries = 0
        info.retry_at = 0.0
        info.last_err = ""
        return
    if info.state is S.FailedUnrecoverable or resumed:
        # Parked: nothing is pending until an operator acts; resumed: retry right away.
        info.retry_at = 0.0
        return
    if info.retries == 0 and retries_before == 0 and info.retry_at == 0 and not step_failed:
        # Fast path for the happy path: no retry pending, nothing to account.
        if info.state in FAILED_STATES and info.state is not before:
            info.retry_at = now + policy.delay(0)
        return
    if info.state is not before:
        back_to_work = info.state not in FAILED_STATES and not _forced(events)
        if before in FAILED_STATES and before is not S.FailedUnrecoverable and back_to_work:
            info.retries += 1  # a failed state sent the sector back to work: one retry
        info.retry_at = 0.0
    if step_failed:
        info.retries += 1
        info.retry_at = now + policy.delay(info.retries - 1)
    elif info.state in FAILED_STATES and info.state is not before:
        info.retry_at = now + policy.delay(info.retries)


def _forced(events: list[Any]) -> bool:
    """True if an operator (not a failed state's own retry) moved the sector."""
    return any(
        isinstance(e, SectorEvent) and e.is_global and not getattr(e, "retry", False)
        for e in events
    )


def exhausted(sealing: Sealing, info: SectorInfo) -> bool:
    """True when a pending retry would go over the sector's retry budget."""
    return info.retries >= sealing.config.retry.budget and (
        info.retry_at > 0 or info.state in FAILED_STATES
    )


def run_handler(
    sealing: Sealing, handler: Handler, ctx: Context, info: SectorInfo
) -> Awaitable[None]:
    """The step: wait out a pending retry's backoff (or give up), then run the handler."""
    if info.retry_at > 0 or info.state in FAILED_STATES:
        return _after_backoff(sealing, handler, ctx, info)
    # No retry pending (every round of a healthy sector): the handler's own coroutine is the
    # step, with none around it for each of its waits to resume through.
    return handler(sealing, ctx, info)


async def _after_backoff(
    sealing: Sealing, handler: Handler, ctx: Context, info: SectorInfo
) -> None:
    """`run_handler` with a retry pending: give up, or wait out its backoff and run it."""
    if exhausted(sealing, info):
        ctx.send(
            SectorRetriesExhausted(
                f"retry budget of {sealing.config.retry.budget} spent in {info.state.name}"
                + (f": {info.last_err}" if info.last_err else "")
            )
        )
        return
    if info.retry_at > sealing.clock.now():
        await sealing.clock.sleep_until(info.retry_at)
    await handler(sealing, ctx, info)


def _name(ev: Any) -> str:
    if isinstance(ev, Restart):
        return graph.RESTART
    return type(ev).__name__


def _log_event(info: SectorInfo, ev: Any, now: float) -> None:
    if isinstance(ev, Restart):
        return  # Lotus never logs SectorRestart
    if isinstance(ev, StepFailed):
        log_append(info, LogEntry(int(now), "error;StepFailed", ev.error, ev.trace))
        return
    message, trace = ev.describe() if isinstance(ev, SectorEvent) else (repr(ev), "")
    if len(message) > MESSAGE_LIMIT:
        message = message[:MESSAGE_LIMIT] + "... truncated"
    kind = _KINDS.get(type(ev))
    if kind is None:
        kind = _KINDS[type(ev)] = f"event;{_name(ev)}"
    log_append(info, LogEntry(int(now), kind, message, trace))


#: A log entry's kind per event class (one string shared by every entry of that event).
_KINDS: dict[type, str] = {}
