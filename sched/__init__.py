"""An embedded window scheduler: Lotus's resource model, one ledger per worker, operator policy.

Quick tour::

    sched = Scheduler()                       # assigner="balanced"; "lotus" is the baseline
    sched.add_worker(local_worker(paths=(StoragePath("ssd", "host", 4 << 40),)))
    result = await sched.schedule(sector, TaskType.PRE_COMMIT1,
                                  AllocSelector(FileType.CACHE | FileType.SEALED),
                                  prepare=None, work=run_pc1)
    sched.diag()                              # why each queued task is not placed, per worker

This package never imports `sectorfsm.sealing`.
"""

from .fetch import fetch_prepare, simulated_transfer
from .filetypes import FileType, parse_sector_size, space_needed
from .ledger import Ledger, Phase, WorkerResources
from .policy import PolicyError, PolicyWatcher, WorkerPolicy, load_policy, parse_policy
from .resources import ResourceConfigError, Resources, parse_overrides, resource_spec
from .scheduler import Job, Scheduler, SchedulerError
from .selectors import (
    AllocSelector,
    ExistingSelector,
    MoveSelector,
    PinnedSelector,
    Placement,
    TaskSelector,
)
from .storage import SectorRef, StorageIndex, StoragePath
from .tasks import DEAL_SECTOR_PRIORITY, TaskType
from .views import JobSnapshot, TaskDiag, WorkerSnapshot, load_snapshot
from .workers import (
    InProcessBackend,
    WorkerBackend,
    WorkerSpec,
    detect_resources,
    local_worker,
)

__all__ = [
    "DEAL_SECTOR_PRIORITY",
    "AllocSelector",
    "ExistingSelector",
    "FileType",
    "InProcessBackend",
    "Job",
    "JobSnapshot",
    "Ledger",
    "MoveSelector",
    "Phase",
    "PinnedSelector",
    "Placement",
    "PolicyError",
    "PolicyWatcher",
    "ResourceConfigError",
    "Resources",
    "Scheduler",
    "SchedulerError",
    "SectorRef",
    "StorageIndex",
    "StoragePath",
    "TaskDiag",
    "TaskSelector",
    "TaskType",
    "WorkerBackend",
    "WorkerPolicy",
    "WorkerResources",
    "WorkerSnapshot",
    "WorkerSpec",
    "detect_resources",
    "fetch_prepare",
    "load_policy",
    "load_snapshot",
    "local_worker",
    "parse_overrides",
    "parse_policy",
    "parse_sector_size",
    "resource_spec",
    "simulated_transfer",
    "space_needed",
]
