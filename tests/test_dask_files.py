"""Sector and piece files of the `dask` sealer: fetch progress in `sectors jobs`, a lost CC
unsealed file rebuilt sparse (and a deal sector's refused), deal piece data sent to the worker.

In-process: a Dask scheduler and workers on 127.0.0.1 with their own storage roots (the
bytes cross real TCP connections), the engine's `Scheduler`, and the real `DaskSealer`. The
sealing jobs of `LocalJobs` run the worker-side adapter in this process, on the worker's
roots, so each test sees exactly which files a job was given.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import HANG_GUARD, Spawner, child_env, eventually
from distributed import Client
from test_dask_transfer import DEADLINE, MiB, blob, cluster
from typer.testing import CliRunner

from sectorfsm.cli.app import app
from sectorfsm.fsm import LmdbStore, RealClock
from sectorfsm.fsm.codec import packb
from sectorfsm.sched import FileType, Scheduler, SectorRef, StoragePath, TaskType
from sectorfsm.sched.fetch import fetch_prepare
from sectorfsm.sched.ledger import WorkerResources
from sectorfsm.sched.views import SNAPSHOT_KEY, job_snapshots
from sectorfsm.sealing import commp
from sectorfsm.sealing.backends.dask import adapter
from sectorfsm.sealing.backends.dask.backend import DaskWorkerBackend
from sectorfsm.sealing.backends.dask.identity import WorkerIdentity, WorkerPathInfo
from sectorfsm.sealing.backends.dask.membership import open_cluster
from sectorfsm.sealing.backends.dask.progress import TransferBoard
from sectorfsm.sealing.backends.dask.sealer import DaskSealer, DaskSealerError
from sectorfsm.sealing.backends.dask.transfer import fetch_here
from sectorfsm.sealing.chain import ChainParams
from sectorfsm.sealing.info import DealInfo, PendingPiece, Piece
from sectorfsm.sealing.miner import Miner
from sectorfsm.sealing.store_view import store_path

GIB = 1 << 30
TESTS = Path(__file__).resolve().parent


def identity(name: str, paths: dict[str, Path]) -> WorkerIdentity:
    """A worker identity whose storage paths are `paths` (id -> its directory)."""
    return WorkerIdentity(
        name=name,
        resources=WorkerResources(cpus=4, mem_physical=8 * GIB),
        tasks=frozenset(TaskType),
        paths=tuple(WorkerPathInfo(pid, str(d), GIB) for pid, d in paths.items()),
    )


class LocalJobs(DaskWorkerBackend):
    """A worker backend whose sealing jobs run the adapter here (PC1 is faked: its inputs
    are what the tests look at); it records each job's function and arguments."""

    def __init__(self, client: Any, address: str, ident: WorkerIdentity) -> None:
        super().__init__(client, address, ident, "127.0.0.1")
        self.calls: list[tuple[str, str, list[Any]]] = []
        #: What each job's data file held when the job ran (AddPiece's last argument).
        self.data_seen: list[bytes | None] = []

    async def call(self, job_id: int, key: str, func: str, args: list[Any]) -> Any:
        """Run `func(*args)` in a thread (PC1: return a stand-in output)."""
        self.calls.append((key, func, args))
        module, _, name = func.partition(":")
        fn = getattr(importlib.import_module(module), name)
        if fn is adapter.pre_commit1:
            return b"pc1-out"
        if fn is adapter.add_piece:
            data = args[-1]
            self.data_seen.append(None if data is None else Path(data).read_bytes())  # noqa: ASYNC240
        return await asyncio.to_thread(fn, *args)

    async def ack(self, key: str) -> None:
        """Nothing to forget: the job ran here."""


@pytest.fixture
def worker_paths(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """The path id -> directory map the adapter resolves against (filled by the test)."""
    roots: dict[str, Path] = {}
    real = adapter.roots
    monkeypatch.setattr(adapter, "roots", lambda: dict(roots) or real())
    yield roots


def _job(sched: Scheduler, worker: str, task: TaskType, sector: SectorRef, path: str) -> Any:
    return SimpleNamespace(
        sched_id=11,
        sector=sector,
        task_type=task,
        worker=sched.worker(worker),
        placement=SimpleNamespace(path=path, fetch_bytes=sector.size),
        phase=SimpleNamespace(value="preparing"),
        started_at=time.time() - 3,
    )


def _repo_with(tmp: Path, snapshot: dict[str, Any]) -> Path:
    repo = tmp / "repo"
    store = LmdbStore(store_path(repo))
    try:
        store.write(lambda txn: txn.put(SNAPSHOT_KEY, packb(snapshot), db=store.db("meta")))
    finally:
        store.close()
    return repo


# ------------------------------------------------------------------------- 1. fetch progress


def test_a_fetch_between_workers_shows_its_progress_in_sectors_jobs(tmp_path: Path) -> None:
    size, chunk = 16 * MiB, MiB

    async def body() -> None:
        async with cluster(tmp_path) as env:
            src = blob(env.src_root / "sealed" / "s-t01000-1", size)
            dest = env.dst_root / "sealed" / "s-t01000-1"
            env.server.gate_from = 6 * MiB  # the source holds the transfer mid-way
            async with Client(env.scheduler.address, asynchronous=True) as c:
                backend = DaskWorkerBackend(
                    c, env.dst.address, identity("dst", {"d": env.dst_root}), "10.0.0.9"
                )
                sched = Scheduler()
                sched.add_worker(backend.identity.to_spec(), backend)
                assert backend.transfer(11) is None  # no board, nothing running
                TransferBoard.of(c)
                # As the sealer submits it: pinned to the destination, tagged with the job.
                fut = c.submit(
                    partial(fetch_here, job=backend.job_key(11)),
                    env.src.address,
                    str(src),
                    str(dest),
                    chunk=chunk,
                    workers=[env.dst.address],
                    allow_other_workers=False,
                    pure=False,
                )

                def midway() -> dict[str, Any] | None:
                    t = backend.transfer(11)
                    return t if t is not None and 0 < t["done"] < t["total"] else None

                seen = await eventually(midway, "a progress report between 0 and the total")
                # The last report before the source stopped always reaches the engine.
                await eventually(
                    lambda: (backend.transfer(11) or {}).get("done") == 6 * MiB, "6 MiB done"
                )
                assert seen["total"] == size
                now = backend.transfer(11)
                assert now is not None and now["rate"] > 0
                held = _job(sched, "dst", TaskType.COMMIT2, SectorRef(1000, 1, 2048), "d")
                (snap,) = job_snapshots([held], [], time.time())
                assert snap.transfer == now and snap.host == "10.0.0.9"
                repo = _repo_with(
                    tmp_path, {"at": time.time(), "workers": [], "jobs": [snap.to_dict()]}
                )
                env.server.gate.set()
                got = await asyncio.wait_for(fut, DEADLINE)
                assert got["size"] == size
                await eventually(lambda: backend.transfer(11) is None, "the transfer's end")
        runner = CliRunner()
        shown = runner.invoke(app, ["jobs", "--repo", str(repo)], env={"COLUMNS": "200"})
        assert shown.exit_code == 0, shown.output
        row = next(line for line in shown.output.splitlines() if "s-t01000-1" in line)
        assert "preparing 6.0MiB/16.0MiB 37% " in row and row.split()[-2].endswith("/s")
        data = json.loads(runner.invoke(app, ["jobs", "--json", "--repo", str(repo)]).output)
        assert data["jobs"][0]["transfer"]["done"] == 6 * MiB
        assert data["jobs"][0]["transfer"]["total"] == size

    asyncio.run(body())


# -------------------------------------------------------- 3. a lost unsealed file, rebuilt


def _lost_unsealed_setup(tmp_path: Path, size: int) -> tuple[Scheduler, LocalJobs, SectorRef, Path]:
    """Worker `wb` (path `b-seal`) connected; `wa` (path `a-seal`) holds the unsealed file
    of sector 1 but is not in the cluster."""
    sched = Scheduler()
    root = tmp_path / "wb-seal"
    remote = LocalJobs(None, "tcp://127.0.0.1:1", identity("wb", {"b-seal": root}))
    sched.add_worker(remote.identity.to_spec(), remote)
    sched.index.declare(StoragePath("a-seal", "wa", GIB))
    sector = SectorRef(1000, 1, size)
    sched.index.add_sector(sector, FileType.UNSEALED, "a-seal", {FileType.UNSEALED: size})
    return sched, remote, sector, root


def test_a_lost_cc_unsealed_file_is_rebuilt_sparse_on_the_new_worker(
    tmp_path: Path, worker_paths: dict[str, Path]
) -> None:
    size = 64 * MiB
    half = size // 2
    sched, remote, sector, root = _lost_unsealed_setup(tmp_path, size)
    worker_paths["b-seal"] = root
    fillers = [Piece(commp.zero_piece_cid(half), half), Piece(commp.zero_piece_cid(half), half)]
    # An older copy of the file on the new worker (an attempt that failed there), all data.
    blob(root / "unsealed" / str(sector), size)

    async def body() -> None:
        async with LmdbStore(tmp_path / "repo") as store:
            sealer = DaskSealer(RealClock(), 1000)
            sealer.bind(sched, store)
            job = _job(sched, "wb", TaskType.PRE_COMMIT1, sector, "b-seal")
            await fetch_prepare(sched, FileType.UNSEALED, sealer.fetcher(FileType.UNSEALED))(job)
            assert await sealer.pre_commit1(job, b"t" * 32, fillers) == b"pc1-out"

    asyncio.run(body())
    unsealed = root / "unsealed" / str(sector)
    st = unsealed.stat()
    assert st.st_size == size
    assert st.st_blocks * 512 <= 64 * 1024, f"{st.st_blocks * 512} bytes allocated"
    with open(unsealed, "rb") as f:
        assert all(block.count(0) == len(block) for block in iter(lambda: f.read(4 * MiB), b""))
    rebuilt = [(func, args) for key, func, args in remote.calls if "rebuild" in key]
    assert rebuilt[0] == ("sectorfsm.sealing.backends.dask.adapter:remove", [[rebuilt[1][1][0]]])
    assert [a[2:] for _, a in rebuilt[1:]] == [[0, half, None], [half, half, None]]
    assert remote.calls[-1][0] == "PC1-s1-a1"
    assert sched.index.find_sector(sector, FileType.UNSEALED) == {"b-seal": FileType.UNSEALED}


def test_a_lost_deal_unsealed_file_fails_clearly_and_the_index_keeps_pointing_at_it(
    tmp_path: Path, worker_paths: dict[str, Path]
) -> None:
    sched, remote, sector, root = _lost_unsealed_setup(tmp_path, 2048)
    worker_paths["b-seal"] = root
    before = sched.index.sector_bytes(sector)
    pieces = [
        Piece(commp.zero_piece_cid(1024), 1024, DealInfo(7)),
        Piece(commp.zero_piece_cid(1024), 1024),
    ]

    async def body() -> None:
        async with LmdbStore(tmp_path / "repo") as store:
            sealer = DaskSealer(RealClock(), 1000)
            sealer.bind(sched, store)
            job = _job(sched, "wb", TaskType.PRE_COMMIT1, sector, "b-seal")
            await fetch_prepare(sched, FileType.UNSEALED, sealer.fetcher(FileType.UNSEALED))(job)
            with pytest.raises(DaskSealerError) as err:
                await sealer.pre_commit1(job, b"t" * 32, pieces)
            assert str(err.value) == (
                f"sector {sector}: its unsealed file, with deal data, is on worker wa, "
                "which left the cluster"
            )

    asyncio.run(body())
    assert remote.calls == []  # nothing ran: no filler written over where deal data belongs
    assert not (root / "unsealed").exists()
    assert sched.index.find_sector(sector, FileType.UNSEALED) == {"a-seal": FileType.UNSEALED}
    assert sched.index.sector_bytes(sector) == before


# ------------------------------------------------------- 4. deal data sent to AddPiece's worker


def _piece_file(path: Path, data: bytes) -> tuple[str, int]:
    """Write a client's data file; its CommP and padded size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    unpadded = 127
    while unpadded < len(data):
        unpadded *= 2
    return commp.piece_cid(path), commp.padded_size(unpadded)


def test_a_deal_piece_reaches_addpiece_on_a_remote_worker_without_a_shared_path(
    tmp_path: Path, worker_paths: dict[str, Path]
) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as env:
            worker_paths["d-seal"] = env.dst_root
            # The engine's data file: the worker is given only its own copy of it.
            data = os.urandom(3 * MiB + 123)
            engine_file = tmp_path / "engine" / "deal.car"
            cid, size = _piece_file(engine_file, data)
            sector = SectorRef(1000, 3, 8 * MiB)
            async with (
                Client(env.scheduler.address, asynchronous=True) as c,
                LmdbStore(tmp_path / "repo") as store,
            ):
                remote = LocalJobs(c, env.dst.address, identity("dst", {"d-seal": env.dst_root}))
                sched = Scheduler()
                sched.add_worker(remote.identity.to_spec(), remote)
                sealer = DaskSealer(RealClock(), 1000)
                sealer.bind(sched, store)
                job = _job(sched, "dst", TaskType.ADD_PIECE, sector, "d-seal")
                piece = PendingPiece(cid, size, DealInfo(5), str(engine_file))
                got = await sealer.add_piece(job, [], size, piece)
                assert got == Piece(cid, size, DealInfo(5))
                ((key, func, args),) = remote.calls
                staged = args[-1]
                assert key == "AP-s3-a1" and func.endswith(":add_piece")
                assert staged == f"{env.dst_root}/pieces/{sector}-{cid}"
                assert remote.data_seen == [data]  # the worker's copy, whole, when AP ran
                assert not os.path.lexists(staged)  # noqa: ASYNC240 (and deleted after)
                assert sorted(p.name for p in (env.dst_root / "pieces").iterdir()) == []
                # A missing data file: one clear error, nothing run on the worker.
                gone = PendingPiece(cid, size, DealInfo(6), str(tmp_path / "engine" / "gone"))
                with pytest.raises(DaskSealerError, match="gone does not exist"):
                    await sealer.add_piece(job, [size], size, gone)
                assert len(remote.calls) == 1

    asyncio.run(body())


DEAL_WORKER = """
name = "wa"
cpus = 4
memory = "8GiB"
tasks = ["AP", "PC1", "PC2", "C1", "C2", "FIN"]
threads = 8
state_dir = "jobs"
host = "127.0.0.1"

[[paths]]
id = "a-seal"
path = "seal"
capacity = "1GiB"
store = true
"""


def test_a_deal_sector_seals_on_a_sectors_worker_from_data_only_the_engine_has(
    spawn: Spawner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = tmp_path / "wa"
    box.mkdir()
    (box / "worker.toml").write_text(DEAL_WORKER)
    first, second = os.urandom(1000), os.urandom(1010)
    # The data files are named relative to the engine's working directory: the worker, which
    # runs in another one, could not open them by those names (as on another machine).
    monkeypatch.chdir(tmp_path)
    engine = Path("engine-data")

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
            async with open_cluster(m.sched, listen="tcp://127.0.0.1:0", beat=0.1) as cluster:
                spawn.python(
                    *("-m", "sectorfsm", "worker", "--scheduler", cluster.address),
                    *("--config", "worker.toml"),
                    name="wa",
                    env=child_env(),
                    cwd=box,
                )
                members = cluster.membership.members
                await eventually(lambda: len(members) == 1, "the worker joined")
                cid1, size1 = _piece_file(engine / "a.car", first)
                cid2, size2 = _piece_file(engine / "b.car", second)
                n = await m.add_piece(cid1, size1, data_path=str(engine / "a.car"))
                assert await m.add_piece(cid2, size2, data_path=str(engine / "b.car")) == n
                info = await m.wait(n, "Proving", timeout=HANG_GUARD)
                assert [(p.piece_cid, p.size) for p in info.pieces] == [
                    (cid1, 1024),
                    (cid2, 1024),
                ]

    asyncio.run(main())
    # The copies the worker read went through its own path, and are gone.
    assert (box / "seal" / "pieces").is_dir()
    assert list((box / "seal" / "pieces").iterdir()) == []
