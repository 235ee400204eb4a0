"""The engine side of remote workers: `[cluster]` config, membership, the dask worker backend.

The cluster tests run the engine's embedded Dask scheduler in the test's event loop and real
`dask worker` processes on 127.0.0.1 that declare a `sectors worker` identity through
tests/daskpreload.py. Every wait is on something observable (a worker registered, a count
line written, a policy in force); every process is killed by the `spawn` fixture.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jobfuncs
import pytest
from conftest import HANG_GUARD, Child, Spawner, eventually, run

from sectorfsm.cli.runconfig import RunConfigError, load_run_config
from sectorfsm.sched import Scheduler
from sectorfsm.sched.ledger import Phase
from sectorfsm.sched.pushed import PushedPolicy
from sectorfsm.sched.scheduler import Job
from sectorfsm.sched.selectors import TaskSelector
from sectorfsm.sched.storage import SectorRef
from sectorfsm.sched.tasks import TaskType
from sectorfsm.sealing.backends.dask import jobs
from sectorfsm.sealing.backends.dask.certs import make_certs
from sectorfsm.sealing.backends.dask.membership import Cluster, open_cluster

TESTS = Path(__file__).resolve().parent
GIB = 1 << 30

# ---------------------------------------------------------------------- [cluster] config


def _load(tmp: Path, cluster: str) -> Any:
    path = tmp / "sectors.toml"
    path.write_text(f"[cluster]\n{cluster}\n")
    return load_run_config(path)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("", "give exactly one of listen"),
        (
            'listen = "tls://0.0.0.0:8786"\nscheduler = "tls://h:8786"',
            "give exactly one of listen",
        ),
        ('listen = "tcp://0.0.0.0:8786"', "[cluster] listen: tcp://0.0.0.0:8786 is unencrypted"),
        ('scheduler = "udp://h:1"', "[cluster] scheduler: unsupported scheme"),
        ('listen = "tls://0.0.0.0:8786"', "[cluster] certs: tls://0.0.0.0:8786 needs"),
        ('listen = "tls://0.0.0.0:8786"\ncerts = "nowhere"', "[cluster] certs: no certificate"),
        ('listen = "tcp://127.0.0.1:1"\nlocal_worker = "no"', "local_worker"),
        ('listen = "tcp://127.0.0.1:1"\nworker_ttl = 0', "worker_ttl"),
        ('listen = "tcp://127.0.0.1:1"\nport = 1', "port"),
    ],
)
def test_bad_cluster_tables_are_one_line_errors(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(RunConfigError) as info:
        _load(tmp_path, table)
    text = str(info.value)
    assert message in text and "\n" not in text, text
    assert text.startswith(str(tmp_path / "sectors.toml"))


def test_good_cluster_tables(tmp_path: Path) -> None:
    make_certs(tmp_path / "certs", ["w1"])
    cfg = _load(tmp_path, 'listen = "tls://0.0.0.0:8786"\ncerts = "certs"\nlocal_worker = false')
    assert cfg.cluster.listen == "tls://0.0.0.0:8786"
    assert cfg.cluster.certs == tmp_path / "certs"
    assert cfg.cluster.local_worker is False and cfg.cluster.warning is None
    loose = _load(tmp_path, 'scheduler = "tcp://10.0.0.5:8786"\ninsecure = true')
    assert loose.cluster.scheduler == "tcp://10.0.0.5:8786"
    assert "unencrypted" in loose.cluster.warning
    assert load_run_config(None).cluster is None


def test_without_cluster_distributed_is_never_imported(tmp_path: Path) -> None:
    config = tmp_path / "sectors.toml"
    config.write_text('[miner]\nsealer = "sim"\n')
    script = (
        "import sys\n"
        "from sectorfsm.cli.app import app\n"
        f"app(['init', '-c', {str(config)!r}, '--repo', {str(tmp_path / 'repo')!r}],"
        " standalone_mode=False)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('distributed', 'dask'))\n"
        "print('IMPORTED', bad)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_GUARD
    )
    assert done.returncode == 0, done.stderr
    assert "IMPORTED []" in done.stdout, done.stdout


# ---------------------------------------------------------------------- membership


def identity(name: str, tasks: tuple[TaskType, ...], policy: Path | None = None) -> dict[str, Any]:
    """A contract identity for a worker with one 1 TiB sealing path `<name>-ssd`."""
    return {
        "version": 1,
        "name": name,
        "backend": "reference",
        "resources": {"cpus": 16, "memory": 256 * GIB, "swap": 0, "gpus": []},
        "tasks": [t.value for t in tasks],
        "overrides": {},
        "paths": [{"id": f"{name}-ssd", "path": f"/x/{name}", "capacity": 1 << 40, "seal": True}],
        "policy": {"file": None if policy is None else str(policy)},
    }


def start_worker(
    spawn: Spawner, address: str, name: str, ident: object, free: dict[str, int] | None = None
) -> Child:
    """A `dask worker` (no nanny) that declares `ident` through tests/daskpreload.py."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env["SECTORS_TEST_IDENTITY"] = json.dumps(ident)
    env["SECTORS_TEST_FREE"] = json.dumps(free or {})
    args = [
        *("-m", "distributed.cli.dask_worker", address, "--name", name),
        *("--nthreads", "8", "--memory-limit", "0", "--no-nanny", "--no-dashboard"),
        *("--host", "127.0.0.1", "--preload", "daskpreload"),
    ]
    return spawn.python(*args, name=name, env=env)


def in_cluster(tmp: Path, body: Callable[[Scheduler, Cluster, list[str]], Any]) -> None:
    """Run `body(sched, cluster, said)` with an embedded Dask scheduler in this loop."""

    async def main() -> None:
        sched = Scheduler(policy_poll_interval=0.1)
        await sched.start()
        said: list[str] = []
        try:
            async with open_cluster(
                sched, listen="tcp://127.0.0.1:0", say=said.append, beat=0.1
            ) as cluster:
                await jobs.install(cluster.client, str(tmp / "jobs"))
                await body(sched, cluster, said)
        finally:
            await sched.stop()

    run(main)


def test_join_heartbeat_policy_and_a_refused_identity(spawn: Spawner, tmp_path: Path) -> None:
    policy = tmp_path / "myscheduler.json"
    policy.write_text(json.dumps({"PreCommit1Max": 1, "ForceP1FromLocalAP": False}))

    async def body(sched: Scheduler, cluster: Cluster, said: list[str]) -> None:
        start_worker(
            spawn,
            cluster.address,
            "pc1-box",
            identity("pc1-box", (TaskType.ADD_PIECE, TaskType.PRE_COMMIT1), policy),
            free={"pc1-box-ssd": 5 * GIB},
        )
        broken = identity("broken", (TaskType.PRE_COMMIT1,))
        broken["resources"]["cpus"] = "many"
        start_worker(spawn, cluster.address, "broken", broken)

        w = await eventually(lambda: sched.find_worker("pc1-box"), "pc1-box registered")
        assert w.spec.task_types == {TaskType.ADD_PIECE, TaskType.PRE_COMMIT1}
        assert w.spec.needs_heartbeats
        assert any(line.startswith("worker pc1-box joined from tcp://127.0.0.1:") for line in said)
        # The free space the worker reports is what the index offers.
        path = sched.index.paths["pc1-box-ssd"]
        await eventually(lambda: path.available == 5 * GIB, "reported free space")
        # The policy the worker read from its own file is in force here.
        assert isinstance(w.watcher, PushedPolicy)
        assert w.policy.pre_commit1_max == 1
        policy.write_text(json.dumps({"PreCommit1Max": 3, "ForceP1FromLocalAP": False}))
        await eventually(lambda: w.policy.pre_commit1_max == 3, "the edited policy")
        policy.write_text("{ not json")
        await eventually(lambda: w.watcher is not None and w.watcher.error, "the bad edit")
        assert w.policy.pre_commit1_max == 3  # the last good policy is kept
        snap = next(s for s in sched.workers() if s.name == "pc1-box")
        assert snap.remote is not None and snap.remote["host"] == "127.0.0.1"
        assert snap.remote["policy"]["error"] and snap.policy_error
        # The malformed identity is refused, with the field that is wrong, and nothing crashed.
        refused = await eventually(
            lambda: cluster.membership.snapshot()["refused"], "the refused worker"
        )
        (reason,) = refused.values()
        assert "resources" in reason and "cpus" in reason, reason
        assert sched.find_worker("broken") is None
        assert any("broken" in line and "refused" in line for line in said)

    in_cluster(tmp_path, body)


def test_a_killed_workers_job_fails_within_seconds_and_retries_elsewhere(
    spawn: Spawner, tmp_path: Path
) -> None:
    count, release = tmp_path / "count", tmp_path / "release"
    sector = SectorRef(1000, 1, 2048)

    async def body(sched: Scheduler, cluster: Cluster, said: list[str]) -> None:
        children = {
            n: start_worker(spawn, cluster.address, n, identity(n, (TaskType.PRE_COMMIT1,)))
            for n in ("wa", "wb")
        }
        for n in children:
            await eventually(lambda n=n: sched.find_worker(n), f"{n} registered")
        ran_on: list[str] = []

        async def work(job: Job) -> Any:
            ran_on.append(job.worker.name)
            return await job.run(jobfuncs.gate, str(count), str(release), job.worker.name)

        first = asyncio.ensure_future(
            sched.schedule(sector, TaskType.PRE_COMMIT1, TaskSelector(), None, work)
        )
        await eventually(lambda: count.exists() and count.read_text(), "the job's child started")
        victim = ran_on[0]
        killed_at = time.monotonic()
        children[victim].kill()
        with pytest.raises(Exception):  # noqa: B017 (KilledWorker or RemoteWorkerLost)
            await first
        assert time.monotonic() - killed_at < 10
        await eventually(lambda: sched.find_worker(victim) is None, "the dead worker removed")
        assert any(line.startswith(f"worker {victim} left") for line in said)
        assert not any(j.phase != "queued" for j in sched.jobs())  # its ledger is released
        # The retry goes to the worker that is left, and its result comes back.
        release.write_text("go")
        result = await sched.schedule(sector, TaskType.PRE_COMMIT1, TaskSelector(), None, work)
        assert result == ran_on[1] != victim
        assert len(count.read_text().splitlines()) == 2
        assert Phase.RUNNING  # the phases the scheduler reports are its own

    in_cluster(tmp_path, body)


def test_an_external_scheduler_feeds_membership_through_its_topic(
    spawn: Spawner, tmp_path: Path
) -> None:
    port_file = tmp_path / "scheduler.json"
    spawn.python(
        *("-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0"),
        *("--no-dashboard", "--scheduler-file", str(port_file)),
        name="dask-scheduler",
    )

    def written() -> str | None:
        try:  # the file may be caught half written
            return str(json.loads(port_file.read_text())["address"])
        except (OSError, ValueError, KeyError):
            return None

    async def main() -> None:
        address = await eventually(written, "the scheduler's address file")
        sched = Scheduler()
        said: list[str] = []
        async with open_cluster(sched, scheduler=address, say=said.append) as cluster:
            assert cluster.scheduler is None and cluster.address == address
            child = start_worker(spawn, address, "ext", identity("ext", (TaskType.COMMIT2,)))
            await eventually(lambda: sched.find_worker("ext"), "ext registered")
            child.kill()
            await eventually(lambda: sched.find_worker("ext") is None, "ext removed")
        assert said[0].startswith("worker ext joined") and said[1].startswith("worker ext left")

    run(main)
