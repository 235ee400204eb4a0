"""A planner round: the planner folds a machine's queued events into its state.

`RoundPlanner.plan` runs the group's planner on a loaded machine and encodes the state it
leaves; the runtime (fsm/runtime.py) then stages that record and the inbox deletes in the
current commit. A planner that raises, or returns nonsense, never kills the machine: the state
is restored, the culprit event consumed and the error recorded (as go-statemachine would not).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .codec import append_only_tail
from .errors import RecordError, StoreError, Terminated
from .machine import Machine, Step
from .tail import TailEncoder

if TYPE_CHECKING:
    from .records import GroupRecords

log = logging.getLogger("sectorfsm.fsm")

#: What a round decides: `(step or None, events processed, final, encoded state record)`.
Round = tuple["Step | None", int, bool, bytes]
#: The planner: `(events, state) -> (step or None, events processed)`.
PlanFn = Callable[[list[Any], Any], "tuple[Step | None, int]"]


class RoundPlanner:
    """Plans one machine at a time with the group's planner (see the module docstring)."""

    def __init__(
        self, planner: PlanFn, records: GroupRecords[Any], final: Callable[[Any], bool] | None
    ) -> None:
        self.name = records.name
        self.records = records
        self._planner = planner
        self._final = final
        self._encode_record = records.local_encoder()  # (used on the loop thread only)
        tail = append_only_tail(records.codec.state_type)
        self._tail = None if tail is None else TailEncoder(records.codec.schema_version, tail)
        self._decode_state = records.decode_state
        self._counts = records.counts

    def state_of(self, m: Machine) -> Any:
        """The machine's state, decoded from its record if its last step was handed it.

        A record the machine let go of is read back from the store (it is committed);
        raises RecordError if it is gone or cannot be read.
        """
        state = m.state
        if state is None:
            record = m.record
            if record is None:
                record = self.records.raw(m.key)
                if record is None:
                    what = self.records.what(m.id, "state record")
                    raise RecordError(f"{what} is gone from the store")
                m.record = record
            state = m.state = self._decode_state(record, m.id)
            if self._tail is not None:
                self._tail.bind(m, state)
        return state

    def read_back(self, machines: Sequence[Machine]) -> list[Machine] | None:
        """Read back and decode the records of machines whose last step was handed their state.

        One read transaction for all of them. Returns those whose record is gone or cannot
        be read (logged), or None if the store could not be read at all.
        """
        try:
            raws = self.records.raw_many([m.key for m in machines])
        except Exception:
            log.exception("%s: cannot read %d machines back", self.name, len(machines))
            return None
        lost = []
        for m, raw in zip(machines, raws, strict=True):
            m.record = raw
            try:
                self.state_of(m)
            except (RecordError, StoreError) as exc:
                log.error("%s: cannot read machine %r back: %s", self.name, m.id, exc)
                lost.append(m)
        return lost

    def cancels(self, cancels: Callable[[Any, Any], bool], event: object, m: Machine) -> bool:
        """`cancels(event, state)` for a busy machine, whose step may hold its state."""
        try:
            state = self.state_of(m)
        except (RecordError, StoreError) as exc:  # (its record is broken: stop its step)
            log.error("%s: cannot read machine %r back: %s", self.name, m.id, exc)
            return True
        return bool(cancels(event, state))

    def created(self, m: Machine) -> None:
        """Count a machine whose record the current commit creates (if the group counts)."""
        counts = self._counts
        if counts is not None:
            m.counted = counts.entry(counts.key_of(m.state), m.final)
            counts.stage(m.counted, 1, m.key)

    def plan(self, m: Machine, limit: int | None = None) -> Round:
        """Plan `m`'s queued events (the first `limit`): `(step, processed, final, record)`."""
        events = m.events[:limit]
        terminated = False
        state = m.state
        if state is None:  # (handed to the machine's last step: its record is the state)
            state = self.state_of(m)
        counts = self._counts
        if counts is not None and m.counted is None:
            # Before the planner changes the state.
            m.counted = counts.entry(counts.key_of(state), m.final)
        try:
            step, processed = self._planner(events, state)
        except Terminated:
            step, processed, terminated = None, len(events), True
            if len(events) > 1:
                log.warning(
                    "%s: machine %r terminated with %d events unplanned",
                    self.name,
                    m.id,
                    len(events) - 1,
                )
        except Exception as exc:
            return self._plan_failed(m, events, exc)
        if not isinstance(processed, int) or not 0 <= processed <= len(events):
            return self._plan_failed(
                m,
                events,
                ValueError(f"planner returned processed={processed!r} for {len(events)} events"),
            )
        if processed == 0 and step is None:
            # Nothing consumed and nothing to wait for: go-statemachine would spin here.
            processed = 1
            m.record_error(f"planner did not consume event {describe(events[0])}")
        try:
            final, record = self._encode_state_record(m, terminated)
        except Exception as exc:  # (the final= predicate raised, or the state cannot be encoded)
            return self._plan_failed(m, events, exc)
        return step, processed, final, record

    def _plan_failed(self, m: Machine, events: Sequence[object], exc: Exception) -> Round:
        # Undo whatever the planner mutated before raising. The notes of what the record ends
        # with may describe a record this round encoded but will not stage: forget them.
        m.tail, m.tail_count = None, -1
        if m.record is None:  # (a state shared with its step: the record is committed)
            m.state = None
            self.state_of(m)  # (reads the record back, or raises RecordError)
        else:
            m.state = self.records.decode(m.record, m.id)[0]
        stored = m.record
        assert stored is not None
        if len(events) > 1:
            # One event of the batch is bad: plan the first alone, so only the culprit is dropped.
            return self.plan(m, limit=1)
        log.warning(
            "%s: machine %r: planner rejected %s: %s", self.name, m.id, describe(events[0]), exc
        )
        m.record_error(f"planner rejected {describe(events[0])}: {type(exc).__name__}: {exc}")
        try:
            final, record = self._encode_state_record(m, False)
        except Exception:
            # Even the stored state cannot be encoded again: leave it as it is.
            log.exception("%s: machine %r: cannot store its state", self.name, m.id)
            final, record = m.final, stored
        return None, 1, final, record

    def _encode_state_record(self, m: Machine, terminated: bool) -> tuple[bool, bytes]:
        """The round's finality and record; raises if the state cannot be stored."""
        final = self._final
        is_final = terminated or (final is not None and bool(final(m.state)))
        tail = self._tail
        if tail is None:
            record = self._encode_record(m.state, is_final, m.last_error)
        else:
            record = tail.encode(m, m.state, is_final, m.last_error)
        counts = self._counts
        if counts is not None:
            # Staged in the round's own commit: the count moves with the state record.
            name = counts.key_of(m.state)
            entry = counts.entries[is_final].get(name) or counts.entry(name, is_final)
            old = m.counted
            if entry is not old:
                if old is not None:
                    counts.moved(old, entry, m.key)
                m.counted = entry
        return is_final, record


def describe(event: object) -> str:
    """An event's name, for log lines and recorded errors."""
    return type(event).__name__
