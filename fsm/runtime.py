"""The in-memory runtime of a group's loaded machines: queue, planner rounds, steps.

`StateGroup` (fsm/group.py) is the public face and owns one `MachineRuntime`, which does the
engine work between commits; `MachineSteps` (fsm/steps.py) runs the steps it plans:

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
* **One commit in flight.** The committer takes a batch only once the previous one has landed
  and its callbacks ran. The runtime relies on it: a commit's rounds are started (or
  recovered) before the next commit's rounds are planned, and a failed commit is the latest
  batch taken. `_plan_dirty` raises RuntimeError rather than plan over rounds still in flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import GroupStoppedError, RecordError, StoreError, UnknownMachineError
from .events import Restart
from .keys import MachineId
from .machine import Machine, Step
from .rounds import PlanFn, RoundPlanner, describe
from .steps import MachineSteps
from .watch import MachineWatchers

if TYPE_CHECKING:
    from .clock import Clock
    from .codec import RecordCodec
    from .records import GroupRecords
    from .store import LmdbStore

log = logging.getLogger("sectorfsm.fsm")

Machines = list[Machine]


class MachineRuntime:
    """A running group's loaded machines and the work between commits (module docstring)."""

    def __init__(
        self,
        store: LmdbStore,
        records: GroupRecords[Any],
        codec: RecordCodec[Any],
        planner: PlanFn,
        state_type: type,
        clock: Clock,
        *,
        event_types: frozenset[type] = frozenset(),
        final: Callable[[Any], bool] | None = None,
        creating: frozenset[type] = frozenset(),
        cancelling: frozenset[type] = frozenset(),
        cancels: Callable[[Any, Any], bool] | None = None,
        eager_steps: bool = True,
        shared_state: bool = False,
    ) -> None:
        self.name = records.name
        self.records = records
        self.clock = clock
        self._codec = codec
        self._round = RoundPlanner(planner, records, final)
        self._state_type = state_type
        self._committer = committer = store.committer
        self._merge = committer.merge
        self._encode_event = codec.encode_event
        self._encode_step_event = codec.encode_step_event
        self._event_types = event_types
        self._creating = creating
        self._cancelling = cancelling
        #: Whether a `cancelling` event cancels the step running in the machine's state
        #: (None: always), so a stray one never throws away work it had no business stopping.
        self._cancels = cancels
        self.steps = MachineSteps(self, records, committer, eager=eager_steps, shared=shared_state)
        #: Machines planned in the flush being built (merge mode: one commit callback for all),
        #: and that flush's staged state writes.
        self._planned: Machines | None = None
        self._states: dict[bytes, Any] | None = None
        self._machines: dict[MachineId, Machine] = {}
        self._dirty: dict[MachineId, Machine] = {}
        # Containers swapped in and out every flush are reused rather than made anew: a big
        # young container is traversed by every minor GC collection while it stays young.
        self._dirty_spare: dict[MachineId, Machine] = {}
        self._unstaged_spare: dict[MachineId, Machine] = {}
        self._planned_list: Machines = []
        #: Machines with sent events not staged for commit yet (see `_stage_sent`).
        self._unstaged: dict[MachineId, Machine] = {}
        self._seq = 0
        self._running = False
        self._stopping = False
        #: Running and not stopping: local sends are accepted.
        self._accepting = False
        #: Rounds staged whose commit has not landed yet.
        self._rounds = 0
        self._waiters: list[asyncio.Future[None]] = []
        #: Per-machine futures, resolved by the commit of each round (`StateGroup.watch`).
        self.watchers = MachineWatchers(records.counts.names if records.counts else None)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between `start()` and the end of `stop()`."""
        return self._running

    @property
    def active(self) -> bool:
        """Running and not stopping: rounds are planned and steps started."""
        return self._running and not self._stopping

    def restore(
        self,
        machine_id: MachineId,
        entries: Sequence[tuple[bytes, bytes]],
        quarantine: Callable[[str, bytes, bytes, str], None],
    ) -> Machine | None:
        """Load a machine at start with its inbox `entries`, then `Restart` (if not final).

        Raises RecordError if its record cannot be read; unreadable events go to `quarantine`.
        """
        for key, _ in entries:  # (first: numbers stay unique even if the record is unreadable)
            self._seq = max(self._seq, int.from_bytes(key[-8:], "big"))
        m = self._load(machine_id)
        if m is None:
            return None
        self._queue_pending(m, entries, quarantine)
        m.push_restart()
        if m.events:
            self._dirty[machine_id] = m
        return m

    def _queue_pending(
        self,
        m: Machine,
        entries: Iterable[tuple[bytes, bytes]],
        quarantine: Callable[[str, bytes, bytes, str], None] | None = None,
    ) -> None:
        """Queue a machine's inbox entries as read from disk (unreadable ones: `quarantine`)."""
        what = self.records.what(m.id, "inbox event")
        for key, raw in entries:
            try:
                event, from_step = self._codec.decode_inbox_event(raw, what)
            except RecordError as exc:
                if quarantine is None:
                    raise
                quarantine("inbox", key, raw, str(exc))
                continue
            seq = int.from_bytes(key[-8:], "big")
            m.push(seq, event, 0)
            if from_step:
                m.sent.append(seq)  # (the step that sent it is superseded like any other)

    def start(self) -> None:
        """Hook into the committer and accept events (after `restore`)."""
        committer = self._committer
        committer.add_hook(self._plan_dirty)
        committer.add_hook(self._stage_sent, late=True)
        committer.add_listener(self.notify)
        committer.add_clock(self.clock)
        self._running = True
        self._stopping = False
        self._accepting = True
        # Steps run in copies of this context, as Tasks created here would.
        self.steps.bind_context()

    def refuse_events(self) -> None:
        """Stop accepting events: the group is stopping."""
        self._stopping = True
        self._accepting = False

    async def stop(self) -> None:
        """Cancel running steps, commit what is staged and forget the loaded machines."""
        await self.steps.stop(self._machines.values())
        self._running = False
        self._stage_sent()
        committer = self._committer
        committer.remove_hook(self._plan_dirty)
        committer.remove_hook(self._stage_sent)
        try:
            await committer.flush()
        finally:
            self.watchers.wake_all()
            committer.remove_listener(self.notify)
            committer.remove_clock(self.clock)
            self._machines.clear()
            self._dirty.clear()
            self._unstaged.clear()
            self._rounds = 0

    def is_idle(self) -> bool:
        """True if no event is pending, no step runs and every write is committed."""
        if not self._running:
            return True
        steps = self.steps.running
        return not self._dirty and steps == 0 and self._rounds == 0 and self._committer.idle

    async def wait_idle(self) -> None:
        """Wait until `is_idle()`."""
        while not self.is_idle():
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut

    def notify(self) -> None:
        """Wake `wait_idle` callers so they check again (after every commit)."""
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def stats(self) -> dict[str, int]:
        """In-memory figures: loaded machines, running steps, queued events."""
        return {
            "loaded": len(self._machines),
            "steps": self.steps.running,
            "dirty": len(self._dirty),
            "pending_events": sum(len(m.events) for m in self._machines.values()),
        }

    # -- what Context, the mailbox and the group call ----------------------------------------

    def loaded(self, machine_id: MachineId) -> bool:
        """True if the machine is in memory (it may not be committed yet)."""
        return machine_id in self._machines

    def in_memory(self, machine_id: MachineId) -> Machine | None:
        """The machine if it is loaded (never loads it)."""
        return self._machines.get(machine_id)

    def machine(self, machine_id: MachineId) -> Machine | None:
        """The loaded machine, else loaded from disk now; None if it does not exist."""
        return self._machines.get(machine_id) or self._load(machine_id)

    def deliver(self, m: Machine, event: object, raw: bytes) -> None:
        """Queue a mailbox event already encoded as `raw` (its put joins the current commit)."""
        self._enqueue(m, event, raw)

    def superseded(self, m: Machine, gen: int) -> bool:
        """True once a step started at generation `gen` of `m` is no longer its latest."""
        return gen != m.gen or self._machines.get(m.id) is not m

    def send_from_step(self, m: Machine, gen: int, event: object) -> None:
        """`Context.send`: queue `event` unless the step that sends it was superseded."""
        if self._accepting and type(event) in self._event_types:
            if self._machines.get(m.id) is m and gen == m.gen:
                self._enqueue(m, event, None, True)
                return
            # Superseded: a newer round started another step, or the machine was reloaded
            # since (a failed commit, a restart of the group, or it went dormant when final).
            self._superseded(m, event)
            return
        self.send(m.id, event)  # raises the error that says why

    def queue_step_event(self, m: Machine, event: object) -> None:
        """Queue an event on behalf of the machine's step (`StepFailed`)."""
        self._enqueue(m, event, None, True)

    def step_released(self, m: Machine) -> None:
        """A step that ran in a Task ended: plan what it sent, wake idle waiters."""
        if self._running and self._machines.get(m.id) is m:
            self.settle(m)
        self.notify()

    def settle(self, m: Machine) -> None:
        """A machine stopped being busy: plan its queued events, or let it go dormant."""
        if m.events:
            self._dirty[m.id] = m
            self._committer.request_flush()
        elif m.final and not m.busy:
            del self._machines[m.id]  # dormant: lives on disk only

    # -- the event queue and its staging -----------------------------------------------------

    def send(self, machine_id: MachineId, event: object) -> None:
        """Queue `event` for a machine, loading (or creating) it; raises if refused."""
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
                m = self.create(machine_id)
        self._enqueue(m, event)

    def _superseded(self, m: Machine, event: object) -> None:
        what = "sent by a step that a newer one superseded"
        log.info("%s: machine %r: dropped %s, %s", self.name, m.id, describe(event), what)

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
            if cancels is None or self._round.cancels(cancels, event, m):
                self.steps.cancel(m)
        if not busy:
            self._dirty[m.id] = m

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

    def create(self, machine_id: MachineId, state: Any = None) -> Machine:
        """Stage a new machine's record; it exists once that commit lands (see `_begun`)."""
        if state is None:
            state = self._state_type()
        key = self.records.key(machine_id)
        final = self.records.is_final(state)
        record = self.records.encode(state, final, None)
        m = Machine(machine_id, key, state, record)
        m.final, m.exists = final, False
        self._machines[machine_id] = m
        committer = self._committer
        committer.put("states", key, record, fresh=True)
        if not final:
            committer.put("live", key, b"", fresh=True)
        self._round.created(m)
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
        # Reused: the previous flush's rounds were all started before this flush could run.
        planned = self._planned_list
        if planned:
            # Two commits' rounds would overlap: the first commit's callback would start (or
            # recover) the second's rounds too, before their state is on disk.
            raise RuntimeError(
                f"group {self.name!r}: rounds planned while the previous commit's rounds are "
                "in flight (the committer must keep one commit in flight at a time)"
            )
        self._dirty, self._dirty_spare = self._dirty_spare, dirty  # cleared below
        machines = self._machines
        plan = self._round.plan
        finish = self._finish_round
        if self._merge:
            self._planned = planned
            self._states = self._committer.staging("states")
        try:
            back = [m for m in dirty.values() if m.state is None]
            if back:
                self._read_back(back, dirty)
            for m in dirty.values():
                if not (m.planning or m.stepping) and m.events and machines.get(m.id) is m:
                    finish(m, *plan(m))
        finally:
            self._planned = self._states = None
            dirty.clear()
            if planned:
                self._committer.on_commit(self._batch_rounds_committed, planned)

    def _read_back(self, machines: Machines, dirty: dict[MachineId, Machine]) -> None:
        """Read back the states of machines whose last step was handed theirs (one read).

        A machine whose record is gone or unreadable is forgotten, as one that cannot be
        reloaded after a failed commit; if the store cannot be read, none is planned now.
        """
        live = self._machines
        machines = [m for m in machines if not (m.planning or m.stepping) and live.get(m.id) is m]
        lost = self._round.read_back(machines)
        for m in machines if lost is None else ():
            self._dirty[m.id] = dirty.pop(m.id)  # (left for the next flush)
        for m in lost or ():
            del live[m.id]
            self._unstaged.pop(m.id, None)

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
            committer.on_commit(self._machine_round_committed, m, step)
            committer.end_unit()

    def _drop_superseded(self, m: Machine) -> None:
        """Drop the queued events the superseded step sent (and a `Restart`, now served)."""
        delete = self._committer.delete
        for event in m.drop_sent(lambda key: delete("inbox", key)):
            if not isinstance(event, Restart):
                self._superseded(m, event)

    def _batch_rounds_committed(self, planned: Machines, err: BaseException | None) -> None:
        # Cleared in any case: `_plan_dirty` refuses to plan while it holds rounds.
        if self.watchers and err is None:  # (a failed commit wakes them below, to re-read)
            self.watchers.wake_machines(planned)
        try:
            if err is not None or not self._running or self._stopping:
                for m in planned:
                    step, m.next_step = m.next_step, None
                    self._machine_round_committed(m, step, err)
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
                    self.settle(m)
                else:
                    self.steps.start(m, step)
        finally:
            planned.clear()

    def _machine_round_committed(
        self, m: Machine, step: Step | None, err: BaseException | None
    ) -> None:
        m.planning = False
        self._rounds -= 1
        self.watchers.wake(m.id)
        if self._machines.get(m.id) is not m:
            return
        if err is not None:
            self._recover(m)
            return
        if step is not None and self._running and not self._stopping:
            self.steps.start(m, step)
        else:
            m.cancel_requested = False  # (as in `_batch_rounds_committed`)
            self.settle(m)

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
        self._queue_pending(fresh, self.records.pending(fresh.key))
        fresh.keep_newer(newer, m, failed_batch)
        self._stage_machine(fresh)  # (before `Restart` ends the queue)
        fresh.push_restart()
        self._dirty[m.id] = fresh
        self._committer.request_flush()
