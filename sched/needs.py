"""What a task needs on a worker and how many such tasks fit it idle, kept between asks.

`Scheduler.fit` answers for a worker and a kind (task type, sector size) several times per
scheduling cycle, and the answer's static half (`resources.resource_spec` and
`assigners.slots_for`) reads only the worker's spec and its policy's stage cap: it is kept
per worker and kind until one of those changes (a heartbeat replaces the resources).
"""

from __future__ import annotations

from dataclasses import dataclass

from .assigners import slots_for
from .ledger import WorkerResources
from .resources import ResourceOverrides, Resources, resource_spec
from .tasks import TaskType
from .workers import Worker, WorkerSpec


@dataclass(slots=True)
class Needs:
    """A task's needs on a worker and the worker's slots for it, with what they were read from."""

    spec: WorkerSpec
    resources: WorkerResources
    overrides: ResourceOverrides | None
    cap: int | None
    need: Resources
    slots: int


class NeedsMemo:
    """`resource_spec` and `slots_for` per (worker, task type, size), while their inputs hold."""

    def __init__(self) -> None:
        self._kept: dict[tuple[str, TaskType, int], Needs] = {}

    def get(self, w: Worker, task_type: TaskType, size: int, cap: int | None) -> Needs:
        """The task's needs on `w` and `w`'s slots for it under `cap` (`kept.need`, `.slots`)."""
        spec = w.spec
        key = (w.name, task_type, size)
        kept = self._kept.get(key)
        if (
            kept is None
            or kept.spec is not spec
            or kept.resources is not spec.resources
            or kept.overrides is not spec.overrides
            or kept.cap != cap
        ):
            need = resource_spec(task_type, size, spec.overrides)
            kept = Needs(spec, spec.resources, spec.overrides, cap, need, 0)
            kept.slots = slots_for(w, need, cap)
            self._kept[key] = kept
        return kept
