"""Views of remote workers: `sectors jobs` (worker, host, phase, time) and `sched-diag` reasons.

The reasons are the scheduler's, so most tests drive the scheduler API with a stand-in remote
backend (the `RemoteBackend` protocol: it describes its machine) and a clock they set by hand.
One test runs the embedded Dask scheduler with a real worker process that is killed with
SIGKILL, and reads the same views.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jobfuncs
from conftest import Spawner, eventually, run
from test_dask_engine import identity, in_cluster, start_worker
from typer.testing import CliRunner

from sectorfsm.cli.app import app
from sectorfsm.fsm.codec import packb
from sectorfsm.fsm.store import LmdbStore
from sectorfsm.sched import Scheduler
from sectorfsm.sched.pushed import PushedPolicy
from sectorfsm.sched.scheduler import Job
from sectorfsm.sched.selectors import TaskSelector
from sectorfsm.sched.storage import SectorRef, StoragePath
from sectorfsm.sched.tasks import TaskType
from sectorfsm.sched.views import SNAPSHOT_KEY
from sectorfsm.sched.workers import WorkerResources, WorkerSpec
from sectorfsm.sealing.backends.dask.membership import Cluster
from sectorfsm.sealing.store_view import store_path

GIB = 1 << 30
SECTOR = SectorRef(1000, 7, 2048)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1_000_000.0

    def now(self) -> float:
        """The current time."""
        return self.t


class Remote:
    """A stand-in remote backend: jobs wait for `release`; it describes a host."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.lost: str | None = None
        self.release = asyncio.Event()

    async def submit(self, job_id: int, fn: Any, *args: Any) -> Any:
        """Wait for the release, then return `fn(*args)`."""
        await self.release.wait()
        return fn(*args)

    async def kill(self, job_id: int) -> None:
        """Nothing to kill."""

    def describe(self) -> dict[str, Any]:
        """Its host and whether it was lost."""
        return {"host": self.host, "address": f"tcp://{self.host}:1", "lost": self.lost}


def spec(name: str, *tasks: TaskType) -> WorkerSpec:
    """A worker with room for many 2 KiB tasks."""
    return WorkerSpec(name, WorkerResources(cpus=16, mem_physical=64 * GIB), frozenset(tasks))


async def queued(sched: Scheduler, task: TaskType = TaskType.PRE_COMMIT1) -> asyncio.Future[Any]:
    """Schedule `task` for SECTOR and wait until it sits in the queue."""

    async def work(job: Job) -> Any:
        return await job.run(abs, -1)

    fut = asyncio.ensure_future(sched.schedule(SECTOR, task, TaskSelector(), None, work))
    await eventually(lambda: sched.diag(), "the task queued")
    return fut


def reasons(sched: Scheduler) -> dict[str, str]:
    """The reasons of the one queued task."""
    (diag,) = sched.diag()
    return diag.reasons


def test_a_remote_worker_that_left_is_lost_n_seconds_ago() -> None:
    async def main() -> None:
        clock = Clock()
        sched = Scheduler(clock=clock)
        remote = Remote("10.0.0.7")
        sched.add_worker(spec("pc1-box", TaskType.PRE_COMMIT1), remote)
        sched.add_worker(spec("local", TaskType.PRE_COMMIT1))
        sched.add_worker(spec("ap-box", TaskType.ADD_PIECE), Remote("10.0.0.8"))
        remote.lost = "left the cluster"
        sched.remove_worker("pc1-box")
        sched.remove_worker("ap-box")
        sched.remove_worker("local")  # in-process, dropped on purpose: not "lost"
        fut = await queued(sched)
        clock.t += 12.4
        assert reasons(sched) == {"pc1-box": "lost 12 s ago (left the cluster)"}
        clock.t += 600
        assert reasons(sched)["pc1-box"] == "lost 10 min ago (left the cluster)"
        # The worker comes back under its name: it takes the task, and it is no longer lost.
        back = Remote("10.0.0.7")
        back.release.set()
        sched.add_worker(spec("pc1-box", TaskType.PRE_COMMIT1), back)
        assert await fut == 1

    run(main)


def test_a_worker_whose_paths_are_declared_but_absent_is_not_connected() -> None:
    async def main() -> None:
        sched = Scheduler(clock=Clock())
        sched.index.declare(StoragePath("ghost-ssd", "ghost", 1 << 40))
        sched.index.declare(StoragePath("shared", None, 1 << 40, can_seal=False, can_store=True))
        fut = await queued(sched)
        got = reasons(sched)
        assert list(got) == ["ghost"]
        assert got["ghost"].startswith("not connected"), got
        fut.cancel()
        await asyncio.gather(fut, return_exceptions=True)

    run(main)


def test_a_pushed_policy_file_error_is_a_reason() -> None:
    async def main() -> None:
        sched = Scheduler(clock=Clock())
        sched.add_worker(spec("pc1-box", TaskType.PRE_COMMIT1), Remote("10.0.0.7"))
        pushed = PushedPolicy("/etc/sectors/myscheduler.json")
        pushed.update({"PreCommit1Max": 0}, None, 1.0)
        sched.use_policy("pc1-box", pushed)
        pushed.update(None, "/etc/sectors/myscheduler.json: invalid JSON at line 1", 2.0)
        fut = await queued(sched)
        why = reasons(sched)["pc1-box"]
        assert why.startswith("PC1 disabled on this worker (PreCommit1Max = 0)"), why
        assert "policy file error" in why and "invalid JSON at line 1" in why, why
        fut.cancel()
        await asyncio.gather(fut, return_exceptions=True)

    run(main)


def test_jobs_show_the_remote_host_phase_and_time() -> None:
    async def main() -> None:
        clock = Clock()
        sched = Scheduler(clock=clock)
        remote = Remote("10.0.0.7")
        sched.add_worker(spec("pc1-box", TaskType.PRE_COMMIT1), remote)
        sched.add_worker(spec("local", TaskType.ADD_PIECE))

        async def work(job: Job) -> Any:
            return await job.run(abs, -1)

        fut = asyncio.ensure_future(
            sched.schedule(SECTOR, TaskType.PRE_COMMIT1, TaskSelector(), None, work)
        )
        (job,) = await eventually(
            lambda: [j for j in sched.jobs() if j.phase == "running"], "the job running"
        )
        clock.t += 65
        (job,) = sched.jobs()
        assert (job.worker, job.host, job.phase, job.age_s) == (
            "pc1-box",
            "10.0.0.7",
            "running",
            65,
        )
        assert job.to_dict()["host"] == "10.0.0.7"
        remote.release.set()
        assert await fut == 1

    run(main)


def _repo_with(tmp: Path, snapshot: dict[str, Any]) -> Path:
    """A repo whose store holds `snapshot` as the scheduler's latest."""
    repo = tmp / "repo"
    store = LmdbStore(store_path(repo))
    try:
        store.write(lambda txn: txn.put(SNAPSHOT_KEY, packb(snapshot), db=store.db("meta")))
    finally:
        store.close()
    return repo


def test_sectors_jobs_and_sched_diag_print_remote_workers(tmp_path: Path) -> None:
    import time

    snapshot = {
        "at": time.time(),
        "workers": [],
        "jobs": [
            {
                **{"sched_id": 3, "sector": "s-t01000-7", "task": "PC1", "worker": "pc1-box"},
                **{"phase": "running", "age_s": 3725.0, "host": "10.0.0.7"},
            },
            {
                **{"sched_id": 4, "sector": "s-t01000-8", "task": "C2", "worker": None},
                **{"phase": "queued", "age_s": 2.0, "host": None},
            },
        ],
        "diag": [
            {
                **{"sched_id": 4, "sector": "s-t01000-8", "task": "C2", "priority": 0},
                "reasons": {
                    "c2-box": "lost 12 s ago (left the cluster)",
                    "pc1-box": "does not do C2 (policy file error, last good policy kept: [x])",
                },
            }
        ],
    }
    repo = _repo_with(tmp_path, snapshot)
    runner = CliRunner()
    shown = runner.invoke(app, ["jobs", "--repo", str(repo)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.output.splitlines() if "pc1-box" in line)
    assert row.split() == ["3", "s-t01000-7", "PC1", "pc1-box", "10.0.0.7", "running", "1h02m"]
    data = json.loads(runner.invoke(app, ["jobs", "--json", "--repo", str(repo)]).output)
    assert data["jobs"][0]["host"] == "10.0.0.7"
    diag = runner.invoke(app, ["sched-diag", "--repo", str(repo)], env={"COLUMNS": "200"})
    assert diag.exit_code == 0, diag.output
    assert "  c2-box: lost 12 s ago (left the cluster)" in diag.output
    assert "last good policy kept: [x])" in diag.output  # brackets shown, not eaten as markup


def test_a_killed_worker_shows_in_jobs_then_as_lost(spawn: Spawner, tmp_path: Path) -> None:
    count, release = tmp_path / "count", tmp_path / "release"

    async def body(sched: Scheduler, cluster: Cluster, said: list[str]) -> None:
        child = start_worker(
            spawn, cluster.address, "pc1-box", identity("pc1-box", (TaskType.PRE_COMMIT1,))
        )
        await eventually(lambda: sched.find_worker("pc1-box"), "pc1-box registered")

        async def work(job: Job) -> Any:
            return await job.run(jobfuncs.gate, str(count), str(release), "done")

        first = asyncio.ensure_future(
            sched.schedule(SECTOR, TaskType.PRE_COMMIT1, TaskSelector(), None, work)
        )
        await eventually(lambda: count.exists() and count.read_text(), "the job's child started")
        (job,) = sched.jobs()
        assert (job.worker, job.host, job.phase) == ("pc1-box", "127.0.0.1", "running")
        child.kill()
        await asyncio.gather(first, return_exceptions=True)
        await eventually(lambda: sched.find_worker("pc1-box") is None, "pc1-box removed")
        again = await queued(sched)
        why = reasons(sched)["pc1-box"]
        assert why.startswith("lost ") and why.endswith(" s ago (left the cluster)"), why
        again.cancel()
        await asyncio.gather(again, return_exceptions=True)

    in_cluster(tmp_path, body)
