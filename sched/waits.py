"""Why a task is held back from a worker that has room for it: better to wait elsewhere.

A worker whose compute is busy may still take a task as a claim, to fetch its files while it
waits (`ledger.py`). That pays only for a fetch that has to happen anyway: a task with nothing
to fetch would just sit on memory, and a sector whose files are on a worker that runs the task
itself should wait for that worker rather than cross a link to wait somewhere else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .filetypes import FileType
from .tasks import TaskType

if TYPE_CHECKING:
    from .queue import Request
    from .scheduler import Scheduler
    from .selectors import Placement
    from .workers import Worker


def prefetch_refusal(
    sched: Scheduler, req: Request, w: Worker, busy: str | None, placement: Placement
) -> str | None:
    """Why `w`, whose compute is `busy`, should not take `req` to fetch and wait; None if fine.

    `busy` is the ledger's `start_refusal` for the task (None: it could start now).
    """
    if busy is None:
        return None  # it can start now
    if not placement.fetch_bytes:
        return busy  # nothing to fetch: waiting here would only hold memory
    if (name := other_holder(sched, req, w)) is not None:
        return f"{busy}; {name} holds the sector's files and does {req.task_type.short}"
    return None


def other_holder(sched: Scheduler, req: Request, w: Worker) -> str | None:
    """Another enabled worker that holds `req`'s files and does its type (first by name).

    While `w`'s compute is busy, such a worker makes `prefetch_refusal` refuse `req` there
    whatever the placement: a caller that needs no words may skip `w` on this alone.
    """
    for h in holders_doing(sched, req):
        if h is not w:
            return h.name
    return None


def holders_doing(sched: Scheduler, req: Request) -> list[Worker]:
    """The enabled workers that hold `req`'s files and do its type, by name.

    The same for every request of a shape (its files are where the shape says): a cycle asks
    once per shape, and `other_holder` of any worker is the first of them that is not it.
    """
    files = getattr(req.selector, "files", None)
    if not isinstance(files, FileType):
        return []
    out = []
    for name in sorted(sched.index.holders(req.sector, files)):
        h = sched.find_worker(name)
        if h is not None and h.enabled and h.supports(req.task_type):
            out.append(h)
    return out


def local_wait_refusal(wait: tuple[float, str] | None, fetch_s: float) -> str | None:
    """The refusal when waiting for the holder (`wait`: seconds, name) beats fetching here."""
    if wait is None or wait[0] >= fetch_s:
        return None
    return (
        f"waiting for {wait[1]}, which holds the sector's files and should free "
        f"up in ~{minutes(wait[0])} (fetching here would take {minutes(fetch_s)})"
    )


def minutes(seconds: float) -> str:
    """`12 min` from a minute up, `40 s` below."""
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


class Durations:
    """Learned run time of each task type's work, in clock seconds."""

    def __init__(self) -> None:
        self._mean: dict[TaskType, float] = {}

    def observe(self, task_type: TaskType, seconds: float) -> None:
        """Learn how long a task type's work takes (exponential moving average)."""
        old = self._mean.get(task_type)
        self._mean[task_type] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def get(self, task_type: TaskType) -> float | None:
        """The learned run time of `task_type` (None until one finished)."""
        return self._mean.get(task_type)


def local_wait(sched: Scheduler, req: Request) -> tuple[float, str] | None:
    """How soon a worker holding the files could take the task itself, if one will.

    Only holders already running this task type count (their estimated remaining time is
    known); the wait ends with one of their jobs, which re-runs the cycle on that worker.
    """
    duration = sched.durations.get(req.task_type)
    if duration is None:
        return None
    now = sched.clock.now()
    best: tuple[float, str] | None = None
    for h in holders_doing(sched, req):
        for sid in h.jobs:
            job = sched.job(sid)
            if job is None or job.task_type != req.task_type or job.work_started is None:
                continue
            left = max(0.0, duration - (now - job.work_started))
            if best is None or left < best[0]:
                best = (left, h.name)
    return best
