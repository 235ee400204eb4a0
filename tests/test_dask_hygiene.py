"""Cluster hygiene: nothing but the Dask comm port off loopback; stale attempts discarded.

* Dask starts an HTTP server with every scheduler and worker, even with `dashboard=False`
  (port 8787 of every interface for the scheduler, with prometheus/info/json/proxy routes):
  the engine's embedded scheduler and `sectors worker` keep it on loopback, without routes.
* A worker that rejoins with jobs of attempts the engine has moved past gets them killed and
  forgotten; a job of the current attempt (what a restarted engine re-attaches to) is kept.

The sockets are read with psutil; every wait is on something observable (a worker joined, a
line said, a child's pid gone); every process is killed by the `spawn` fixture.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from conftest import HANG_GUARD, Child, Spawner, child_env, eventually, run, until

from sectorfsm.sched import Scheduler
from sectorfsm.sealing.backends.dask import jobs
from sectorfsm.sealing.backends.dask.certs import make_certs
from sectorfsm.sealing.backends.dask.jobrecord import JobCancelled, JobState
from sectorfsm.sealing.backends.dask.jobs import JobRegistry
from sectorfsm.sealing.backends.dask.membership import open_cluster
from sectorfsm.sealing.backends.dask.security import engine_security
from sectorfsm.sealing.backends.dask.stale import discard_jobs, parse_attempt, superseded
from sectorfsm.sealing.backends.dask.table import JobTable

TESTS = Path(__file__).resolve().parent
GATE = "jobfuncs:gate"

WORKER_TOML = """
name = "box"
cpus = 2
memory = "2GiB"
tasks = ["AP", "PC1"]
threads = 4
state_dir = "jobs"

[[paths]]
id = "seal"
path = "seal"
capacity = "1GiB"
"""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def listening(pid: int | None = None) -> set[tuple[str, int]]:
    """The (ip, port) pairs a process listens on over TCP (this one by default)."""
    conns = psutil.Process(pid).net_connections("inet")
    return {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}


def off_loopback(pairs: set[tuple[str, int]]) -> set[int]:
    """The ports of `pairs` bound to an address other than loopback (0.0.0.0 and :: count)."""
    return {port for ip, port in pairs if not ipaddress.ip_address(ip.split("%")[0]).is_loopback}


def port_of(address: str) -> int:
    """The port of a Dask address such as `tls://0.0.0.0:8786`."""
    return int(address.rsplit(":", 1)[1])


def http_status(port: int, path: str) -> int:
    """The HTTP status of GET `path` on a loopback port (blocking: call it off the loop)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=HANG_GUARD) as r:
            status: int = r.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


def sectors_worker(spawn: Spawner, tmp: Path, address: str) -> Child:
    """`sectors worker` (worker.toml above, no `host`: it listens on every interface)."""
    box = tmp / "box"
    box.mkdir(exist_ok=True)
    (box / "worker.toml").write_text(WORKER_TOML)
    args = ["-m", "sectorfsm", "worker", "--scheduler", address, "--config", "worker.toml"]
    return spawn.python(*args, name="box", env=child_env(), cwd=box)


# ---------------------------------------------------------------------- sockets


def test_the_embedded_scheduler_listens_off_loopback_on_its_comm_port_only(
    tmp_path: Path,
) -> None:
    certs = tmp_path / "certs"
    make_certs(certs, ["w1"])

    async def main() -> None:
        sched = Scheduler()
        await sched.start()
        before = listening()
        try:
            async with open_cluster(
                sched, listen="tls://0.0.0.0:0", security=engine_security(certs), say=print
            ) as cluster:
                assert cluster.scheduler is not None
                opened = listening() - before
                assert off_loopback(opened) == {port_of(cluster.address)}, opened
                # Dask's HTTP server cannot be turned off: it is on loopback, with no routes.
                http = cluster.scheduler.http_server
                assert ipaddress.ip_address(http.address).is_loopback
                for path in ("/health", "/info/main/workers.html", "/metrics", "/json/identity"):
                    assert await asyncio.to_thread(http_status, http.port, path) == 404, path
        finally:
            await sched.stop()

    run(main)


def test_a_sectors_worker_listens_off_loopback_on_its_comm_port_only(
    spawn: Spawner, tmp_path: Path
) -> None:
    async def main() -> None:
        sched = Scheduler()
        await sched.start()
        try:
            async with open_cluster(sched, listen="tcp://127.0.0.1:0", say=print) as cluster:
                proc = sectors_worker(spawn, tmp_path, cluster.address)
                members = cluster.membership.members
                await eventually(lambda: members, "the worker joined")
                (address,) = members
                opened = listening(proc.pid)
                assert off_loopback(opened) == {port_of(address)}, opened
        finally:
            await sched.stop()

    run(main)


# ---------------------------------------------------------------------- stale attempts


def test_parse_attempt_reads_only_the_sealers_job_ids() -> None:
    assert parse_attempt("PC1-s12-a3") == ("PC1", 12, 3)
    assert parse_attempt("AP-s0-a1") == ("AP", 0, 1)
    for other in ("j5-abc123", "PC1-s12", "PC1-s1-a1x", "PC1-sx-a1", "-s1-a1", "fetch-PC1-s1-a1"):
        assert parse_attempt(other) is None, other


def test_stale_jobs_in_the_registry_are_killed_and_forgotten_the_current_ones_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    table = JobTable(tmp_path / "jobs")
    registry = JobRegistry(str(tmp_path / "jobs"))
    registry.table = table
    worker: Any = SimpleNamespace(name="box", plugins={jobs.PLUGIN: registry})
    count, never = tmp_path / "count", tmp_path / "never"
    ended: dict[str, BaseException | None] = {}

    def run_one(job_id: str) -> None:
        try:
            table.run(job_id, GATE, [str(count), str(never), job_id])
            ended[job_id] = None
        except BaseException as exc:  # recorded for the asserts
            ended[job_id] = exc

    gated = ["PC1-s1-a1", "PC1-s1-a2", "PC2-s3-a1"]
    threads = [threading.Thread(target=run_one, args=(j,)) for j in gated]
    try:
        for thread in threads:
            thread.start()
        until(lambda: count.exists() and len(count.read_text().split()) == 3, "three children")
        # Finished, not acknowledged: one of an old attempt, one a restarted engine collects.
        assert table.run("AP-s1-a1", "jobfuncs:add", [str(tmp_path / "adds"), 1, 2]) == 3
        assert table.run("AP-s2-a1", "jobfuncs:add", [str(tmp_path / "adds"), 3, 4]) == 7
        pids = {r.job_id: r.pid for r in table.records()}
        states = {r.job_id: str(r.state) for r in table.records()}
        assert set(states) == {*gated, "AP-s1-a1", "AP-s2-a1"}

        # Sector 1 moved on to attempt 2 of both tasks; sector 3's PC2 is at 2, but the
        # engine still waits on attempt 1 there; sector 2 is at its first attempt.
        current = {(1, "PC1"): 2, (1, "AP"): 2, (3, "PC2"): 2}
        stale = superseded(
            [*states, "j5-abc123"],
            lambda sector, task: current.get((sector, task), 1),
            lambda job_id: job_id == "PC2-s3-a1",
        )
        assert stale == ["AP-s1-a1", "PC1-s1-a1"]

        ends = asyncio.run(discard_jobs(stale, 5.0, worker))
        assert ends == {"PC1-s1-a1": str(JobState.CANCELLED), "AP-s1-a1": str(JobState.DONE)}
        until(lambda: not _alive(pids["PC1-s1-a1"]), "the stale child killed")
        assert {r.job_id for r in table.records()} == {"PC1-s1-a2", "PC2-s3-a1", "AP-s2-a1"}
        assert _alive(pids["PC1-s1-a2"]) and _alive(pids["PC2-s3-a1"])
        assert table.outcome("AP-s2-a1") == 7  # still there for the engine to collect
        threads[0].join(HANG_GUARD)
        assert isinstance(ended["PC1-s1-a1"], JobCancelled)
        # Bad input: one line, nothing changed.
        with pytest.raises(ValueError, match="job id"):
            asyncio.run(discard_jobs(["../x"], 5.0, worker))
        assert len(table.records()) == 3
    finally:
        table.close()  # whatever happened, no child outlives the test
        for thread in threads:
            thread.join(HANG_GUARD)


def test_a_discarded_jobs_waiter_hears_it_was_cancelled_though_its_record_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under load the waiter woke only after the discard had forgotten the job, and said
    # "no record of it (acknowledged?)": here it is held there until the discard returns.
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    table = JobTable(tmp_path / "jobs")
    registry = JobRegistry(str(tmp_path / "jobs"))
    registry.table = table
    worker: Any = SimpleNamespace(name="box", plugins={jobs.PLUGIN: registry})
    count, never = tmp_path / "count", tmp_path / "never"
    armed, gate = threading.Event(), threading.Event()
    real_wait = threading.Event.wait
    ended: list[BaseException | None] = []

    class HeldWake(threading.Event):
        """Once armed, the waiter's thread stays past its wake-up until `gate` opens."""

        def wait(self, timeout: float | None = None) -> bool:
            woke = real_wait(self, timeout)
            if armed.is_set() and threading.current_thread().name == "waiter":
                real_wait(gate, HANG_GUARD)
            return woke

    monkeypatch.setattr(threading, "Event", HeldWake)

    def run_one() -> None:
        try:
            table.run("PC1-s1-a1", GATE, [str(count), str(never), "PC1-s1-a1"])
            ended.append(None)
        except BaseException as exc:  # recorded for the asserts
            ended.append(exc)

    waiter = threading.Thread(target=run_one, name="waiter")
    try:
        waiter.start()
        until(lambda: (count.exists() and count.read_text().split()) or None, "the child started")
        armed.set()  # the waiter waits for the job's end now, and nothing else
        ends = asyncio.run(discard_jobs(["PC1-s1-a1"], 5.0, worker))
        assert ends == {"PC1-s1-a1": str(JobState.CANCELLED)}
        assert table.records() == []
        gate.set()
        waiter.join(HANG_GUARD)
        (exc,) = ended
        assert isinstance(exc, JobCancelled), exc
    finally:
        gate.set()
        table.close()
        waiter.join(HANG_GUARD)


def test_a_worker_rejoining_a_restarted_engine_loses_its_stale_jobs_only(
    spawn: Spawner, tmp_path: Path
) -> None:
    count, never = tmp_path / "count", tmp_path / "never"

    async def main() -> None:
        sched = Scheduler()
        await sched.start()
        try:
            # The kernel picks the port (one picked by the test could be taken before the
            # bind); the restarted engine listens on the same one.
            first = open_cluster(sched, listen="tcp://127.0.0.1:0", say=print, beat=0.1)
            async with first as cluster:
                listen = cluster.address
                proc = sectors_worker(spawn, tmp_path, cluster.address)
                members = cluster.membership.members
                await eventually(lambda: members, "the worker joined")
                (address,) = members
                futures = [
                    jobs.submit(cluster.client, address, j, GATE, [str(count), str(never), j])
                    for j in ("PC1-s1-a1", "PC1-s2-a1")
                ]
                await eventually(
                    lambda: count.exists() and len(count.read_text().split()) == 2,
                    "both jobs' children started",
                )
                records = await jobs.jobs(cluster.client, address)
                pids = {r.job_id: r.pid for r in records}
                for future in futures:
                    future.release()
            # The engine stopped (its embedded scheduler with it); the jobs run on.
            proc.wait_for_line(r"scheduler lost; reconnecting")
            assert all(_alive(pid) for pid in pids.values())

            # It comes back: sector 1's PC1 was retried elsewhere (attempt 2 is current),
            # sector 2's attempt 1 is the one the engine is about to re-attach to.
            said: list[str] = []
            current = {(1, "PC1"): 2}
            async with open_cluster(
                sched,
                listen=listen,
                say=said.append,
                beat=0.1,
                attempts=lambda sector, task: current.get((sector, task), 1),
            ) as cluster:
                line = await eventually(
                    lambda: next((s for s in said if "superseded" in s), None),
                    "the stale job discarded",
                )
                assert line == (
                    "worker box: discarded jobs of superseded attempts: PC1-s1-a1 (cancelled)"
                )
                assert not _alive(pids["PC1-s1-a1"])
                (address,) = cluster.membership.members
                records = await jobs.jobs(cluster.client, address)
                assert [(r.job_id, r.state) for r in records] == [("PC1-s2-a1", JobState.RUNNING)]
                assert _alive(pids["PC1-s2-a1"])
                # The current attempt is re-attached to and finishes, run once.
                args = [str(count), str(never), "PC1-s2-a1"]
                future = jobs.submit(cluster.client, address, "PC1-s2-a1", GATE, args)
                never.touch()
                assert await future == "PC1-s2-a1"
                assert len(count.read_text().split()) == 2
        finally:
            await sched.stop()

    run(main)
