"""Store integrity: damaged files, OS-level locks, quarantine and duplicate groups."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import HANG_GUARD
from fsmtoy import Add, Counter, make_group

from sectorfsm.fsm import (
    LmdbStore,
    MachineExistsError,
    RecordError,
    StoreError,
    StoreFullError,
    StoreLockedError,
)

TESTS = str(Path(__file__).parent)


def _fill(path: Path, n: int = 400) -> None:
    """A store of a few hundred KiB (several pages), closed."""
    with LmdbStore(path, durability="nosync") as store:
        db = store.db("filler")
        store.write(lambda txn: [txn.put(b"%06d" % i, b"x" * 1000, db=db) for i in range(n)])


@pytest.mark.parametrize("size", [0, 100, 8192, 100_000])
def test_truncated_data_file_is_refused_before_mapping(tmp_path: Path, size: int) -> None:
    _fill(tmp_path)
    data = tmp_path / "data.mdb"
    assert data.stat().st_size > 100_000
    os.truncate(data, size)
    # In a child: before the check, mapping the file killed the process with SIGBUS.
    script = f"""
import sys
from sectorfsm.fsm import LmdbStore, StoreError
try:
    LmdbStore({str(tmp_path)!r})
except StoreError as exc:
    print(exc)
    sys.exit(3)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 3, proc.stderr
    message = proc.stdout.strip()
    assert str(data) in message and "restore the store directory from a backup" in message
    assert ("empty" if size == 0 else "truncated" if size >= 8192 else "not an LMDB") in message
    assert data.stat().st_size == size  # nothing was written: an empty file is not reused


def test_intact_store_passes_the_meta_page_check(tmp_path: Path) -> None:
    from sectorfsm.fsm.lmdbfile import check_data_file

    _fill(tmp_path)
    meta = check_data_file(tmp_path / "data.mdb")
    assert meta is not None and meta.page_size >= 4096
    assert (meta.last_page + 1) * meta.page_size <= (tmp_path / "data.mdb").stat().st_size
    assert check_data_file(tmp_path / "absent.mdb") is None


def test_store_identity_is_made_once_and_kept(tmp_path: Path) -> None:
    with LmdbStore(tmp_path) as store:
        first = store.identity
    with LmdbStore(tmp_path) as store:
        assert store.identity == first and len(first) == 32
    with LmdbStore(tmp_path / "other") as store:
        assert store.identity != first


def _engine_child(path: Path) -> subprocess.Popen[str]:
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        sys.path.insert(0, {TESTS!r})
        from fsmtoy import make_group
        from sectorfsm.fsm import LmdbStore
        async def main():
            store = LmdbStore({str(path)!r})
            g = make_group(store)
            await g.start()
            print("STARTED", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
            await g.stop()
            store.close()
        asyncio.run(main())
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "STARTED"
    return child


def _stop_child(child: subprocess.Popen[str]) -> None:
    if child.poll() is None:
        child.kill()
    child.wait(timeout=30)


def test_deleting_the_lock_files_does_not_let_a_second_engine_start(tmp_path: Path) -> None:
    child = _engine_child(tmp_path)
    try:
        (tmp_path / "engine.lock").unlink()

        async def attempt() -> None:
            async with LmdbStore(tmp_path) as store:
                with pytest.raises(StoreLockedError, match=f"pid {child.pid}"):
                    await make_group(store).start()

        asyncio.run(attempt())
        # Without lock.mdb, a new opener would get a writer mutex of its own: refused too.
        (tmp_path / "lock.mdb").unlink()
        with pytest.raises(StoreError, match=r"lock\.mdb was deleted while an engine"):
            LmdbStore(tmp_path)
    finally:
        _stop_child(child)


def test_lock_of_a_killed_engine_is_never_stale(tmp_path: Path) -> None:
    child = _engine_child(tmp_path)
    child.kill()  # SIGKILL: no cleanup at all
    child.wait(timeout=30)

    async def restart() -> None:
        async with LmdbStore(tmp_path) as store:
            assert not store.engine_locked_elsewhere()
            g = make_group(store)
            await g.start()
            await g.stop()

    asyncio.run(restart())


def test_cli_writer_is_not_an_engine_and_an_engine_waits_for_it(tmp_path: Path) -> None:
    LmdbStore(tmp_path).close()
    script = textwrap.dedent(
        f"""
        import sys
        from sectorfsm.fsm import LmdbStore
        store = LmdbStore({str(tmp_path)!r})
        assert store.lock_writer()
        print("WRITING", flush=True)
        sys.stdin.readline()
        store.unlock_writer()
        store.close()
        """
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline().strip() == "WRITING"
        with LmdbStore(tmp_path) as store:
            assert not store.engine_locked_elsewhere()  # a CLI writer is not an engine
            assert store.lock_writer()  # CLI writers share the claim
            store.unlock_writer()
            with pytest.raises(StoreLockedError, match="`sectors` command has been writing"):
                store.lock_engine(wait=0.2)
            writer.stdin.write("\n")
            writer.stdin.flush()
            store.lock_engine(wait=HANG_GUARD)  # returns once the writer is done
            assert writer.wait(timeout=HANG_GUARD) == 0
            assert not store.lock_writer()  # an engine runs (here): writers queue instead
            store.unlock_engine()
    finally:
        _stop_child(writer)


def test_two_groups_of_one_name_on_one_store_are_refused(tmp_path: Path) -> None:
    from sectorfsm.fsm.errors import DuplicateGroupError

    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            first, second = make_group(store), make_group(store)
            await first.start()
            with pytest.raises(DuplicateGroupError, match="'counters' is already running"):
                await second.start()
            await first.stop()
            await second.start()  # the name is free again
            await second.stop()

    asyncio.run(main())


def test_corrupt_state_record_is_set_aside_and_can_be_restored(tmp_path: Path) -> None:
    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store)
            await g.start()
            for i in range(3):
                await g.begin(i, Counter())
                await g.send(i, Add(uid=i))
            await g.idle()
            await g.stop()
            key = g.records.key(1)
            good = g.records.raw(key)
            assert good is not None
            store.write(lambda txn: txn.put(key, b"\xc1bad", db=store.db("states")))
            with pytest.raises(RecordError, match=r"counters machine 1 is corrupt: its 4 bytes"):
                g.get(1)
            listed: dict[object, str] = {}
            ids = [mid for mid, _ in g.records.list(on_error=lambda m, r, e: listed.update({m: r}))]
            assert ids == [0, 2] and listed == {1: b"\xc1bad"}

            await g.start()  # the others resume; machine 1 moves to quarantine, bytes kept
            assert set(g.unreadable) == {1}
            [(mid, why, raw)] = g.records.list_quarantined()
            assert (mid, raw) == (1, b"\xc1bad") and "is corrupt" in why
            assert g.records.raw(key) is None and 1 not in g.records.live_ids()
            with pytest.raises(RecordError, match="machine 1 is in quarantine"):
                g.get(1)
            with pytest.raises(MachineExistsError, match="in quarantine"):
                await g.begin(1, Counter())  # its number stays taken
            await g.send(2, Add(uid=20))
            await g.idle()
            await g.stop()

            with pytest.raises(RecordError):  # a restore must be readable itself
                store.write(lambda txn: g.records.restore(txn, 1, b"\xc1still bad"))
            store.write(lambda txn: g.records.restore(txn, 1, good))
            assert g.records.list_quarantined() == []
            await g.start()
            await g.send(1, Add(uid=10))
            await g.idle()
            st1, st2 = g.get(1), g.get(2)
            assert st1 is not None and st1.applied == [1, 10]
            assert st2 is not None and st2.applied == [2, 20]
            await g.stop()

    asyncio.run(main())


def test_failed_commit_of_an_unawaited_post_logs_no_orphan_future(tmp_path: Path) -> None:
    import gc

    orphans: list[str] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, ctx: orphans.append(str(ctx.get("message")))
        )
        store = LmdbStore(tmp_path, map_size=1 << 20, max_map_size=1 << 20)
        g = make_group(store)
        await g.start()
        await g.begin(1, Counter())
        big = "x" * (1 << 20)  # never fits under the map ceiling
        fut = g.post(1, Add(uid=len(big)))
        store.committer.put("meta", b"big", big.encode())
        with pytest.raises(StoreFullError):
            await store.committer.waiter()
        del fut  # nobody ever awaited it
        gc.collect()
        await g.stop()
        store.close()

    asyncio.run(main())
    gc.collect()
    assert not [m for m in orphans if "never retrieved" in m]
