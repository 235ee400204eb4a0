"""The `dask` sealer end to end: an engine with an embedded Dask scheduler, two real
`sectors worker` processes on 127.0.0.1, a 2KiB committed-capacity sector from pledge to
Proving. Worker A seals (AP, PC1, PC2, C1, FIN, where the files are, as in Lotus); worker B
proves (C2) and holds the long-term storage path, so the finalized files are fetched to it.
Every process is killed by the `spawn` fixture.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import HANG_GUARD, Spawner, child_env, eventually

from sectorfsm.fsm import LmdbStore, RealClock
from sectorfsm.fsm.codec import packb
from sectorfsm.sched import Job, SectorRef, TaskType
from sectorfsm.sealing.backends import make_backend, sealers
from sectorfsm.sealing.backends.dask import jobs
from sectorfsm.sealing.backends.dask.backend import DaskWorkerBackend
from sectorfsm.sealing.backends.dask.identity import PolicyReport
from sectorfsm.sealing.backends.dask.membership import open_cluster
from sectorfsm.sealing.backends.dask.sealer import ATTEMPTS_DB, DaskSealer
from sectorfsm.sealing.chain import ChainParams
from sectorfsm.sealing.miner import Miner

TESTS = Path(__file__).resolve().parent

WORKER_A = """
name = "wa"
cpus = 4
memory = "8GiB"
tasks = ["AP", "PC1", "PC2", "C1", "FIN"]
threads = 8
state_dir = "jobs"
host = "127.0.0.1"

[[paths]]
id = "a-seal"
path = "seal"
capacity = "1GiB"
"""

WORKER_B = """
name = "wb"
cpus = 4
memory = "8GiB"
tasks = ["C2", "GET"]
threads = 8
state_dir = "jobs"
host = "127.0.0.1"

[[paths]]
id = "b-store"
path = "store"
capacity = "1GiB"
seal = false
store = true
"""


def test_dask_is_a_registered_sealer_that_needs_a_cluster(tmp_path: Path) -> None:
    assert "dask" in sealers()
    for options, message in [
        ({}, "needs a [cluster] table"),
        ({"cluster": False}, "needs a [cluster] table"),
        ({"cluster": True, "speed": 3}, "unknown option(s) for the dask sealer: speed"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            make_backend(
                "dask", clock=RealClock(), miner=1000, repo=tmp_path / "r", options=options
            )
    assert not (tmp_path / "r").exists()


def test_a_sector_seals_on_two_remote_workers_to_proving(spawn: Spawner, tmp_path: Path) -> None:
    boxes = {}
    for name, toml in (("wa", WORKER_A), ("wb", WORKER_B)):
        box = tmp_path / name
        box.mkdir()
        (box / "worker.toml").write_text(toml)
        boxes[name] = box
    ran: list[tuple[str, str]] = []
    said: list[str] = []

    async def main() -> None:
        async with Miner.open(
            tmp_path / "repo",
            sealer="dask",
            sector_size="2KiB",
            chain=ChainParams.devnet(0.1),
            sealer_options={"cluster": True},
        ) as m:
            for w in m.sched.workers():  # the in-process worker cannot run dask jobs
                m.sched.remove_worker(w.name)

            def on_job(job: Job, seconds: float) -> None:
                ran.append((job.task_type.short, job.worker.name))

            m.sched.add_job_listener(on_job)
            async with open_cluster(
                m.sched, listen="tcp://127.0.0.1:0", say=said.append, beat=0.1
            ) as cluster:
                for name, box in boxes.items():
                    spawn.python(
                        *("-m", "sectorfsm", "worker", "--scheduler", cluster.address),
                        *("--config", "worker.toml"),
                        name=name,
                        env=child_env(),
                        cwd=box,
                    )
                members = cluster.membership.members
                await eventually(lambda: len(members) == 2, "both workers joined")
                n = await m.pledge()
                info = await m.wait(n, "Proving", timeout=HANG_GUARD)
                assert info.state == "Proving"
                # Every result was acknowledged once recorded: the workers forget the jobs.
                for backend in list(members.values()):
                    address = backend.address

                    async def left(address: str = address) -> list[Any]:
                        return await jobs.jobs(cluster.client, address)

                    deadline = time.monotonic() + HANG_GUARD
                    while await left():
                        assert time.monotonic() < deadline, await left()
                        await asyncio.sleep(0.05)

    asyncio.run(main())
    where = dict(ran)
    assert where["PC1"] == "wa"
    assert where["C2"] == "wb"
    assert where["GET"] == "wb"  # the finalized files were fetched from wa to wb's store path
    name = "s-t01000-1"
    store = boxes["wb"] / "store"
    assert (store / "sealed" / name).is_file()
    assert (store / "cache" / name / "p_aux").is_file()
    seal = boxes["wa"] / "seal"
    assert not (seal / "sealed" / name).exists()
    assert not (seal / "cache" / name).exists()


class _Remote(DaskWorkerBackend):
    """A remote worker whose jobs answer at once; it records what it was asked."""

    def __init__(self) -> None:
        ident = SimpleNamespace(name="w", policy=PolicyReport())
        super().__init__(None, "tcp://127.0.0.1:1", ident, "127.0.0.1")  # type: ignore[arg-type]
        self.calls: list[str] = []
        self.acked: list[str] = []
        #: What the store holds when each ack is sent (set by the test).
        self.probe: Any = lambda: None
        self.seen: list[Any] = []

    async def call(self, job_id: int, key: str, func: str, args: list[Any]) -> Any:
        self.calls.append(key)
        return b"proof"

    async def ack(self, key: str) -> None:
        self.acked.append(key)
        self.seen.append(self.probe())


def test_results_are_acked_after_their_commit_and_job_ids_count_attempts(tmp_path: Path) -> None:
    remote = _Remote()
    job: Any = SimpleNamespace(
        sched_id=1,
        sector=SectorRef(1000, 5, 2048),
        task_type=TaskType.COMMIT2,
        worker=SimpleNamespace(name="w", backend=remote),
    )

    async def main() -> None:
        async with LmdbStore(tmp_path / "repo") as store:
            sealer = DaskSealer(RealClock(), 1000)
            sealer.bind(None, store)  # type: ignore[arg-type]

            def recorded() -> Any:
                with store.read() as txn:
                    return txn.get(b"5/C2", db=store.db(ATTEMPTS_DB))

            remote.probe = recorded
            assert await sealer.commit2(job, b"c1") == b"proof"
            await eventually(lambda: remote.acked, "the acknowledgement")
            assert remote.acked == ["C2-s5-a1"]
            # Acked only once the commit that ends the attempt (with the event) was durable.
            assert remote.seen == [packb(2)]
            await sealer.commit2(job, b"c1")
            await store.committer.flush()
        async with LmdbStore(tmp_path / "repo") as store:
            again = DaskSealer(RealClock(), 1000)
            again.bind(None, store)  # type: ignore[arg-type]
            await again.commit2(job, b"c1")
        # A restarted engine goes on from the attempts it recorded.
        assert remote.calls == ["C2-s5-a1", "C2-s5-a2", "C2-s5-a3"]

    asyncio.run(main())
