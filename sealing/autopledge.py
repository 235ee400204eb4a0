"""Pledge tools and auto-pledge: myScheduler's `mypledge`, `mypledgeonce` and `AutoPledgeDiff`.

Free AddPiece slots (`ap_slots`), for `sectors pledge --fill`: over the workers that do AP,
are enabled, not draining (IsPlanOffline) and not over their disk quota (DiskHoldMax,
APDiskHoldMax), a worker's free slots are its `AddPieceMax` minus the AP work held there
(assigned, preparing or running) or queued pinned to it. A worker without a cap (no policy
file, or `AddPieceMax: null`) counts how many more APs its ledger admits (CPU, memory).

Auto-pledge (`AutoPledger`), the rule the seed leaves undefined:

- A worker takes part when its policy has `AutoPledgeDiff: N` with N > 0 and a numeric
  `PreCommit1Max: P` > 0, and `[sealing] auto_pledge` is on (the default).
- Its pipeline in flight is its AP + PC1 tasks held or queued pinned to it, plus the CC
  sectors pinned to it that have not reached the scheduler yet.
- When `P - in_flight > N`, the engine pledges `P - in_flight` CC sectors pinned to it
  (back to full), as many as MaxSealingSectors allows (the log says when it stopped them).
- It never pledges for a worker that is disabled, draining, has AP disabled
  (`AddPieceMax: 0`) or is over its disk quota.
- The rule is evaluated after every scheduling cycle, at most once per event-loop turn: a
  task released, a worker added, enabled or with a reloaded policy all run a cycle.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import operator
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import compress
from typing import TYPE_CHECKING, Any

from ..fsm.codec import packb, unpackb
from ..sched import FileType, Scheduler, SectorRef, TaskType, resource_spec
from ..sched.rules import units_of_counts
from .states import SectorState
from .stats import sector_counts, sector_stats

if TYPE_CHECKING:
    from ..fsm import LmdbStore, StateGroup
    from ..sched.workers import Worker
    from .info import SectorInfo
    from .input import SectorInput
    from .notify import StateChange, StateChanges

log = logging.getLogger("sectorfsm.sealing")

#: `meta` key of the auto-pledge state per worker, for `sectors workers` in another process.
META_AUTOPLEDGE = b"sealing/autopledge"
#: A worker without an AddPieceMax is never counted for more APs than this.
RESOURCE_ROOM_LIMIT = 64
_AP = frozenset({TaskType.ADD_PIECE})
_AP_PC1 = frozenset({TaskType.ADD_PIECE, TaskType.PRE_COMMIT1})
#: A `Scheduler.tasks_of` row's worker (held) or pin (queued), its sector, a sector's number.
_WORKER = operator.itemgetter(2)
_SECTOR = operator.itemgetter(0)
_NUMBER = operator.attrgetter("number")


#: States of a pinned CC sector before its AddPiece reaches the scheduler.
_BEFORE_AP = frozenset({SectorState.UndefinedSectorState, SectorState.Packing})
#: States in which an auto-pledged sector still counts in its worker's AP + PC1 pipeline.
_FEEDING = frozenset(
    {
        SectorState.UndefinedSectorState,
        SectorState.Packing,
        SectorState.GetTicket,
        SectorState.PreCommit1,
    }
)


@dataclass(slots=True)
class WorkerSlots:
    """One AP-capable worker as `pledge --fill/--per-worker` counted it."""

    worker: str
    #: AddPieceMax (None: no cap, the worker's resources decide).
    cap: int | None
    #: AP work held there or queued pinned to it.
    in_use: int
    free: int
    #: Why it gets nothing ("" when it takes part).
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _refusal(w: Worker, index: Any) -> str:
    """Why `w` takes no new AP (disabled, draining, AP off, over its disk quota), or ""."""
    if not w.enabled:
        return f"disabled: {w.disabled_reason or 'disabled'}"
    if w.watcher is None:
        return ""
    policy = w.policy
    if policy.is_plan_offline:
        return "draining (IsPlanOffline)"
    if policy.add_piece_max == 0:
        return "AP disabled (AddPieceMax = 0)"
    if policy.disk_hold_max <= 0 and policy.ap_disk_hold_max <= 0:
        return ""  # no quota: nothing to count
    used, ap_used = units_of_counts(index.file_counts(w.name))
    if policy.disk_hold_max > 0 and used + 1 > policy.disk_hold_max:
        return f"over disk quota: {used}+1 > {policy.disk_hold_max} units (DiskHoldMax)"
    if policy.ap_disk_hold_max > 0 and ap_used + 1 > policy.ap_disk_hold_max:
        return f"over disk quota: {ap_used}+1 > {policy.ap_disk_hold_max} units (APDiskHoldMax)"
    return ""


def _resource_room(w: Worker, sector_size: int) -> int:
    """How many more APs the worker's ledger admits (no cap: its resources decide)."""
    need = resource_spec(TaskType.ADD_PIECE, sector_size, w.spec.overrides)
    ledger = copy.deepcopy(w.ledger)
    room = 0
    while room < RESOURCE_ROOM_LIMIT and ledger.refusal(TaskType.ADD_PIECE, need) is None:
        ledger.add(-1 - room, TaskType.ADD_PIECE, need)
        room += 1
    return room


def waiting_pins(group: StateGroup[SectorInfo], seen: set[int]) -> Counter[str]:
    """Pinned CC sectors per worker whose AddPiece is not in the scheduler yet (a live scan)."""
    out: Counter[str] = Counter()
    for n, info in group.records.list_live(on_error=lambda *_: None):
        if info.ap_worker and info.state in _BEFORE_AP and int(n) not in seen:
            out[info.ap_worker] += 1
    return out


def ap_slots(
    sched: Scheduler, sector_size: int, group: StateGroup[SectorInfo] | None = None
) -> list[WorkerSlots]:
    """Free AddPiece slots per AP-capable worker (see the module docstring).

    With `group`, pinned sectors that have not reached the scheduler yet count as queued.
    """
    held: Counter[str] = Counter()
    queued: Counter[str] = Counter()
    seen = set()
    for sector, _, worker, is_held in sched.tasks_of(_AP):
        seen.add(sector.number)
        if worker is not None:
            (held if is_held else queued)[worker] += 1
    if group is not None:
        queued.update(waiting_pins(group, seen))
    out = []
    for w in sched.workers_for(TaskType.ADD_PIECE):
        in_use = held[w.name] + queued[w.name]
        cap = w.policy.add_piece_max if w.watcher is not None else None
        note = _refusal(w, sched.index)
        if note:
            free = 0
        elif cap is None:
            free = max(0, _resource_room(w, sector_size) - queued[w.name])
        else:
            free = max(0, cap - in_use)
        out.append(WorkerSlots(w.name, cap, in_use, free, note))
    return out


def sealing_headroom(group: StateGroup[SectorInfo], limit: int) -> int | None:
    """How many more sectors MaxSealingSectors allows (None: no limit)."""
    if limit <= 0:
        return None
    # The same count as `input.check_sealing_limit` (Lotus's curSealing), kept per commit.
    return max(0, limit - sector_stats(sector_counts(group.records)).cur_sealing)


@dataclass(slots=True)
class PledgePlan:
    """What `pledge --fill/--per-worker` counted per worker, and the sectors it created."""

    mode: str  # "fill" or "per-worker"
    slots: list[WorkerSlots]
    #: Sectors per worker the count asked for, and those MaxSealingSectors let through.
    wanted: dict[str, int]
    granted: dict[str, int]
    #: Why fewer than wanted were created ("" when all were).
    stopped: str = ""
    sectors: list[int] = field(default_factory=list)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def plan_pledge(
    sched: Scheduler, group: StateGroup[SectorInfo], limit: int, sector_size: int, mode: str
) -> PledgePlan:
    """Count for `pledge --fill` (free AP slots) or `--per-worker` (one per eligible worker)."""
    if mode not in ("fill", "per-worker"):
        raise ValueError(f"pledge mode must be 'fill' or 'per-worker', not {mode!r}")
    slots = ap_slots(sched, sector_size, group)
    if mode == "fill":
        wanted = {s.worker: s.free for s in slots if s.free > 0}
    else:
        wanted = {s.worker: 1 for s in slots if not s.note}
    headroom = sealing_headroom(group, limit)
    granted: dict[str, int] = {}
    left = headroom
    for name, n in wanted.items():
        take = n if left is None else min(n, left)
        if take > 0:
            granted[name] = take
        if left is not None:
            left -= take
    total, made = sum(wanted.values()), sum(granted.values())
    stopped = ""
    if made < total:
        stopped = (
            f"MaxSealingSectors ({limit}) stopped it at {made} of {total} sector(s) "
            f"({limit - (headroom or 0)} sealing)"
        )
    return PledgePlan(mode, slots, wanted, granted, stopped)


def execute_plan(plan: PledgePlan, sector_input: SectorInput) -> list[asyncio.Future[None]]:
    """Create the plan's sectors, each pinned to its worker; returns their durability."""
    futures = []
    for name, n in plan.granted.items():
        for number, durable in sector_input.new_cc_sectors(n, worker=name):
            plan.sectors.append(number)
            futures.append(durable)
    return futures


class AutoPledger:
    """Keeps each `AutoPledgeDiff` worker's AP + PC1 pipeline fed (rule: module docstring)."""

    def __init__(
        self,
        sched: Scheduler,
        sector_input: SectorInput,
        store: LmdbStore,
        *,
        enabled: bool,
        changes: StateChanges,
    ) -> None:
        self.sched = sched
        self.input = sector_input
        self.store = store
        self.enabled = enabled
        #: CC sectors pledged here, until they are seen past PC1: number -> worker.
        self._pending: dict[int, str] = {}
        #: The engine's durable state changes: a pledged sector leaves `_pending` as its
        #: change past PC1 lands, so no evaluation reads a sector's state.
        self._changes = changes
        self._listening = False
        #: Pledged here, first event not durable yet (not in the per-state counts).
        self._staged: set[int] = set()
        self._due = False
        self._running = False
        self._limited = False
        self._state: dict[str, dict[str, Any]] = {}
        #: The last count and what it was counted from: the AP and PC1 tasks, the version of
        #: `_pending` (bumped as it changes), and whether a holder of files was asked (the
        #: index may have moved since). Most cycles move no AP or PC1 task: the count stands.
        self._flight: Counter[str] | None = None
        self._flight_tasks: list[tuple[SectorRef, TaskType, str | None, bool]] = []
        self._flight_version = -1
        self._pending_version = 0
        self._asked_holders = False
        #: What the last evaluation read, if it pledged and logged nothing and read no disk
        #: quota: an evaluation reading the same would do the same (nothing).
        self._quiet: tuple[Any, ...] | None = None
        #: Sectors created, for tests and the log.
        self.pledged = 0

    def start(self) -> None:
        """Evaluate after every scheduling cycle from now on (and once now)."""
        self._running = True
        self.sched.add_cycle_listener(self._cycle_done)
        self.store.committer.add_listener(self._committed)
        self._cycle_done()

    def stop(self) -> None:
        """Stop pledging (the scheduler keeps the listener, which then does nothing)."""
        self._running = False
        self.store.committer.remove_listener(self._committed)
        if self._listening:
            self._changes.remove_listener(self._changed)
            self._listening = False

    def _changed(self, change: StateChange) -> None:
        if change.after not in _FEEDING and self._pending.pop(change.sector, None) is not None:
            self._pending_version += 1  # past PC1, failed or removed

    def _committed(self) -> None:
        # Held back by MaxSealingSectors: a sector reaching Proving frees room without any
        # scheduling cycle, so commits re-evaluate too (only while the limit holds it).
        if self._limited:
            self._cycle_done()

    def _durable(self, number: int, fut: asyncio.Future[None]) -> None:
        self._staged.discard(number)
        # A failed commit stops the engine and is reported there.
        if not fut.cancelled():
            fut.exception()

    def _cycle_done(self) -> None:
        if self._running and not self._due:
            self._due = True
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        self._due = False
        if not self._running:
            return
        try:
            self.evaluate()
        except Exception:
            log.exception("auto-pledge")

    def state(self) -> dict[str, dict[str, Any]]:
        """Per worker: diff, PC1 cap, in flight, whether it is active, and why not."""
        return dict(self._state)

    def evaluate(self) -> int:
        """Apply the rule once to every worker; returns how many sectors it pledged."""
        workers = [
            w
            for w in self.sched.workers_for(TaskType.ADD_PIECE)
            if w.watcher is not None and w.policy.auto_pledge_diff > 0
        ]
        if not workers:  # the common case, after every cycle: cost nothing
            if self._state:
                self._state = {}
                self.store.committer.put("meta", META_AUTOPLEDGE, packb({}))
            return 0
        flight = self._in_flight()
        state: dict[str, dict[str, Any]] = {}
        limit = self.input.config.max_sealing_sectors
        headroom = sealing_headroom(self.input.group, limit)
        if headroom is not None:  # the counts see a sector once its first event is durable
            headroom = max(0, headroom - len(self._staged))
        # Everything the rule reads but the index (only a disk quota makes it read that).
        inputs = (
            flight,
            self.enabled,
            limit,
            headroom,
            [(w, w.enabled, w.disabled_reason, w.watcher, w.policy) for w in workers],
        )
        if inputs == self._quiet:
            return 0  # as the last one, which pledged and logged nothing: the same again
        made = 0
        self._limited = False
        reads_index = False
        for w in workers:
            policy = w.policy
            diff = policy.auto_pledge_diff
            cap = policy.pre_commit1_max
            reads_index = reads_index or policy.disk_hold_max > 0 or policy.ap_disk_hold_max > 0
            now = flight[w.name]
            entry: dict[str, Any] = {"diff": diff, "pc1_max": cap, "in_flight": now}
            state[w.name] = entry
            note = _refusal(w, self.sched.index)
            if not self.enabled:
                note = "off ([sealing] auto_pledge = false)"
            elif not note and not cap:
                note = "needs a PreCommit1Max > 0"
            entry["note"] = note
            entry["active"] = not note
            if note or cap is None or cap - now <= diff:
                continue
            want = cap - now
            if headroom is not None and want > headroom:
                log.info(
                    "auto-pledge for %s: MaxSealingSectors stops it at %d of %d sector(s)",
                    w.name,
                    headroom,
                    want,
                )
                entry["note"] = f"stopped by MaxSealingSectors ({limit})"
                self._limited = True
                want = headroom
            if want <= 0:
                continue
            if not self._listening:
                # From the first pledge on (until then, no listener costs the planner a thing).
                self._changes.add_listener(self._changed)
                self._listening = True
            for n, durable in self.input.new_cc_sectors(want, worker=w.name, auto=True):
                self._staged.add(n)
                durable.add_done_callback(functools.partial(self._durable, n))
                self._pending[n] = w.name
            self._pending_version += 1
            if headroom is not None:
                headroom -= want
            made += want
            entry["in_flight"] = now + want
            log.info("auto-pledge: %d CC sector(s) for %s", want, w.name)
        self.pledged += made
        quiet = not made and not self._limited and not reads_index
        self._quiet = inputs if quiet else None
        if state != self._state:
            self._state = state
            self.store.committer.put("meta", META_AUTOPLEDGE, packb(state))
        return made

    def _in_flight(self) -> Counter[str]:
        """AP + PC1 held or queued pinned per worker, plus pledged sectors between tasks."""
        # Run after every scheduling cycle over every AP and PC1 task: counted in C (Counter of
        # a map, set difference), with Python only for the unpinned and those between tasks.
        tasks = self.sched.tasks_of(_AP_PC1)
        # The count is a function of the tasks (compared in C: the same sector objects),
        # `_pending` and, if one was asked, the index's holders: reused while they hold.
        if (
            self._flight is not None
            and self._flight_version == self._pending_version
            and not self._asked_holders
            and tasks == self._flight_tasks
        ):
            return self._flight
        self._asked_holders = False
        self._flight_tasks, self._flight_version = tasks, self._pending_version
        self._flight = flight = self._count(tasks)
        return flight

    def _count(self, tasks: list[tuple[SectorRef, TaskType, str | None, bool]]) -> Counter[str]:
        """`_in_flight` of these AP and PC1 tasks (see there)."""
        flight = Counter(map(_WORKER, tasks))
        pending = self._pending
        if flight.pop(None, 0):
            # (`not` picks the rows without a worker, and "" ones, skipped here, in C.)
            for sector, _, worker, _ in compress(tasks, map(operator.not_, map(_WORKER, tasks))):
                if worker is not None:
                    continue
                # A queued PC1 is not pinned: it follows its unsealed file (the AP worker's),
                # so it counts for the worker this rule pledged it for, or the one holding
                # that file. Not counting it pledged without bound behind a full PC1 box.
                worker = pending.get(sector.number)
                if not worker:
                    self._asked_holders = True
                    worker = self._holder(sector)
                if worker is not None:
                    flight[worker] += 1
        # In the scheduler as AP or PC1: counted above, no record to read.
        # Between tasks (before AP, or AP done and PC1 to come). Those past PC1, failed or
        # removed are no longer this rule's: the state changes drop them (`_changed`).
        between = pending.keys() - set(map(_NUMBER, map(_SECTOR, tasks)))
        flight.update(pending[n] for n in between)
        return flight

    def _holder(self, sector: SectorRef) -> str | None:
        """The worker holding `sector`'s unsealed file (where its queued PC1 will run)."""
        holders = self.sched.index.holders(sector, FileType.UNSEALED)
        return min(holders) if holders else None


def load_state(store: LmdbStore) -> dict[str, dict[str, Any]]:
    """The auto-pledge state the engine last published (empty before any)."""
    with store.read() as txn:
        raw = txn.get(META_AUTOPLEDGE, db=store.db("meta"))
    data = unpackb(raw) if raw is not None else {}
    return data if isinstance(data, dict) else {}
