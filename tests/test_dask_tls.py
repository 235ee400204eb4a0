"""Mutual TLS on a real Dask cluster, with certificates made by `sectors cluster certs`.

An in-process Scheduler (as the engine embeds it) and in-process Workers on 127.0.0.1: a
worker holding a certificate from the cluster CA joins and runs a pinned task; one holding a
certificate from another CA is refused in the TLS handshake and never joins.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import dask
import pytest
from distributed import Client, Scheduler, Worker
from distributed.diagnostics.plugin import SchedulerPlugin
from typer.testing import CliRunner

from sectorfsm.cli.app import app
from sectorfsm.sealing.backends.dask.security import engine_security, worker_security

#: Seconds before a wait gives up: a hang guard, far above what a pass takes under load.
DEADLINE = 30.0


class Joins(SchedulerPlugin):
    """Every worker the scheduler ever added, in order (not just those still connected)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.joined = asyncio.Event()

    def add_worker(self, scheduler: Any, worker: str) -> None:
        """Record the worker's name."""
        self.names.append(scheduler.workers[worker].name)
        self.joined.set()


class Refusals(logging.Handler):
    """Sets an event when the scheduler's listener logs a handshake refused for an unknown CA."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.seen = asyncio.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the message; wake the test on an unknown-CA refusal."""
        message = record.getMessage()
        if "TLS handshake failed" in message and "UNKNOWN_CA" in message:
            self.messages.append(message)
            self.loop.call_soon_threadsafe(self.seen.set)


def make(directory: Path, *workers: str) -> Path:
    """`sectors cluster certs DIRECTORY --worker W...` through the CLI."""
    args = [a for w in workers for a in ("--worker", w)]
    result = CliRunner().invoke(app, ["cluster", "certs", str(directory), *args])
    assert result.exit_code == 0, result.output
    return directory


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Path, Path]:
    """The cluster's directory (engine, pc1-box) and another CA's (also naming pc1-box)."""
    return make(tmp_path / "cluster", "pc1-box"), make(tmp_path / "rogue", "pc1-box")


def test_a_worker_with_a_cluster_certificate_joins_and_runs_a_task(
    certs: tuple[Path, Path],
) -> None:
    cluster, _ = certs

    async def body() -> None:
        joins = Joins()
        engine = engine_security(cluster)
        async with Scheduler(
            host="127.0.0.1",
            port=0,
            protocol="tls",
            dashboard=False,
            dashboard_address="127.0.0.1:0",  # its HTTP server still starts: keep it local
            security=engine,
        ) as s:
            assert s.address.startswith("tls://127.0.0.1:")
            s.add_plugin(joins, name="joins")
            async with (
                Worker(
                    s.address,
                    name="pc1-box",
                    nthreads=1,
                    memory_limit=0,
                    dashboard=False,
                    security=worker_security(cluster, "pc1-box"),
                ) as w,
                Client(s.address, asynchronous=True, security=engine) as c,
            ):
                assert w.address.startswith("tls://")  # the worker's own port is TLS too
                fut = c.submit(lambda x: x + 1, 41, workers=[w.address], pure=False)
                assert await asyncio.wait_for(fut, DEADLINE) == 42
        assert joins.names == ["pc1-box"]

    asyncio.run(body())


def test_a_worker_signed_by_another_ca_is_refused_and_never_joins(
    certs: tuple[Path, Path],
) -> None:
    cluster, rogue = certs

    async def body() -> None:
        joins = Joins()
        refusals = Refusals(asyncio.get_running_loop())
        log = logging.getLogger("distributed.comm.tcp")
        log.addHandler(refusals)
        try:
            async with Scheduler(
                host="127.0.0.1",
                port=0,
                protocol="tls",
                dashboard=False,
                dashboard_address="127.0.0.1:0",
                security=engine_security(cluster),
            ) as s:
                s.add_plugin(joins, name="joins")
                # Same name, same file layout, but signed by a CA the cluster does not trust.
                worker = Worker(
                    s.address,
                    name="pc1-box",
                    nthreads=1,
                    memory_limit=0,
                    dashboard=False,
                    death_timeout=3,
                    security=worker_security(rogue, "pc1-box"),
                )
                start = asyncio.ensure_future(worker.start())
                try:
                    # How it fails: the scheduler's listener rejects the handshake...
                    await asyncio.wait_for(refusals.seen.wait(), DEADLINE)
                    # ...the worker keeps retrying until its death timeout, then gives up...
                    with pytest.raises(TimeoutError, match="Worker start timed out"):
                        await asyncio.wait_for(start, DEADLINE)
                finally:
                    await worker.close()
                # ...and at no point did it join.
                assert joins.names == [] and not joins.joined.is_set()
                assert s.workers == {}
        finally:
            log.removeHandler(refusals)
        assert "alert unknown ca" in refusals.messages[0]

    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        asyncio.run(body())
