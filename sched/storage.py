"""The storage index: which worker and path hold which sector file, and space reservations.

Lotus checks a path's free space from a heartbeat refreshed every 10 s and reserves nothing
when it assigns work, so a burst of assignments lands on one path and later fails with
"out of space". Here space is reserved when a task is assigned and released when it ends, so
`available` always accounts for work already promised to the path.

The index also counts the bytes of every sector file it records (`StoragePath.stored`), per
file: a file keeps its bytes when it moves, gives them back when it is removed, and shrinks
to Lotus's finalized size (`FsOverheadFinalized` in `storiface/filetype.go@v1.11.3`) when
Finalize drops the cache's scratch layers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from .filetypes import FileType, space_needed

#: Every single file type, in `FileType.each` order.
_EVERY_FILE = tuple(FileType(0x3F).each())
#: How many sectors' answers `StorageIndex` keeps before it starts over.
_KNOWN_SECTORS = 1024


@dataclass(slots=True)
class _Known:
    """What `StorageIndex` answered about one sector since its files last changed."""

    holders: dict[FileType, frozenset[str]] = field(default_factory=dict)
    locations: frozenset[tuple[str | None, int]] | None = None


@dataclass(frozen=True, slots=True, order=True)
class SectorRef:
    """A sector: its miner actor id, its number and its size in bytes."""

    miner: int
    number: int
    size: int

    def __str__(self) -> str:
        return f"s-t0{self.miner}-{self.number}"


@dataclass(slots=True)
class StoragePath:
    """One storage path: local to a worker (sealing scratch) or shared long-term storage."""

    id: str
    #: The worker that has this path locally; None for storage every worker can reach.
    worker: str | None
    capacity: int
    can_seal: bool = True
    can_store: bool = False
    weight: int = 1
    #: Bytes used on disk by anything but the sector files the index records, as reported.
    used: int = 0
    #: Bytes promised to assigned tasks that have not written them yet.
    reserved: int = 0
    #: Bytes of the sector files the index records on this path.
    stored: int = 0

    @property
    def available(self) -> int:
        """Free bytes after other use, this path's sector files and what is reserved."""
        return self.capacity - self.used - self.stored - self.reserved


@dataclass(slots=True)
class _Reservation:
    path: str
    size: int


@dataclass(slots=True)
class StorageIndex:
    """Sector files per path, and space reservations per task."""

    paths: dict[str, StoragePath] = field(default_factory=dict)
    #: Per sector, per single file type, `(path id, bytes counted there)` for each path that
    #: holds it: a tuple, mostly of one (a set per file of every sector ever sealed was a
    #: fifth of the engine's memory per finished sector). Keyed by sector first, so a task's
    #: questions about its sector hash the sector once, not once per file type.
    _sectors: dict[SectorRef, dict[FileType, tuple[tuple[str, int], ...]]] = field(
        default_factory=dict
    )
    _by_path: dict[str, set[tuple[SectorRef, FileType]]] = field(
        default_factory=lambda: defaultdict(set)
    )
    #: Per path, how many files of each type `_by_path` holds (`file_counts`).
    _counts: dict[str, dict[FileType, int]] = field(
        default_factory=lambda: defaultdict(dict), compare=False, repr=False
    )
    _reservations: dict[int, list[_Reservation]] = field(default_factory=dict)
    #: Path ids per worker, so per-worker lookups do not scan every path.
    _of_worker: dict[str | None, list[str]] = field(default_factory=lambda: defaultdict(list))
    #: `holders` and `locations` answers per sector until that sector's files or any path
    #: change: one burst of placement tests asks the same question once per worker, and a
    #: sector's files change a few times in its life, where the cluster's change constantly.
    _held_by: dict[SectorRef, _Known] = field(default_factory=dict, compare=False, repr=False)
    #: Per worker, bumped whenever the files on its paths or its paths change, so what is
    #: counted from them (the policy's disk units) is counted again only when it can differ.
    _files_rev: dict[str | None, int] = field(
        default_factory=lambda: defaultdict(int), compare=False, repr=False
    )

    # -- paths ------------------------------------------------------------------------------

    def declare(self, path: StoragePath) -> None:
        """Add or replace a path (keeps the files already recorded on it)."""
        old = self.paths.get(path.id)
        if old is not None:
            path.reserved, path.stored = old.reserved, old.stored
            self._of_worker[old.worker].remove(old.id)
            self._files_rev[old.worker] += 1
        self.paths[path.id] = path
        self._files_rev[path.worker] += 1
        self._of_worker[path.worker].append(path.id)
        self._held_by.clear()  # a path's worker is in every answer

    def worker_paths(self, worker: str) -> Iterator[StoragePath]:
        """The paths local to `worker`."""
        return (self.paths[pid] for pid in self._of_worker.get(worker, ()))

    # -- sector files -----------------------------------------------------------------------

    def add_sector(
        self,
        sector: SectorRef,
        files: FileType,
        path_id: str,
        sizes: Mapping[FileType, int] | None = None,
        *,
        finalized: bool = False,
    ) -> None:
        """Record that `files` of `sector` are now on `path_id`, counting their bytes there.

        A file's bytes are `sizes[file]` when given (what is really on disk), else Lotus's
        overhead for its type (while sealing, or `finalized`).
        """
        path = self.paths.get(path_id)
        if path is None:
            raise KeyError(f"unknown storage path {path_id!r}")
        self._held_by.pop(sector, None)
        held = self._sectors.get(sector)
        if held is None:
            held = self._sectors[sector] = {}
        by_path, counts = self._by_path[path_id], self._counts[path_id]
        for f in files.each():
            nbytes = sizes[f] if sizes is not None and f in sizes else None
            if nbytes is None:
                nbytes = space_needed(f, sector.size, finalized=finalized)
            holders = held.get(f, ())
            old = 0
            for i, (pid, counted) in enumerate(holders):
                if pid == path_id:
                    old = counted
                    held[f] = (*holders[:i], (path_id, nbytes), *holders[i + 1 :])
                    break
            else:
                held[f] = (*holders, (path_id, nbytes))
            path.stored += nbytes - old
            n = len(by_path)
            by_path.add((sector, f))
            if len(by_path) != n:
                counts[f] = counts.get(f, 0) + 1
        if files:
            self._files_rev[path.worker] += 1

    def remove_sector(self, sector: SectorRef, files: FileType, path_id: str | None = None) -> None:
        """Forget `files` of `sector` on one path (or on every path); their bytes are freed."""
        self._held_by.pop(sector, None)
        held = self._sectors.get(sector)
        if held is None:
            return
        paths = self.paths
        for f in files.each():
            holders = held.get(f)
            if not holders:
                continue
            left = []
            for pid, counted in holders:
                if path_id is not None and pid != path_id:
                    left.append((pid, counted))
                    continue
                by_path = self._by_path[pid]
                n = len(by_path)
                by_path.discard((sector, f))
                if len(by_path) != n:
                    self._counts[pid][f] -= 1
                path = paths.get(pid)
                if path is not None:
                    self._files_rev[path.worker] += 1
                    path.stored -= counted
            if left:
                held[f] = tuple(left)
            else:
                del held[f]
        if not held:
            del self._sectors[sector]

    def move_sector(self, sector: SectorRef, files: FileType, path_id: str) -> None:
        """`files` moved to `path_id` from wherever they were; their bytes go with them."""
        sizes: dict[FileType, int] = {}
        held = self._sectors.get(sector)
        if held is not None:
            for f in files.each():
                for _, counted in held.get(f, ()):
                    sizes[f] = max(sizes.get(f, 0), counted)
        self.remove_sector(sector, files)
        self.add_sector(sector, files, path_id, sizes)

    def finalize_sector(self, sector: SectorRef, files: FileType) -> None:
        """Finalize shrank `files` of `sector`: count them at Lotus's finalized size."""
        held = self._sectors.get(sector)
        if held is None:
            return
        paths = self.paths
        for f in files.each():
            holders = held.get(f)
            if not holders:
                continue
            nbytes = space_needed(f, sector.size, finalized=True)
            for pid, counted in holders:
                path = paths.get(pid)
                if path is not None:
                    path.stored += nbytes - counted
            held[f] = tuple((pid, nbytes) for pid, _ in holders)

    def sector_bytes(self, sector: SectorRef) -> dict[str, dict[FileType, int]]:
        """Path id -> the bytes counted for each of the sector's files there."""
        out: dict[str, dict[FileType, int]] = {}
        held = self._sectors.get(sector)
        if held:
            for f in _EVERY_FILE:
                for pid, counted in held.get(f, ()):
                    out.setdefault(pid, {})[f] = counted
        return out

    def bytes_at(self, sector: SectorRef, files: FileType, path_id: str) -> int:
        """The bytes counted for `files` of `sector` on `path_id` (`sector_bytes`, summed)."""
        held = self._sectors.get(sector)
        total = 0
        if held:
            for f in files.each():
                for pid, counted in held.get(f, ()):
                    if pid == path_id:
                        total += counted
        return total

    def find_sector(self, sector: SectorRef, files: FileType) -> dict[str, FileType]:
        """Which of `files` each path holds."""
        bits: dict[str, int] = {}
        held = self._sectors.get(sector)
        if held:
            for f in files.each():
                for pid, _ in held.get(f, ()):
                    bits[pid] = bits.get(pid, 0) | f.value
        # One enum conversion per path: flag arithmetic makes a new member at every `|`.
        return {pid: FileType(b) for pid, b in bits.items()}

    def has_any(self, sector: SectorRef, files: FileType) -> bool:
        """True if any path holds any of `files` of `sector` (`find_sector`, without a dict)."""
        held = self._sectors.get(sector)
        return held is not None and any(f in held for f in files.each())

    def holders(self, sector: SectorRef, files: FileType) -> frozenset[str]:
        """Workers that hold *all* of `files` of `sector` on their local paths."""
        known = self._known(sector)
        found = known.holders.get(files)
        if found is None:
            found = known.holders[files] = frozenset(self._holders(sector, files))
        return found

    def _known(self, sector: SectorRef) -> _Known:
        known = self._held_by.get(sector)
        if known is None:
            if len(self._held_by) >= _KNOWN_SECTORS:
                self._held_by.clear()  # bounded: most answers are asked again soon or never
            known = self._held_by[sector] = _Known()
        return known

    def _holders(self, sector: SectorRef, files: FileType) -> set[str]:
        # One set per file type, intersected.
        held = self._sectors.get(sector)
        if held is None:
            return set()
        paths = self.paths
        out: set[str] | None = None
        for f in files.each():
            ws = {w for pid, _ in held.get(f, ()) if (w := paths[pid].worker) is not None}
            out = ws if out is None else out & ws
            if not out:
                return set()
        return out if out is not None else set()

    def locations(self, sector: SectorRef) -> frozenset[tuple[str | None, int]]:
        """`(worker or None for shared storage, files held)` for every holder of the sector."""
        known = self._known(sector)
        found = known.locations
        if found is None:
            per: dict[str | None, int] = {}
            held = self._sectors.get(sector)
            if held:
                paths = self.paths
                for f in _EVERY_FILE:
                    for pid, _ in held.get(f, ()):
                        w = paths[pid].worker
                        per[w] = per.get(w, 0) | int(f)
            found = known.locations = frozenset(per.items())
        return found

    def worker_holds(self, worker: str, sector: SectorRef, files: FileType) -> bool:
        """True if `worker` has all of `files` of `sector` locally."""
        held = self._sectors.get(sector)
        if held is None:
            return False
        paths = self.paths
        for f in files.each():
            for pid, _ in held.get(f, ()):
                if paths[pid].worker == worker:
                    break
            else:
                return False
        return files.value != 0

    def files_version(self, worker: str) -> int:
        """A number that changes whenever the files on `worker`'s paths, or its paths, do."""
        return self._files_rev[worker]

    def file_counts(self, worker: str) -> dict[FileType, int]:
        """How many files of each type `local_files` lists, kept as files come and go."""
        out: dict[FileType, int] = {}
        for p in self.worker_paths(worker):
            if not p.can_store:
                for f, n in self._counts.get(p.id, {}).items():
                    out[f] = out.get(f, 0) + n
        return out

    def local_files(self, worker: str) -> Iterator[tuple[SectorRef, FileType]]:
        """Every sector file on `worker`'s sealing (non-long-term) paths."""
        for p in self.worker_paths(worker):
            if not p.can_store:
                yield from self._by_path.get(p.id, ())

    # -- space ------------------------------------------------------------------------------

    def best_alloc(
        self, worker: str, files: FileType, sector_size: int, *, sealing: bool = True
    ) -> StoragePath | None:
        """`worker`'s local path with the most weighted free space that fits `files`."""
        need = space_needed(files, sector_size)
        best: StoragePath | None = None
        for p in self.worker_paths(worker):
            if not (p.can_seal if sealing else p.can_store) or p.available < need:
                continue
            if best is None or p.available * p.weight > best.available * best.weight:
                best = p
        return best

    def free_space(self, worker: str, *, sealing: bool = True) -> int:
        """The largest free space on any of `worker`'s sealing (or storage) paths."""
        spaces = [
            p.available
            for p in self.worker_paths(worker)
            if (p.can_seal if sealing else p.can_store)
        ]
        return max(spaces, default=0)

    def lacks_room(self, worker: str, need: int) -> bool:
        """True if `worker` has sealing paths but none with `need` bytes free (out of space)."""
        best: int | None = None
        paths = self.paths
        for pid in self._of_worker.get(worker, ()):
            p = paths[pid]
            if p.can_seal:
                free = p.available
                if best is None or free > best:
                    best = free
        return best is not None and best < need

    def reserve(self, owner: int, path_id: str, size: int) -> None:
        """Promise `size` bytes of `path_id` to task `owner` until `release(owner)`."""
        self.paths[path_id].reserved += size
        self._reservations.setdefault(owner, []).append(_Reservation(path_id, size))

    def consume(self, owner: int, path_id: str, nbytes: int) -> None:
        """Task `owner` wrote `nbytes` it had reserved on `path_id`: they now count as stored."""
        for r in self._reservations.get(owner, ()):
            if r.path == path_id and nbytes > 0:
                used = min(r.size, nbytes)
                r.size -= used
                nbytes -= used
                if path_id in self.paths:
                    self.paths[path_id].reserved -= used

    def release(self, owner: int) -> None:
        """Return everything task `owner` had reserved."""
        for r in self._reservations.pop(owner, ()):
            path = self.paths.get(r.path)
            if path is not None:
                path.reserved -= r.size
