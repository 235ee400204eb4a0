"""A worker's files survive its restart and the engine's (issue 15, items 3 and 4).

* A `sectors worker` reports the sector files under its paths when it joins (names and sizes)
  and the engine reconciles its storage index with them: recorded files found gone are
  dropped and their sector's next task fails naming them; unknown files are counted.
* After an engine restart, files records on a remote worker's paths wait for that worker to
  join, then go back into the index.
* With real processes: a worker killed with kill -9 while the sectors it sealed are proving
  elsewhere (their C2 held on the other worker) comes back under the same name and config;
  it is re-added, the sector whose files it kept finalizes there and reaches Proving with no
  refetch, and the sector whose cache was deleted while it was down fails its finalize with
  a reason that `sectors status` shows. Every process is killed by the `spawn` fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG_GUARD, Spawner, eventually
from test_dask_sealing import WORKER_A, WORKER_B

from sectorfsm.fsm import LmdbStore, RealClock
from sectorfsm.fsm.codec import packb, unpackb
from sectorfsm.sched import FileType, Job, Scheduler, SectorRef, WorkerSpec, space_needed
from sectorfsm.sched.ledger import WorkerResources
from sectorfsm.sched.storage import StoragePath
from sectorfsm.sched.tasks import TaskType
from sectorfsm.sched.views import publish_snapshot
from sectorfsm.sealing.backends.dask.identity import HeldFile, WorkerIdentity
from sectorfsm.sealing.backends.dask.membership import open_cluster
from sectorfsm.sealing.backends.dask.worker import held_files
from sectorfsm.sealing.chain import ChainParams
from sectorfsm.sealing.miner import Miner
from sectorfsm.sealing.sealer import FILES_DB, ScheduledSealer, SectorFilesLost

SIZE = 2048
CACHE, SEALED, UNSEALED = FileType.CACHE, FileType.SEALED, FileType.UNSEALED

# ---------------------------------------------------------------------- the worker's report


def test_a_worker_reports_the_sector_files_under_its_paths(tmp_path: Path) -> None:
    seal = tmp_path / "seal"
    (seal / "sealed").mkdir(parents=True)
    (seal / "sealed" / "s-t01000-3").write_bytes(b"x" * 100)
    (seal / "cache" / "s-t01000-3").mkdir(parents=True)
    (seal / "cache" / "s-t01000-3" / "p_aux").write_bytes(b"y" * 30)
    (seal / "cache" / "s-t01000-3" / "t_aux").write_bytes(b"z" * 12)
    (seal / "sealed" / "s-t01000-4.part").write_bytes(b"half a fetch")  # not a sector file
    (seal / "unsealed").mkdir()
    (seal / "unsealed" / "notes.txt").write_text("nor this")
    held = held_files({"a-seal": seal, "never-written": tmp_path / "empty"})
    assert held == (
        HeldFile("a-seal", "sealed", "s-t01000-3", 100),
        HeldFile("a-seal", "cache", "s-t01000-3", 42),
    )
    wire = {
        "version": 1,
        "name": "wa",
        "resources": {"cpus": 2, "memory": 1 << 30},
        "tasks": [TaskType.PRE_COMMIT1.value],
        "paths": [{"id": "a-seal", "path": str(seal), "capacity": 1 << 30}],
    }
    ident = WorkerIdentity.from_wire(wire)
    ident.files = held
    assert WorkerIdentity.from_wire(ident.to_wire()).files == held
    stray = {**wire, "files": [{"path": "b", "kind": "sealed", "name": "s-t01-1", "size": 1}]}
    with pytest.raises(ValueError, match=r"files: on undeclared path id\(s\) \['b'\]"):
        WorkerIdentity.from_wire(stray)
    bad = {**wire, "files": [{"path": "a-seal", "kind": "tmp", "name": "s-t01-1", "size": 1}]}
    with pytest.raises(ValueError, match="kind"):
        WorkerIdentity.from_wire(bad)


# ---------------------------------------------------------------------- the engine's index


class _Backend:
    """A backend whose tasks the tests never reach (the sealer fails them first)."""

    name = "stub"

    async def release_unsealed(self, sector: SectorRef) -> None:
        """Nothing to delete here."""

    async def commit1(self, job: Job, *args: Any) -> bytes:
        """Commit1's output names the worker it ran on."""
        return job.worker.name.encode()


def _spec(name: str, path_id: str) -> WorkerSpec:
    return WorkerSpec(
        name=name,
        resources=WorkerResources(cpus=4, mem_physical=8 << 30),
        task_types=frozenset(TaskType),
        paths=(StoragePath(path_id, name, 1 << 30),),
    )


def _ref(number: int) -> SectorRef:
    return SectorRef(1000, number, SIZE)


def _records(store: LmdbStore) -> dict[int, Any]:
    with store.read() as txn:
        return {int(k): unpackb(v) for k, v in txn.cursor(db=store.db(FILES_DB))}


def test_records_on_a_remote_path_wait_for_its_worker_then_are_reconciled(
    tmp_path: Path,
) -> None:
    sealing = CACHE | SEALED | UNSEALED
    total = space_needed(sealing, SIZE)

    async def main() -> None:
        async with LmdbStore(tmp_path / "repo") as store:
            # What an engine recorded before it stopped: three sectors on worker wa's path,
            # one on a local path.
            db = store.db(FILES_DB)

            def seed(txn: Any) -> None:
                for n in (1, 2, 3):
                    txn.put(str(n).encode(), packb({"a-seal": [int(sealing), total]}), db=db)
                txn.put(b"4", packb({"local": [int(UNSEALED), SIZE]}), db=db)

            store.write(seed)
            sched = Scheduler(clock=RealClock())
            sched.add_worker(_spec("here", "local"))
            sealer = ScheduledSealer(sched, _Backend(), store)  # type: ignore[arg-type]
            sealer.load(_ref)
            index = sched.index
            assert index.find_sector(_ref(4), UNSEALED) == {"local": UNSEALED}
            assert index.find_sector(_ref(1), sealing) == {}  # wa has not joined yet
            # Persisting a sector meanwhile keeps the part of its record still to be applied.
            await sealer.release_unsealed(_ref(1))
            await store.committer.flush()
            assert _records(store)[1] == {"a-seal": [int(sealing), total]}
            # The sector's next task waits for the files' worker, saying why.
            c1 = asyncio.ensure_future(
                sealer.seal_commit1(_ref(1), b"t", b"s", [], None, False)  # type: ignore[arg-type]
            )
            diag = await eventually(lambda: sched.diag(), "sector one's C1 queued")
            assert diag[0].reasons == {
                "here": "sector s-t01000-1 has no sealed+cache file anywhere yet: recorded on "
                "path(s) a-seal, whose worker has not joined"
            }, diag

            sched.add_worker(_spec("wa", "a-seal"))
            held = [("a-seal", kind, f"s-t01000-{n}", 100) for n in (1, 2) for kind in _KINDS]
            held.remove(("a-seal", "cache", "s-t01000-2", 100))  # gone while wa was down
            held.append(("a-seal", "sealed", "s-t01000-9", 2048))  # never recorded
            held.append(("a-seal", "sealed", "s-t09999-1", 2048))  # another miner's
            sealer.worker_joined("wa", ["a-seal"], held)

            assert index.find_sector(_ref(1), sealing) == {"a-seal": sealing}
            assert await c1 == b"wa"  # placed where the files came back
            assert index.sector_bytes(_ref(1))["a-seal"] == {
                f: space_needed(f, SIZE) for f in sealing.each()
            }
            assert index.find_sector(_ref(2), sealing) == {"a-seal": SEALED | UNSEALED}
            assert index.find_sector(_ref(3), sealing) == {}  # reported nothing at all
            assert index.find_sector(_ref(9), SEALED) == {"a-seal": SEALED}
            assert index.find_sector(SectorRef(9999, 1, SIZE), SEALED) == {}
            # The sector whose cache is gone fails its next task at once, saying why.
            why = "sector s-t01000-2: its cache file on path a-seal of worker wa is gone"
            with pytest.raises(SectorFilesLost, match=f"^{why} \\(not there when wa joined\\)$"):
                await sealer.seal_commit1(_ref(2), b"t", b"s", [], None, False)  # type: ignore[arg-type]
            with pytest.raises(SectorFilesLost, match=why):
                await sealer.finalize_sector(_ref(2), False)
            with pytest.raises(SectorFilesLost, match="s-t01000-3: its unsealed file"):
                await sealer.seal_pre_commit1(_ref(3), b"t", [], False)
            await store.committer.flush()
            records = _records(store)
            assert records[2] == {"a-seal": [int(SEALED | UNSEALED), 2 * SIZE]}
            assert 3 not in records
            assert records[9] == {"a-seal": [int(SEALED), 2048]}

    asyncio.run(main())


_KINDS = ("unsealed", "sealed", "cache")


# ---------------------------------------------------------------------- with real processes

#: Loaded by the workers' interpreters: every C2 job writes `c2-{sector}` in the gate
#: directory, then holds until the test writes `release` there.
HOLD_C2 = """
import os
import time

from sectorfsm.sealing.backends.dask import adapter

_c2 = adapter.commit2


def commit2(miner, number, c1out):
    gate = os.environ["SECTORS_TEST_C2_GATE"]
    open(os.path.join(gate, f"c2-{number}"), "w").close()
    while not os.path.exists(os.path.join(gate, "release")):
        time.sleep(0.02)
    return _c2(miner, number, c1out)


adapter.commit2 = commit2
"""


def _env(hooks: Path, gate: Path) -> dict[str, str]:
    env = dict(os.environ)
    path = [str(hooks), str(Path(__file__).resolve().parent), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    env["SECTORS_TEST_C2_GATE"] = str(gate)
    return env


def _cli(spawn: Spawner, repo: Path, *args: str) -> str:
    env = {**os.environ, "SECTORFSM_REPO": str(repo), "COLUMNS": "200"}
    proc = spawn.run([sys.executable, "-m", "sectorfsm", *args], env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_worker_restarted_after_kill_9_keeps_its_files_and_misses_the_deleted_one(
    spawn: Spawner, tmp_path: Path
) -> None:
    gate, hooks = tmp_path / "gate", tmp_path / "hooks"
    gate.mkdir()
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOLD_C2)
    boxes: dict[str, Path] = {}
    for name, toml in (("wa", WORKER_A), ("wb", WORKER_B)):
        boxes[name] = tmp_path / name
        boxes[name].mkdir()
        (boxes[name] / "worker.toml").write_text(toml)
    repo = tmp_path / "repo"
    ran: list[tuple[str, str, int]] = []
    said: list[str] = []
    seen: dict[str, Any] = {}

    async def main() -> None:
        async with Miner.open(
            repo,
            sealer="dask",
            sector_size="2KiB",
            chain=ChainParams.devnet(0.1),
            sealer_options={"cluster": True},
            config={"retry": {"base": 0.5, "cap": 2.0}},
        ) as m:
            for w in m.sched.workers():  # the in-process worker cannot run dask jobs
                m.sched.remove_worker(w.name)

            def on_job(job: Job, seconds: float) -> None:
                ran.append((job.task_type.short, job.worker.name, job.sector.number))

            m.sched.add_job_listener(on_job)
            async with open_cluster(
                m.sched,
                listen="tcp://127.0.0.1:0",
                say=said.append,
                beat=0.1,
                on_join=m.sealer.worker_joined,
            ) as cluster:

                def start(name: str) -> Any:
                    return spawn.python(
                        *("-m", "sectorfsm", "worker", "--scheduler", cluster.address),
                        *("--config", "worker.toml"),
                        name=name,
                        env=_env(hooks, gate),
                        cwd=boxes[name],
                    )

                wa = start("wa")
                start("wb")
                members = cluster.membership.members
                await eventually(lambda: len(members) == 2, "both workers joined")
                first, gone = next((a, b) for a, b in members.items() if b.name == "wa")
                one, two = await m.pledge(), await m.pledge()
                await eventually(
                    lambda: (gate / f"c2-{one}").exists() and (gate / f"c2-{two}").exists(),
                    "both sectors' C2 held on wb",
                )
                # Both sectors' sealed files and caches are on wa: kill it, whole group.
                wa.kill_group()
                await eventually(lambda: f"worker wa left ({first})" in said, "wa left")
                files = boxes["wa"] / "seal"
                assert (files / "sealed" / f"s-t01000-{one}").is_file()
                for kind in ("cache", "sealed", "unsealed"):  # on disk when wa comes back
                    assert (files / kind / f"s-t01000-{two}").exists()
                # While it is down, sector two's cache is deleted.
                shutil.rmtree(files / "cache" / f"s-t01000-{two}")
                start("wa")
                await eventually(
                    lambda: sum(line.startswith("worker wa joined") for line in said) == 2,
                    "wa joined again",
                )
                again, back = next((a, b) for a, b in members.items() if b.name == "wa")
                seen["new member"] = back is not gone
                index = m.sched.index
                sealed = CACHE | SEALED
                assert index.holders(_ref(one), sealed) == {"wa"}  # its files recognised
                assert index.find_sector(_ref(two), CACHE) == {}  # the deleted one dropped
                publish_snapshot(
                    m.store, {**m.sched.snapshot(), "cluster": cluster.membership.snapshot()}
                )
                await m.store.committer.flush()
                shown = await asyncio.to_thread(_cli, spawn, repo, "workers", "--json")
                (row,) = [w for w in json.loads(shown)["workers"] if w["name"] == "wa"]
                seen["addresses"] = (first, again, row["remote"]["address"])
                (gate / "release").write_text("go")
                await m.wait(one, "Proving", timeout=HANG_GUARD)

                def finalize_failed() -> Any:
                    log = m.status(two).log
                    return next((e for e in log if e.kind == "event;SectorFinalizeFailed"), None)

                event = await eventually(finalize_failed, "sector two's finalize failed")
                seen["why"] = event.trace
                seen["status"] = await asyncio.to_thread(
                    _cli, spawn, repo, "status", str(two), "--json"
                )

    asyncio.run(main())
    first, again, shown = seen["addresses"]
    # Re-added as a new member, at its current address (the kernel may hand the new
    # process the port the killed one had, so the address alone cannot tell).
    assert seen["new member"] and shown == again, (first, again, shown)
    # Sector one went on where its files are: FIN on wa, then the one move to wb's store.
    assert ("FIN", "wa", 1) in ran
    assert [w for task, w, n in ran if n == 1 and task == "GET"] == ["wb"]
    assert (boxes["wb"] / "store" / "sealed" / "s-t01000-1").is_file()
    why = "sector s-t01000-2: its cache file on path a-seal of worker wa is gone"
    assert seen["why"] == f"finalize sector: {why} (not there when wa joined)", seen["why"]
    assert why in seen["status"]


def test_after_an_engine_restart_a_sectors_files_wait_for_their_worker(
    spawn: Spawner, tmp_path: Path
) -> None:
    gate, hooks = tmp_path / "gate", tmp_path / "hooks"
    gate.mkdir()
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOLD_C2)
    boxes: dict[str, Path] = {}
    for name, toml in (("wa", WORKER_A), ("wb", WORKER_B)):
        boxes[name] = tmp_path / name
        boxes[name].mkdir()
        (boxes[name] / "worker.toml").write_text(toml)
    repo = tmp_path / "repo"
    ran: list[tuple[str, str, int]] = []
    seen: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def engine() -> Any:
        async with Miner.open(
            repo,
            sealer="dask",
            sector_size="2KiB",
            chain=ChainParams.devnet(0.1),
            sealer_options={"cluster": True},
            config={"retry": {"base": 0.5, "cap": 2.0}},
        ) as m:
            for w in m.sched.workers():  # the in-process worker cannot run dask jobs
                m.sched.remove_worker(w.name)
            m.sched.add_job_listener(
                lambda job, s: ran.append((job.task_type.short, job.worker.name, job.sector.number))
            )
            said: list[str] = []
            async with open_cluster(
                m.sched,
                listen="tcp://127.0.0.1:0",
                say=said.append,
                beat=0.1,
                on_join=m.sealer.worker_joined,
            ) as cluster:

                def start(name: str) -> Any:
                    return spawn.python(
                        *("-m", "sectorfsm", "worker", "--scheduler", cluster.address),
                        *("--config", "worker.toml"),
                        name=name,
                        env=_env(hooks, gate),
                        cwd=boxes[name],
                    )

                yield m, start, said

    async def main() -> None:
        async with engine() as (m, start, said):
            workers = [start("wa"), start("wb")]
            await eventually(lambda: len(m.sched.workers()) == 2, "both workers joined")
            n = await m.pledge()
            await eventually(lambda: (gate / f"c2-{n}").exists(), "C2 held on wb")
            for child in workers:  # the whole cluster goes down with the engine
                child.kill_group()
            await eventually(lambda: not m.sched.workers(), "both workers left")
        seen["sector"] = n
        (gate / "release").write_text("go")
        del ran[:]
        async with engine() as (m, start, said):
            index = m.sched.index
            assert "a-seal" not in index.paths and index.find_sector(_ref(n), CACHE) == {}
            start("wa")
            await eventually(lambda: "wa" in index.holders(_ref(n), CACHE | SEALED), "files back")
            assert index.find_sector(_ref(n), CACHE | SEALED | UNSEALED) == {
                "a-seal": CACHE | SEALED | UNSEALED
            }
            start("wb")
            await m.wait(n, "Proving", timeout=HANG_GUARD)
            seen["said"] = list(said)

    asyncio.run(main())
    n = seen["sector"]
    assert ("FIN", "wa", n) in ran  # finalized where its files are, after the restart
    assert [w for task, w, s in ran if s == n and task == "GET"] == ["wb"]  # only to the store
    assert (boxes["wb"] / "store" / "sealed" / f"s-t01000-{n}").is_file()
