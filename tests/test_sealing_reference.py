"""The `reference` sealer: real files in Lotus's layout, real CommP/CommD, proofs bound to them."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import HANG_GUARD
from sealtools import kinds, miner, run

from sectorfsm.fsm import VirtualClock
from sectorfsm.fsm.codec import unpackb
from sectorfsm.sched import (
    FileType,
    SectorRef,
    StoragePath,
    TaskType,
    WorkerSpec,
    detect_resources,
)
from sectorfsm.sealing import commp, proofs
from sectorfsm.sealing.backends import StorageError, default_workers, files, reference, sectorfile
from sectorfsm.sealing.backends.files import disk_space
from sectorfsm.sealing.info import SectorInfo
from sectorfsm.sealing.miner import Miner, SectorStuckError

DAY = 86400.0
FAST = {"retry": {"base": 30.0, "factor": 2.0, "cap": 600.0, "budget": 6}}
SECTOR = 2048


def _storage(tmp_path: Path) -> Path:
    return tmp_path / "repo" / "storage"


def _files(root: Path, n: int) -> tuple[Path, Path, Path]:
    name = f"s-t01000-{n}"
    return root / "unsealed" / name, root / "sealed" / name, root / "cache" / name


def _faults(m: Miner) -> reference.ReferenceFaults:
    return m.sealer.backend.faults  # type: ignore[attr-defined, no-any-return]


def _piece_file(tmp_path: Path, name: str, data: bytes) -> tuple[str, int, str]:
    """A data file and the (CommP, padded size) a client would declare for it."""
    path = tmp_path / name
    path.write_bytes(data)
    unpadded = 127
    while unpadded < len(data):  # the smallest valid unpadded size that holds the data
        unpadded *= 2
    padded = commp.padded_size(unpadded)
    return commp.piece_cid(path), padded, str(path)


def _exists(*parts: str) -> bool:
    return Path(*parts).exists()


def _trace(info: SectorInfo, event: str) -> str:
    return next(e.trace for e in reversed(info.log) if e.kind == f"event;{event}")


def test_cc_sector_has_real_files_at_each_stage_and_remove_deletes_them(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, sealer="reference") as m:
            unsealed, sealed, cache = _files(_storage(tmp_path), 1)
            n = await m.pledge()
            await m.wait(n, "WaitSeed", timeout=DAY)
            # After PreCommit2: the unsealed and sealed files and the cache with its scratch.
            assert unsealed.stat().st_size == SECTOR and sealed.stat().st_size == SECTOR
            assert (cache / "sc-02-data-layer-1.dat").exists() and (cache / "t_aux").exists()
            record = sectorfile.read_sealed(sealed, SECTOR)
            info = m.status(n)
            assert record["comm_r"] == info.comm_r and record["comm_d"] == info.comm_d
            info = await m.wait(n, "Proving", timeout=DAY)
            # A CC sector is the zero commitment; finalize dropped its unsealed copy and the
            # cache scratch, keeping the small aux files.
            assert info.comm_d == commp.zero_piece_cid(SECTOR)
            assert not unsealed.exists() and sealed.exists()
            assert sorted(p.name for p in cache.iterdir()) == sorted(reference.KEEP_IN_CACHE)
            runs = m.sealer.backend.runs  # type: ignore[attr-defined]
            assert all(runs[t] == 1 for t in (TaskType.PRE_COMMIT1, TaskType.COMMIT2))
            await m.remove(n)
            await m.wait(n, "Removed", timeout=DAY)
            assert not sealed.exists() and not cache.exists() and not unsealed.exists()

    run(body)


def test_an_8mib_cc_sector_stays_sparse(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, sealer="reference", sector_size="8MiB") as m:
            unsealed, sealed, _ = _files(_storage(tmp_path), 1)
            n = await m.pledge()
            await m.wait(n, "WaitSeed", timeout=DAY)
            for f in (unsealed, sealed):
                st = f.stat()
                assert st.st_size == 8 << 20 and st.st_blocks * 512 < 1 << 20, f
            await m.wait(n, "Proving", timeout=DAY)

    run(body)


def test_deal_sector_commitments_come_from_the_data_in_the_unsealed_file(tmp_path: Path) -> None:
    async def body() -> None:
        first, second = os.urandom(1000), os.urandom(300)
        async with miner(tmp_path, sealer="reference") as m:
            cid1, size1, path1 = _piece_file(tmp_path, "a.bin", first)
            cid2, size2, path2 = _piece_file(tmp_path, "b.bin", second)
            assert (size1, size2) == (1024, 512)
            n = await m.add_piece(cid1, size1, data_path=path1)
            assert await m.add_piece(cid2, size2, data_path=path2) == n
            info = await m.wait(n, "Proving", timeout=DAY)
            pieces = [(p.piece_cid, p.size) for p in info.pieces]
            assert pieces[:2] == [(cid1, 1024), (cid2, 512)]
            assert info.comm_d == commp.unsealed_cid(SECTOR, pieces)
            # Deals keep their unsealed copy, which really holds the data, fr32-padded.
            unsealed, sealed, _ = _files(_storage(tmp_path), n)
            raw = unsealed.read_bytes()
            assert len(raw) == SECTOR
            assert sectorfile.fr32_unpad(raw[:1024]) == first + bytes(1016 - 1000)
            assert sectorfile.fr32_unpad(raw[1024:1536]) == second + bytes(508 - 300)
            assert raw[1536:] == bytes(512)
            # CommD is the CommP of the whole sector's data.
            assert commp.piece_cid(sectorfile.fr32_unpad(raw)) == info.comm_d
            await m.sealer.release_unsealed(m.sealing.ref(info))
            assert not unsealed.exists() and sealed.exists()
            assert not m.sealer.holds(m.sealing.ref(info), FileType.UNSEALED)
            await m.remove(n)
            await m.wait(n, "Removed", timeout=DAY)
            assert not unsealed.exists() and not sealed.exists()

    run(body)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("mismatch", "piece CID mismatch"),
        ("missing", "does not exist"),
        ("too large", "more than the piece's unpadded size 1016"),
        ("no path", "has no data file"),
    ],
)
def test_bad_piece_data_takes_the_addpiecefailed_path(
    tmp_path: Path, case: str, message: str
) -> None:
    async def body() -> None:
        async with miner(tmp_path, sealer="reference", config=FAST) as m:
            cid, size, path = _piece_file(tmp_path, "p.bin", b"x" * 1000)
            if case == "mismatch":
                cid = commp.piece_cid(b"y" * 1000)
            elif case == "missing":
                os.unlink(path)
            elif case == "too large":
                with open(path, "ab") as f:  # noqa: ASYNC230 - a test fixture, before sealing
                    f.write(b"x" * 17)
            n = await m.add_piece(cid, size, data_path=None if case == "no path" else path)
            info = await m.wait(n, "AddPieceFailed", timeout=DAY)
            assert message in _trace(info, "SectorAddPieceFailed")
            info = await m.wait(n, "WaitDeals", timeout=DAY)
            assert info.pieces == []

    run(body)


def test_corrupt_sealed_file_fails_the_proof_then_reseals(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, sealer="reference", config=FAST) as m:
            n = await m.pledge()
            await m.wait(n, "WaitSeed", timeout=DAY)
            _, sealed, _ = _files(_storage(tmp_path), n)
            raw = bytearray(sealed.read_bytes())
            raw[40] ^= 0x01  # inside the record
            sealed.write_bytes(raw)
            info = await m.wait(n, "ComputeProofFailed", timeout=DAY)
            assert "record digest mismatch" in _trace(info, "SectorComputeProofFailed")
            # Lotus's path: after two failed proofs, reseal from PreCommit1; PreCommit2
            # rewrites the sealed file and the sector proves.
            info = await m.wait(n, "Proving", timeout=DAY)
            assert "SectorSealPreCommit1Failed" in kinds(info)
            assert sectorfile.read_sealed(sealed, SECTOR)["comm_r"] == info.comm_r

    run(body)


def test_replaced_sealed_file_gives_a_proof_the_chain_rejects(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, sealer="reference", config=FAST) as m:
            n = await m.pledge()
            info = await m.wait(n, "WaitSeed", timeout=DAY)
            _, sealed, _ = _files(_storage(tmp_path), n)
            # A well-formed sealed file, but sealed with another ticket (or another sector's).
            record = sectorfile.read_sealed(sealed, SECTOR)
            assert info.comm_d is not None
            other = proofs.sealed_cid(1000, n, info.comm_d, b"\x01" * 32)
            sectorfile.write_sealed(sealed, {**record, "comm_r": other}, SECTOR)
            info = await m.wait(n, "ComputeProofFailed", timeout=DAY)
            assert "invalid proof" in _trace(info, "SectorComputeProofFailed")
            # Failed proofs lead to a reseal, whose PreCommit2 rewrites the sealed file.
            info = await m.wait(n, "Proving", timeout=DAY)
            assert "SectorSealPreCommit1Failed" in kinds(info)

    run(body)


def test_wrong_ticket_and_wrong_seed_give_invalid_proofs(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, sealer="reference", config=FAST) as m:
            _faults(m).wrong_ticket.add(1)
            _faults(m).wrong_seed.add(2)
            bad_ticket, bad_seed = await m.pledge(), await m.pledge()
            for n in (bad_ticket, bad_seed):
                info = await m.wait(n, "ComputeProofFailed", timeout=DAY)
                assert "invalid proof" in _trace(info, "SectorComputeProofFailed")
            _faults(m).wrong_seed.clear()
            _faults(m).wrong_ticket.clear()
            await m.wait(bad_seed, "Proving", timeout=DAY)
            # The precommit carries a CommR sealed with the wrong ticket: nothing matches it.
            with pytest.raises(SectorStuckError, match="retry budget"):
                await m.wait(bad_ticket, "Proving", timeout=30 * DAY)

    run(body)


def test_cancelling_threaded_file_work_waits_for_the_thread_to_stop() -> None:
    started, stopped = threading.Event(), threading.Event()

    def work(*, stop: threading.Event) -> None:
        started.set()
        try:
            while True:
                time.sleep(0.005)
                files.check_stop(stop)  # raises TaskStopped once cancelled
        finally:
            time.sleep(0.05)  # slow to wind down: the cancellation must wait for it
            stopped.set()

    async def body() -> None:
        clock = VirtualClock()
        task = asyncio.ensure_future(files.run_in_thread(clock, work))
        assert await asyncio.to_thread(started.wait, HANG_GUARD), "the work never started"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The thread is done by the time the cancellation lands, and the clock is free.
        assert stopped.is_set()
        assert clock._holds == 0

    run(body)


def test_add_piece_is_idempotent_and_a_filler_clears_a_failed_piece(tmp_path: Path) -> None:
    unsealed = tmp_path / "unsealed"
    data = tmp_path / "d.bin"
    data.write_bytes(os.urandom(700))
    cid = reference.write_piece(unsealed, SECTOR, 1024, 1024, str(data))
    first = unsealed.read_bytes()
    assert reference.write_piece(unsealed, SECTOR, 1024, 1024, str(data)) == cid
    assert unsealed.read_bytes() == first and cid == commp.piece_cid(data, 1016)
    # The piece was rejected; a filler written over it must leave zeros behind.
    zero = reference.write_piece(unsealed, SECTOR, 1024, 1024, None)
    assert zero == commp.zero_piece_cid(1024) and unsealed.read_bytes() == bytes(SECTOR)
    reference.write_piece(unsealed, SECTOR, 0, 1024, None)
    pieces = [(commp.zero_piece_cid(1024), 1024)] * 2
    out = reference.pre_commit1(unsealed, tmp_path / "cache", SECTOR, b"t" * 32, pieces)
    assert unpackb(out)["comm_d"] == commp.zero_piece_cid(SECTOR)
    # PreCommit1 re-checks the file against the pieces: stray data is caught.
    with unsealed.open("r+b") as f:
        f.seek(1500)
        f.write(b"\x01")
    with pytest.raises(sectorfile.SectorFileError, match="should be zero"):
        reference.pre_commit1(unsealed, tmp_path / "cache", SECTOR, b"t" * 32, pieces)


@pytest.mark.parametrize("numpy", [True, False])
def test_fr32_unpad_inverts_fr32_pad(numpy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commp, "USE_NUMPY", numpy)
    data = os.urandom(127 * 100)
    padded = commp.fr32_pad(data)
    assert sectorfile.fr32_unpad(padded) == data
    bad = bytearray(padded)
    bad[31 + 128 * 70] |= 0x80
    with pytest.raises(ValueError, match="padding bits"):
        sectorfile.fr32_unpad(bytes(bad))


def test_unusable_storage_path_fails_open_clearly(tmp_path: Path) -> None:
    async def body() -> None:
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("a file")
        with pytest.raises(StorageError, match=r"storage path 'local'.*not a directory"):
            async with Miner.open(
                tmp_path / "repo",
                sealer="reference",
                sealer_options={"storage": {"local": str(blocker)}},
            ):
                pass
        (tmp_path / "repo2").mkdir()
        (tmp_path / "repo2" / "storage").write_text("a file")
        with pytest.raises(StorageError, match="not a directory"):
            default_workers("reference", tmp_path / "repo2")

    run(body)


def test_default_worker_sees_the_disk_and_a_full_disk_is_a_clear_error(tmp_path: Path) -> None:
    [spec] = default_workers("reference", tmp_path)
    [path] = spec.paths
    total, _, free = shutil.disk_usage(tmp_path)
    assert path.id == "local" and path.can_seal and path.can_store
    assert path.capacity == total and disk_space(tmp_path / "storage")[0] == total
    assert path.used == pytest.approx(total - free, rel=0.01)  # storage itself is ~empty
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full to stand for a full disk")

    async def body() -> None:
        async with miner(tmp_path, sealer="reference", config=FAST) as m:
            unsealed, _, _ = _files(_storage(tmp_path), 1)
            # Claimed first, as the engine does before it creates a sector's files: unclaimed
            # files in its place would be refused as another repo's.
            storage = m.sealer.backend.storage  # type: ignore[attr-defined]
            storage.owners.claim("local", _storage(tmp_path), SectorRef(1000, 1, 2048))
            unsealed.symlink_to("/dev/full")  # every write there fails with ENOSPC
            cid, size, data = _piece_file(tmp_path, "p.bin", b"z" * 500)
            n = await m.add_piece(cid, size, data_path=data)
            info = await m.wait(n, "AddPieceFailed", timeout=DAY)
            assert "storage path 'local'" in _trace(info, "SectorAddPieceFailed")
            assert "is full" in _trace(info, "SectorAddPieceFailed")

    run(body)


def test_files_are_where_the_index_says_with_two_workers_and_paths(tmp_path: Path) -> None:
    async def body() -> None:
        res = detect_resources()
        ap_only = frozenset({TaskType.ADD_PIECE})
        workers = [
            WorkerSpec(
                "w1", res, ap_only, (StoragePath("p1", "w1", 1 << 40),), needs_heartbeats=False
            ),
            WorkerSpec(
                "w2",
                res,
                frozenset(TaskType) - ap_only,
                (StoragePath("p2", "w2", 1 << 40, can_store=True),),
                needs_heartbeats=False,
            ),
        ]
        roots = {"p1": str(tmp_path / "one"), "p2": str(tmp_path / "two")}
        async with miner(
            tmp_path, sealer="reference", workers=workers, sealer_options={"storage": roots}
        ) as m:
            n = await m.pledge()
            info = await m.wait(n, "WaitSeed", timeout=DAY)
            # Each file is on disk where the storage index says it is.
            ref = m.sealing.ref(info)
            for kind, ftype in (("unsealed", FileType.UNSEALED), ("sealed", FileType.SEALED)):
                [pid] = m.sched.index.find_sector(ref, ftype)
                other = "p1" if pid == "p2" else "p2"
                assert _exists(roots[pid], kind, str(ref)), kind
                assert not _exists(roots[other], kind, str(ref)), kind
            assert m.sched.index.find_sector(ref, FileType.CACHE) == {"p2": FileType.CACHE}
            assert _exists(roots["p2"], "cache", str(ref), "t_aux")
            info = await m.wait(n, "Proving", timeout=DAY)
            assert info.comm_d == commp.zero_piece_cid(SECTOR)

    run(body)
