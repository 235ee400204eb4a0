"""LmdbStore: durability modes, map growth, full disk, bad directories, corrupt records, locks.

Damaged files, OS-level locks, quarantine and duplicate groups: test_fsm_store_integrity.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from conftest import HANG_GUARD, Spawner
from fsmtoy import Add, Counter, make_group

from sectorfsm.fsm import (
    LmdbStore,
    RecordError,
    StoreError,
    StoreFullError,
    StoreLockedError,
)
from sectorfsm.fsm.codec import packb

TESTS = str(Path(__file__).parent)


def test_rejects_unknown_durability(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="durability must be one of"):
        LmdbStore(tmp_path, durability="fast")  # type: ignore[arg-type]


def test_same_store_twice_in_one_process_is_refused(tmp_path: Path) -> None:
    with LmdbStore(tmp_path), pytest.raises(StoreError, match="already open in this process"):
        LmdbStore(tmp_path / "." / "")
    LmdbStore(tmp_path).close()  # closing released it


def test_path_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create store directory"):
        LmdbStore(blocker / "repo")


def test_not_an_lmdb_file(tmp_path: Path) -> None:
    (tmp_path / "data.mdb").write_bytes(b"definitely not lmdb" * 1000)
    with pytest.raises(StoreError, match="is not an LMDB file"):
        LmdbStore(tmp_path)


def test_unwritable_directory_is_a_clear_error() -> None:
    # Under the system temp dir, so an unprivileged user can reach it (pytest's tmp is 0700).
    base = Path(tempfile.mkdtemp(prefix="sectorfsm-ro-"))
    base.chmod(0o755)
    repo = base / "ro"
    repo.mkdir()
    repo.chmod(0o555)
    script = textwrap.dedent(
        f"""
        import os
        from sectorfsm.fsm import LmdbStore, StoreError
        if os.getuid() == 0:
            os.setgid(65534); os.setuid(65534)  # root ignores permissions: become nobody
        try:
            LmdbStore({str(repo)!r})
        except StoreError as exc:
            print("ERR", exc)
        """
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_GUARD
        )
    finally:
        repo.chmod(0o755)
        shutil.rmtree(base)
    assert "ERR" in out.stdout and "not writable" in out.stdout, out.stdout + out.stderr
    assert not (repo / "data.mdb").exists()


def test_map_grows_by_itself(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path, durability="nosync", map_size=256 * 1024)
    start = store.map_size
    blobs = store.db("blobs")
    with pytest.raises(StoreError, match="must be opened"):
        store.write(lambda txn: store.db("late"))
    blob = os.urandom(4096)
    for batch in range(20):

        def fill(txn: object, batch: int = batch) -> None:
            for i in range(50):
                txn.put(f"{batch}-{i}".encode(), blob, db=blobs)  # type: ignore[attr-defined]

        store.write(fill)
    assert store.map_size > start
    with store.read() as txn:
        assert txn.stat(store.db("blobs"))["entries"] == 1000
        assert txn.get(b"0-0", db=store.db("blobs")) == blob
    store.close()


def test_map_ceiling_gives_store_full_and_keeps_data(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path, durability="nosync", map_size=128 * 1024, max_map_size=512 * 1024)
    store.write(lambda txn: txn.put(b"keep", b"me", db=store.db("meta")))
    blobs = store.db("blobs")
    blob = os.urandom(8192)
    with pytest.raises(StoreFullError, match="ceiling"):
        for batch in range(1000):

            def fill(txn: object, batch: int = batch) -> None:
                for i in range(10):
                    txn.put(f"{batch}-{i}".encode(), blob, db=blobs)  # type: ignore[attr-defined]

            store.write(fill)
    with store.read() as txn:
        assert txn.get(b"keep", db=store.db("meta")) == b"me"
    store.close()


def test_full_disk_is_a_clear_error_and_loses_nothing(tmp_path: Path) -> None:
    """A real short write: the child runs with RLIMIT_FSIZE so the data file cannot grow."""
    script = textwrap.dedent(
        f"""
        import asyncio, resource, signal, sys
        sys.path.insert(0, {TESTS!r})
        from fsmtoy import Add, Counter, make_group
        from sectorfsm.fsm import LmdbStore, StoreFullError

        async def main():
            store = LmdbStore({str(tmp_path)!r})
            g = make_group(store)
            await g.start()
            for i in range(20):
                await g.begin(i, Counter())
                await g.send(i, Add(uid=i))
            await g.idle()
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            size = (store.path / "data.mdb").stat().st_size
            resource.setrlimit(resource.RLIMIT_FSIZE, (size + 8192, resource.RLIM_INFINITY))
            try:
                for i in range(20, 100000):
                    await g.begin(i, Counter(applied=list(range(200))))
            except StoreFullError as exc:
                print("FULL", exc, flush=True)
            else:
                print("NEVER FULL", flush=True)
            # The engine keeps serving reads and the sector data written before is intact.
            print("STATE0", g.get(0).applied, flush=True)
            store.close()

        asyncio.run(main())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_GUARD
    )
    assert "FULL" in out.stdout and "disk is full" in out.stdout, out.stdout + out.stderr
    assert "STATE0 [0]" in out.stdout, out.stdout + out.stderr

    async def check() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store)
            await g.start()
            for i in range(20):
                st = g.get(i)
                assert st is not None and st.applied == [i]
            await g.send(0, Add(uid=99))  # writable again once space is back
            await g.idle()
            st0 = g.get(0)
            assert st0 is not None and st0.applied == [0, 99]
            await g.stop()

    asyncio.run(check())


def test_corrupt_state_record_names_the_record(tmp_path: Path) -> None:
    async def setup() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store)
            await g.start()
            for i in range(3):
                await g.begin(i, Counter())
                await g.send(i, Add(uid=i))
            await g.stop()
            key = g.records.key(1)
            store.write(lambda txn: txn.put(key, b"\xc1garbage", db=store.db("states")))

    asyncio.run(setup())

    async def check() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store)
            with pytest.raises(RecordError, match="state record of counters machine 1 is corrupt"):
                g.get(1)
            await g.start()  # the others still resume
            assert set(g.unreadable) == {1}
            await g.send(2, Add(uid=20))
            await g.idle()
            st0, st2 = g.get(0), g.get(2)
            assert st0 is not None and st0.applied == [0]
            assert st2 is not None and st2.applied == [2, 20]
            await g.stop()

    asyncio.run(check())


def test_wrong_schema_and_unknown_fields_are_clear(tmp_path: Path) -> None:
    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store)
            await g.start()
            await g.begin(1, Counter())
            await g.begin(2, Counter())
            await g.stop()
            store.write(
                lambda txn: txn.put(
                    g.records.key(1),
                    packb([2, False, None, {"state": "Idle"}]),
                    db=store.db("states"),
                )
            )
            store.write(
                lambda txn: txn.put(
                    g.records.key(2),
                    packb([1, False, None, {"color": "red"}]),
                    db=store.db("states"),
                )
            )
            with pytest.raises(RecordError, match="schema version 2, this code reads 1"):
                g.get(1)
            with pytest.raises(RecordError, match=r"unknown field\(s\) \['color'\]"):
                g.get(2)

    asyncio.run(main())


def test_corrupt_inbox_event_is_quarantined_on_start(tmp_path: Path) -> None:
    async def setup() -> None:
        store = LmdbStore(tmp_path)
        g = make_group(store)
        await g.start()
        await g.begin(1, Counter())
        await g.stop()
        key = g.records.key(1) + (5).to_bytes(8, "big")
        store.write(lambda txn: txn.put(key, packb([1, "NoSuchEvent", {}]), db=store.db("inbox")))
        good = g.records.key(1) + (6).to_bytes(8, "big")
        raw = g.records.codec.encode_event(Add(uid=6))
        store.write(lambda txn: txn.put(good, raw, db=store.db("inbox")))
        store.close()

    asyncio.run(setup())

    async def check() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store)
            await g.start()
            await g.idle()
            st = g.get(1)
            assert st is not None and st.applied == [6]
            with store.read() as txn:
                assert txn.stat(store.db("quarantine"))["entries"] == 1
                assert txn.stat(store.db("inbox"))["entries"] == 0
            await g.stop()

    asyncio.run(check())


def test_second_engine_in_process_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store)
            await g.start()
            # The engine lock is a flock on the store directory itself.
            fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
            import fcntl

            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.close(fd)
            await g.stop()
            assert not store.engine_locked_elsewhere()

    asyncio.run(main())


def test_second_engine_process_is_refused(tmp_path: Path, spawn: Spawner) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        sys.path.insert(0, {TESTS!r})
        from fsmtoy import make_group
        from sectorfsm.fsm import LmdbStore
        async def main():
            store = LmdbStore({str(tmp_path)!r})
            g = make_group(store)
            await g.start()
            print("STARTED", flush=True)
            sys.stdin.readline()
            await g.stop()
            store.close()
        asyncio.run(main())
        """
    )
    child = spawn.python("-c", script, stdin=True)
    child.wait_for_line("^STARTED$")

    async def attempt() -> None:
        async with LmdbStore(tmp_path) as store:
            assert store.engine_locked_elsewhere()
            g = make_group(store)
            with pytest.raises(StoreLockedError, match=f"pid {child.pid}"):
                await g.start()
            # Reading and appending still work while the other engine runs.
            assert g.get(1) is None

    asyncio.run(attempt())
    stdin = child.popen.stdin
    assert stdin is not None
    stdin.write(b"\n")
    stdin.flush()
    assert child.finish() == 0, child.describe()


def test_sync_facade(tmp_path: Path) -> None:
    from sectorfsm.fsm import SyncEngine

    with LmdbStore(tmp_path) as store, SyncEngine() as engine:
        g = engine.group(make_group(store))
        g.start()
        g.begin(1, Counter())
        g.send(1, Add(uid=5, amount=2))
        g.idle()
        st = g.get(1)
        assert st is not None and st.total == 2
        assert g.has(1) and [mid for mid, _ in g.list()] == [1]
        info = g.info(1)
        assert info is not None and info.state.applied == [5]
        g.stop()


def test_async_context_manager_flushes(tmp_path: Path) -> None:
    async def main() -> None:
        async with LmdbStore(tmp_path, durability="nosync") as store:
            g = make_group(store)
            await g.start()
            await g.begin(1, Counter())
            g.post(1, Add(uid=1))  # staged, not awaited
            await g.stop()

    asyncio.run(main())

    async def resume() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store)
            info = g.info(1)
            # Flushed by stop(): durable in the inbox, not yet applied.
            assert info is not None and info.pending_events == 1 and info.state.applied == []
            await g.start()
            await g.idle()
            st = g.get(1)
            assert st is not None and st.applied == [1]
            await g.stop()

    asyncio.run(resume())
