"""Acknowledgements of finished jobs, batched per worker instead of one round trip each.

A worker keeps a job's result until the engine acknowledges it (`jobs.ack`). Sent one by
one, each acknowledgement is a `client.run` round trip through the scheduler, about as much
CPU as the job's own Dask task when the job is short. So they are queued here: the worker's
next job carries them (`jobs.submit(..., acks=...)`, deleted by the worker while that job
runs), and what no job carried within `ACK_DELAY` seconds goes in one `client.run`. A result
is still kept until its acknowledgement arrives; only its deletion comes later. Acks lost
with the engine leave records on the worker's disk, which no later engine reads: their job
ids carry the engine's epoch or attempt.
"""

from __future__ import annotations

import asyncio
import logging

from distributed import Client

from . import jobs
from .jobrecord import check_job_id

log = logging.getLogger("sectorfsm.cluster")

#: Seconds an acknowledgement waits for a job to carry it before it is sent on its own.
ACK_DELAY = 0.2


class AckBatch:
    """The acknowledgements one worker has yet to receive."""

    def __init__(self, client: Client, address: str, delay: float = ACK_DELAY) -> None:
        self.client = client
        self.address = address
        self.delay = delay
        self._keys: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def add(self, key: str) -> None:
        """Queue job `key`'s acknowledgement (bad ids are refused here, one line)."""
        self._keys.append(check_job_id(key))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.delay, self._due)

    def take(self) -> list[str]:
        """The queued acknowledgements, for a job to carry; the queue is empty after."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        keys, self._keys = self._keys, []
        return keys

    def put_back(self, keys: list[str]) -> None:
        """Queue again what a job that never reached the worker carried (acks repeat safely)."""
        for key in keys:
            self.add(key)

    def drop(self) -> None:
        """Forget the queue: the worker left (its records stay on its disk)."""
        self.take()

    async def flush(self) -> None:
        """Send the queued acknowledgements now, in one round trip (best effort)."""
        keys = self.take()
        if not keys:
            return
        try:
            await jobs.ack_all(self.client, self.address, keys)
        except Exception as exc:  # the records stay on the worker's disk: only space is lost
            log.warning("worker %s: could not acknowledge jobs %s: %s", self.address, keys, exc)

    def _due(self) -> None:
        self._timer = None
        task = asyncio.ensure_future(self.flush())
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
