"""myScheduler's rules: whether a worker's policy lets it take a task, and disk-unit counting.

`policy_refusal` mirrors myScheduler's `canHandleRequestMine` (in its fork of Lotus's
`extern/sector-storage/sched_resources.go`, Lotus ~v1.10); the policy itself (the knobs,
parsing, hot reload) lives in `policy.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from .filetypes import FileType, space_needed
from .policy import WorkerPolicy
from .storage import SectorRef, StorageIndex
from .tasks import TaskType
from .workers import Worker

#: Disk units of one sector's cache directory once SDR has started (about 14 x 32 GiB).
CACHE_UNITS = 14


class WorkerView(Protocol):
    """What the rules need to know about one worker right now (supplied by the scheduler)."""

    def stage_count(self, stage: str) -> int:
        """Running + prepared + assigned tasks of stage "AP"/"PC1"/"PC2"/"C2" on this worker."""
        ...

    @property
    def disk_used(self) -> int:
        """Units held on the worker's local paths (`disk_units`)."""
        ...

    @property
    def ap_disk_used(self) -> int:
        """Unsealed-file units held on the worker's local paths (`disk_units`)."""
        ...

    @property
    def out_of_space(self) -> bool:
        """The worker's storage reported that it cannot allocate a new sector."""
        ...

    def holds(self, sector: object, files: FileType) -> bool:
        """These files of that sector are on this worker's local paths."""
        ...


_CAPS: dict[TaskType, tuple[str, str]] = {
    TaskType.ADD_PIECE: ("add_piece_max", "AddPieceMax"),
    TaskType.PRE_COMMIT1: ("pre_commit1_max", "PreCommit1Max"),
    TaskType.PRE_COMMIT2: ("pre_commit2_max", "PreCommit2Max"),
    TaskType.COMMIT2: ("commit2_max", "Commit2Max"),
}


def stage_cap(policy: WorkerPolicy, task: TaskType) -> int | None:
    """The policy's cap for this task's stage (None: no cap, or a stage without caps)."""
    knob = _CAPS.get(task)
    return None if knob is None else getattr(policy, knob[0])


_DRAINED = frozenset(
    {
        TaskType.ADD_PIECE,
        TaskType.PRE_COMMIT1,
        TaskType.PRE_COMMIT2,
        TaskType.COMMIT1,
        TaskType.COMMIT2,
    }
)


def _cap_refusal(policy: WorkerPolicy, task: TaskType, view: WorkerView) -> str | None:
    attr, knob = _CAPS[task]
    cap: int | None = getattr(policy, attr)
    if cap is not None and view.stage_count(task.short) >= cap:
        return f"{task.short} cap {cap} reached ({knob})"
    return None


def _constrained(policy: WorkerPolicy, view: WorkerView) -> str | None:
    """Why the worker is in myScheduler's disk-constrained mode, or None if it is not."""
    if policy.disk_hold_max > 0 and view.disk_used > policy.disk_hold_max:
        return (
            f"disk-constrained: {view.disk_used} units held > {policy.disk_hold_max} (DiskHoldMax)"
        )
    if view.out_of_space:
        if policy.ignore_out_of_space:
            return "out of space, disk-constrained (IgnoreOutOfSpace)"
        return "out of space (IgnoreOutOfSpace is off)"
    return None


# myScheduler's `canHandleRequestMine`, in its order of checks, but following its manual where
# the code differs from it: the drain also refuses C1; the disk-constrained mode also keeps
# C1/C2 to sectors whose cache is local; a PC1 whose cache is already local (a restarted PC1)
# is not charged 14 more units, else a constrained worker could never finish it; and
# `out_of_space` without IgnoreOutOfSpace refuses AP/PC1 outright and constrains the rest, so
# that turning IgnoreOutOfSpace on only ever loosens the rules.
def policy_refusal(
    policy: WorkerPolicy, task: TaskType, sector: object, view: WorkerView
) -> str | None:
    """Why `policy` refuses a new `task` for `sector` on the worker in `view`; None = allowed."""
    if task not in _DRAINED:
        return None
    if policy.is_plan_offline:
        return "draining (IsPlanOffline)"
    if task in _CAPS:
        attr, knob = _CAPS[task]
        if getattr(policy, attr) == 0:
            return f"{task.short} disabled on this worker ({knob} = 0)"
    if (
        task in (TaskType.ADD_PIECE, TaskType.PRE_COMMIT1)
        and view.out_of_space
        and not policy.ignore_out_of_space
    ):
        return "out of space (IgnoreOutOfSpace is off)"
    constrained = _constrained(policy, view)
    # `holds` may be an index lookup, so it is asked at most once and only when a rule needs it.
    cache_local: bool | None = None

    def has_cache() -> bool:
        nonlocal cache_local
        if cache_local is None:
            cache_local = view.holds(sector, FileType.CACHE)
        return cache_local

    if task is TaskType.ADD_PIECE:
        if constrained:
            return constrained
        if (refusal := _cap_refusal(policy, task, view)) is not None:
            return refusal
        hold = policy.disk_hold_max
        if hold > 0 and view.disk_used + 1 > hold:
            return f"disk hold {view.disk_used}+1 > {hold} units (DiskHoldMax)"
        ap_hold = policy.ap_disk_hold_max
        if ap_hold > 0 and view.ap_disk_used + 1 > ap_hold:
            return f"AP disk hold {view.ap_disk_used}+1 > {ap_hold} units (APDiskHoldMax)"
        return None

    if task is TaskType.PRE_COMMIT1:
        if constrained and not has_cache():
            return f"{constrained}, and the sector cache is not on this worker"
        hold = policy.disk_hold_max
        # A PC1 whose cache is already here (a restart) holds its 14 units already.
        if hold > 0 and view.disk_used + CACHE_UNITS > hold and not has_cache():
            return f"disk hold {view.disk_used}+{CACHE_UNITS} > {hold} units (DiskHoldMax)"
        if (refusal := _cap_refusal(policy, task, view)) is not None:
            return refusal
        if policy.force_p1_from_local_ap and not view.holds(sector, FileType.UNSEALED):
            return "sector unsealed file is not on this worker (ForceP1FromLocalAP)"
        return None

    # PC2, C1 and C2 only read the cache, so the disk-constrained mode takes them only if the
    # cache is already here (no fetch that would fill the disk further).
    if constrained and not has_cache():
        return f"{constrained}, and the sector cache is not on this worker"
    if task is TaskType.PRE_COMMIT2:
        if (refusal := _cap_refusal(policy, task, view)) is not None:
            return refusal
        if policy.force_p2_from_local_p1 and not has_cache():
            return "sector cache is not on this worker (ForceP2FromLocalP1)"
        if not policy.allow_p2c2_parallel and view.stage_count("C2") >= 1:
            return "a C2 is running and AllowP2C2Parallel is off"
        return None

    if task is TaskType.COMMIT2 and (refusal := _cap_refusal(policy, task, view)) is not None:
        return refusal
    if policy.force_c2_from_local_p2 and not has_cache():
        return "sector cache is not on this worker (ForceC2FromLocalP2)"
    if task is TaskType.COMMIT2 and not policy.allow_p2c2_parallel and view.stage_count("PC2") >= 1:
        return "a PC2 is running and AllowP2C2Parallel is off"
    return None


def policy_blocks(policy: WorkerPolicy, task: TaskType, view: WorkerView) -> bool:
    """True if `policy_refusal` refuses `task` on this worker whatever the sector.

    A yes/no without words for callers that only skip (the balanced cycle's offers): every
    test here is one `policy_refusal` makes, in some order, before it could allow the task,
    and none of them asks where the sector's files are.
    """
    if task not in _DRAINED:
        return False
    if policy.is_plan_offline:
        return True
    knob = _CAPS.get(task)
    if knob is not None:
        cap: int | None = getattr(policy, knob[0])
        if cap is not None and view.stage_count(task.short) >= cap:
            return True  # cap 0 included: the stage is disabled here
    if (
        (task is TaskType.ADD_PIECE or task is TaskType.PRE_COMMIT1)
        and view.out_of_space
        and not policy.ignore_out_of_space
    ):
        return True
    if task is TaskType.ADD_PIECE:
        hold, ap_hold = policy.disk_hold_max, policy.ap_disk_hold_max
        return (
            view.out_of_space
            or (hold > 0 and view.disk_used + 1 > hold)
            or (ap_hold > 0 and view.ap_disk_used + 1 > ap_hold)
        )
    if not policy.allow_p2c2_parallel:
        if task is TaskType.PRE_COMMIT2:
            return view.stage_count("C2") >= 1
        if task is TaskType.COMMIT2:
            return view.stage_count("PC2") >= 1
    return False


def local_files_required(policy: WorkerPolicy, task: TaskType) -> FileType:
    """The sector files a `Force*FromLocal*` rule of `policy` wants here for `task` (or NONE)."""
    if task is TaskType.PRE_COMMIT1:
        return FileType.UNSEALED if policy.force_p1_from_local_ap else FileType.NONE
    if task is TaskType.PRE_COMMIT2:
        return FileType.CACHE if policy.force_p2_from_local_p1 else FileType.NONE
    if task is TaskType.COMMIT1 or task is TaskType.COMMIT2:
        return FileType.CACHE if policy.force_c2_from_local_p2 else FileType.NONE
    return FileType.NONE


def files_block(policy: WorkerPolicy, task: TaskType, sector: object, view: WorkerView) -> bool:
    """True if a `Force*FromLocal*` rule of `policy` refuses `task` for `sector` here.

    The yes/no of `policy_refusal`'s file-locality rules, for callers that only skip: each
    refuses wherever `policy_refusal` reaches it, and every earlier test refuses too.
    """
    files = local_files_required(policy, task)
    return bool(files) and not view.holds(sector, files)


def delay_refusal(
    policy: WorkerPolicy, task: TaskType, released_at: float | None, now: float
) -> str | None:
    """Why `AllowDelay` holds new `task`s off this worker at `now`; None = allowed.

    `released_at` is when a task the worker held was last released (None: never); the
    worker takes no new governed task until `policy.allow_delay` seconds after it.
    """
    if released_at is None or not delay_blocks(policy, task, released_at, now):
        return None
    return (
        f"a task was released here {now - released_at:.1f}s ago; new work waits "
        f"{policy.allow_delay:g}s (AllowDelay)"
    )


def delay_blocks(
    policy: WorkerPolicy, task: TaskType, released_at: float | None, now: float
) -> bool:
    """True if `delay_refusal` refuses (the yes/no, without formatting its words)."""
    return (
        task in _DRAINED
        and released_at is not None
        and policy.allow_delay > 0
        and now - released_at < policy.allow_delay
    )


# myScheduler's `localDiskUsed`. Each entry is one sector's file or directory on a path that
# is not long-term storage (myScheduler skips CanStore paths), with whether it holds the SDR
# layer file `sc-02-data-layer-1.dat`; only a cache cares. A cache without the layer counts 0
# because SDR has not started filling it yet. Other file types (update, piece) count 0, as in
# myScheduler, which only looks at the three sealing directories.
def disk_units(files: Iterable[tuple[FileType, bool]]) -> tuple[int, int]:
    """`(disk_used, ap_disk_used)`: a cache with its layer 14, unsealed 1 (+1 AP), sealed 1."""
    used = ap_used = 0
    for files_of_sector, has_layer in files:
        for ft in files_of_sector.each():
            if ft is FileType.CACHE:
                used += CACHE_UNITS if has_layer else 0
            elif ft is FileType.UNSEALED:
                used += 1
                ap_used += 1
            elif ft is FileType.SEALED:
                used += 1
    return used, ap_used


def units_of_counts(counts: Mapping[FileType, int]) -> tuple[int, int]:
    """`disk_units` of files counted by type (`StorageIndex.file_counts`), caches layered."""
    unsealed = counts.get(FileType.UNSEALED, 0)
    used = counts.get(FileType.CACHE, 0) * CACHE_UNITS + unsealed
    return used + counts.get(FileType.SEALED, 0), unsealed


#: The files a new PC1 writes: a worker without room for them is out of space.
_PC1_FILES = FileType.CACHE | FileType.SEALED
#: The capped task type of each stage name.
_STAGE_TYPE = {t.short: t for t in _CAPS}


class PolicyView:
    """`WorkerView` over the scheduler's state: a worker's ledger and the storage index."""

    __slots__ = ("_index", "_oos", "_sector_size", "_units", "_worker")

    def __init__(
        self, worker: Worker, index: StorageIndex, units: tuple[int, int], sector_size: int
    ) -> None:
        self._worker = worker
        self._index = index
        self._units = units
        self._sector_size = sector_size
        self._oos: bool | None = None

    def stage_count(self, stage: str) -> int:
        """Tasks of stage "AP"/"PC1"/"PC2"/"C2" the worker's ledger holds."""
        task = _STAGE_TYPE.get(stage)
        return 0 if task is None else self._worker.ledger.counts.get(task, 0)

    @property
    def disk_used(self) -> int:
        """Disk units held on the worker's local paths."""
        return self._units[0]

    @property
    def ap_disk_used(self) -> int:
        """Unsealed-file units held on the worker's local paths."""
        return self._units[1]

    @property
    def out_of_space(self) -> bool:
        """True if the worker has sealing paths but too little free space for a PC1's files."""
        # Asked up to twice per verdict, and a view lives for one verdict: work it out once.
        if self._oos is None:
            need = space_needed(_PC1_FILES, self._sector_size)
            self._oos = self._index.lacks_room(self._worker.name, need)
        return self._oos

    def holds(self, sector: object, files: FileType) -> bool:
        """Whether the worker's local paths hold all of `files` of `sector`."""
        assert isinstance(sector, SectorRef)
        return self._index.worker_holds(self._worker.name, sector, files)
