"""Faults survived by the `dask` sealer, with real `sectors worker` processes (issue 15, item 4).

kill -9 of a worker during PreCommit1: two workers can seal (wa, wa2), a third proves and
stores (wb). The first PC1 to start, wherever it runs, blocks in its job child (a
`sitecustomize` on the workers' PYTHONPATH holds it) until the test kills that worker's whole
process group; the job must fail at once, the warm spawner's child die with its worker, and
the sector retry PC1 on the other sealing worker and reach Proving. Every process is killed
by the `spawn` fixture.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from conftest import HANG_GUARD, Spawner, eventually
from test_dask_sealing import WORKER_A, WORKER_B

from sectorfsm.sched import Job
from sectorfsm.sealing.backends.dask import jobs
from sectorfsm.sealing.backends.dask.membership import open_cluster
from sectorfsm.sealing.chain import ChainParams
from sectorfsm.sealing.miner import Miner

#: Loaded by every interpreter of the workers (worker, spawner, job child): the first PC1
#: of the cluster writes `hung` (its pid and worker) and blocks until its process is killed.
HOLD_FIRST_PC1 = """
import os
import threading

from sectorfsm.sealing.backends.dask import adapter

_pc1 = adapter.pre_commit1


def pre_commit1(*args, **kwargs):
    marker = os.path.join(os.environ["SECTORS_TEST_PC1_GATE"], "hung")
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return _pc1(*args, **kwargs)
    os.write(fd, f"{os.getpid()} {os.environ['SECTORS_TEST_WORKER']}".encode())
    os.close(fd)
    threading.Event().wait()


adapter.pre_commit1 = pre_commit1
"""


def _env(hooks: Path, gate: Path, name: str) -> dict[str, str]:
    """The worker's environment: our tests and the PC1 hold on its path, the gate, its name."""
    env = dict(os.environ)
    path = [str(hooks), str(Path(__file__).resolve().parent), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    env["SECTORS_TEST_PC1_GATE"] = str(gate)
    env["SECTORS_TEST_WORKER"] = name
    return env


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_kill_9_of_a_worker_during_pc1_retries_it_on_another_worker(
    spawn: Spawner, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOLD_FIRST_PC1)
    boxes: dict[str, Path] = {}
    for name, toml in (
        ("wa", WORKER_A),
        ("wa2", WORKER_A.replace('"wa"', '"wa2"').replace('"a-seal"', '"a2-seal"')),
        ("wb", WORKER_B),
    ):
        box = tmp_path / name
        box.mkdir()
        (box / "worker.toml").write_text(toml)
        boxes[name] = box
    ran: list[tuple[str, str]] = []
    said: list[str] = []
    hung: dict[str, Any] = {}

    async def main() -> None:
        async with Miner.open(
            tmp_path / "repo",
            sealer="dask",
            sector_size="2KiB",
            chain=ChainParams.devnet(0.1),
            sealer_options={"cluster": True},
            config={"retry": {"base": 0.5, "cap": 2.0}},  # retry soon after the failure
        ) as m:
            for w in m.sched.workers():  # the in-process worker cannot run dask jobs
                m.sched.remove_worker(w.name)

            def on_job(job: Job, seconds: float) -> None:
                ran.append((job.task_type.short, job.worker.name))

            m.sched.add_job_listener(on_job)
            async with open_cluster(
                m.sched, listen="tcp://127.0.0.1:0", say=said.append, beat=0.1
            ) as cluster:
                children = {}
                for name, box in boxes.items():
                    children[name] = spawn.python(
                        *("-m", "sectorfsm", "worker", "--scheduler", cluster.address),
                        *("--config", "worker.toml"),
                        name=name,
                        env=_env(hooks, gate, name),
                        cwd=box,
                    )
                members = cluster.membership.members
                await eventually(lambda: len(members) == 3, "the three workers joined")
                n = await m.pledge()
                marker = gate / "hung"
                await eventually(lambda: marker.exists() and marker.read_text(), "PC1 started")
                pid_text, victim = marker.read_text().split()
                pid = int(pid_text)
                address = next(a for a, b in members.items() if b.name == victim)

                # The worker's own registry shows the PC1 job running in that child. AP ran
                # in the same warm child; its record goes when its ack arrives (acks ride
                # with the next job or follow within 0.2 s), so wait for that first.
                async def settled() -> list[Any] | None:
                    found = await jobs.jobs(cluster.client, address)
                    return found if all(r.job_id.startswith("PC1-") for r in found) else None

                records = await eventually(settled, "the AP job's record acknowledged")
                assert [(r.job_id, r.pid, r.state.value) for r in records] == [
                    (f"PC1-s{n}-a1", pid, "running")
                ]
                assert _alive(pid)
                held = m.sched.worker(victim)
                assert list(held.ledger.entries)
                killed = time.monotonic()
                children[victim].kill_group()
                await eventually(lambda: not held.ledger.entries, "the ledger released")
                hung["released_s"] = time.monotonic() - killed
                await eventually(lambda: not _alive(pid), "the PC1 child died with its worker")
                await eventually(
                    lambda: f"worker {victim} left ({address})" in said, "the worker left"
                )
                info = await m.wait(n, "Proving", timeout=HANG_GUARD)
                assert n == 1
                hung["victim"] = victim
                hung["log"] = [(e.kind, e.trace) for e in info.log]

    asyncio.run(main())
    victim = hung["victim"]
    other = "wa2" if victim == "wa" else "wa"
    pc1 = [worker for task, worker in ran if task == "PC1"]
    assert pc1 == [victim, other]  # failed where it was killed, then done on the other worker
    assert hung["released_s"] < 5.0  # the job failed within seconds of the kill
    kinds = [kind for kind, _ in hung["log"]]
    failed = kinds.index("event;SectorSealPreCommit1Failed")
    assert "event;SectorRetrySealPreCommit1" in kinds[failed:]
    why = hung["log"][failed][1]
    # Whichever came first, Dask's KilledWorker or membership's leave, the worker is named.
    assert why.startswith(f"seal pre commit(1) failed: worker {victim} "), why
    assert (boxes["wb"] / "store" / "sealed" / "s-t01000-1").is_file()
