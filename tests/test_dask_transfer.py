"""Sector files moved worker to worker over Dask comms (sealing/backends/dask/transfer.py).

An in-process Scheduler and two in-process Workers on 127.0.0.1, each with its own temp
storage root and a `FileServer` plugin: the bytes cross a real TCP connection between the
workers. Faults are injected in the source's handler (a dropped connection after a chunk was
read, a chunk damaged in flight), and the source counts every byte it reads from disk.
"""

from __future__ import annotations

import asyncio
import filecmp
import os
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, Scheduler, Worker
from distributed.comm import CommClosedError

from sectorfsm.sealing.backends.dask.transfer import (
    PROGRESS_TOPIC,
    FileServer,
    PathRefused,
    SourceChanged,
    TransferError,
    fetch_here,
    pull,
)

#: Seconds before a wait gives up: a hang guard, far above what a pass takes under load.
DEADLINE = 60.0
MiB = 1 << 20


class Faulty(FileServer):
    """A source whose `read` handler drops the connection or damages data at chosen offsets."""

    def __init__(self, roots: Any) -> None:
        super().__init__(roots)
        #: Offsets whose next read is served from disk, then the connection dropped (once each).
        self.drop_once: set[int] = set()
        #: Reads at or past this offset are served from disk, then the connection dropped.
        self.drop_from: int | None = None
        #: Offsets whose next reply has one byte flipped after its CRC was computed.
        self.damage_once: set[int] = set()
        #: Reads at or past this offset wait for `gate` (a transfer held mid-way).
        self.gate_from: int | None = None
        self.gate = asyncio.Event()

    async def read(self, path: str, offset: int, size: int, tid: str, ident: list[int]) -> Any:
        """Serve as usual, then inject the fault planned for `offset`."""
        if self.gate_from is not None and offset >= self.gate_from:
            await self.gate.wait()
        rep = await super().read(path, offset, size, tid, ident)
        if offset in self.drop_once or (self.drop_from is not None and offset >= self.drop_from):
            self.drop_once.discard(offset)
            raise CommClosedError(f"injected: connection dropped after the chunk at {offset}")
        if offset in self.damage_once:
            self.damage_once.discard(offset)
            data = bytearray(rep["data"])
            data[len(data) // 2] ^= 0xFF
            rep["data"] = bytes(data)
        return rep


@dataclass
class Env:
    """Two workers on one scheduler; `src` serves `src_root`, `dst` owns `dst_root`."""

    scheduler: Scheduler
    src: Worker
    dst: Worker
    server: Faulty
    src_root: Path
    dst_root: Path


@asynccontextmanager
async def cluster(tmp_path: Path) -> AsyncIterator[Env]:
    """A scheduler and two workers with separate storage roots, all closed on the way out."""
    src_root, dst_root = tmp_path / "src-root", tmp_path / "dst-root"
    src_root.mkdir()
    dst_root.mkdir()
    server = Faulty([src_root])
    async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0") as s:
        common: dict[str, Any] = {
            "host": "127.0.0.1",
            "nthreads": 2,
            "memory_limit": 0,
            "dashboard": False,
        }
        async with (
            Worker(s.address, name="src", plugins=(server,), **common) as a,
            Worker(s.address, name="dst", plugins=(FileServer([dst_root]),), **common) as b,
        ):
            yield Env(s, a, b, server, src_root, dst_root)


def blob(path: Path, size: int) -> Path:
    """Write `size` bytes that differ from chunk to chunk (a misplaced chunk would show)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n
    return path


def sparse(path: Path, size: int, data: dict[int, int]) -> Path:
    """A file of `size` bytes, holes except for random bytes at each offset: length in `data`."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, n in data.items():
            f.seek(offset)
            f.write(os.urandom(n))
    return path


def flip(path: Path, offset: int) -> None:
    """Invert the byte at `offset` of `path` in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


def same(a: Path, b: Path) -> bool:
    """Byte-for-byte equality, read in blocks."""
    return filecmp.cmp(a, b, shallow=False)


def test_a_large_file_and_a_cache_tree_arrive_byte_identical(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as env:
            sealed = blob(env.src_root / "sealed" / "s-t01000-1", 48 * MiB)
            cache = env.src_root / "cache" / "s-t01000-1"
            blob(cache / "p_aux", 64)
            blob(cache / "t_aux", 1000)
            blob(cache / "sc-02-data-tree-r-last-0.dat", 3 * MiB + 17)
            blob(cache / "sub" / "deep" / "layer", 5 * MiB)
            (cache / "empty").write_bytes(b"")
            (cache / "nothing-here").mkdir()
            dest = env.dst_root / "sealed" / "s-t01000-1"
            async with Client(env.scheduler.address, asynchronous=True) as c:
                reported = asyncio.Event()

                def on_progress(event: tuple[float, dict[str, Any]]) -> None:
                    msg = event[1]
                    if msg["job"] == "fetch-1" and msg["done"] == msg["total"] == 48 * MiB:
                        reported.set()

                c.subscribe_topic(PROGRESS_TOPIC, on_progress)
                # As the backend will run it: a task pinned to the destination worker.
                fut = c.submit(
                    fetch_here,
                    env.src.address,
                    str(sealed),
                    str(dest),
                    job="fetch-1",
                    workers=[env.dst.address],
                    allow_other_workers=False,
                    pure=False,
                )
                got = await asyncio.wait_for(fut, DEADLINE)
                await asyncio.wait_for(reported.wait(), DEADLINE)  # progress reached the total
            assert same(sealed, dest)
            assert got["size"] == got["fetched"] == 48 * MiB and got["retries"] == 0
            assert sorted(p.name for p in dest.parent.iterdir()) == ["s-t01000-1"]  # no .part
            # Never more than one chunk read at a time, and each byte read once.
            assert env.server.max_read == 8 * MiB
            assert env.server.bytes_read == 48 * MiB

            seen: list[tuple[int, int]] = []
            tree = env.dst_root / "cache" / "s-t01000-1"
            res = await pull(
                env.dst.rpc,
                env.src.address,
                str(cache),
                tree,
                chunk=MiB,
                progress=lambda d, t: seen.append((d, t)),
            )
            files = sorted(p.relative_to(cache) for p in cache.rglob("*"))
            assert sorted(p.relative_to(tree) for p in tree.rglob("*")) == files
            for rel in files:
                assert (cache / rel).is_dir() or same(cache / rel, tree / rel), rel
            assert res.files == 5 and res.size == 8 * MiB + 17 + 1064
            assert seen[-1] == (res.size, res.size)
            assert [d for d, _ in seen] == sorted(d for d, _ in seen)
            assert not (env.dst_root / "cache" / "s-t01000-1.part").exists()

    asyncio.run(body())


def test_memory_stays_bounded_by_the_chunk_size(tmp_path: Path) -> None:
    chunk = 2 * MiB

    async def body() -> None:
        async with cluster(tmp_path) as env:
            src = blob(env.src_root / "f", 40 * MiB)
            tracemalloc.start()
            try:
                await pull(env.dst.rpc, env.src.address, str(src), env.dst_root / "f", chunk=chunk)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert same(src, env.dst_root / "f")
            assert env.server.max_read == chunk
            # Source and destination share this process: a few chunks in flight, not the file.
            assert peak < 8 * chunk, f"peak {peak / MiB:.1f} MiB for a 40 MiB file"

    asyncio.run(body())


def test_a_dropped_connection_resumes_without_rereading_verified_chunks(tmp_path: Path) -> None:
    chunk, size = 4 * MiB, 40 * MiB

    async def body() -> None:
        async with cluster(tmp_path) as env:
            src = blob(env.src_root / "sealed" / "s", size)
            dest = env.dst_root / "sealed" / "s"
            seen: list[int] = []

            # Dropped once mid-transfer: retried at once, only the lost chunk is read again.
            env.server.drop_once = {5 * chunk}
            res = await pull(
                env.dst.rpc,
                env.src.address,
                str(src),
                dest,
                chunk=chunk,
                backoff=0.001,
                progress=lambda d, t: seen.append(d),
            )
            assert same(src, dest) and res.retries == 1
            assert env.server.bytes_read == size + chunk
            assert seen[-1] == size and seen == sorted(seen)

            # The source keeps dropping from chunk 6 on: the pull gives up with one clear error
            # and leaves the verified part file behind...
            dest2 = env.dst_root / "sealed" / "s2"
            env.server.bytes_read = 0
            env.server.drop_from = 6 * chunk
            with pytest.raises(TransferError, match="gave up after 3 failed attempts in a row"):
                await pull(
                    env.dst.rpc,
                    env.src.address,
                    str(src),
                    dest2,
                    chunk=chunk,
                    attempts=3,
                    backoff=0.001,
                )
            part = dest2.with_name("s2.part")
            assert part.stat().st_size == 6 * chunk and not dest2.exists()
            assert env.server.bytes_read == 6 * chunk + 3 * chunk

            # ...and the next pull starts from it: nothing verified is served again, and the
            # source's running sha256 still covers the whole file (no second full read).
            env.server.drop_from = None
            env.server.bytes_read = 0
            seen.clear()
            res = await pull(
                env.dst.rpc,
                env.src.address,
                str(src),
                dest2,
                chunk=chunk,
                progress=lambda d, t: seen.append(d),
            )
            assert same(src, dest2) and not part.exists()
            assert env.server.bytes_read == size - 6 * chunk
            assert res.fetched == size - 6 * chunk
            assert seen[0] == 6 * chunk and seen[-1] == size

    asyncio.run(body())


def test_a_damaged_chunk_is_detected_and_fetched_again(tmp_path: Path) -> None:
    chunk, size = 4 * MiB, 40 * MiB

    async def body() -> None:
        async with cluster(tmp_path) as env:
            src = blob(env.src_root / "f", size)
            env.server.damage_once = {2 * chunk, size - chunk}  # the last one carries the sha256
            res = await pull(
                env.dst.rpc,
                env.src.address,
                str(src),
                env.dst_root / "f",
                chunk=chunk,
                backoff=0.001,
            )
            assert same(src, env.dst_root / "f")
            assert res.retries == 2 and env.server.damage_once == set()
            assert env.server.bytes_read == size + 2 * chunk

    asyncio.run(body())


def test_paths_outside_the_roots_are_refused(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as env:
            outside = blob(tmp_path / "secret", 100)
            (env.src_root / "link").symlink_to(outside)
            (env.src_root / "dirlink").symlink_to(tmp_path)
            blob(env.src_root / "ok", 10)
            bad = [
                str(outside),
                "/etc/passwd",
                f"{env.src_root}/../secret",
                f"{env.src_root}/sub/../ok",  # inside, but '..' is refused outright
                str(env.src_root / "link"),
                str(env.src_root / "dirlink" / "secret"),
                "ok",
                "",
            ]
            for path in bad:
                with pytest.raises(PathRefused):
                    await pull(env.dst.rpc, env.src.address, path, env.dst_root / "x")
                assert list(env.dst_root.iterdir()) == [], path
            assert env.server.bytes_read == 0
            # The destination worker writes only under its own roots.
            async with Client(env.scheduler.address, asynchronous=True) as c:
                fut = c.submit(
                    fetch_here,
                    env.src.address,
                    str(env.src_root / "ok"),
                    str(tmp_path / "elsewhere"),
                    workers=[env.dst.address],
                    allow_other_workers=False,
                    pure=False,
                )
                with pytest.raises(PathRefused, match="outside this worker's storage roots"):
                    await asyncio.wait_for(fut, DEADLINE)
            assert not (tmp_path / "elsewhere").exists()

    asyncio.run(body())


def test_a_source_file_that_changes_midway_fails_clearly(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as env:
            src = blob(env.src_root / "f", 4 * MiB)

            def grow(done: int, total: int) -> None:
                if done == MiB:
                    with open(src, "ab") as f:
                        f.write(b"more")

            with pytest.raises(SourceChanged, match="changed on the source worker"):
                await pull(
                    env.dst.rpc,
                    env.src.address,
                    str(src),
                    env.dst_root / "f",
                    chunk=MiB,
                    progress=grow,
                )
            assert not (env.dst_root / "f").exists()

    asyncio.run(body())


def test_holes_in_a_sparse_file_cross_as_holes(tmp_path: Path) -> None:
    chunk, size = MiB, 24 * MiB

    async def body() -> None:
        async with cluster(tmp_path) as env:
            # Data in chunk 3 and at the very end, holes elsewhere.
            src = sparse(env.src_root / "unsealed", size, {3 * chunk + 100: 5000, size - 10: 10})
            if os.stat(src).st_blocks * 512 >= size:
                pytest.skip("this filesystem does not keep holes")
            dest = env.dst_root / "unsealed"
            res = await pull(env.dst.rpc, env.src.address, str(src), dest, chunk=chunk)
            assert same(src, dest)
            assert res.fetched == 2 * chunk and res.holes == size - 2 * chunk
            assert env.server.bytes_read == 2 * chunk
            assert os.stat(dest).st_blocks * 512 <= 4 * chunk  # still sparse

    asyncio.run(body())


def test_a_part_file_damaged_on_disk_fails_the_whole_file_check_and_starts_over(
    tmp_path: Path,
) -> None:
    chunk, size = MiB, 8 * MiB

    async def body() -> None:
        async with cluster(tmp_path) as env:
            src = blob(env.src_root / "f", size)
            dest = env.dst_root / "f"
            env.server.drop_from = 4 * chunk
            with pytest.raises(TransferError, match="gave up"):
                await pull(env.dst.rpc, env.src.address, str(src), dest, chunk=chunk, attempts=1)
            flip(dest.with_name("f.part"), chunk + 7)  # bit rot in a chunk verified on arrival
            env.server.drop_from = None
            env.server.bytes_read = 0
            res = await pull(
                env.dst.rpc, env.src.address, str(src), dest, chunk=chunk, backoff=0.001
            )
            assert same(src, dest) and res.retries == 1
            # The rest of the file, then all of it again after the mismatch.
            assert env.server.bytes_read == size - 4 * chunk + size

    asyncio.run(body())


def test_a_retried_fetch_finds_its_finished_copy_and_copies_nothing(tmp_path: Path) -> None:
    size = 12 * MiB

    async def body() -> None:
        async with cluster(tmp_path) as env:
            src = blob(env.src_root / "sealed" / "s-t01000-1", size)
            dest = env.dst_root / "sealed" / "s-t01000-1"
            await pull(env.dst.rpc, env.src.address, str(src), dest, chunk=MiB)
            before = os.stat(dest)
            env.server.bytes_read = 0
            seen: list[tuple[int, int]] = []
            # The copy finished, then the engine died before it recorded the move: the same
            # fetch again succeeds without copying (the source reads the file once, to hash it).
            res = await pull(
                env.dst.rpc,
                env.src.address,
                str(src),
                dest,
                chunk=MiB,
                progress=lambda d, t: seen.append((d, t)),
            )
            assert res.kept and not res.replaced and res.fetched == 0 and res.files == 1
            assert env.server.bytes_read == size and env.server.max_read == 8 * MiB
            after = os.stat(dest)
            assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
            assert seen == [(size, size)]
            # As the Dask task the sealer runs, too.
            async with Client(env.scheduler.address, asynchronous=True) as c:
                fut = c.submit(
                    fetch_here,
                    env.src.address,
                    str(src),
                    str(dest),
                    workers=[env.dst.address],
                    allow_other_workers=False,
                    pure=False,
                )
                got = await asyncio.wait_for(fut, DEADLINE)
            assert got["kept"] and got["fetched"] == 0

    asyncio.run(body())


def test_a_copy_with_other_content_is_replaced_through_the_part_file(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as env:
            src = blob(env.src_root / "sealed" / "s-t01000-1", 6 * MiB)
            dest = env.dst_root / "sealed" / "s-t01000-1"
            for damage in ("flip", "short"):
                await pull(env.dst.rpc, env.src.address, str(src), dest, chunk=MiB)
                if damage == "flip":
                    flip(dest, 3 * MiB + 5)  # same size, other bytes
                else:
                    os.truncate(dest, MiB)
                # The source's copy is served again into `.part`, then renamed over the old one.
                env.server.drop_from = 4 * MiB
                with pytest.raises(TransferError, match="gave up"):
                    await pull(env.dst.rpc, env.src.address, str(src), dest, chunk=MiB, attempts=1)
                assert dest.with_name("s-t01000-1.part").stat().st_size == 4 * MiB
                assert not same(src, dest)  # the old copy stays until the new one is whole
                env.server.drop_from = None
                res = await pull(env.dst.rpc, env.src.address, str(src), dest, chunk=MiB)
                assert res.replaced and not res.kept and res.fetched == 2 * MiB, damage
                assert same(src, dest)
                assert sorted(p.name for p in dest.parent.iterdir()) == ["s-t01000-1"]
                dest.unlink()

    asyncio.run(body())


def test_a_different_file_at_the_destination_is_never_overwritten(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as env:
            src = blob(env.src_root / "sealed" / "s-t01000-1", MiB)
            other = blob(env.dst_root / "sealed" / "s-t01000-2", 2 * MiB)
            kept = other.read_bytes()
            with pytest.raises(TransferError, match="is not a copy of s-t01000-1: not overwritten"):
                await pull(env.dst.rpc, env.src.address, str(src), other)
            (env.dst_root / "cache" / "s-t01000-1").mkdir(parents=True)
            with pytest.raises(TransferError, match="exists and is not a file like s-t01000-1"):
                await pull(
                    env.dst.rpc, env.src.address, str(src), env.dst_root / "cache" / "s-t01000-1"
                )
            assert other.read_bytes() == kept
            assert sorted(p.name for p in other.parent.iterdir()) == ["s-t01000-2"]
            assert env.server.bytes_read == 0

    asyncio.run(body())


def test_a_cache_tree_fetched_again_is_kept_or_mended(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as env:
            cache = env.src_root / "cache" / "s-t01000-1"
            blob(cache / "p_aux", 64)
            blob(cache / "tree-r-last-0.dat", 3 * MiB)
            blob(cache / "sub" / "layer", 2 * MiB)
            tree = env.dst_root / "cache" / "s-t01000-1"
            await pull(env.dst.rpc, env.src.address, str(cache), tree, chunk=MiB)
            res = await pull(env.dst.rpc, env.src.address, str(cache), tree, chunk=MiB)
            assert res.kept and res.fetched == 0 and res.files == 3
            # One file damaged, one left over from something else: mended, the stray removed,
            # and only the damaged file crosses again.
            flip(tree / "sub" / "layer", 10)
            (tree / "stray").write_bytes(b"x")
            res = await pull(env.dst.rpc, env.src.address, str(cache), tree, chunk=MiB)
            assert res.replaced and res.fetched == 2 * MiB
            files = sorted(p.relative_to(cache) for p in cache.rglob("*"))
            assert sorted(p.relative_to(tree) for p in tree.rglob("*")) == files
            for rel in files:
                assert (cache / rel).is_dir() or same(cache / rel, tree / rel), rel
            assert not tree.with_name("s-t01000-1.part").exists()

    asyncio.run(body())
