"""StateGroup: many persisted machines of one kind, driven by one planner.

Semantics follow go-statemachine, with its defects fixed (see DESIGN §2):

* `send()` returns once the event is durable (it sits in the inbox, or is already applied).
  A planner round deletes the events it processed and writes the new state in one
  transaction, so after a crash no sent event is lost and none is applied twice.
* One step at a time per machine; events that arrive meanwhile are planned as one batch
  when it returns. A step starts only after the state that planned it is committed.
* A step that raises records its error and delivers `StepFailed`; the machine stays usable.
* A planner that raises on an event leaves the state as it was, records the error and
  consumes that one event; it neither kills the machine nor loops.
* On `start()`, machines in non-final states are re-planned with their pending events and
  then `Restart`. Final machines stay on disk, costing no memory, until an event arrives.

A group that is not started is a *client*: `send`/`begin` write to the store's mailbox, and
whichever process runs the engine picks them up within `poll_interval` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from .clock import Clock, RealClock
from .codec import RecordCodec
from .commit import Committer
from .errors import (
    GroupStoppedError,
    MachineExistsError,
    RecordError,
    StoreError,
    Terminated,
    UnknownMachineError,
)
from .events import BUILTIN_EVENTS, Restart, StepFailed
from .keys import MachineId
from .machine import Context, Machine, MachineInfo, Step
from .mailbox import MailboxReader
from .records import GroupRecords, scan
from .steps import ResumedStep, StepRunner, call
from .steps import close as _close
from .store import LmdbStore

log = logging.getLogger("sectorfsm.fsm")

S = TypeVar("S")
Planner = Callable[[list[Any], S], "tuple[Step | None, int]"]
_MAX_ERROR = 4000
_Machines = list[Machine]  # (inside the class, `list` is StateGroup.list)


class StateGroup(Generic[S]):
    """A named set of machines sharing a planner, a state type and a store."""

    def __init__(
        self,
        store: LmdbStore,
        name: str,
        planner: Planner[S],
        state_type: type[S],
        events: Iterable[type] = (),
        *,
        final: Callable[[S], bool] | None = None,
        creating: Iterable[type] = (),
        cancelling: Iterable[type] = (),
        clock: Clock | None = None,
        schema_version: int = 1,
        poll_interval: float = 0.2,
        eager_steps: bool = True,
    ) -> None:
        if not name or "\x00" in name or len(name) > 64:
            raise ValueError("group names are 1-64 characters without NUL")
        self.store = store
        self._committer: Committer = store.committer
        self.name = name
        self.planner = planner
        self.state_type = state_type
        self.clock: Clock = clock or RealClock()
        self.poll_interval = poll_interval
        #: Start steps inline until they first wait (see `fsm.steps`); False: a Task each.
        self.eager_steps = eager_steps
        self._begin_step = StepRunner().run if eager_steps else call
        self._codec: RecordCodec[S] = RecordCodec(
            state_type, (*BUILTIN_EVENTS, *events), schema_version
        )
        self._event_types = frozenset((*BUILTIN_EVENTS, *events))
        self._creating = frozenset(creating)
        self._cancelling = frozenset(cancelling)
        for cls in (*self._creating, *self._cancelling):
            if not self._codec.knows_event(cls):
                raise ValueError(f"{cls.__name__} is not among the group's events")
        #: The persisted view of this group (reads work whether or not the group runs).
        self.records: GroupRecords[S] = GroupRecords(store, name, self._codec, final)
        self._prefix = self.records.prefix
        self._merge = self._committer.merge
        self._final = final
        self._encode_record = self.records.local_encoder()  # (used on the loop thread only)
        self._encode_event = self._codec.encode_event
        #: Machines planned in the flush being built (merge mode: one commit callback for all),
        #: and that flush's staged state writes.
        self._planned: _Machines | None = None
        self._states: dict[bytes, Any] | None = None
        self._context = contextvars.Context()
        self._machines: dict[MachineId, Machine] = {}
        self._dirty: dict[MachineId, Machine] = {}
        # Containers swapped in and out every flush are reused rather than made anew: a big
        # young container is traversed by every minor GC collection while it stays young.
        self._dirty_spare: dict[MachineId, Machine] = {}
        self._unstaged_spare: dict[MachineId, Machine] = {}
        self._planned_spare: _Machines = []
        #: Machines with sent events not staged for commit yet (see `_stage_sent`).
        self._unstaged: dict[MachineId, Machine] = {}
        self._seq = 0
        self._running = False
        self._stopping = False
        #: Running and not stopping: local sends are accepted.
        self._accepting = False
        self._steps = 0
        self._rounds = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._poller: asyncio.Task[None] | None = None
        self._mailbox = MailboxReader(self)
        #: Ids whose stored record could not be read at start (they are left untouched).
        self.unreadable: dict[MachineId, str] = {}

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """True between `start()` and `stop()`."""
        return self._running

    async def start(self) -> None:
        """Claim the repo for this process's engine and resume every live machine."""
        if self._running:
            raise RuntimeError(f"group {self.name!r} is already started")
        self.store.lock_engine()
        try:
            self._resume()
        except BaseException:
            self.store.unlock_engine()
            raise
        committer = self._committer
        committer.add_hook(self._before_commit)
        committer.add_listener(self._notify)
        committer.add_clock(self.clock)
        self._running = True
        self._stopping = False
        self._accepting = True
        # Steps run in copies of this context, as Tasks created here would.
        self._context = contextvars.copy_context()
        self._mailbox.ingest()
        self._poller = asyncio.get_running_loop().create_task(
            self._mailbox.poll(), name=f"sectorfsm-mailbox-{self.name}"
        )
        committer.request_flush()

    def _resume(self) -> None:
        pending: dict[MachineId, list[tuple[bytes, bytes]]] = {}
        live: list[MachineId] = []
        records = self.records
        with self.store.read() as txn:
            for key, value in scan(txn, self.store.db("inbox"), self._prefix):
                mid, end = records.machine_id(key)
                self._seq = max(self._seq, int.from_bytes(key[end:], "big"))
                pending.setdefault(mid, []).append((key, value))
            for key in scan(txn, self.store.db("live"), self._prefix, values=False):
                live.append(records.machine_id(key)[0])
        for mid in dict.fromkeys([*live, *pending]):
            try:
                m = self._load(mid)
            except RecordError as exc:
                log.error("group %s: not resuming machine %r: %s", self.name, mid, exc)
                self.unreadable[mid] = str(exc)
                continue
            if m is None:
                continue
            for key, raw in pending.get(mid, ()):
                try:
                    event = self._codec.decode_event(raw, self.records.what(mid, "inbox event"))
                except RecordError as exc:
                    self._mailbox.quarantine("inbox", key, raw, str(exc))
                    continue
                m.push(int.from_bytes(key[-8:], "big"), event, 0)
            if not m.final:
                m.push(0, Restart(), 0)
            if m.events:
                self._dirty[mid] = m

    async def stop(self) -> None:
        """Cancel running steps, commit what is staged and release the repo."""
        if not self._running:
            return
        self._stopping = True
        self._accepting = False
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        tasks = [m.task for m in self._machines.values() if m.task is not None]
        for m in self._machines.values():
            if m.task is not None:
                self._cancel_step(m)
        await asyncio.gather(*tasks, return_exceptions=True)
        for m in self._machines.values():
            if m.step_coro is not None:  # (only if a task died without releasing its step)
                with contextlib.suppress(RuntimeError):
                    _close(m.step_coro)
                m.step_coro = None
        self._steps = 0
        self._running = False
        self._stage_sent()
        committer = self._committer
        committer.remove_hook(self._before_commit)
        try:
            await committer.flush()
        finally:
            committer.remove_listener(self._notify)
            committer.remove_clock(self.clock)
            self._machines.clear()
            self._dirty.clear()
            self._unstaged.clear()
            self._rounds = 0
            self.store.unlock_engine()
            self._notify()

    async def idle(self) -> None:
        """Wait until no event is pending, no step runs and every write is committed."""
        while not self._is_idle():
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut

    def is_idle(self) -> bool:
        """True if no event is pending, no step runs and every write is committed."""
        return self._is_idle()

    def _is_idle(self) -> bool:
        if not self._running:
            return True
        return not self._dirty and self._steps == 0 and self._rounds == 0 and self._committer.idle

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # -- public operations ----------------------------------------------------------------

    async def begin(self, machine_id: MachineId, initial_state: S) -> None:
        """Create machine `machine_id` in `initial_state`; it waits for its first event."""
        key = self.records.key(machine_id)
        if not isinstance(initial_state, self.state_type):
            raise TypeError(f"initial state must be a {self.state_type.__name__}")
        if not self._running:
            self._check_stoppable()
            final = self.records.is_final(initial_state)
            record = self.records.encode(initial_state, final, None)
            await asyncio.to_thread(
                self.store.write,
                lambda txn: self.records.client_begin(txn, machine_id, key, record, final),
            )
            return
        if machine_id in self._machines or self.records.raw(key) is not None:
            raise MachineExistsError(f"{self.name} machine {machine_id!r} already exists")
        self._create(machine_id, initial_state)
        committer = self._committer
        waiter = committer.waiter()
        committer.end_unit()
        await waiter

    async def send(self, machine_id: MachineId, event: object) -> None:
        """Deliver `event` to a machine; returns once the event is durable."""
        self.records.key(machine_id)
        if not self._running:
            self._check_stoppable()
            raw = self._codec.encode_event(event)
            create = self.state_type if type(event) in self._creating else None
            await asyncio.to_thread(
                self.store.write,
                lambda txn: self.records.client_send(txn, machine_id, raw, create),
            )
            return
        committer = self._committer
        self._send_local(machine_id, event)
        waiter = committer.waiter()
        committer.end_unit()
        await waiter

    def post(self, machine_id: MachineId, event: object) -> asyncio.Future[None]:
        """Stage `event` now, without yielding; the future resolves once it is durable.

        For engine-side code that must stage several writes in one commit (the group must be
        running). Everything staged before the next `await` lands in the same transaction.
        """
        self._send_local(machine_id, event)
        return self._committer.waiter()

    def get(self, machine_id: MachineId) -> S | None:
        """The persisted state of a machine, or None if it does not exist."""
        raw = self.records.raw(self.records.key(machine_id))
        return None if raw is None else self.records.decode(raw, machine_id)[0]

    def has(self, machine_id: MachineId) -> bool:
        """True if the machine exists in the store."""
        return self.records.raw(self.records.key(machine_id)) is not None

    def info(self, machine_id: MachineId) -> MachineInfo[S] | None:
        """The persisted state plus engine bookkeeping (final flag, last error, pending)."""
        return self.records.info(machine_id)

    def list(
        self,
        filter: Callable[[S], bool] | None = None,
        *,
        start_after: MachineId | None = None,
        page_size: int = 1000,
    ) -> Iterator[tuple[MachineId, S]]:
        """Yield `(id, state)` in id order, reading the store page by page."""
        return self.records.list(filter, start_after=start_after, page_size=page_size)

    def count_by(self, field: str) -> dict[Any, int]:
        """Count machines by the value of one state field (a full scan, page by page)."""
        counts: dict[Any, int] = {}
        for _, state in self.list():
            value = getattr(state, field)
            counts[value] = counts.get(value, 0) + 1
        return counts

    def stats(self) -> dict[str, int]:
        """In-memory figures: loaded machines, running steps, queued events."""
        return {
            "loaded": len(self._machines),
            "steps": self._steps,
            "dirty": len(self._dirty),
            "pending_events": sum(len(m.events) for m in self._machines.values()),
        }

    # -- engine internals -----------------------------------------------------------------

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

    def _enqueue(self, m: Machine, event: object, raw: bytes | None = None) -> None:
        self._seq = seq = self._seq + 1
        committer = self._committer
        if raw is None and self._merge:
            # Staged right before the commit, and only if no planner round consumed it by then
            # (the round's state write then records it): most events never touch the inbox.
            batch = committer.batch_no
            if batch != m.batch:
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
            value = raw or (self._encode_event, event)
            committer.put("inbox", m.inbox_key(seq), value, fresh=True)
            m.push(seq, event, committer.batch_no)
            committer.on_commit(self._staged_committed, m, [seq])
        busy = m.planning or m.stepping
        if busy and type(event) in self._cancelling:
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
        seqs = m.seqs[-n:]
        for seq, event in zip(seqs, m.events[-n:], strict=True):
            # Encoded at commit time, and only if no round consumes it in the same commit.
            put("inbox", m.inbox_key(seq), (encode, event), fresh=True)
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

    def _before_commit(self) -> None:
        self._plan_dirty()
        self._stage_sent()

    def _create(self, machine_id: MachineId, state: S | None = None) -> Machine:
        """Stage a new machine's record; it exists once that commit lands (see `_begun`)."""
        if state is None:
            state = self.state_type()
        key = self.records.key(machine_id)
        final = self.records.is_final(state)
        record = self.records.encode(state, final, None)
        m = Machine(machine_id, key, state, record)
        m.final = final
        m.committed = b""
        self._machines[machine_id] = m
        committer = self._committer
        committer.put("states", key, record, fresh=True)
        if not final:
            committer.put("live", key, b"", fresh=True)
        committer.on_commit(self._begun, m)
        return m

    def _begun(self, m: Machine, err: BaseException | None) -> None:
        if err is None:
            if m.committed == b"":
                m.committed = m.record
            return
        if m.committed == b"" and self._machines.get(m.id) is m:
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

    def _plan_dirty(self) -> None:
        if not self._running or self._stopping:
            return  # what is pending stays in the inbox for the next start
        dirty = self._dirty
        if not dirty:
            return
        self._dirty, self._dirty_spare = self._dirty_spare, dirty  # cleared below
        machines = self._machines
        # Reused: the previous flush's rounds were all started before this flush could run.
        planned, self._planned_spare = self._planned_spare, []
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
            else:
                self._planned_spare = planned

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
        self._finish_round(m, step, processed, terminated)

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
        self._finish_round(m, None, 1, False)

    def _record_error(self, m: Machine, message: str) -> None:
        m.last_error = message[:_MAX_ERROR]

    def _finish_round(
        self, m: Machine, step: Step | None, processed: int, terminated: bool
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
        else:
            m.drop(processed)
        was_final = m.final
        final = self._final
        m.final = terminated or (final is not None and bool(final(m.state)))
        record = self._encode_record(m.state, m.final, m.last_error)
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

    def _rounds_committed(self, planned: _Machines, err: BaseException | None) -> None:
        try:
            self._start_rounds(planned, err)
        finally:
            planned.clear()
            self._planned_spare = planned

    def _start_rounds(self, planned: _Machines, err: BaseException | None) -> None:
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
            m.committed = m.record
            if step is None or m.cancel_requested:
                # (A cancelling event arrived while the round was being committed: no step.)
                m.cancel_requested = False
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
        m.committed = m.record
        if step is not None and self._running and not self._stopping:
            self._start_step(m, step)
        else:
            self._settle(m)

    def _start_step(self, m: Machine, step: Step) -> None:
        if m.cancel_requested:
            # A cancelling event arrived while this round was being committed: skip the step.
            m.cancel_requested = False
            self._settle(m)
            return
        ctx = m.ctx
        if ctx is None:
            ctx = m.ctx = Context(self, m)
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
            if m.events:  # (`_settle`, inline)
                self._dirty[m.id] = m
                self._committer.request_flush()
            elif m.final:
                del self._machines[m.id]  # dormant: lives on disk only
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
            event = self._codec.decode_event(raw, self.records.what(m.id, "inbox event"))
            fresh.push(int.from_bytes(key[-8:], "big"), event, 0)
        known = set(fresh.seqs)
        for seq, event in newer:
            if seq not in known:
                fresh.push(seq, event, failed_batch)
        # Events sent since the failed batch was taken are not staged yet (a suffix of them).
        # Stage them now, before `Restart` ends the queue.
        fresh.unstaged = m.unstaged
        self._stage_machine(fresh)
        if not fresh.final:
            fresh.push(0, Restart(), 0)
        self._dirty[m.id] = fresh
        self._committer.request_flush()

    def _step_failed(self, m: Machine, exc: BaseException) -> None:
        trace = "".join(traceback.format_exception(exc))
        message = f"{type(exc).__name__}: {exc}"
        log.warning("%s: machine %r: step failed: %s", self.name, m.id, message)
        self._record_error(m, f"step failed: {message}")
        if self._running and not self._stopping:
            self._enqueue(m, StepFailed(message[:_MAX_ERROR], trace[-_MAX_ERROR:]))

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

    # -- mailbox (writes from clients) ----------------------------------------------------

    def _check_stoppable(self) -> None:
        if self.store.closed:
            raise StoreError(f"store {self.store.path} is closed")


def _describe(event: object) -> str:
    return type(event).__name__
