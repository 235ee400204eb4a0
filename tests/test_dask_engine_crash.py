"""kill -9 of the ENGINE while PreCommit1 runs on a remote worker (issue 15, item 4).

`sectors run` with an embedded Dask scheduler (`[cluster] listen`) and one real `sectors
worker`. A `sitecustomize` on the worker's PYTHONPATH wraps the PC1 of its job children: each
run appends `start PID` to a file, then holds until the test creates `release`, then appends
`done PID`. So PC1 lasts as long as the test needs (the engine's death and restart), and the
number of `start` lines is the proof that the child ran exactly once.

The engine is killed (SIGKILL, scheduler included) once PC1 observably runs; the worker loses
its scheduler, keeps the child running and reconnects to the restarted `sectors run` at the
same address. The restarted engine asks for the same job id and gets that run's result:

* `running`: PC1 is released only after the new engine shows the job placed again (it
  re-attached to the running child);
* `finished`: PC1 ends while no engine runs; the worker keeps the result until an engine
  collects and acknowledges it.

Either way the sector goes on to Proving with no PC1 failure in its log, and the worker's
record of the job is gone (acknowledged) by then. And when another PC1 worker is up before
the one running the job rejoins (held with SIGSTOP), the task waits, pinned to the worker
the engine recorded for that attempt, instead of starting the PC1 a second time there. A
clean stop (SIGINT) leaves the job running too: no PC1 failure is recorded, and the next
`sectors run` collects it the same way.
Every process is killed by `spawn`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import Child, Spawner, until

from sectorfsm.cli.runconfig import RunConfigError, load_run_config
from sectorfsm.fsm import LmdbStore, RealClock
from sectorfsm.fsm.codec import packb
from sectorfsm.sched import SectorRef, TaskType
from sectorfsm.sealing.backends.dask.backend import DaskWorkerBackend
from sectorfsm.sealing.backends.dask.identity import PolicyReport
from sectorfsm.sealing.backends.dask.sealer import ATTEMPTS_DB, DaskSealer

HOLD_PC1 = """
import os
import time

from sectorfsm.sealing.backends.dask import adapter

_pc1 = adapter.pre_commit1


def _say(line):
    fd = os.open(os.path.join(os.environ["SECTORS_TEST_PC1_GATE"], "runs"),
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(fd, f"{line} {os.getpid()}\\n".encode())
    os.close(fd)


def pre_commit1(*args, **kwargs):
    _say("start")
    release = os.path.join(os.environ["SECTORS_TEST_PC1_GATE"], "release")
    while not os.path.exists(release):  # the job child's own long PC1
        time.sleep(0.02)
    out = _pc1(*args, **kwargs)
    _say("done")
    return out


adapter.pre_commit1 = pre_commit1
"""

WORKER = """
name = "wa"
cpus = 4
memory = "8GiB"
tasks = ["AP", "PC1", "PC2", "C1", "C2", "FIN", "GET"]
threads = 8
state_dir = "jobs"
host = "127.0.0.1"

[[paths]]
id = "a-seal"
path = "seal"
capacity = "1GiB"

[[paths]]
id = "a-store"
path = "store"
capacity = "1GiB"
seal = false
store = true
"""


#: A second worker that can do PC1 (and nothing else).
WORKER_PC1 = """
name = "wa2"
cpus = 4
memory = "8GiB"
tasks = ["PC1"]
threads = 8
state_dir = "jobs"
host = "127.0.0.1"

[[paths]]
id = "a2-seal"
path = "seal"
capacity = "1GiB"
"""


def _engine_config(port: int) -> str:
    return (
        '[miner]\nsealer = "dask"\nsector_size = "2KiB"\nblock_time = 0.1\n'
        # No local_worker: with the dask sealer the engine's process keeps none.
        f'[cluster]\nlisten = "tcp://127.0.0.1:{port}"\n'
    )


def _runs(gate: Path) -> list[list[str]]:
    try:
        return [line.split() for line in (gate / "runs").read_text().splitlines()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class _Engine:
    """`sectors run` on one repo and config, started again after a kill."""

    def __init__(self, spawn: Spawner, tmp: Path) -> None:
        self.spawn = spawn
        self.config = tmp / "sectors.toml"
        # The kernel picks the first engine's port (one the test picked could be taken before
        # the engine binds it); the config then names it, for the workers and the restarts.
        self.config.write_text(_engine_config(0))
        self.env = {**os.environ, "SECTORFSM_REPO": str(tmp / "repo"), "COLUMNS": "200"}

    def start(self, *args: str, name: str) -> Child:
        """`sectors run --config ... ARGS`; returns once its Dask scheduler listens."""
        daemon = self.spawn.python(
            *("-m", "sectorfsm", "run", "--config", self.config, *args), env=self.env, name=name
        )
        port = daemon.wait_for_line(r"cluster: Dask scheduler running tcp://127\.0\.0\.1:(\d+)")[1]
        self.config.write_text(_engine_config(int(port)))
        return daemon

    def cli(self, *args: str) -> Any:
        """A `sectors ... --json` command's answer (None if it failed)."""
        proc = self.spawn.run([sys.executable, "-m", "sectorfsm", *args, "--json"], env=self.env)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def waiting(self, task: str, worker: str) -> str | None:
        """Why `sectors sched-diag` says queued `task` cannot go to `worker` (None: not so)."""
        snap = self.cli("sched-diag")
        for d in snap["diag"] if snap is not None else []:
            if d["task"] == task and worker in d["reasons"]:
                return str(d["reasons"][worker])
        return None

    def placed(self, task: str, worker: str) -> bool:
        """True when `sectors jobs` shows `task` on `worker`."""
        snap = self.cli("jobs")
        return snap is not None and any(
            j["task"] == task and j["worker"] == worker for j in snap["jobs"]
        )


def _worker(spawn: Spawner, tmp: Path, name: str, toml: str) -> Child:
    """A `sectors worker` in `tmp/name`, its job children's PC1 held by the gate."""
    box = tmp / name
    box.mkdir()
    (box / "worker.toml").write_text(toml)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp / "hooks"), env.get("PYTHONPATH")]))
    env["SECTORS_TEST_PC1_GATE"] = str(tmp / "gate")
    address = (tmp / "sectors.toml").read_text().split('listen = "')[1].split('"')[0]
    return spawn.python(
        *("-m", "sectorfsm", "worker", "--scheduler", address, "--config", "worker.toml"),
        name=name,
        env=env,
        cwd=box,
    )


def _pc1_running_then_engine_stopped(
    spawn: Spawner, tmp: Path, *, kill: bool = True
) -> tuple[_Engine, Child, str]:
    """Engine and worker wa up, a sector's PC1 held on wa, then kill -9 of the engine.

    With `kill=False` the engine is stopped cleanly (SIGINT) instead, and must exit 0.

    Returns the engine (to start again), the worker, and the PC1 child's pid.
    """
    for d in ("gate", "hooks"):
        (tmp / d).mkdir()
    (tmp / "hooks" / "sitecustomize.py").write_text(HOLD_PC1)
    engine = _Engine(spawn, tmp)
    first = engine.start("--pledge", "1", name="engine-1")
    worker = _worker(spawn, tmp, "wa", WORKER)
    first.wait_for_line(r"cluster: worker wa joined from", anywhere=True)
    until(lambda: len(_runs(tmp / "gate")) == 1, "PC1 started on the worker")
    ((what, pid),) = _runs(tmp / "gate")
    assert what == "start"
    assert (tmp / "wa" / "jobs" / "wa" / "PC1-s1-a1.record").is_file()
    if kill:
        first.kill()  # SIGKILL: the engine and its embedded Dask scheduler die at once
    else:
        first.interrupt()
        assert first.finish() == 0, first.describe()
    worker.wait_for_line(r"scheduler lost; reconnecting")
    assert _alive(int(pid)), "the PC1 child must outlive the engine"
    return engine, worker, pid


def _proving_from_that_pc1(engine: _Engine, tmp: Path, pid: str) -> None:
    """The sector is Proving from the one PC1 run, and the worker forgot the job."""
    # The child ran once: one start, one end, the same process.
    assert _runs(tmp / "gate") == [["start", pid], ["done", pid]]
    status = engine.cli("status", "1")
    assert status is not None and status["state"] == "Proving"
    kinds = [e["kind"] for e in status["log"]]
    assert "event;SectorPreCommit1" in kinds
    assert not [k for k in kinds if "Failed" in k], kinds
    # Collected, its commit durable, then acknowledged: the worker forgot the job.
    assert not (tmp / "wa" / "jobs" / "wa" / "PC1-s1-a1.record").exists()
    assert (tmp / "wa" / "store" / "sealed" / "s-t01000-1").is_file()


@pytest.mark.parametrize("collected", ["running", "finished"])
def test_kill_9_of_the_engine_during_pc1_resumes_from_that_pc1(
    spawn: Spawner, tmp_path: Path, collected: str
) -> None:
    engine, _, pid = _pc1_running_then_engine_stopped(spawn, tmp_path)
    gate = tmp_path / "gate"
    if collected == "finished":
        (gate / "release").touch()
        until(lambda: len(_runs(gate)) == 2, "PC1 finished with no engine running")
    second = engine.start("--until-proving", name="engine-2")
    second.wait_for_line(r"cluster: worker wa joined from", anywhere=True)
    if collected == "running":
        until(lambda: engine.placed("PC1", "wa"), "PC1 placed again on wa by the new engine")
        assert _alive(int(pid))
        (gate / "release").touch()
    assert second.finish() == 0, second.describe()
    _proving_from_that_pc1(engine, tmp_path, pid)


def test_the_restarted_engine_waits_for_the_worker_that_runs_the_pc1(
    spawn: Spawner, tmp_path: Path
) -> None:
    """Another PC1 worker is up first: the task waits for wa, where its job runs."""
    engine, worker, pid = _pc1_running_then_engine_stopped(spawn, tmp_path)
    os.kill(worker.pid, signal.SIGSTOP)  # wa cannot rejoin yet (its PC1 child runs on)
    try:
        second = engine.start("--until-proving", name="engine-2")
        _worker(spawn, tmp_path, "wa2", WORKER_PC1)
        second.wait_for_line(r"cluster: worker wa2 joined from", anywhere=True)
        why = until(lambda: engine.waiting("PC1", "wa2"), "PC1 waiting, not placed on wa2")
        assert why == "sector is pinned to worker wa"
        assert len(_runs(tmp_path / "gate")) == 1  # nothing started on wa2
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    second.wait_for_line(r"cluster: worker wa joined from", anywhere=True)
    until(lambda: engine.placed("PC1", "wa"), "PC1 placed again on wa by the new engine")
    (tmp_path / "gate" / "release").touch()
    assert second.finish() == 0, second.describe()
    _proving_from_that_pc1(engine, tmp_path, pid)


def test_the_worker_of_an_attempt_is_durable_before_its_job_and_cleared_after(
    tmp_path: Path,
) -> None:
    """What pins a restarted engine's task: on disk before the job exists, gone once it ended."""
    ident: Any = SimpleNamespace(name="w", policy=PolicyReport())
    remote = DaskWorkerBackend(None, "tcp://127.0.0.1:1", ident, "127.0.0.1")  # type: ignore[arg-type]
    job: Any = SimpleNamespace(
        sched_id=1,
        sector=SectorRef(1000, 5, 2048),
        task_type=TaskType.COMMIT2,
        worker=SimpleNamespace(name="w", backend=remote),
    )

    async def main() -> None:
        async with LmdbStore(tmp_path / "repo") as store:

            def where() -> Any:
                with store.read() as txn:
                    return txn.get(b"5/C2@", db=store.db(ATTEMPTS_DB))

            sealer = DaskSealer(RealClock(), 1000)
            sealer.bind(None, store)  # type: ignore[arg-type]
            assert sealer.running_on(5, "C2") is None
            calls: list[Any] = []

            async def call(job_id: int, key: str, func: str, args: list[Any]) -> Any:
                calls.append((key, where(), sealer.running_on(5, "C2")))
                return b"proof"

            async def ack(key: str) -> None:
                pass

            remote.call = call  # type: ignore[method-assign]
            remote.ack = ack  # type: ignore[method-assign]
            await sealer.commit2(job, b"c1")
            assert calls == [("C2-s5-a1", packb("w"), "w")]
            await store.committer.flush()
            assert where() is None and sealer.running_on(5, "C2") is None
            # An engine that died while a job ran left its record: a new one reads it.
            store.write(lambda txn: txn.put(b"5/C2@", packb("w"), db=store.db(ATTEMPTS_DB)))
        async with LmdbStore(tmp_path / "repo") as store:
            again = DaskSealer(RealClock(), 1000)
            again.bind(None, store)  # type: ignore[arg-type]
            assert again.running_on(5, "C2") == "w"
            assert again.attempt(5, "C2") == 2

    asyncio.run(main())


def test_a_clean_stop_of_the_engine_during_pc1_leaves_it_running(
    spawn: Spawner, tmp_path: Path
) -> None:
    """Ctrl-C (or `systemctl restart`): no PC1 failure recorded, the job collected later."""
    engine, _, pid = _pc1_running_then_engine_stopped(spawn, tmp_path, kill=False)
    status = engine.cli("status", "1")
    assert status is not None and status["state"] == "PreCommit1", status
    second = engine.start("--until-proving", name="engine-2")
    second.wait_for_line(r"cluster: worker wa joined from", anywhere=True)
    until(lambda: engine.placed("PC1", "wa"), "PC1 placed again on wa by the new engine")
    (tmp_path / "gate" / "release").touch()
    assert second.finish() == 0, second.describe()
    _proving_from_that_pc1(engine, tmp_path, pid)


def test_the_dask_sealer_keeps_no_local_worker(tmp_path: Path) -> None:
    """A kept local worker would take tasks the dask sealer refuses, after a restart too."""
    config = tmp_path / "sectors.toml"
    config.write_text(_engine_config(8786))
    cluster = load_run_config(config).cluster
    assert cluster is not None and cluster.local_worker is False
    config.write_text(_engine_config(8786) + "local_worker = true\n")
    with pytest.raises(RunConfigError, match=r"\[cluster\] local_worker: the dask sealer runs"):
        load_run_config(config)
    sim = '[miner]\nsealer = "sim"\n[cluster]\nlisten = "tcp://127.0.0.1:8786"\n'
    config.write_text(sim)
    cluster = load_run_config(config).cluster
    assert cluster is not None and cluster.local_worker is True
