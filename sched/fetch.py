"""Fetching a sector's files to the worker a task was placed on (Lotus's GET / `schedFetch`).

`fetch_prepare(...)` gives a `prepare` action: when the placement says files must move, it
copies them from a holder to the path reserved on the task's worker, then records the move
in the storage index. The transfer itself is pluggable; `simulated_transfer` models it on the
scheduler's clock as bytes / the slower of the two links, so placement cost and simulated
time agree.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .filetypes import FileType

if TYPE_CHECKING:
    from .scheduler import Job, Scheduler

#: `(job, source worker or None for shared storage, bytes)`; must leave the files in place.
Transfer = Callable[["Job", str | None, int], Awaitable[None]]

#: Lotus's `lotus-worker run --parallel-fetch-limit` default.
PARALLEL_FETCH_LIMIT = 5

#: Per scheduler, per worker: the fetches allowed at once. Kept here, not on the scheduler,
#: because every `fetch_prepare` of one scheduler shares them and nothing else uses them.
_SLOTS: weakref.WeakKeyDictionary[Scheduler, dict[str, asyncio.Semaphore]] = (
    weakref.WeakKeyDictionary()
)


def simulated_transfer(sched: Scheduler) -> Transfer:
    """A transfer that only takes time: bytes / the slower link, on the scheduler's clock."""

    async def transfer(job: Job, source: str | None, nbytes: int) -> None:
        bandwidth = job.worker.spec.bandwidth
        src = sched.worker(source) if source is not None else None
        if src is not None:
            bandwidth = min(bandwidth, src.spec.bandwidth)
        await sched.clock.sleep(nbytes / bandwidth)

    return transfer


def fetch_prepare(
    sched: Scheduler, files: FileType, transfer: Transfer | None = None
) -> Callable[[Job], Awaitable[None]]:
    """A `prepare` action that brings `files` of the job's sector to the job's worker."""
    move = transfer or simulated_transfer(sched)

    async def prepare(job: Job) -> None:
        if not job.placement.fetch_bytes or job.placement.path is None:
            return  # already local
        index, path = sched.index, job.placement.path
        source = min(index.holders(job.sector, files), default=None)  # the first by name
        async with _fetch_slots(sched, job.worker.name):
            await move(job, source, job.placement.fetch_bytes)
        index.move_sector(job.sector, files, path)
        # The moved files now count as stored there: the reservation made for them ends.
        index.consume(job.sched_id, path, index.bytes_at(job.sector, files, path))
        sched.files_changed(job.sector)

    return prepare


def _fetch_slots(sched: Scheduler, worker: str) -> asyncio.Semaphore:
    per_worker = _SLOTS.get(sched)
    if per_worker is None:
        per_worker = _SLOTS[sched] = {}
    slots = per_worker.get(worker)
    if slots is None:
        slots = per_worker[worker] = asyncio.Semaphore(PARALLEL_FETCH_LIMIT)
    return slots
