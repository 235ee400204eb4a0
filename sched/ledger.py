"""One ledger per worker: everything assigned, prepared or running there, and admission.

Lotus sizes each of a worker's two scheduling windows, its "preparing" set and its "active"
set to the whole idle worker and stacks them, so a worker can be promised up to 4x what it
has. Here a task holds its resources in the worker's single ledger from the moment it is
assigned until it finishes, and admission is checked against that total: memory, CPU threads,
GPU share and per-type concurrency can never be exceeded.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field

from .resources import Resources, describe_bytes
from .tasks import TaskType


class Phase(enum.StrEnum):
    """Where a task is on its worker (Lotus's `RunWait`: assigned, prepared, running)."""

    ASSIGNED = "assigned"
    PREPARING = "preparing"
    RUNNING = "running"


@dataclass(frozen=True, slots=True)
class WorkerResources:
    """What a worker has. Memory in bytes; `gpus` are device names."""

    cpus: int
    mem_physical: int
    mem_swap: int = 0
    gpus: tuple[str, ...] = ()
    #: Memory used by everything else on the host (refreshed by heartbeats).
    mem_used: int = 0
    mem_swap_used: int = 0
    #: Lotus's `ResourceFiltering = "disabled"`: admit on task-type caps only.
    ignore_resources: bool = False

    def __post_init__(self) -> None:
        if self.cpus < 0 or self.mem_physical < 0 or self.mem_swap < 0:
            raise ValueError("worker resources must not be negative")


@dataclass(slots=True)
class _Entry:
    task_type: TaskType
    need: Resources
    threads: int
    phase: Phase


@dataclass(slots=True)
class Ledger:
    """Resources committed on one worker, with the admission check."""

    resources: WorkerResources
    entries: dict[int, _Entry] = field(default_factory=dict)
    cpu_used: int = 0
    gpu_used: float = 0.0
    mem_min_used: int = 0
    mem_max_used: int = 0
    counts: Counter[TaskType] = field(default_factory=Counter)
    #: Base memory charged for each task type present (charged once per type).
    bases: dict[TaskType, int] = field(default_factory=dict)
    #: Bumped on every change, so cached verdicts about this worker can be recognised as stale.
    version: int = 0

    def refusal(self, task_type: TaskType, need: Resources) -> str | None:
        """Why this task cannot be admitted now, in an operator's words; None if it fits."""
        res = self.resources
        if need.max_concurrent > 0 and self.counts[task_type] >= need.max_concurrent:
            return f"{task_type.short} MAX_CONCURRENT {need.max_concurrent} reached"
        if res.ignore_resources:
            return None
        base = self._base(task_type, need)
        mem_need = need.min_memory + base
        mem_free = res.mem_physical - self.mem_min_used
        if mem_need > mem_free:
            return f"needs {describe_bytes(mem_need)} RAM, {describe_bytes(max(0, mem_free))} free"
        vmem_need = need.max_memory + base
        vmem_used = max(self.mem_max_used, res.mem_used + res.mem_swap_used)
        vmem_free = res.mem_physical + res.mem_swap - vmem_used
        if vmem_need > vmem_free:
            return (
                f"needs {describe_bytes(vmem_need)} RAM+swap, "
                f"{describe_bytes(max(0, vmem_free))} free"
            )
        threads = need.threads(res.cpus, len(res.gpus))
        if self.cpu_used + threads > res.cpus:
            return f"needs {threads} CPU threads, {max(0, res.cpus - self.cpu_used)} free"
        if res.gpus and need.gpu_utilization > 0:
            free = len(res.gpus) - self.gpu_used
            if need.gpu_utilization > free + 1e-9:
                return f"needs {need.gpu_utilization:g} GPU, {max(0.0, free):g} free"
        return None

    def add(self, sched_id: int, task_type: TaskType, need: Resources) -> None:
        """Commit a task's resources (it must have passed `refusal`)."""
        if sched_id in self.entries:
            raise ValueError(f"task {sched_id} is already on this worker's ledger")
        threads = need.threads(self.resources.cpus, len(self.resources.gpus))
        base = self._base(task_type, need)
        if base:
            self.bases[task_type] = base
        self.entries[sched_id] = _Entry(task_type, need, threads, Phase.ASSIGNED)
        self.version += 1
        self.counts[task_type] += 1
        self.cpu_used += threads
        if self.resources.gpus:
            self.gpu_used += need.gpu_utilization
        self.mem_min_used += need.min_memory + base
        self.mem_max_used += need.max_memory + base

    def free(self, sched_id: int) -> None:
        """Release a finished (or cancelled) task's resources."""
        entry = self.entries.pop(sched_id)
        self.version += 1
        self.counts[entry.task_type] -= 1
        base = 0
        if self.counts[entry.task_type] == 0:
            del self.counts[entry.task_type]
            base = self.bases.pop(entry.task_type, 0)  # the last of its type
        self.cpu_used -= entry.threads
        if self.resources.gpus:
            self.gpu_used = max(0.0, self.gpu_used - entry.need.gpu_utilization)
        self.mem_min_used -= entry.need.min_memory + base
        self.mem_max_used -= entry.need.max_memory + base

    def set_phase(self, sched_id: int, phase: Phase) -> None:
        """Record that a task moved on (assigned -> preparing -> running)."""
        self.entries[sched_id].phase = phase

    def phase_counts(self) -> dict[Phase, int]:
        """How many tasks are in each phase."""
        out = dict.fromkeys(Phase, 0)
        for e in self.entries.values():
            out[e.phase] += 1
        return out

    def utilization(self) -> float:
        """The most-used resource's share, 0..1 (memory, CPU or GPU)."""
        res = self.resources
        shares = [self.cpu_used / res.cpus if res.cpus else 0.0]
        if res.mem_physical:
            shares.append(max(self.mem_min_used, res.mem_used) / res.mem_physical)
        if res.gpus:
            shares.append(self.gpu_used / len(res.gpus))
        return max(shares)

    def _base(self, task_type: TaskType, need: Resources) -> int:
        # BaseMinMemory (proof parameters) is shared by all tasks of one type on a worker:
        # count it once per type present (Lotus's "dedupe" TODO), not once per task.
        return need.base_min_memory if self.counts[task_type] == 0 else 0
