"""One ledger per worker: everything assigned, prepared or running there, and admission.

Lotus sizes each of a worker's two scheduling windows, its "preparing" set and its "active"
set to the whole idle worker and stacks them, so a worker can be promised up to 4x what it
has. Here a task holds its resources in the worker's single ledger from the moment it is
assigned until it finishes, and admission is checked against that total: memory, CPU threads,
GPU share and per-type concurrency can never be exceeded.

A task placed on a worker whose compute is busy is a *claim* until it can run: it holds its
memory but not its compute (threads, GPU share, a MAX_CONCURRENT slot) and fetches its files
meanwhile, so the GPU keeps working while the next task's files arrive. `claim_refusal`
admits claims up to one worker's worth of compute (one waiting task per slot, not Lotus's
stacked windows); `acquire` turns a claim into running compute once `compute_refusal` says
it fits. A task placed where everything fits holds it all from the start, as before.
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
    #: Holds its threads, GPU share and concurrency slot (False: a claim, still fetching).
    computing: bool = True


@dataclass(slots=True)
class Ledger:
    """Resources committed on one worker, with the admission check."""

    resources: WorkerResources
    entries: dict[int, _Entry] = field(default_factory=dict)
    #: Threads and GPU share held by computing entries.
    cpu_used: int = 0
    gpu_used: float = 0.0
    #: Threads, GPU share and tasks per type of the claims (entries not computing yet).
    claimed_cpu: int = 0
    claimed_gpu: float = 0.0
    claimed: Counter[TaskType] = field(default_factory=Counter)
    #: The claims' threads and GPU share per task type (`start_refusal` without a walk).
    claimed_threads: Counter[TaskType] = field(default_factory=Counter)
    claimed_gpus: dict[TaskType, float] = field(default_factory=dict)
    mem_min_used: int = 0
    mem_max_used: int = 0
    counts: Counter[TaskType] = field(default_factory=Counter)
    #: Base memory charged for each task type present (charged once per type).
    bases: dict[TaskType, int] = field(default_factory=dict)
    #: Bumped on every change, so cached verdicts about this worker can be recognised as stale.
    version: int = 0

    def refusal(self, task_type: TaskType, need: Resources) -> str | None:
        """Why this task cannot be admitted now, in an operator's words; None if it fits.

        Everything on the ledger counts here, claims included: the task could run at once.
        """
        return self._refusal(
            task_type,
            need,
            self.counts.get(task_type, 0),
            self.cpu_used + self.claimed_cpu,
            self.gpu_used + self.claimed_gpu,
        )

    def claim_refusal(self, task_type: TaskType, need: Resources) -> str | None:
        """Why this task cannot be placed here to fetch and wait for compute; None if it can."""
        # `.get`: a Counter's missing key goes through its Python `__missing__` (hot path).
        why = self._refusal(
            task_type, need, self.claimed.get(task_type, 0), self.claimed_cpu, self.claimed_gpu
        )
        if why is None or "RAM" in why:
            return why
        return f"{why} (counting the tasks that fetch or wait to run: one per slot)"

    def compute_refusal(self, task_type: TaskType, need: Resources) -> str | None:
        """Why a claim of this task cannot start computing now; None if it can."""
        running = self.counts.get(task_type, 0) - self.claimed.get(task_type, 0)
        return self._refusal(task_type, need, running, self.cpu_used, self.gpu_used, mem=False)

    def start_refusal(self, task_type: TaskType, need: Resources) -> str | None:
        """Why this task could not start computing now; None if it could.

        Claims of its own type count as if computing: a fetching PC2 lends the GPU to C2,
        not to a second PC2 that would only make it wait (and hold more memory meanwhile).
        """
        # Kept per type by `_claim`: a walk of the entries here was O(tasks held) per start,
        # quadratic on a worker holding thousands (bench_scale's one simulated worker).
        cpu = self.cpu_used + self.claimed_threads.get(task_type, 0)
        gpu = self.gpu_used + self.claimed_gpus.get(task_type, 0.0)
        count = self.counts.get(task_type, 0)
        return self._refusal(task_type, need, count, cpu, gpu, mem=False)

    def _refusal(
        self,
        task_type: TaskType,
        need: Resources,
        count: int,
        cpu_used: int,
        gpu_used: float,
        *,
        mem: bool = True,
    ) -> str | None:
        res = self.resources
        if need.max_concurrent > 0 and count >= need.max_concurrent:
            return f"{task_type.short} MAX_CONCURRENT {need.max_concurrent} reached"
        if res.ignore_resources:
            return None
        if mem:
            base = self._base(task_type, need)
            mem_need = need.min_memory + base
            mem_free = res.mem_physical - self.mem_min_used
            if mem_need > mem_free:
                return (
                    f"needs {describe_bytes(mem_need)} RAM, {describe_bytes(max(0, mem_free))} free"
                )
            vmem_need = need.max_memory + base
            vmem_used = max(self.mem_max_used, res.mem_used + res.mem_swap_used)
            vmem_free = res.mem_physical + res.mem_swap - vmem_used
            if vmem_need > vmem_free:
                return (
                    f"needs {describe_bytes(vmem_need)} RAM+swap, "
                    f"{describe_bytes(max(0, vmem_free))} free"
                )
        threads = need.threads(res.cpus, len(res.gpus))
        if cpu_used + threads > res.cpus:
            return f"needs {threads} CPU threads, {max(0, res.cpus - cpu_used)} free"
        if res.gpus and need.gpu_utilization > 0:
            free = len(res.gpus) - gpu_used
            if need.gpu_utilization > free + 1e-9:
                return f"needs {need.gpu_utilization:g} GPU, {max(0.0, free):g} free"
        return None

    def add(
        self, sched_id: int, task_type: TaskType, need: Resources, *, computing: bool = True
    ) -> None:
        """Commit a task's resources (it must have passed `refusal`, or `claim_refusal`
        with `computing=False`: then it holds memory only until `acquire`)."""
        if sched_id in self.entries:
            raise ValueError(f"task {sched_id} is already on this worker's ledger")
        threads = need.threads(self.resources.cpus, len(self.resources.gpus))
        base = self._base(task_type, need)
        if base:
            self.bases[task_type] = base
        entry = _Entry(task_type, need, threads, Phase.ASSIGNED, computing=False)
        self.entries[sched_id] = entry
        self.version += 1
        self.counts[task_type] += 1
        self.mem_min_used += need.min_memory + base
        self.mem_max_used += need.max_memory + base
        if computing:
            # Straight to computing: the same totals as a claim and its `acquire`, with no
            # claim counted and taken back (two Counter updates per task).
            entry.computing = True
            self.version += 1
            self.cpu_used += threads
            if self.resources.gpus:
                self.gpu_used += need.gpu_utilization
        else:
            self._claim(entry, 1)

    def acquire(self, sched_id: int) -> None:
        """A claim starts computing: its threads, GPU share and slot move to the used totals."""
        entry = self.entries[sched_id]
        if entry.computing:
            return
        self._claim(entry, -1)
        entry.computing = True
        self.version += 1
        self.cpu_used += entry.threads
        if self.resources.gpus:
            self.gpu_used += entry.need.gpu_utilization

    def _claim(self, entry: _Entry, sign: int) -> None:
        self.claimed[entry.task_type] += sign
        t = entry.task_type
        if not self.claimed[t]:
            del self.claimed[t]
        self.claimed_cpu += sign * entry.threads
        self.claimed_threads[t] += sign * entry.threads
        if not self.claimed_threads[t]:
            del self.claimed_threads[t]
        if self.resources.gpus:
            self.claimed_gpu = max(0.0, self.claimed_gpu + sign * entry.need.gpu_utilization)
            gpu = self.claimed_gpus.get(t, 0.0) + sign * entry.need.gpu_utilization
            if self.claimed[t]:
                self.claimed_gpus[t] = max(0.0, gpu)
            else:
                self.claimed_gpus.pop(t, None)  # no claim of the type left: exactly none

    def free(self, sched_id: int) -> None:
        """Release a finished (or cancelled) task's resources."""
        entry = self.entries.pop(sched_id)
        self.version += 1
        self.counts[entry.task_type] -= 1
        base = 0
        if self.counts[entry.task_type] == 0:
            del self.counts[entry.task_type]
            base = self.bases.pop(entry.task_type, 0)  # the last of its type
        if not entry.computing:
            self._claim(entry, -1)
        else:
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
        # (`.get`: a Counter's missing key goes through its Python `__missing__`; hot path.)
        return need.base_min_memory if not self.counts.get(task_type) else 0
