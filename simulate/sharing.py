"""A worker's GPUs, cores and memory shared by the stages only it runs: a bound of their own.

Per stage, the slot bound assumes each stage has the box to itself. A box that alone runs PC2
and C2 on one GPU seals at most one sector per (PC2 + C2) of GPU time, however many slots
each stage would admit alone. For each worker and each of its resources, the stages that only
this worker runs (so every sector passes through it) each hold `need` of the resource for the
task's seconds, fetch included: the worker finishes at most `total / sum(need x seconds)`
sectors a second. Stages that other workers also run are left out (their load could move),
so this stays an upper bound.

Under the `lotus` baseline a task fetches in the preparing pool and works in the active one,
each holding the full `need` of a resource as large as the worker's: the GPU is busy with C2
while the next PC2's files arrive. There the bound is `total / max(sum(need x work),
sum(need x fetch))`, the busier of the two pools. `balanced` fetches the same way, as a claim
beside the running task, but its claim keeps its memory: memory is held for fetch and work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..sched import TaskType, WorkerSpec, resource_spec

if TYPE_CHECKING:
    from .bound import StageBound

__all__ = ["ResourceBound", "resource_bounds"]


@dataclass(frozen=True, slots=True)
class ResourceBound:
    """One worker resource shared by two or more stages only that worker runs."""

    worker: str
    #: "GPU", "CPU threads" or "memory".
    resource: str
    per_day: float
    stages: tuple[TaskType, ...]
    #: What each of `stages` holds of it per task, and how much the worker has.
    needs: tuple[float, ...]
    total: float

    @property
    def unit(self) -> tuple[float, str]:
        """What "one more" of this resource means in the bottleneck sentence."""
        return {
            "GPU": (1.0, "GPU"),
            "CPU threads": (16.0, "16 cores"),
            "memory": (float(256 << 30), "256 GiB of memory"),
        }[self.resource]


def resource_bounds(
    specs: list[WorkerSpec],
    sector_size: int,
    stages: Mapping[TaskType, StageBound],
    *,
    prepares_apart: bool = False,
    fetch_holds_memory: bool = False,
) -> list[ResourceBound]:
    """The bound of each resource that two or more sole-provider stages share on a worker."""
    out = []
    for spec in specs:
        res = spec.resources
        totals = {"GPU": float(len(res.gpus)), "CPU threads": float(res.cpus)}
        totals["memory"] = float(res.mem_physical)
        loads = dict.fromkeys(totals, 0.0)
        fetching = dict.fromkeys(totals, 0.0)
        users: dict[str, list[tuple[TaskType, float]]] = {k: [] for k in totals}
        for task, stage in stages.items():
            if [w.worker for w in stage.workers] != [spec.name]:
                continue
            share = stage.workers[0]
            work = share.seconds if prepares_apart else share.seconds + share.fetch_seconds
            need = resource_spec(task, sector_size, spec.overrides)
            uses = {
                "GPU": need.gpu_utilization if res.gpus else 0.0,
                "CPU threads": float(need.threads(res.cpus, len(res.gpus))),
                "memory": float(need.min_memory),
            }
            for name, amount in uses.items():
                if amount > 0:
                    held = work
                    if name == "memory" and fetch_holds_memory and prepares_apart:
                        held += share.fetch_seconds
                    loads[name] += amount * held
                    fetching[name] += amount * share.fetch_seconds
                    users[name].append((task, amount))
        for name, load in loads.items():
            if prepares_apart:
                load = max(load, fetching[name])
            if len(users[name]) >= 2 and load > 0 and totals[name] > 0:
                per_day = totals[name] / load * 86400
                tasks = tuple(t for t, _ in users[name])
                needs = tuple(a for _, a in users[name])
                out.append(ResourceBound(spec.name, name, per_day, tasks, needs, totals[name]))
    return out
