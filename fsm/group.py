"""StateGroup: many persisted machines of one kind, driven by one planner.

Semantics follow go-statemachine (`machine.go`, `group.go` @ v1.0.1, as Lotus v1.11.3 uses),
with its defects fixed (see docs/lotus-deviations.md):

* `send()` returns once the event is durable (it sits in the inbox, or is already applied).
  A planner round deletes the events it processed and writes the new state in one
  transaction, so after a crash no sent event is lost and none is applied twice.
* One step at a time per machine; events that arrive meanwhile are planned as one batch
  when it returns. A step starts only after the state that planned it is committed.
* A planner that returns a step asks for it to run now, as in go-statemachine: it must
  return None for a round that changed nothing (an event it rejected or ignored), or the
  state's step runs again. A step's events count only while it is the machine's latest:
  once a round starts another step (or makes the machine final), what it sent that is still
  queued, or sends later through its Context, is dropped and logged as stale, never planned
  against a state it was not meant for (this holds across a restart too).
* `send()` and `post()` encode the event first: one that cannot be stored raises there and
  nothing is staged.
* A step that raises records its error and delivers `StepFailed`; the machine stays usable.
* A planner that raises on an event leaves the state as it was, records the error and
  consumes that one event; it neither kills the machine nor loops.
* On `start()`, machines in non-final states are re-planned with their pending events and
  then `Restart`. Final machines stay on disk, costing no memory, until an event arrives.
* `watch(id)` is a one-shot future for one machine's next committed round: a waiter on a
  machine is woken by its own commits only (fsm/watch.py), never by every commit.
* With `count_by` (state -> str), the group keeps how many machines have each key in the
  commit that writes each state (`counts()` reads them without a scan; fsm/counts.py), and
  checks them at `start()`.

A group that is not started is a *client*: `send`/`begin` write to the store's mailbox, and
whichever process runs the engine picks them up within `poll_interval` seconds.

This module is the public face and the lifecycle. It owns a `MachineRuntime`
(`fsm/runtime.py`: the event queue and the work between commits), which plans rounds with
`fsm/rounds.py` and runs steps with `fsm/steps.py`; client writes come in through
`fsm/mailbox.py`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from .clock import Clock, RealClock
from .codec import RecordCodec
from .commit import Committer
from .errors import (
    GroupStoppedError,
    MachineExistsError,
    RecordError,
    StoreError,
)
from .events import BUILTIN_EVENTS
from .keys import MachineId
from .machine import MachineInfo, Step
from .mailbox import MailboxReader
from .records import GroupRecords, scan
from .runtime import MachineRuntime
from .store import LmdbStore

log = logging.getLogger("sectorfsm.fsm")

S = TypeVar("S")
Planner = Callable[[list[Any], S], "tuple[Step | None, int]"]


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
        cancels: Callable[[Any, S], bool] | None = None,
        clock: Clock | None = None,
        count_by: Callable[[S], str] | None = None,
        schema_version: int = 1,
        poll_interval: float = 0.2,
        eager_steps: bool = True,
        shared_state: bool = False,
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
        #: The group's steps never change the state they get (nor does anything they hand it
        #: to): the machine then keeps that object and plans its next round from it, instead
        #: of reading its record back and decoding it. Whatever still holds it sees the
        #: machine's later rounds. False: each step's state is its own to change.
        self.shared_state = shared_state
        self._codec: RecordCodec[S] = RecordCodec(
            state_type, (*BUILTIN_EVENTS, *events), schema_version
        )
        self._event_types = frozenset((*BUILTIN_EVENTS, *events))
        self._creating = frozenset(creating)
        cancelling = frozenset(cancelling)
        for cls in (*self._creating, *cancelling):
            if not self._codec.knows_event(cls):
                raise ValueError(f"{cls.__name__} is not among the group's events")
        #: The persisted view of this group (reads work whether or not the group runs).
        self.records: GroupRecords[S] = GroupRecords(store, name, self._codec, final, count_by)
        #: The loaded machines and the engine work between commits (fsm/runtime.py).
        self._runtime = MachineRuntime(
            store,
            self.records,
            self._codec,
            planner,
            state_type,
            self.clock,
            event_types=self._event_types,
            final=final,
            creating=self._creating,
            cancelling=cancelling,
            cancels=cancels,
            eager_steps=eager_steps,
            shared_state=shared_state,
        )
        self._poller: asyncio.Task[None] | None = None
        self._mailbox = MailboxReader(self._runtime, self.set_aside)
        #: Ids whose stored record could not be read (set aside in quarantine at start).
        self.unreadable: dict[MachineId, str] = {}

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """True between `start()` and `stop()`."""
        return self._runtime.running

    async def start(self) -> None:
        """Claim the repo for this process's engine and resume every live machine."""
        if self._runtime.running:
            raise RuntimeError(f"group {self.name!r} is already started")
        self.store.lock_engine()
        try:
            self.store.claim_group(self.name)
        except BaseException:
            self.store.unlock_engine()
            raise
        try:
            self._resume()
        except BaseException:
            self.store.release_group(self.name)
            self.store.unlock_engine()
            raise
        self._runtime.start()
        self._mailbox.ingest()
        self._poller = asyncio.get_running_loop().create_task(
            self._mailbox.poll(self.poll_interval), name=f"sectorfsm-mailbox-{self.name}"
        )
        self._committer.request_flush()

    def _resume(self) -> None:
        pending: dict[MachineId, list[tuple[bytes, bytes]]] = {}
        live: list[MachineId] = []
        records = self.records
        with self.store.read() as txn:
            for key, value in scan(txn, self.store.db("inbox"), records.prefix):
                pending.setdefault(records.machine_id(key)[0], []).append((key, value))
            for key in scan(txn, self.store.db("live"), records.prefix, values=False):
                live.append(records.machine_id(key)[0])
        bad: list[tuple[MachineId, bytes, str]] = []
        counts = records.counts
        known: dict[MachineId, str] = {}
        for mid in dict.fromkeys([*live, *pending]):
            try:
                m = self._runtime.restore(mid, pending.get(mid, ()), self._mailbox.quarantine)
            except RecordError as exc:
                raw = records.raw(records.key(mid))
                if raw is not None:
                    bad.append((mid, raw, str(exc)))
                continue
            if counts is not None and m is not None:
                known[mid] = name = counts.key_of(m.state)
                m.counted = counts.entry(name, m.final)
        if bad:
            self.set_aside(bad)
        if counts is not None:
            # O(live): the live half is checked against what was just loaded.
            counts.check(records, known)

    def set_aside(self, bad: list[tuple[MachineId, bytes, str]]) -> None:
        """Move unreadable machine records `(id, raw, reason)` to quarantine (one commit).

        The engine runs every other machine; these wait, bytes kept, for the operator to
        export, repair and restore them (`GroupRecords.restore`) or drop them.
        """
        records = self.records
        for name in ("states", "live", "quarantine"):
            self.store.db(name)

        def move(txn: Any) -> None:
            for mid, raw, why in bad:
                # Only the bytes that were read: a record rewritten meanwhile is not ours.
                if txn.get(records.key(mid), db=self.store.db("states")) == raw:
                    records.set_aside(txn, mid, raw, why)

        self.store.write(move)
        if records.counts is not None and self._runtime.running:
            records.counts.check(records, {})  # (set_aside left them to be rebuilt)
        for mid, _, why in bad:
            log.error(
                "group %s: machine %r set aside in quarantine (its record is kept): %s",
                self.name,
                mid,
                why,
            )
            self.unreadable[mid] = why

    async def stop(self) -> None:
        """Cancel running steps, commit what is staged and release the repo."""
        runtime = self._runtime
        if not runtime.running:
            return
        runtime.refuse_events()
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        try:
            await runtime.stop()
        finally:
            self.store.release_group(self.name)
            self.store.unlock_engine()
            runtime.notify()

    async def idle(self) -> None:
        """Wait until no event is pending, no step runs and every write is committed."""
        await self._runtime.wait_idle()

    def is_idle(self) -> bool:
        """True if no event is pending, no step runs and every write is committed."""
        return self._runtime.is_idle()

    # -- public operations ----------------------------------------------------------------

    async def begin(self, machine_id: MachineId, initial_state: S) -> None:
        """Create machine `machine_id` in `initial_state`; it waits for its first event."""
        key = self.records.key(machine_id)
        if not isinstance(initial_state, self.state_type):
            raise TypeError(f"initial state must be a {self.state_type.__name__}")
        if not self._runtime.running:
            self._check_stoppable()
            final = self.records.is_final(initial_state)
            record = self.records.encode(initial_state, final, None)
            await asyncio.to_thread(
                self.store.write,
                lambda txn: self.records.client_begin(
                    txn, machine_id, key, record, final, initial_state
                ),
            )
            return
        if self._runtime.loaded(machine_id) or self.records.raw(key) is not None:
            raise MachineExistsError(f"{self.name} machine {machine_id!r} already exists")
        if self.records.quarantined(machine_id) is not None:
            raise MachineExistsError(
                f"{self.name} machine {machine_id!r} exists but its record is in quarantine"
            )
        self._runtime.create(machine_id, initial_state)
        committer = self._committer
        waiter = committer.waiter()
        committer.end_unit()
        await waiter

    async def send(self, machine_id: MachineId, event: object) -> None:
        """Deliver `event` to a machine; returns once the event is durable."""
        self.records.key(machine_id)
        self._check_encodable(machine_id, event)
        if not self._runtime.running:
            self._check_stoppable()
            raw = self._codec.encode_event(event)
            create = self.state_type if type(event) in self._creating else None
            await asyncio.to_thread(
                self.store.write,
                lambda txn: self.records.client_send(txn, machine_id, raw, create),
            )
            return
        committer = self._committer
        self._runtime.send(machine_id, event)
        waiter = committer.waiter()
        committer.end_unit()
        await waiter

    def post(self, machine_id: MachineId, event: object) -> asyncio.Future[None]:
        """Stage `event` now, without yielding; the future resolves once it is durable.

        For engine-side code that must stage several writes in one commit (the group must be
        running). Everything staged before the next `await` lands in the same transaction.
        """
        self._check_encodable(machine_id, event)
        self._runtime.send(machine_id, event)
        return self._committer.waiter()

    def get(self, machine_id: MachineId) -> S | None:
        """The persisted state of a machine, or None if it does not exist.

        `RecordError` names a record that cannot be read, or that was set aside in quarantine.
        """
        raw = self.records.raw(self.records.key(machine_id))
        if raw is not None:
            return self.records.decode(raw, machine_id)[0]
        aside = self.records.quarantined(machine_id)
        if aside is not None:
            raise RecordError(
                f"{self.records.what(machine_id, 'state record')} is in quarantine: {aside[0]}"
            )
        return None

    def peek(self, machine_id: MachineId) -> S | None:
        """`get`, read-only: a loaded machine's own state object when it is the committed one.

        For hot read paths (never change what it returns, nor call it from a planner): a
        machine whose round is not committed yet, or whose step holds its state, is read from
        the store as `get` does.
        """
        m = self._runtime.in_memory(machine_id)
        if m is not None and m.exists and not m.planning and m.state is not None:
            state: S = m.state
            return state
        return self.get(machine_id)

    def watch(self, machine_id: MachineId) -> asyncio.Future[str | None]:
        """A future resolved once the next commit writing this machine's state has landed.

        Only that machine's commits (and the group stopping) resolve it, so waiters on many
        machines cost nothing per commit of the others (fsm/watch.py). Its result is the
        count key (`count_by`) of the state that commit wrote, or None (no counts, a failed
        commit, the group stopping): re-read the state with `get`. One-shot: watch again to
        keep waiting. The group must be running.
        """
        self.records.key(machine_id)
        if not self._runtime.running:
            raise GroupStoppedError(f"group {self.name!r} is not running: nothing would wake it")
        return self._runtime.watchers.watch(machine_id)

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
        """Yield `(id, state)` in id order, reading the store page by page.

        Records that cannot be read are skipped (and listed in `unreadable`, logged once).
        """
        return self.records.list(
            filter, start_after=start_after, page_size=page_size, on_error=self._unreadable
        )

    def list_by(self, keys: Iterable[str]) -> Iterator[tuple[MachineId, S]]:
        """Yield `(id, state)` of the machines whose `count_by` key is in `keys`, in id order.

        Read from the key index kept with the counts: the cost is that of the machines
        listed, not of the group. While the index is not exact (a store written before it,
        until the engine's first start rebuilds it) a full scan answers instead.
        """
        counts = self.records.counts
        if counts is None:
            raise ValueError(f"group {self.name!r} has no count_by: it keeps no key index")
        wanted = set(keys)
        found = counts.keys_with(wanted)
        if found is None:
            key_of = counts.key_of
            return self.list(lambda state: key_of(state) in wanted)
        return self.records.list_keys(found, on_error=self._unreadable)

    def _unreadable(self, machine_id: MachineId, raw: bytes, exc: RecordError) -> None:
        if machine_id not in self.unreadable:
            log.error("group %s: skipping machine %r: %s", self.name, machine_id, exc)
        self.unreadable[machine_id] = str(exc)

    def count_by(self, field: str) -> dict[Any, int]:
        """Count machines by the value of one state field (a full scan, page by page)."""
        counts: dict[Any, int] = {}
        for _, state in self.list():
            value = getattr(state, field)
            counts[value] = counts.get(value, 0) + 1
        return counts

    def counts(self) -> dict[str, int]:
        """Machines per `count_by` key, final or not (read from the stored counts: no scan).

        Before the engine first made them exact (a store written by a version without counts,
        or a record just quarantined), they come from a full scan instead.
        """
        counts = self.records.counts
        if counts is None:
            raise ValueError(f"group {self.name!r} has no count_by: it keeps no counts")
        stored = counts.read()
        return stored if stored is not None else counts.scanned(self.records)

    def stats(self) -> dict[str, int]:
        """In-memory figures: loaded machines, running steps, queued events."""
        return self._runtime.stats()

    def _check_encodable(self, machine_id: MachineId, event: object) -> None:
        """Encode `event` now, so an event that cannot be stored fails its own send only."""
        try:
            self._codec.encode_event(event)
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

    # -- mailbox (writes from clients) ----------------------------------------------------

    def _check_stoppable(self) -> None:
        if self.store.closed:
            raise StoreError(f"store {self.store.path} is closed")
