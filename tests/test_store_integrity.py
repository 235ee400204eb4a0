"""Store integrity end to end: corrupt records, damaged stores, sector-file owners, the lock.

Real `sectors` processes where the behaviour is the CLI's (exit codes, one-line errors, a
second engine); an in-process Miner where it is the engine's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import HANG_GUARD
from sealtools import miner, run

from sectorfsm.fsm import LmdbStore, StoreError
from sectorfsm.sealing.miner import Miner
from sectorfsm.sealing.store_view import sector_records

SIM = '[miner]\nsealer = "sim"\nblock_time = 0.1\n'
DAY = 86400.0


def sectors(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the `sectors` CLI in its own process."""
    env = {**os.environ, "SECTORFSM_REPO": str(repo), "COLUMNS": "250"}
    return subprocess.run(
        [sys.executable, "-m", "sectorfsm", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture
def sim_repo(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A sim repo whose sectors 1-3 are Proving (no engine running)."""
    config = tmp_path / "sim.toml"
    config.write_text(SIM)
    repo = tmp_path / "repo"
    out = ok(sectors(repo, "run", "-c", str(config), "--pledge", "3", "--until-proving"))
    assert "are Proving" in out
    yield repo, config


def _corrupt(repo: Path, number: int) -> bytes:
    """Overwrite a sector record with garbage (kept live); returns the good bytes."""
    with LmdbStore(repo / "store") as store:
        records = sector_records(store, events=False)
        key = records.key(number)
        good = records.raw(key)
        assert good is not None
        store.write(lambda txn: txn.put(key, b"\xc1\xc1garbage", db=store.db("states")))
        store.write(lambda txn: txn.put(key, b"", db=store.db("live")))
    return good


def test_a_corrupt_sector_is_set_aside_and_every_other_one_runs(
    sim_repo: tuple[Path, Path], tmp_path: Path
) -> None:
    repo, config = sim_repo
    good = _corrupt(repo, 2)

    listed = sectors(repo, "list", "--json")  # before: a traceback
    rows = {r["number"]: r for r in json.loads(ok(listed))}
    assert rows[2]["state"] == "Corrupt" and "sectors machine 2 is corrupt" in rows[2]["reason"]
    assert rows[1]["state"] == rows[3]["state"] == "Proving"

    # Before: `error: state record of sectors machine 2 is corrupt ()`, exit 1.
    out = ok(sectors(repo, "run", "-c", str(config), "--pledge", "1", "--until-proving"))
    assert "sector 4: FinalizeSector -> Proving" in out and "are Proving" in out

    status = sectors(repo, "status", "2")
    assert status.returncode == 1 and "Traceback" not in status.stderr
    message = " ".join(status.stderr.split())
    assert "sector 2 cannot be read" in message and "kept in quarantine" in message
    assert "sectors quarantine restore 2 FILE --really-do-it" in message
    assert "()" not in message and "Unpack failed" not in message
    table = ok(sectors(repo, "list"))
    assert "Corrupt" in table and "Proving" in table

    saved = tmp_path / "sector2.bin"
    ok(sectors(repo, "quarantine", "export", "2", str(saved)))
    assert saved.read_bytes() == b"\xc1\xc1garbage"
    refused = sectors(repo, "quarantine", "restore", "2", str(saved), "--really-do-it")
    assert refused.returncode == 1 and "not a readable record" in refused.stderr
    repaired = tmp_path / "repaired.bin"
    repaired.write_bytes(good)
    ok(sectors(repo, "quarantine", "restore", "2", str(repaired), "--really-do-it"))
    assert json.loads(ok(sectors(repo, "status", "2", "--json")))["state"] == "Proving"
    assert "nothing is in quarantine" in ok(sectors(repo, "quarantine", "list"))


def test_a_dropped_corrupt_sector_is_gone_and_its_number_not_reused(
    sim_repo: tuple[Path, Path],
) -> None:
    repo, _ = sim_repo
    _corrupt(repo, 3)
    assert sectors(repo, "quarantine", "drop", "3").returncode == 1  # needs --really-do-it
    ok(sectors(repo, "quarantine", "drop", "3", "--really-do-it"))
    assert [r["number"] for r in json.loads(ok(sectors(repo, "list", "--json")))] == [1, 2]
    assert "Created CC sector: 4" in ok(sectors(repo, "pledge"))


@pytest.mark.parametrize("size", [0, 8192, 100_000])
def test_a_truncated_store_is_refused_by_every_command(
    sim_repo: tuple[Path, Path], size: int
) -> None:
    repo, config = sim_repo
    data = repo / "store" / "data.mdb"
    assert data.stat().st_size > 100_000
    os.truncate(data, size)
    for args in (["status", "1"], ["list"], ["pledge"], ["run", "-c", str(config)]):
        proc = sectors(repo, *args)
        # Before: exit 135 (SIGBUS) with no message; at 0 bytes, a "new" repo.
        assert proc.returncode == 1, (args, proc.returncode, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        text = " ".join(proc.stderr.split())
        assert "data.mdb" in text and "restore the store directory from a backup" in text, text
        assert "Traceback" not in proc.stderr and len(lines) <= 3  # one message, wrapped
    assert data.stat().st_size == size  # nothing was written over it


def test_a_corrupt_chain_record_stops_the_engine_with_its_name(
    sim_repo: tuple[Path, Path],
) -> None:
    repo, config = sim_repo
    with LmdbStore(repo / "store") as store:
        db = store.db("devnet")
        with store.read() as txn:
            key = next(k for k, _ in txn.cursor(db=db) if k.startswith(b"msg/"))
        store.write(lambda txn: txn.put(key, b"\xc1", db=db))
    proc = sectors(repo, "run", "-c", str(config))
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"devnet record '{key.decode()}'" in text and "restore the store" in text
    assert "()" not in text


def test_a_corrupt_files_index_record_is_set_aside(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, sealer="reference") as m:
            n = await m.pledge()
            await m.wait(n, "Proving", timeout=DAY)
        with LmdbStore(tmp_path / "repo" / "store") as store:
            db = store.db("sectorfiles")
            store.write(lambda txn: txn.put(str(n).encode(), b"\xc1", db=db))
        async with miner(tmp_path, sealer="reference") as m:  # before: an exception at start
            assert m.status(n).state.value == "Proving"
            n2 = await m.pledge()
            await m.wait(n2, "Proving", timeout=DAY)
            with m.store.read() as txn:
                aside = txn.get(b"sectorfiles/" + str(n).encode(), db=m.store.db("quarantine"))
            assert aside is not None

    run(body)


def _sealed_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_new_store_over_old_sector_files_is_refused(tmp_path: Path) -> None:
    sealed = tmp_path / "repo" / "storage" / "sealed" / "s-t01000-1"

    async def first() -> None:
        async with miner(tmp_path, sealer="reference") as m:
            await m.wait(await m.pledge(), "Proving", timeout=DAY)

    run(first)
    before = _sealed_digest(sealed)
    marker = json.loads((tmp_path / "repo" / "storage" / "owners" / "s-t01000-1").read_text())
    assert marker["miner"] == 1000 and marker["sector"] == 1 and len(marker["store"]) == 32

    shutil.rmtree(tmp_path / "repo" / "store")  # lost; 0 bytes is refused by the store itself

    async def second() -> None:
        with pytest.raises(StoreError, match="storage already holds sector files"):
            async with miner(tmp_path, sealer="reference"):
                pass  # before: a new repo, whose sector 1 overwrote the old sealed file

    run(second)
    assert _sealed_digest(sealed) == before


def test_sector_files_of_another_repo_are_never_written_over(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"

    async def seal_in_a() -> None:
        async with miner(a, sealer="reference") as m:
            await m.wait(await m.pledge(), "Proving", timeout=DAY)

    async def start_b() -> None:
        async with miner(b, sealer="reference"):
            pass

    run(seal_in_a)
    run(start_b)  # b exists (its identity is recorded) and has no sectors yet
    # a's sector 1 files (and owner marker) land in b's storage.
    shutil.copytree(a / "repo" / "storage", b / "repo" / "storage", dirs_exist_ok=True)
    sealed = b / "repo" / "storage" / "sealed" / "s-t01000-1"
    before = _sealed_digest(sealed)

    async def pledge_in_b() -> None:
        async with miner(b, sealer="reference") as m:
            n = await m.pledge()
            assert n == 1
            # Every attempt is refused (the retry budget runs out), none writes a byte.
            info = await m.wait(n, "FailedUnrecoverable", timeout=DAY)
            assert "the files of s-t01000-1 belong to another repo" in info.last_err

    run(pledge_in_b)
    assert _sealed_digest(sealed) == before


def test_unmarked_files_that_the_store_records_are_adopted(tmp_path: Path) -> None:
    """A repo from before owner markers goes on sealing in its own files (and marks them)."""
    storage = tmp_path / "repo" / "storage"

    async def precommit() -> None:
        async with miner(tmp_path, sealer="reference") as m:
            await m.wait(await m.pledge(), "WaitSeed", timeout=DAY)

    run(precommit)
    shutil.rmtree(storage / "owners")  # as a repo made before markers existed

    async def finish() -> None:
        async with miner(tmp_path, sealer="reference") as m:
            await m.wait(1, "Proving", timeout=DAY)

    run(finish)
    assert (storage / "owners" / "s-t01000-1").exists()


# -- the engine lock, with real engines --------------------------------------------------------


def _start_engine(repo: Path, config: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "SECTORFSM_REPO": str(repo)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sectorfsm", "run", "-c", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # the banner is printed once the engine holds the repo
        if "sectorfsm engine on" in line:
            return proc
    raise AssertionError(f"the engine did not start (exit {proc.wait()})")


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=HANG_GUARD)


def test_deleting_lock_files_under_a_running_engine_lets_no_second_one_in(
    sim_repo: tuple[Path, Path],
) -> None:
    repo, config = sim_repo
    engine = _start_engine(repo, config)
    try:
        (repo / "store" / "engine.lock").unlink()
        second = sectors(repo, "run", "-c", str(config))
        assert second.returncode == 1 and f"another engine (pid {engine.pid})" in second.stderr
        (repo / "store" / "lock.mdb").unlink()
        third = sectors(repo, "run", "-c", str(config))
        assert third.returncode == 1 and "lock.mdb was deleted while an engine" in " ".join(
            third.stderr.split()
        )
    finally:
        _kill(engine)
    # kill -9 leaves nothing to clean up by hand: the next engine starts at once.
    restarted = _start_engine(repo, config)
    try:
        assert restarted.poll() is None
    finally:
        restarted.send_signal(signal.SIGINT)
        restarted.wait(timeout=HANG_GUARD)


def test_an_engine_start_waits_for_an_offline_pledge(
    sim_repo: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, _ = sim_repo
    # The engine waits a few seconds for a CLI writer, then refuses; the writer below goes on
    # only once the engine waits, and a loaded machine can take longer than that for its
    # pledge. What is checked is that the engine waits and then starts, not for how long.
    lock_engine = LmdbStore.lock_engine
    monkeypatch.setattr(
        LmdbStore, "lock_engine", lambda store, wait=HANG_GUARD: lock_engine(store, wait)
    )
    # Holds the repo as an offline `sectors pledge` does, until told to go on with its pledge.
    script = f"""
import sys
from sectorfsm.fsm import LmdbStore
from sectorfsm.sealing import requests
store = LmdbStore({str(repo / "store")!r})
assert store.lock_writer()
print("WRITING", flush=True)
sys.stdin.readline()
print(requests.pledge_offline(store, 2), flush=True)
store.unlock_writer()
store.close()
"""
    writer = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    waiting = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting up to" in record.getMessage():
                waiting.set()

    handler = Seen(logging.WARNING)
    logging.getLogger("sectorfsm.fsm.store").addHandler(handler)
    states: list[str] = []

    async def engine() -> None:
        async with Miner.open(repo, clock="virtual") as m:
            states.extend(m.status(n).state.value for n in (1, 4, 5))

    thread = threading.Thread(target=run, args=(engine,))
    try:
        assert writer.stdin is not None and writer.stdout is not None
        assert writer.stdout.readline().strip() == "WRITING"
        with LmdbStore(repo / "store") as store:
            assert not store.engine_locked_elsewhere()  # a CLI writer is not an engine
        thread.start()
        # Before: the engine exited at once with "another engine (pid <the CLI's>)".
        assert waiting.wait(HANG_GUARD), "the engine did not wait for the writer"
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "[4, 5]"  # its pledge completed first
        thread.join(HANG_GUARD)
        assert not thread.is_alive() and states[0] == "Proving" and len(states) == 3
        assert writer.wait(timeout=HANG_GUARD) == 0
    finally:
        logging.getLogger("sectorfsm.fsm.store").removeHandler(handler)
        _kill(writer)
        thread.join(HANG_GUARD)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (root only), unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_offline_pledge_on_a_full_disk_is_one_line(small_disk: Path, tmp_path: Path) -> None:
    config = tmp_path / "sim.toml"
    config.write_text(SIM)
    repo = small_disk / "repo"
    ok(sectors(repo, "run", "-c", str(config), "--pledge", "1", "--until-proving"))
    with open(small_disk / "filler", "wb") as f:  # fill the disk to the last block
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    proc = sectors(repo, "pledge", "--count", "10000")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = " ".join(proc.stderr.split())
    assert text.startswith("error: ") and "disk is full" in text, text
    assert "Traceback" not in proc.stderr and "nothing from this write was applied" in text
