"""One machine's in-memory runtime, the context its steps see, and the public info record."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .events import Restart
from .keys import MachineId

if TYPE_CHECKING:
    from .clock import Clock
    from .runtime import MachineRuntime

S = TypeVar("S")
#: The longest error message a record keeps (a step's trace is cut to this too).
MAX_ERROR = 4000


class Context:
    """Handed to every step: the way a step talks back to its machine.

    Each step gets its own: what it sends counts only while that step is the machine's
    latest (see `send`).
    """

    __slots__ = ("_gen", "_machine", "_runtime")

    def __init__(self, runtime: MachineRuntime, machine: Machine, gen: int = 0) -> None:
        self._runtime = runtime
        self._machine = machine
        #: The machine's step generation when this step was started.
        self._gen = gen

    @property
    def id(self) -> MachineId:
        """The id of the machine this step belongs to."""
        return self._machine.id

    @property
    def clock(self) -> Clock:
        """The group's clock; steps wait through it so virtual time works."""
        return self._runtime.clock

    @property
    def cancelled(self) -> bool:
        """True once a cancelling event arrived (or the group is stopping) while the step ran."""
        return self._machine.cancel_requested

    @property
    def superseded(self) -> bool:
        """True once a newer step of the machine started (or it became final, or was reloaded)."""
        return self._runtime.superseded(self._machine, self._gen)

    def send(self, event: object) -> None:
        """Queue `event` for this machine; it is planned after the current step returns.

        Valid also after the step returned (from callbacks the step registered), until the
        step is superseded: a later round started another step, or made the machine final.
        From then on what it sends is dropped (and logged), and what it sent that is still
        queued is dropped too, so a late result never lands in a state it was not meant for.
        """
        self._runtime.send_from_step(self._machine, self._gen, event)


#: A step: `async def step(ctx, state)`, or a plain function for work that never waits (the
#: engine then runs it inline, without creating a Task). `state` is the step's own: the
#: machine plans its next round from the committed record, never from this object.
Step = Callable[[Context, Any], Awaitable[None] | None]


class Machine:
    """Runtime of a loaded machine (live, or dormant but touched by an event)."""

    __slots__ = (
        "batch",
        "batch_start",
        "cancel_requested",
        "counted",
        "events",
        "exists",
        "final",
        "gen",
        "id",
        "key",
        "last_error",
        "next_step",
        "planning",
        "record",
        "sent",
        "seqs",
        "started",
        "state",
        "step_coro",
        "stepping",
        "tail",
        "tail_bytes",
        "tail_count",
        "tail_size",
        "task",
        "unstaged",
    )

    def __init__(self, machine_id: MachineId, key: bytes, state: Any, record: bytes | None) -> None:
        self.id = machine_id
        self.key = key
        #: The state as of `record`; None while the machine's step holds it (the step was
        #: handed this object: `RoundPlanner.state_of` decodes the record again when needed).
        self.state = state
        #: Encoded record as last staged; None along with `state` (it is committed: the
        #: machine's next round reads it back from the store rather than keeping a copy).
        self.record = record
        #: False from `MachineRuntime.create` until that record's commit lands.
        self.exists = True
        #: Queued events and their inbox sequence numbers (0: a signal that is never
        #: persisted); the inbox key is built only for an event that is ever written. Two
        #: flat lists rather than a list of tuples: a tuple per event would be one more
        #: object for the cyclic GC to track.
        self.events: list[object] = []
        self.seqs: list[int] = []
        #: The commit batch the newest events were queued in, and where they start in
        #: `events` (what a failed commit keeps: see `queued_since`).
        self.batch = 0
        self.batch_start = 0
        #: How many of the last queued events are not yet staged for commit.
        self.unstaged = 0
        #: Step generation: bumped by every round that starts a step or makes the machine
        #: final. A step's Context carries the generation it was started in.
        self.gen = 0
        #: Sequence numbers of queued events sent by the latest step (and of a `Restart`,
        #: as 0): all of them are dropped when a round supersedes that step. May also hold
        #: numbers of events already planned; harmless, as numbers are never reused.
        self.sent: list[int] = []
        #: A planner round is waiting for its commit (the step starts after it).
        self.planning = False
        #: The step planned by that round, until the round's commit lands.
        self.next_step: Step | None = None
        #: A step runs (inline, or in `task` once it waited).
        self.stepping = False
        self.task: asyncio.Task[None] | None = None
        #: The running step's awaitable, and whether its task began executing it.
        self.step_coro: Awaitable[None] | None = None
        self.started = False
        self.final = False
        self.last_error: str | None = None
        self.cancel_requested = False
        #: The `counts` entry the stored state is counted under (None: not computed yet).
        self.counted: bytes | None = None
        #: What `record` ends with, for a state whose last field only grows (fsm/tail.py):
        #: `tail_count` entries of that field in `tail_size` bytes, the first ones of `tail`
        #: (the field's list in `state`; None when that is not known to be so).
        self.tail: list[Any] | None = None
        self.tail_count = 0
        self.tail_size = 0
        #: Those bytes, while a step shares the state and the machine let go of `record`.
        self.tail_bytes: bytes | None = None

    def record_error(self, message: str) -> None:
        """Note `message` as the machine's last error (written with its next state record)."""
        self.last_error = message[:MAX_ERROR]

    def inbox_key(self, seq: int) -> bytes:
        """The `inbox` key of this machine's event number `seq`."""
        return self.key + seq.to_bytes(8, "big")

    def push(self, seq: int, event: object, batch: int) -> None:
        """Queue an event, noting the commit batch it is queued in."""
        if batch != self.batch:
            self.batch = batch
            self.batch_start = len(self.seqs)
        self.seqs.append(seq)
        self.events.append(event)

    def push_restart(self) -> None:
        """Queue `Restart` last, unless the machine is final (a resumed or reloaded machine)."""
        if not self.final:
            self.push(0, Restart(), 0)
            self.sent.append(0)  # served (dropped) by whichever step starts first

    def queued_since(self, batch: int) -> int:
        """Index of the first queued event whose commit batch is `batch` or later.

        Batch numbers only grow, and none newer than the latest taken one exists, so these are
        exactly the events queued in the newest batch when that batch is `batch` or later.
        """
        return self.batch_start if self.batch >= batch else len(self.seqs)

    def keep_newer(self, newer: list[tuple[int, object]], old: Machine, batch: int) -> None:
        """After a failed commit: queue `newer` events of the machine's `old` runtime.

        Those already back from the inbox are skipped; those `old`'s step sent stay marked.
        Events sent since the failed batch was taken are not staged yet (a suffix of them,
        never more than were kept), so that many are left unstaged.
        """
        known = set(self.seqs)
        marked = set(old.sent)
        kept = 0
        for seq, event in newer:
            if seq not in known:
                self.push(seq, event, batch)
                if seq in marked:
                    self.sent.append(seq)
                kept += 1
        self.unstaged = min(old.unstaged, kept)

    def drop(self, n: int) -> None:
        """Remove the first `n` queued events."""
        seqs = self.seqs
        if n >= len(seqs):
            seqs.clear()
            self.events.clear()
            self.unstaged = self.batch_start = 0
            return
        del seqs[:n], self.events[:n]
        self.batch_start = max(0, self.batch_start - n)
        if self.unstaged > len(seqs):
            self.unstaged = len(seqs)

    def discard(self, seqs: set[int]) -> None:
        """Remove the queued events numbered `seqs` (their commit failed)."""
        unstaged_from = len(self.seqs) - self.unstaged
        kept_seqs: list[int] = []
        kept_events: list[object] = []
        removed_before_batch = unstaged = 0
        for i, (seq, event) in enumerate(zip(self.seqs, self.events, strict=True)):
            if seq in seqs:
                removed_before_batch += i < self.batch_start
                continue
            kept_seqs.append(seq)
            kept_events.append(event)
            unstaged += i >= unstaged_from
        self.seqs[:] = kept_seqs
        self.events[:] = kept_events
        self.batch_start -= removed_before_batch
        self.unstaged = unstaged

    def drop_sent(self, delete: Callable[[bytes], None]) -> list[object]:
        """Remove the queued events its step sent; returns them.

        `delete` is called with the inbox key of each one that is already staged for commit.
        """
        marked = set(self.sent)
        self.sent.clear()
        staged = len(self.seqs) - self.unstaged
        gone: set[int] = set()
        dropped: list[object] = []
        for i, (seq, event) in enumerate(zip(self.seqs, self.events, strict=True)):
            if seq not in marked:
                continue
            gone.add(seq)
            dropped.append(event)
            if i < staged and seq:
                delete(self.inbox_key(seq))
        if gone:
            self.discard(gone)
        return dropped

    @property
    def busy(self) -> bool:
        """True while a round awaits its commit or a step runs: no planning meanwhile."""
        return self.planning or self.stepping


@dataclass(frozen=True, slots=True)
class MachineInfo(Generic[S]):
    """A machine as persisted: its state plus what the engine records about it."""

    id: MachineId
    state: S
    final: bool
    last_error: str | None
    pending_events: int
