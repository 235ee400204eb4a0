"""Jobs of superseded attempts: killed and discarded when their worker (re)joins.

A worker that froze or was cut off is dropped by Dask after `worker-ttl`; the engine fails the
attempt that ran there and retries the sector under the next attempt, a new job id
(`{task}-s{sector}-a{attempt}`, see `sealer.py`). The worker's job table keeps the old job
running across the scheduler loss (`jobs.hold_jobs`), and once the worker is back nobody will
ask for that id again: its child holds the machine's CPUs and its result waits for an ack that
never comes. So when the worker joins, the engine kills and forgets every job of its that is
stale:

* its id names an attempt below the current attempt of its sector and task, as the engine's
  store counts them (a restarted engine reads the same counters: the attempt it is about to
  re-attach to is the current one, never a lower one, so it is left alone), and
* no call of the engine waits on that id.

Any other id (another engine's naming, a job of the current attempt, a higher attempt) is
kept: only what is provably superseded goes.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from . import jobs
from .jobrecord import JobSpecError, JobState, check_job_id
from .table import KILL_GRACE

if TYPE_CHECKING:
    from distributed import Client, Worker

#: `(sector number, task short name)` -> the attempt the engine's next job of it gets.
Attempts = Callable[[int, str], int]

_ATTEMPT_ID = re.compile(r"(?P<task>[A-Za-z0-9]+)-s(?P<sector>\d{1,19})-a(?P<attempt>\d{1,19})")


def parse_attempt(job_id: str) -> tuple[str, int, int] | None:
    """`(task, sector, attempt)` of a job id the dask sealer made; None for any other id."""
    m = _ATTEMPT_ID.fullmatch(job_id)
    if m is None:
        return None
    return m["task"], int(m["sector"]), int(m["attempt"])


def superseded(
    job_ids: Iterable[str], current: Attempts, waited_on: Callable[[str], bool]
) -> list[str]:
    """The ids of `job_ids` below their current attempt that no call waits on, sorted."""
    stale = []
    for job_id in job_ids:
        parsed = parse_attempt(job_id)
        if parsed is None or waited_on(job_id):
            continue
        task, sector, attempt = parsed
        if attempt < current(sector, task):
            stale.append(job_id)
    return sorted(stale)


async def discard_jobs(job_ids: list[str], grace: float, dask_worker: Worker) -> dict[str, str]:
    """For `client.run`: kill each job (if it runs) and forget it; each one's state at the end.

    A job that outlives SIGKILL's grace keeps its record and is reported `running`.
    """
    table = jobs.table_of(dask_worker)

    async def one(job_id: str) -> tuple[str, str]:
        state = await table.kill(job_id, grace)
        try:
            table.ack(job_id)
        except JobSpecError:  # still running after SIGKILL and its grace: keep the record
            return job_id, str(JobState.RUNNING)
        return job_id, str(state)

    return dict(await asyncio.gather(*(one(j) for j in job_ids)))


async def discard(
    client: Client, address: str, job_ids: list[str], grace: float = KILL_GRACE
) -> dict[str, str]:
    """Kill and forget the jobs `job_ids` on the worker at `address` (async client)."""
    for job_id in job_ids:
        check_job_id(job_id)
    answer = await client.run(discard_jobs, list(job_ids), grace, workers=[address])
    return {str(k): str(v) for k, v in answer[address].items()}
