"""Storage accounting: finalize gives back sealing space, bytes follow moves, the disk wins.

Lotus counts a sealing sector at `FSOverheadSeal` (sealed + 14.1x cache) and a finalized one
at `FsOverheadFinalized` (sealed + 0.1x cache, plus unsealed where kept):
`extern/sector-storage/storiface/filetype.go@v1.11.3`.
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import pytest
from sealtools import miner, run

from sectorfsm.sched import (
    AllocSelector,
    FileType,
    Job,
    Scheduler,
    SectorRef,
    StorageIndex,
    StoragePath,
    TaskType,
    WorkerResources,
    WorkerSpec,
    fetch_prepare,
    space_needed,
)
from sectorfsm.sealing.miner import Miner

MIB = 1 << 20
SIZE = 8 * MIB
DAY = 86400.0
SEALED = FileType.SEALED
CACHE = FileType.CACHE
UNSEALED = FileType.UNSEALED
#: What Lotus keeps of a finalized CC sector: the sealed file and the small cache.
FINALIZED = space_needed(SEALED | CACHE, SIZE, finalized=True)
RES = WorkerResources(cpus=64, mem_physical=1 << 40, gpus=("gpu",))


def _worker(name: str, capacity: int, **kw: Any) -> WorkerSpec:
    path = StoragePath(f"{name}-path", name, capacity, can_seal=True, can_store=True)
    return WorkerSpec(name, RES, paths=(path,), needs_heartbeats=False, **kw)


def _path(m: Miner) -> StoragePath:
    [path] = m.sched.index.paths.values()
    return path


def test_index_counts_finalized_sectors_at_lotus_finalized_size() -> None:
    index = StorageIndex()
    index.declare(StoragePath("p", "w", 1 << 40))
    s = SectorRef(1000, 1, SIZE)
    index.add_sector(s, UNSEALED | SEALED | CACHE, "p")
    assert index.paths["p"].stored == space_needed(UNSEALED | SEALED | CACHE, SIZE)
    index.finalize_sector(s, CACHE)  # the unsealed copy kept: 8 + 8 + 0.8 MiB
    assert index.paths["p"].stored == SIZE + FINALIZED
    index.remove_sector(s, UNSEALED)
    assert index.paths["p"].stored == FINALIZED
    index.remove_sector(s, SEALED | CACHE)
    assert index.paths["p"].stored == 0


def test_proving_sectors_give_back_their_sealing_space_on_a_small_disk(tmp_path: Path) -> None:
    # Room for one sector while it seals (8 + 120.8 MiB) and a few finalized ones (8.8 MiB),
    # not for two sealing ones. Counting Proving sectors at sealing size stalled the second
    # PC1 with "no sealing path with 120.8 MiB free" although the disk had room.
    capacity = space_needed(UNSEALED | SEALED | CACHE, SIZE) + 4 * FINALIZED

    async def body() -> None:
        async with miner(
            tmp_path, sector_size="8MiB", workers=[_worker("w", capacity)], sim_time_scale=0.01
        ) as m:
            for _ in range(3):
                n = await m.pledge()
                await m.wait(n, "Proving", timeout=DAY)
                await m.idle()
            path = _path(m)
            assert path.stored == 3 * FINALIZED
            assert path.reserved == 0
            await m.remove(1)
            await m.wait(1, "Removed", timeout=DAY)
            assert path.stored == 2 * FINALIZED
        # A restart restores the finalized sizes, not the sealing ones.
        async with miner(tmp_path, sector_size="8MiB", workers=[_worker("w", capacity)]) as m:
            assert _path(m).stored == 2 * FINALIZED

    run(body)


def _sched_with(*specs: WorkerSpec) -> Scheduler:
    sched = Scheduler()
    for sp in specs:
        sched.add_worker(sp)
    return sched


def test_fetched_files_take_their_bytes_along_and_end_the_reservation() -> None:
    async def main() -> None:
        sched = _sched_with(
            _worker("a", 1 << 40, task_types=frozenset({TaskType.ADD_PIECE})),
            _worker("b", 1 << 40, task_types=frozenset({TaskType.PRE_COMMIT1})),
        )
        s = SectorRef(1000, 1, SIZE)
        sched.index.add_sector(s, UNSEALED, "a-path")
        seen: dict[str, int] = {}

        async def work(job: Job) -> None:
            # Fetched and counted as stored on b: no longer reserved there as well.
            seen["stored"] = sched.index.paths["b-path"].stored
            seen["reserved"] = sched.index.paths["b-path"].reserved

        sel = AllocSelector(CACHE | SEALED, fetch=UNSEALED)
        await sched.schedule(s, TaskType.PRE_COMMIT1, sel, fetch_prepare(sched, UNSEALED), work)
        assert sched.index.paths["a-path"].stored == 0
        assert seen == {"stored": SIZE, "reserved": space_needed(CACHE | SEALED, SIZE)}
        assert sched.index.paths["b-path"].reserved == 0

    run(main)


def test_failed_and_cancelled_tasks_give_back_their_reservation() -> None:
    async def main() -> None:
        sched = _sched_with(_worker("a", 1 << 40))
        started = asyncio.Event()

        async def boom(job: Job) -> None:
            raise RuntimeError("boom")

        async def block(job: Job) -> None:
            started.set()
            await asyncio.Event().wait()

        sel = AllocSelector(CACHE | SEALED)
        pc1 = TaskType.PRE_COMMIT1
        with pytest.raises(RuntimeError, match="boom"):
            await sched.schedule(SectorRef(1000, 1, SIZE), pc1, sel, None, boom)
        assert sched.index.paths["a-path"].reserved == 0
        task = asyncio.ensure_future(
            sched.schedule(SectorRef(1000, 2, SIZE), pc1, sel, None, block)
        )
        await started.wait()
        assert sched.index.paths["a-path"].reserved == space_needed(CACHE | SEALED, SIZE)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert sched.index.paths["a-path"].reserved == 0

    run(main)


def _apparent(root: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(root):
        total += sum(os.lstat(os.path.join(dirpath, n)).st_size for n in names)
    return total


def test_restart_reconciles_the_index_with_the_disk(tmp_path: Path) -> None:
    storage = tmp_path / "repo" / "storage"
    name = "s-t01000-{}".format

    async def body() -> None:
        async with miner(tmp_path, sealer="reference", sector_size="8MiB") as m:
            for _ in range(2):
                n = await m.pledge()
                await m.wait(n, "Proving", timeout=DAY)
            assert _path(m).stored == 2 * FINALIZED
        # Sector 1's sealed file vanished; a file the index never knew appeared.
        (storage / "sealed" / name(1)).unlink()
        (storage / "unsealed" / name(77)).write_bytes(b"x" * 4096)
        (storage / "unsealed" / "s-t09999-5").write_bytes(b"another miner's")
        async with miner(tmp_path, sealer="reference", sector_size="8MiB") as m:
            index = m.sched.index
            assert index.find_sector(SectorRef(1000, 1, SIZE), SEALED) == {}
            assert index.find_sector(SectorRef(1000, 77, SIZE), UNSEALED) == {"local": UNSEALED}
            stored = _path(m).stored
            assert stored == FINALIZED + space_needed(CACHE, SIZE, finalized=True) + 4096
            # The accounting is the disk's, to the small cache files' rounding.
            on_disk = _apparent(storage) - len(b"another miner's")
            assert abs(stored - on_disk) < 0.05 * on_disk

    run(body)


# -- storage paths that cannot be used: one line naming the path, no traceback ---------------


def _run_cli(tmp_path: Path, storage: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from sectorfsm.cli.app import app

    config = tmp_path / "run.toml"
    config.write_text(f'[miner]\nsealer = "reference"\n[sealer.storage]\nlocal = "{storage}"\n')
    result = CliRunner().invoke(
        app,
        ["run", "--config", str(config), "--until-proving"],
        env={"SECTORFSM_REPO": str(tmp_path / "repo"), "COLUMNS": "200"},
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is the bug
    return result.exit_code, result.output


def test_storage_path_under_proc_is_a_one_line_error(tmp_path: Path) -> None:
    code, out = _run_cli(tmp_path, "/proc/x")
    assert code == 1
    [line] = out.strip().splitlines()
    assert line.startswith("error: storage path 'local' (/proc/x): "), out


@pytest.mark.parametrize(
    ("err", "says"), [(errno.EROFS, "is not writable"), (errno.ENOSPC, "is full")]
)
def test_read_only_or_full_storage_path_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, says: str
) -> None:
    from sectorfsm.sealing.backends import files

    def refuse(*args: Any, **kw: Any) -> Any:
        raise OSError(err, os.strerror(err))

    storage = tmp_path / "disk"
    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)  # the probe write
    code, out = _run_cli(tmp_path, str(storage))
    assert code == 1
    [line] = out.strip().splitlines()
    assert line.startswith(f"error: storage path 'local' ({storage}) {says}"), out


def test_each_file_type_of_every_set_lowest_bit_first() -> None:
    """`FileType.each` (a table) splits every set as the bit-by-bit test did."""
    from sectorfsm.sched.filetypes import FileType

    singles = [FileType(1 << i) for i in range(6)]
    for bits in range(64):
        assert list(FileType(bits).each()) == [f for f in singles if bits & f], bits


def test_index_holders_on_two_paths_removed_one_then_all() -> None:
    """A file held on two paths: removing it from one keeps the other and its bytes."""
    from sectorfsm.sched.filetypes import FileType
    from sectorfsm.sched.storage import SectorRef, StorageIndex, StoragePath

    index = StorageIndex()
    for pid, worker in (("a", "w1"), ("b", "w2")):
        index.declare(StoragePath(pid, worker, 1 << 40))
    s = SectorRef(1000, 7, 2048)
    both = FileType.SEALED | FileType.CACHE
    index.add_sector(s, both, "a")
    index.add_sector(s, FileType.SEALED, "b")
    index.add_sector(s, FileType.SEALED, "b")  # (again: still one holder, counted once)
    assert index.find_sector(s, both) == {"a": both, "b": FileType.SEALED}
    stored_b = index.paths["b"].stored
    assert stored_b > 0
    index.remove_sector(s, FileType.SEALED, "a")
    assert index.find_sector(s, both) == {"a": FileType.CACHE, "b": FileType.SEALED}
    assert index.holders(s, FileType.SEALED) == {"w2"} and index.paths["b"].stored == stored_b
    index.remove_sector(s, FileType.SEALED, "a")  # (no longer there: nothing changes)
    assert index.paths["b"].stored == stored_b
    index.remove_sector(s, both)
    assert index.find_sector(s, both) == {} and index.locations(s) == frozenset()
    assert index.paths["a"].stored == index.paths["b"].stored == 0
    assert list(index.local_files("w1")) == list(index.local_files("w2")) == []
