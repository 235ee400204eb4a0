"""The storage index keeps its files per sector: a task's questions hash its sector once.

It also counts each path's files by type as they come and go, so the policy's disk units
of a worker whose files changed are a sum of a few counts, not a walk of all its files.

Every answer is checked against a plain model of the same operations (files per path with
their bytes), through random adds, removals, moves, finalizes and path changes; and the
questions a task asks at every step (`sector_bytes`, `find_sector`, `has_any`,
`worker_holds`) against a count of the sector's hashes: one, not one per file type.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sectorfsm.sched.filetypes import FileType, space_needed
from sectorfsm.sched.gate import PolicyGate
from sectorfsm.sched.ledger import Ledger, WorkerResources
from sectorfsm.sched.rules import disk_units
from sectorfsm.sched.storage import SectorRef, StorageIndex, StoragePath
from sectorfsm.sched.workers import Worker, WorkerSpec

GIB = 1 << 30
TIB = 1 << 40
S32 = 32 << 30
U, S, C = FileType.UNSEALED, FileType.SEALED, FileType.CACHE
EVERY = (U, S, C, FileType.UPDATE, FileType.UPDATE_CACHE, FileType.PIECE)


class _Model:
    """(sector, file) -> {path: bytes}, in the order the paths got the file."""

    def __init__(self) -> None:
        self.files: dict[tuple[SectorRef, FileType], dict[str, int]] = {}

    def add(self, s: SectorRef, files: FileType, pid: str, sizes: dict[FileType, int]) -> None:
        for f in files.each():
            n = sizes.get(f, space_needed(f, s.size))
            self.files.setdefault((s, f), {})[pid] = n

    def remove(self, s: SectorRef, files: FileType, pid: str | None) -> None:
        for f in files.each():
            held = self.files.get((s, f), {})
            for p in [p for p in held if pid is None or p == pid]:
                del held[p]
            if not held:
                self.files.pop((s, f), None)

    def move(self, s: SectorRef, files: FileType, pid: str) -> None:
        sizes = {f: max(h.values()) for f in files.each() if (h := self.files.get((s, f)))}
        self.remove(s, files, None)
        self.add(s, files, pid, sizes)

    def finalize(self, s: SectorRef, files: FileType) -> None:
        for f in files.each():
            for p in self.files.get((s, f), {}):
                self.files[(s, f)][p] = space_needed(f, s.size, finalized=True)


def test_the_index_answers_as_a_plain_model_of_its_files() -> None:
    rng = random.Random(9)
    index, model = StorageIndex(), _Model()
    for name in ("a", "b", "c"):
        index.declare(StoragePath(f"{name}-1", name, 40 * TIB))
    index.declare(StoragePath("shared", None, 400 * TIB, can_seal=False, can_store=True))
    paths = [*index.paths]
    sets = [U, C, S, C | S, U | C | S]
    sectors = [SectorRef(1000, n, S32) for n in range(8)]
    for step in range(600):
        s, files, pid = rng.choice(sectors), rng.choice(sets), rng.choice(paths)
        op = rng.random()
        if op < 0.35:
            index.add_sector(s, files, pid)
            model.add(s, files, pid, {})
        elif op < 0.55:
            where = rng.choice([None, pid])
            index.remove_sector(s, files, where)
            model.remove(s, files, where)
        elif op < 0.8:
            index.move_sector(s, files, pid)
            model.move(s, files, pid)
        else:
            index.finalize_sector(s, C)
            model.finalize(s, C)
        for p in paths:
            want = sum(b.get(p, 0) for b in model.files.values())
            assert index.paths[p].stored == want, step
        for name in "abc":
            listed = Counter(f for _, f in index.local_files(name))
            counted = {f: n for f, n in index.file_counts(name).items() if n}
            assert counted == listed, step
        for t in sectors:
            per: dict[str, dict[FileType, int]] = {}
            for f in EVERY:
                for p, n in model.files.get((t, f), {}).items():
                    per.setdefault(p, {})[f] = n
            assert index.sector_bytes(t) == per, step
            for p in paths:
                for files in sets:
                    here = per.get(p, {})
                    want = sum(here[f] for f in files.each() if f in here)
                    assert index.bytes_at(t, files, p) == want
            for files in sets:
                bits = {
                    p: FileType(sum(f for f in files.each() if f in got)) for p, got in per.items()
                }
                assert index.find_sector(t, files) == {p: b for p, b in bits.items() if b}
                assert index.has_any(t, files) == any((t, f) in model.files for f in files.each())
                workers = {
                    name
                    for name in "abc"
                    if all(f in per.get(f"{name}-1", {}) for f in files.each())
                }
                assert index.holders(t, files) == workers, (step, t, files)
                for name in "abc":
                    assert index.worker_holds(name, t, files) == (name in workers)
            where: dict[str | None, int] = {}
            for p, got in per.items():
                w = index.paths[p].worker
                where[w] = where.get(w, 0) | sum(got)
            assert index.locations(t) == frozenset(where.items())


class _Counted(SectorRef):
    """A sector that counts how often it is hashed."""

    hashes = 0

    def __hash__(self) -> int:
        _Counted.hashes += 1
        return super().__hash__()


def test_a_tasks_questions_hash_its_sector_once() -> None:
    index = StorageIndex()
    index.declare(StoragePath("a-1", "a", 40 * TIB))
    s = _Counted(1000, 1, S32)
    index.add_sector(s, U | C | S, "a-1")
    for ask in (
        lambda: index.sector_bytes(s),
        lambda: index.find_sector(s, U | C | S),
        lambda: index.has_any(s, U | C | S),
        lambda: index.worker_holds("a", s, U | C | S),
    ):
        _Counted.hashes = 0
        ask()
        assert _Counted.hashes == 1  # one lookup of the sector, then its own small table


def test_the_policys_disk_units_come_from_the_counts_not_a_walk_of_the_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    index = StorageIndex()
    index.declare(StoragePath("a-1", "a", 40 * TIB))
    index.declare(StoragePath("a-store", "a", 40 * TIB, can_seal=False, can_store=True))
    res = WorkerResources(cpus=8, mem_physical=64 * GIB)
    w = Worker(WorkerSpec("a", res), None, Ledger(res), 0.0)  # type: ignore[arg-type]
    for n in range(30):
        s = SectorRef(1000, n, S32)
        index.add_sector(s, U | C | S if n % 3 else U, "a-1" if n % 5 else "a-store")
    want = disk_units((f, True) for _, f in index.local_files("a"))
    assert want[0] > 0

    def walked(*args: object) -> None:
        raise AssertionError("the gate walked the worker's files")

    monkeypatch.setattr(StorageIndex, "local_files", walked)
    view = PolicyGate(index).view(w, S32)
    assert (view.disk_used, view.ap_disk_used) == want
