"""Rebuild the path a sector took through the graph from its log (to highlight it)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from ..sealing import graph
from ..sealing.graph import EdgeKind
from ..sealing.states import SectorState
from .model import FORCE_STATE, Triple

S = SectorState

#: The global event that parks a sector in FailedUnrecoverable (remembering where it was).
_EXHAUSTED = "SectorRetriesExhausted"
#: The event whose message names where RecoverDealIDs will return.
_INVALID_DEAL_IDS = "SectorInvalidDealIDs"
#: How many later events the look-ahead replays to choose a run-time target.
_LOOKAHEAD = 8


class LogEntryLike(Protocol):
    """What `path_from_log` reads of a log entry (`sealing.info.LogEntry` has it)."""

    @property
    def kind(self) -> str:
        """`event;<Event>` for events (Lotus also writes `event;sealing.<Event>`)."""

    @property
    def message(self) -> str:
        """The event as JSON, `{"User": {<fields>}}`."""


def _event(entry: LogEntryLike) -> tuple[str, dict[str, Any]] | None:
    if not entry.kind.startswith("event;"):
        return None
    name = entry.kind.removeprefix("event;").rsplit(".", 1)[-1]  # drop a Go package prefix
    try:
        decoded = json.loads(entry.message)
    except ValueError:  # e.g. a message Lotus truncated at 8000 bytes
        decoded = None
    user = decoded.get("User") if isinstance(decoded, dict) else None
    return name, user if isinstance(user, dict) else {}


def _state(value: object) -> SectorState | None:
    """A state from a logged value (the enum value; the name is accepted too)."""
    if not isinstance(value, str):
        return None
    try:
        return SectorState(value)
    except ValueError:
        return SectorState.__members__.get(value)


def _follows(state: SectorState, later: Sequence[tuple[str, dict[str, Any]]]) -> int:
    """How many of the `later` events replay from `state` before one has no edge."""
    count = 0
    for event, _ in later[:_LOOKAHEAD]:
        if event in graph.GLOBAL_EDGES:
            break  # a global event would fit anywhere: it tells nothing
        e = graph.edge(state, event)
        if e is None:
            break
        count += 1
        if e.dest is None:  # apply stays; return/resume: stop guessing there
            if e.kind is not EdgeKind.APPLY:
                break
        else:
            state = e.dest
    return count


def _guess(
    candidates: Sequence[SectorState], later: Sequence[tuple[str, dict[str, Any]]]
) -> SectorState | None:
    """The candidate from which most of the next events replay (None if none does)."""
    best, score = None, 0
    for candidate in candidates:
        n = _follows(candidate, later)
        if n > score:
            best, score = candidate, n
    return best


def path_from_log(log: Iterable[LogEntryLike]) -> list[Triple]:
    """The `(source, event, dest)` transitions a sector took, rebuilt from its log.

    Starts in UndefinedSectorState. An event with no edge from the current state was
    consumed as unexpected and is skipped. A run-time target (RecoverDealIDs' return,
    FailedUnrecoverable's resume) is taken from the log when it says (`return_state` of
    SectorInvalidDealIDs, the state before SectorRetriesExhausted), else guessed from the
    events that follow; if nothing tells, the transition is left out.
    """
    events = [ev for entry in log if (ev := _event(entry)) is not None]
    state = S.UndefinedSectorState
    return_to: SectorState | None = None
    gave_up_in: SectorState | None = None
    path: list[Triple] = []
    for i, (event, fields) in enumerate(events):
        dest: SectorState | None
        global_edge = graph.GLOBAL_EDGES.get(event)
        if global_edge is not None:
            if event == FORCE_STATE:
                dest = _state(fields.get("state"))
            else:
                dest = state if global_edge.dest is None else global_edge.dest
            if event == _EXHAUSTED and state is not S.FailedUnrecoverable:
                gave_up_in = state
        else:
            e = graph.edge(state, event)
            if e is None:
                continue
            if e.kind is EdgeKind.APPLY:
                dest = state
            elif e.kind is EdgeKind.RETURN:
                dest = return_to
                if dest is None:
                    dest = _guess(graph.RETURN_STATES, events[i + 1 :])
                return_to = None
            elif e.kind is EdgeKind.RESUME:
                dest = gave_up_in
                if dest is None:
                    dest = _guess(graph.RESUME_STATES, events[i + 1 :])
                gave_up_in = None
            else:
                dest = e.dest
            if event == _INVALID_DEAL_IDS:
                # UndefinedSectorState's value is "": an unset return_state, not a target
                return_to = _state(fields.get("return_state") or None)
        if dest is None:
            continue
        path.append((state.name, event, dest.name))
        # plan() moves a PackingFailed sector on to DealsExpired without an event (as Lotus
        # does, `extern/storage-sealing/fsm.go@v1.11.3`), so later events are planned from there.
        state = S.DealsExpired if dest is S.PackingFailed else dest
    return path
