"""The in-memory runtime of a group's loaded machines: queue, planner rounds, steps.

`StateGroup` (fsm/group.py) is the public face; this mixin holds the engine work it does
between commits:

* **Queue.** A sent event is queued on its machine. In `group`/`nosync` mode it is staged for
  the inbox only if no planner round consumed it by the time its commit is taken, so an event
  planned in the commit it was sent in is never written at all (the round's state write
  records its effect). In `sync` mode it is staged at once, in the sender's own commit.
* **Rounds.** Right before each commit (a committer hook) every dirty machine that is not busy
  is planned; its new state is written in that commit, and the step it planned starts only
  once the commit has landed (one callback per commit for all of its rounds).
* **Steps.** A step runs inline until its first real wait (`fsm.steps`); only a step that waits
  gets a Task. One step at a time per machine; what it sends is planned when it returns.
* **Superseded steps.** A round that starts a step (or makes the machine final) supersedes the
  machine's previous step: the events that step sent and that are still queued are dropped,
  in the round's own commit, and so is whatever it sends later through its Context. So a
  handler's result is only ever planned against the state (and the run) that started it.
  Which queued events a step sent survives a restart: the inbox record carries a mark.
* **A failed commit.** Machines planned in it are reloaded from disk as after a crash, keeping
  the events sent since; events it carried for other machines are dropped from their queues,
  since their senders were told the send failed.

Containers that are refilled every commit are reused rather than created anew: a big young
container is traversed by every minor collection of the cyclic GC while it stays young.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from .commit import Committer
from .errors import GroupStoppedError, RecordError, StoreError, Terminated, UnknownMachineError
from .events import Restart, StepFailed
from .keys import MachineId
from .machine import Context, Machine, Step
from .steps import ResumedStep
from .steps import close as _close

if TYPE_CHECKING:
    from .clock import Clock
    from .codec import RecordCodec
    from .records import GroupRecords

log = logging.getLogger("sectorfsm.fsm")

_MAX_ERROR = 4000
Machines = list[Machine]  # (inside StateGroup, `list` is its own list() method)


class MachineRuntime:
    """Engine internals of `StateGroup`: see the module docstring."""

    # Set up by StateGroup.__init__/start().
    name: str
    planner: Callable[[list[Any], Any], tuple[Step | None, int]]
    records: GroupRecords[Any]
    _codec: RecordCodec[Any]
    state_type: type
    _committer: Committer
    _merge: bool
    _final: Callable[[Any], bool] | None
    _encode_record: Callable[[Any, bool, str | None], bytes]
    _encode_event: Callable[[object], bytes]
    _encode_step_event: Callable[[object], bytes]
    _begin_step: Callable[..., Awaitable[None] | None]
    _context: contextvars.Context
    _cancelling: frozenset[type]
    _cancels: Callable[[Any, Any], bool] | None
    _creating: frozenset[type]
    _event_types: frozenset[type]
    _accepting: bool
    clock: Clock
    _machines: dict[MachineId, Machine]
    _dirty: dict[MachineId, Machine]
    _dirty_spare: dict[MachineId, Machine]
    _unstaged: dict[MachineId, Machine]
    _unstaged_spare: dict[MachineId, Machine]
    _planned: Machines | None
    _planned_list: Machines
    _states: dict[bytes, Any] | None
    _waiters: list[asyncio.Future[None]]
    _seq: int
    _rounds: int
    _steps: int
    _running: bool
    _stopping: bool

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # -- the event queue and its staging -----------------------------------------------------

    def _send_local(self, machine_id: MachineId, event: object) -> None:
        if not self._accepting:
            raise GroupStoppedError(f"group {self.name!r} is not running")
        if type(event) not in self._event_types:
            self._codec.event_tag(event)  # raises a TypeError naming the foreign event type
        m = self._machines.get(machine_id)
        if m is None:
            m = self._load(machine_id)
            if m is None:
                if type(event) not in self._creating:
                    raise UnknownMachineError(f"{self.name} has no machine {machine_id!r}")
                m = self._create(machine_id)
        self._enqueue(m, event)

    def _check_encodable(self, machine_id: MachineId, event: object) -> None:
        """Encode `event` now, so an event that cannot be stored fails its own send only."""
        try:
            self._encode_event(event)
        except (OverflowError, ValueError, TypeError) as exc:
            if type(event) not in self._event_types:
                raise  # (the codec's TypeError names the foreign event type)
            error: type[Exception] = ValueError
            why = str(exc)
            if isinstance(exc, OverflowError) or "'int'" in why:
                why = "an integer in it is outside the 64-bit range"  # (msgpack's limit)
            elif isinstance(exc, TypeError):
                error = TypeError
            what = f"{type(event).__name__} for {self.name} machine {machine_id!r}"
            raise error(f"{what} cannot be stored: {why}") from None

    def _superseded(self, m: Machine, event: object) -> None:
        log.info(
            "%s: machine %r: dropped %s, sent by a step that a newer one superseded",
            self.name,
            m.id,
            _describe(event),
        )

    def _send_from_step(self, m: Machine, event: object) -> None:
        """`Context.send` when its machine is not the loaded one (or the send is refused)."""
        if self._accepting and type(event) in self._event_types:
            # The machine was reloaded since (a failed commit, a restart of the group, or it
            # went dormant in a final state): the step that holds this Context is gone.
            self._superseded(m, event)
            return
        self._send_local(m.id, event)  # raises the error that says why

    def _enqueue(
        self, m: Machine, event: object, raw: bytes | None = None, step: bool = False
    ) -> None:
        self._seq = seq = self._seq + 1
        committer = self._committer
        if step:
            m.sent.append(seq)
        if raw is None and self._merge:
            # Staged right before the commit, and only if no planner round consumed it by then
            # (the round's state write then records it): most events never touch the inbox.
            batch = committer.batch_no
            if batch != m.batch:  # (`Machine.push`, inline: this runs for every event)
                m.batch = batch
                m.batch_start = len(m.seqs)
            m.seqs.append(seq)
            m.events.append(event)
            m.unstaged += 1
            self._unstaged[m.id] = m
            if m.task is not None or not m.stepping:
                # (A step running inline is settled right after it returns, which flushes.)
                committer.request_flush()
        else:
            # Sync mode commits each unit on its own, so the put must join the sender's unit;
            # a mailbox event must land in the commit that deletes it from the mailbox.
            self._stage_machine(m)
            value = raw or (self._encode_step_event if step else self._encode_event, event)
            committer.put("inbox", m.inbox_key(seq), value, fresh=True)
            m.push(seq, event, committer.batch_no)
            committer.on_commit(self._staged_committed, m, [seq])
        busy = m.planning or m.stepping
        if busy and type(event) in self._cancelling:
            cancels = self._cancels
            if cancels is None or cancels(event, m.state):
                self._cancel_step(m)
        if not busy:
            self._dirty[m.id] = m

    def _cancel_step(self, m: Machine) -> None:
        """Ask the machine's step, or the step its committing round will start, to stop."""
        m.cancel_requested = True
        if m.task is not None and m.started:
            m.task.cancel()
        # Otherwise the step's task has not begun (or its round is still being committed):
        # `_run_step` (or `_rounds_committed`) sees the flag when it does.

    def _stage_machine(self, m: Machine) -> None:
        n = m.unstaged
        if not n:
            return
        m.unstaged = 0
        committer = self._committer
        put = committer.put
        encode = self._encode_event
        step_encode = self._encode_step_event
        marked = set(m.sent) if m.sent else ()
        seqs = m.seqs[-n:]
        for seq, event in zip(seqs, m.events[-n:], strict=True):
            # Encoded at commit time, and only if no round consumes it in the same commit.
            value = (step_encode if seq in marked else encode, event)
            put("inbox", m.inbox_key(seq), value, fresh=True)
        committer.on_commit(self._staged_committed, m, seqs)

    def _staged_committed(self, m: Machine, seqs: Sequence[int], err: BaseException | None) -> None:
        # A failed commit told the senders of these events so: the machine must not apply
        # them. (A machine planned in that commit was already reloaded by `_recover`.)
        if err is not None and self._machines.get(m.id) is m:
            m.discard(set(seqs))

    def _stage_sent(self) -> None:
        """Stage the inbox puts of sent events that no planner round has consumed."""
        if not self._unstaged:
            return
        unstaged, self._unstaged = self._unstaged, self._unstaged_spare
        machines = self._machines
        for m in unstaged.values():
            if m.unstaged and machines.get(m.id) is m:
                self._stage_machine(m)
        unstaged.clear()
        self._unstaged_spare = unstaged

    # -- loading and creating machines -------------------------------------------------------

    def _create(self, machine_id: MachineId, state: Any = None) -> Machine:
        """Stage a new machine's record; it exists once that commit lands (see `_begun`)."""
        if state is None:
            state = self.state_type()
        key = self.records.key(machine_id)
        final = self.records.is_final(state)
        record = self.records.encode(state, final, None)
        m = Machine(machine_id, key, state, record)
        m.final = final
        m.exists = False
        self._machines[machine_id] = m
        committer = self._committer
        committer.put("states", key, record, fresh=True)
        if not final:
            committer.put("live", key, b"", fresh=True)
        committer.on_commit(self._begun, m)
        return m

    def _begun(self, m: Machine, err: BaseException | None) -> None:
        if err is None:
            m.exists = True
            return
        if not m.exists and self._machines.get(m.id) is m:
            # The record never reached the disk: the machine does not exist.
            del self._machines[m.id]
            self._dirty.pop(m.id, None)
            self._unstaged.pop(m.id, None)

    def _load(self, machine_id: MachineId) -> Machine | None:
        key = self.records.key(machine_id)
        raw = self.records.raw(key)
        if raw is None:
            return None
        state, final, last_error = self.records.decode(raw, machine_id)
        m = Machine(machine_id, key, state, raw)
        m.final = final
        m.last_error = last_error
        self._machines[machine_id] = m
        return m

    # -- planner rounds ----------------------------------------------------------------------

    def _plan_dirty(self) -> None:
        if not self._running or self._stopping:
            return  # what is pending stays in the inbox for the next start
        dirty = self._dirty
        if not dirty:
            return
        self._dirty, self._dirty_spare = self._dirty_spare, dirty  # cleared below
        machines = self._machines
        # Reused: the previous flush's rounds were all started before this flush could run.
        planned = self._planned_list
        if self._merge:
            self._planned = planned
            self._states = self._committer.staging("states")
        try:
            for m in dirty.values():
                if not (m.planning or m.stepping) and m.events and machines.get(m.id) is m:
                    self._plan(m)
        finally:
            self._planned = self._states = None
            dirty.clear()
            if planned:
                self._committer.on_commit(self._rounds_committed, planned)

    def _plan(self, m: Machine, limit: int | None = None) -> None:
        events = m.events[:limit]
        terminated = False
        try:
            step, processed = self.planner(events, m.state)
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
            self._plan_failed(m, events, exc)
            return
        if not isinstance(processed, int) or not 0 <= processed <= len(events):
            self._plan_failed(
                m,
                events,
                ValueError(f"planner returned processed={processed!r} for {len(events)} events"),
            )
            return
        if processed == 0 and step is None:
            # Nothing consumed and nothing to wait for: go-statemachine would spin here.
            processed = 1
            self._record_error(m, f"planner did not consume event {_describe(events[0])}")
        try:
            final, record = self._seal(m, terminated)
        except Exception as exc:  # (the final= predicate raised, or the state cannot be encoded)
            self._plan_failed(m, events, exc)
            return
        self._finish_round(m, step, processed, final, record)

    def _plan_failed(self, m: Machine, events: Sequence[object], exc: Exception) -> None:
        # Undo whatever the planner mutated before raising.
        m.state = self.records.decode(m.record, m.id)[0]
        if len(events) > 1:
            # One event of the batch is bad: plan the first alone, so only the culprit is dropped.
            self._plan(m, limit=1)
            return
        log.warning(
            "%s: machine %r: planner rejected %s: %s", self.name, m.id, _describe(events[0]), exc
        )
        self._record_error(
            m, f"planner rejected {_describe(events[0])}: {type(exc).__name__}: {exc}"
        )
        try:
            final, record = self._seal(m, False)
        except Exception:
            # Even the stored state cannot be sealed again: leave it as it is.
            log.exception("%s: machine %r: cannot store its state", self.name, m.id)
            final, record = m.final, m.record
        self._finish_round(m, None, 1, final, record)

    def _record_error(self, m: Machine, message: str) -> None:
        m.last_error = message[:_MAX_ERROR]

    def _seal(self, m: Machine, terminated: bool) -> tuple[bool, bytes]:
        """The round's finality and record; raises if the state cannot be stored."""
        final = self._final
        is_final = terminated or (final is not None and bool(final(m.state)))
        return is_final, self._encode_record(m.state, is_final, m.last_error)

    def _finish_round(
        self, m: Machine, step: Step | None, processed: int, final: bool, record: bytes
    ) -> None:
        committer = self._committer
        seqs = m.seqs
        # Events never staged (the trailing `unstaged` ones) need no delete: they are consumed
        # in the same commit that records their effect.
        staged = len(seqs) - m.unstaged
        if staged:
            for seq in seqs[: processed if processed < staged else staged]:
                if seq:
                    committer.delete("inbox", m.inbox_key(seq))
        if processed >= len(seqs):  # the common case, inline: the whole queue was planned
            seqs.clear()
            m.events.clear()
            m.unstaged = m.batch_start = 0
            m.sent.clear()
        else:
            m.drop(processed)
        if step is not None or final:
            # This round supersedes the machine's last step (see the module docstring).
            m.gen += 1
            if m.sent:
                self._drop_superseded(m)
        was_final = m.final
        m.final = final
        if record != m.record:
            states = self._states
            if states is not None:
                states[m.key] = record
            else:
                committer.put("states", m.key, record)
            m.record = record
        if m.final != was_final:
            if m.final:
                committer.delete("live", m.key)
            else:
                committer.put("live", m.key, b"")
        m.planning = True
        self._rounds += 1
        planned = self._planned
        if planned is not None:
            m.next_step = step
            planned.append(m)
        else:
            committer.on_commit(self._round_committed, m, step)
            committer.end_unit()

    def _drop_superseded(self, m: Machine) -> None:
        """Drop the queued events the superseded step sent (and a `Restart`, now served)."""
        marked = set(m.sent)
        m.sent.clear()
        staged = len(m.seqs) - m.unstaged
        gone: set[int] = set()
        delete = self._committer.delete
        for i, (seq, event) in enumerate(zip(m.seqs, m.events, strict=True)):
            if seq not in marked:
                continue
            gone.add(seq)
            if i < staged and seq:
                delete("inbox", m.inbox_key(seq))
            if not isinstance(event, Restart):
                self._superseded(m, event)
        if gone:
            m.discard(gone)

    def _rounds_committed(self, planned: Machines, err: BaseException | None) -> None:
        try:
            self._start_rounds(planned, err)
        finally:
            planned.clear()

    def _start_rounds(self, planned: Machines, err: BaseException | None) -> None:
        if err is not None or not self._running or self._stopping:
            for m in planned:
                step, m.next_step = m.next_step, None
                self._round_committed(m, step, err)
            return
        # The common case, inlined: every round landed, start each planned step.
        self._rounds -= len(planned)
        machines = self._machines
        for m in planned:
            m.planning = False
            step, m.next_step = m.next_step, None
            if machines.get(m.id) is not m:
                continue
            if step is None:
                m.cancel_requested = False  # no step to cancel: it must not skip a later one
                self._settle(m)
            else:
                self._start_step(m, step)

    def _round_committed(self, m: Machine, step: Step | None, err: BaseException | None) -> None:
        m.planning = False
        self._rounds -= 1
        if self._machines.get(m.id) is not m:
            return
        if err is not None:
            self._recover(m)
            return
        if step is not None and self._running and not self._stopping:
            self._start_step(m, step)
        else:
            m.cancel_requested = False  # (as in `_start_rounds`)
            self._settle(m)

    # -- steps -------------------------------------------------------------------------------

    def _start_step(self, m: Machine, step: Step) -> None:
        if m.cancel_requested:
            # A cancelling event arrived while this round was being committed: skip the step.
            m.cancel_requested = False
            self._settle(m)
            return
        ctx = Context(self, m, m.gen)
        context = self._context.copy()
        m.stepping = True  # events the step sends wait until it returns
        try:
            # A deep copy, so nothing the step does to it can leak into the persisted state.
            copy = self.records.decode_state(m.record, m.id)
            pending = context.run(self._begin_step, step, ctx, copy)
        except asyncio.CancelledError:
            pending = None  # the step cancelled itself before waiting, as a Task would end
        except Exception as exc:  # the step failed before it ever waited
            pending = None
            self._step_failed(m, exc)
        except BaseException:
            m.stepping = False
            m.cancel_requested = False
            self._settle(m)
            raise
        if pending is None:
            # Finished without waiting: no Task was needed.
            m.stepping = m.cancel_requested = False
            self._settle(m)
            return
        self._steps += 1
        m.started = False
        m.step_coro = pending
        m.task = asyncio.get_running_loop().create_task(self._run_step(m, pending), context=context)
        if m.events:
            # It sent events before it waited; `_enqueue` left the flush to its end.
            self._committer.request_flush()

    def _settle(self, m: Machine) -> None:
        if m.events:
            self._dirty[m.id] = m
            self._committer.request_flush()
        elif m.final and not m.busy:
            del self._machines[m.id]  # dormant: lives on disk only

    # -- a failed commit ---------------------------------------------------------------------

    def _recover(self, m: Machine) -> None:
        """A commit failed: reload the machine from disk as after a crash, keeping newer events."""
        failed_batch = self._committer.batch_no
        # Entries staged after the failed batch was taken are still on their way to the disk.
        start = m.queued_since(failed_batch)
        newer = list(zip(m.seqs[start:], m.events[start:], strict=True))
        del self._machines[m.id]
        self._dirty.pop(m.id, None)
        self._unstaged.pop(m.id, None)
        try:
            fresh = self._load(m.id)
        except (RecordError, StoreError) as exc:
            log.error(
                "%s: cannot reload machine %r after a failed commit: %s", self.name, m.id, exc
            )
            return
        if fresh is None:
            return
        for key, raw in self.records.pending(fresh.key):
            what = self.records.what(m.id, "inbox event")
            event, from_step = self._codec.decode_inbox_event(raw, what)
            seq = int.from_bytes(key[-8:], "big")
            fresh.push(seq, event, 0)
            if from_step:
                fresh.sent.append(seq)
        known = set(fresh.seqs)
        marked = set(m.sent)
        kept = 0
        for seq, event in newer:
            if seq not in known:
                fresh.push(seq, event, failed_batch)
                if seq in marked:
                    fresh.sent.append(seq)
                kept += 1
        # Events sent since the failed batch was taken are not staged yet (a suffix of them,
        # never more than were kept). Stage them now, before `Restart` ends the queue.
        fresh.unstaged = min(m.unstaged, kept)
        self._stage_machine(fresh)
        if not fresh.final:
            fresh.push(0, Restart(), 0)
            fresh.sent.append(0)  # served (dropped) by whichever step starts first
        self._dirty[m.id] = fresh
        self._committer.request_flush()

    def _step_failed(self, m: Machine, exc: BaseException) -> None:
        trace = "".join(traceback.format_exception(exc))
        message = f"{type(exc).__name__}: {exc}"
        log.warning("%s: machine %r: step failed: %s", self.name, m.id, message)
        self._record_error(m, f"step failed: {message}")
        if self._running and not self._stopping:
            failed = StepFailed(message[:_MAX_ERROR], trace[-_MAX_ERROR:])
            self._enqueue(m, failed, None, True)

    async def _run_step(self, m: Machine, pending: Awaitable[None]) -> None:
        m.started = True
        task = asyncio.current_task()
        if m.cancel_requested and task is not None:
            if type(pending) is ResumedStep:
                # It ran up to its first wait already: cancel it there, as a Task would be.
                task.cancel()
            else:
                _close(pending)  # it never ran: skip it altogether
                self._release_step(m, task)
                return
        try:
            await pending
        except asyncio.CancelledError:
            if not m.cancel_requested:
                raise
        except Exception as exc:
            self._step_failed(m, exc)
        finally:
            # Release right away, so what the step sent joins the batch being planned now.
            self._release_step(m, asyncio.current_task())

    def _release_step(self, m: Machine, task: asyncio.Task[Any] | None) -> None:
        if task is None or m.task is not task:
            return  # already released
        m.task = None
        m.step_coro = None
        m.stepping = False
        m.cancel_requested = False
        self._steps -= 1
        if self._running and self._machines.get(m.id) is m:
            self._settle(m)
        self._notify()


def _describe(event: object) -> str:
    return type(event).__name__
