"""What the file-based sealer backends share: storage paths, sector files, thread work.

The `reference` and `command` backends keep sector files in Lotus's layout under storage
directories, one per storage path id of the scheduler: `sealer_options["storage"]` maps path
ids to directories (relative ones are under the repo; `sectors run` fills it from each
`[[workers.paths]]`'s `path`), and the default worker's one path, `"local"`, is
`<repo>/storage`. A missing directory is created; one that cannot be is a `StorageError`.
`Storage` tells a backend where each sector file is, or where a new one goes (the path the
scheduler chose).

The default worker's path reports the disk's size as its capacity and what *other* files use
as `used` (the storage index adds this miner's sector files itself), so a full disk shows in
the scheduler's placement decisions.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ...fsm import Clock
from ...sched import FileType, SectorRef, StoragePath, WorkerSpec, local_worker
from ..owners import OwnerError, Owners

if TYPE_CHECKING:
    from ...sched import Placement

T = TypeVar("T")

#: The default worker's name and its one storage path id.
LOCAL_WORKER = "local"
LOCAL_PATH = "local"
#: Lotus's directories under a storage path, one per sector file type.
KINDS = ("unsealed", "sealed", "cache")


class StorageError(RuntimeError):
    """A storage path is unusable: not a directory, not writable, or full."""


class StorageFullError(StorageError):
    """A storage path ran out of space."""


class TaskStopped(Exception):
    """The task was cancelled while its file work ran in a thread."""


def check_stop(stop: threading.Event | None) -> None:
    """Raise `TaskStopped` once the task that runs this thread's work was cancelled."""
    if stop is not None and stop.is_set():
        raise TaskStopped


# ---------------------------------------------------------------------------- storage paths


def storage_roots(repo: Path, options: Mapping[str, Any]) -> dict[str, Path]:
    """Storage path id -> directory: `"local"` is `<repo>/storage` unless `options` say."""
    roots = {LOCAL_PATH: repo / "storage"}
    given = options.get("storage") or {}
    if not isinstance(given, Mapping):
        raise ValueError(f"storage: must map path ids to directories, got {given!r}")
    for pid, where in given.items():
        if not isinstance(pid, str) or not pid or not isinstance(where, str | os.PathLike):
            raise ValueError(f"storage: path id {pid!r} needs a directory, got {where!r}")
        if not str(where):
            raise ValueError(f"storage: path id {pid!r} has an empty directory")
        # An absolute `where` replaces the repo prefix.
        roots[pid] = repo / Path(where).expanduser()
    return roots


def check_worker_paths(specs: Sequence[WorkerSpec], repo: Path, options: Mapping[str, Any]) -> None:
    """Every storage path a worker declares needs a directory, or sealing would stall on it."""
    roots = storage_roots(repo, options)
    for spec in specs:
        for path in spec.paths:
            if path.id not in roots:
                raise ValueError(
                    f"worker {spec.name!r}: storage path {path.id!r} has no directory: "
                    f'give it `path = "..."` in its [[workers.paths]] table'
                )


def check_root(path_id: str, root: Path) -> None:
    """Create the storage directory and its Lotus subdirectories; fail clearly if unusable."""
    where = f"storage path {path_id!r} ({root})"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for kind in KINDS:
            (root / kind).mkdir(exist_ok=True)
    except FileExistsError as exc:
        raise StorageError(f"{where}: {exc.filename} exists and is not a directory") from None
    except NotADirectoryError:
        raise StorageError(f"{where}: part of it is a file, not a directory") from None
    except OSError as exc:
        raise _storage_error(path_id, root, "creating its directories", exc) from None
    try:  # a real write: os.access says yes to root even on a read-only file system
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=root)
        try:
            os.write(fd, b"sectorfsm")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise _storage_error(path_id, root, "writing a probe file", exc) from None


def _storage_error(path_id: str, root: Path, what: str, exc: OSError) -> StorageError:
    where = f"storage path {path_id!r} ({root})"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFullError(f"{where} is full ({what}): {exc.strerror}")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StorageError(f"{where} is not writable ({what}): {exc.strerror}")
    return StorageError(f"{where}: {what} failed: {exc}")


_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


@contextmanager
def storage_errors(path_id: str, root: Path, what: str) -> Iterator[None]:
    """Turn a full or read-only disk into a `StorageError` naming the storage path."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _STORAGE_ERRNOS:
            raise _storage_error(path_id, root, what, exc) from exc
        raise


def disk_space(root: Path) -> tuple[int, int]:
    """`(capacity, used)` of the disk under `root`; `used` leaves out the files in `root`."""
    usage = shutil.disk_usage(root)
    return usage.total, max(0, usage.total - usage.free - _allocated(root))


def _allocated(root: Path) -> int:
    """Bytes of disk the files under `root` really take (sparse holes take none)."""
    total = 0
    stack = [str(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        else:
                            total += entry.stat(follow_symlinks=False).st_blocks * 512
                    except OSError:
                        continue  # deleted meanwhile
        except OSError:
            continue
    return total


@dataclass(frozen=True, slots=True)
class SectorPaths:
    """Where one sector's three files are (or will be), and the path id of each."""

    unsealed: Path
    sealed: Path
    cache: Path
    ids: dict[str, str] = field(hash=False)

    def of(self, kind: str) -> Path:
        """The file (or cache directory) of `kind`."""
        return {"unsealed": self.unsealed, "sealed": self.sealed, "cache": self.cache}[kind]


class Storage:
    """The storage directories by path id, and where each sector's files are on them."""

    def __init__(self, roots: Mapping[str, Path]) -> None:
        if not roots:
            raise StorageError("no storage paths configured")
        self.roots = {pid: Path(root) for pid, root in roots.items()}
        #: Set by `Miner.open`: files are then written only where this repo owns them.
        self.owners: Owners | None = None

    def find(self, sector: SectorRef, kind: str) -> str | None:
        """The id of the path holding the sector's file of `kind`, if any does."""
        name = str(sector)
        for pid, root in self.roots.items():
            if os.path.lexists(root / kind / name):
                return pid
        return None

    def locate(
        self, sector: SectorRef, placement: Placement | None, fetch: Sequence[str] = ()
    ) -> SectorPaths:
        """Each file where it is, else where the scheduler placed the task (new files).

        When the placement says files were fetched (`fetch_bytes`), the storage index now
        records the `fetch` kinds on the placement's path, so they move there on disk too.
        """
        target = placement.path if placement is not None else None
        if target is not None and target not in self.roots:
            raise StorageError(
                f"the scheduler chose storage path {target!r}, which has no directory "
                f"(known: {', '.join(sorted(self.roots))}); give it "
                f'`path = "..."` in its [[workers.paths]] table'
            )
        name = str(sector)
        found = {kind: self.find(sector, kind) for kind in KINDS}
        if self.owners is not None:  # before anything is moved or written
            for pid in {p for p in (*found.values(), target) if p is not None}:
                self._claim(pid, sector)
        if target is not None and placement is not None and placement.fetch_bytes:
            for kind in fetch:
                src = found[kind]
                if src is not None and src != target:
                    dst = self.roots[target] / kind / name
                    with storage_errors(target, self.roots[target], f"fetching {kind} {name}"):
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        shutil.move(self.roots[src] / kind / name, dst)
                    found[kind] = target
        # New files go to the chosen path, else next to the sector's cache (sealed files are
        # made where the cache is), else next to whatever else it has.
        default = target or found["cache"] or found["sealed"] or found["unsealed"]
        default = default or next(iter(self.roots))
        ids = {kind: found[kind] or default for kind in KINDS}
        if self.owners is not None:
            for pid in set(ids.values()):
                self._claim(pid, sector)
        paths = {kind: self.roots[ids[kind]] / kind / name for kind in KINDS}
        return SectorPaths(paths["unsealed"], paths["sealed"], paths["cache"], ids)

    def _claim(self, pid: str, sector: SectorRef) -> None:
        assert self.owners is not None
        try:
            with storage_errors(pid, self.roots[pid], f"claiming {sector}"):
                self.owners.claim(pid, self.roots[pid], sector)
        except OwnerError as exc:
            raise StorageError(str(exc)) from None

    def forget(self, sector: SectorRef) -> None:
        """The sector's files are gone from every path: drop its owner markers."""
        if self.owners is not None:
            self.owners.forget(self.roots, sector)

    def everywhere(self, sector: SectorRef, kind: str) -> list[Path]:
        """The sector's file of `kind` on every path (for deletion)."""
        return [root / kind / str(sector) for root in self.roots.values()]

    @contextmanager
    def errors(self, paths: SectorPaths, kind: str, what: str) -> Iterator[None]:
        """`storage_errors` for the path that holds the file of `kind`."""
        pid = paths.ids[kind]
        with storage_errors(pid, self.roots[pid], what):
            yield


async def run_in_thread(clock: Clock, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args, stop=event)` in a thread, holding a virtual clock; cancel sets `stop`."""
    stop = threading.Event()
    clock.hold()  # real work: simulated time must not jump meanwhile
    try:
        fut = asyncio.ensure_future(asyncio.to_thread(fn, *args, stop=stop))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            # Wait for the thread to notice, so that a remove that follows the cancellation
            # never races with a write that would re-create a deleted file.
            stop.set()
            await asyncio.wait([fut])
            if not fut.cancelled():
                fut.exception()  # retrieved: TaskStopped, or moot now
            raise
    finally:
        clock.release()


# ---------------------------------------------------------------------------- sector files

_KIND_TYPES = {"unsealed": FileType.UNSEALED, "sealed": FileType.SEALED, "cache": FileType.CACHE}


def scan_sector_files(
    roots: Mapping[str, Path], miner: int
) -> dict[tuple[str, int, FileType], int]:
    """`(path id, sector number, file type) -> bytes` of this miner's sector files on disk.

    Bytes are apparent sizes (a cache directory sums its files), the space the files take
    once fully written, as Lotus's overhead factors count it.
    """
    prefix = f"s-t0{miner}-"
    found: dict[tuple[str, int, FileType], int] = {}
    for pid, root in roots.items():
        for kind, ftype in _KIND_TYPES.items():
            try:
                entries = list(os.scandir(root / kind))
            except OSError:
                continue  # no such directory yet, or unreadable: nothing to count there
            for entry in entries:
                number = entry.name.removeprefix(prefix)
                if number == entry.name or not number.isdigit():
                    continue  # another miner's file, a temporary file, or not a sector file
                found[(pid, int(number), ftype)] = _apparent_size(Path(entry.path))
    return found


def _apparent_size(path: Path) -> int:
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
        return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir())
    except OSError:
        return 0  # deleted meanwhile


def delete(path: Path) -> None:
    """Delete a file, or a directory with everything in it; a missing one is no error."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_files(paths: Sequence[Path], *, stop: threading.Event | None = None) -> None:
    """Delete sector files and cache directories (and a sealed file left mid-write)."""
    for path in paths:
        delete(path)
        delete(path.with_name(f".{path.name}.tmp"))


# ---------------------------------------------------------------------------- for the registry


def local_workers(repo: Path) -> list[WorkerSpec]:
    """One in-process worker on this host with one storage path, `"local"` at `<repo>/storage`."""
    root = repo / "storage"
    check_root(LOCAL_PATH, root)
    capacity, used = disk_space(root)
    path = StoragePath(LOCAL_PATH, LOCAL_WORKER, capacity, can_seal=True, can_store=True, used=used)
    return [local_worker(LOCAL_WORKER, paths=(path,))]


def check_storage(
    repo: Path, options: Mapping[str, Any], workers: Sequence[WorkerSpec] | None
) -> dict[str, Path]:
    """The storage roots `options` give, and every declared worker's path among them."""
    if workers is not None:
        check_worker_paths(workers, repo, options)
    return storage_roots(repo, options)


def check_roots(roots: Mapping[str, Path]) -> None:
    """`check_root` for each storage path: create its directories, fail clearly if unusable."""
    for pid, root in roots.items():
        check_root(pid, root)
