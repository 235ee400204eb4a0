"""Owner markers: which repo's sector a set of sector files belongs to.

Sector file names (`s-t0<miner>-<n>`) say nothing of the repo that made them: a repo whose
store was lost and re-created would number its sectors from 1 again and write over the old
sector 1's files. So before a sector's files are first created on a storage path, a marker
`<path>/owners/s-t0<miner>-<n>` records the miner, the sector number and the identity of the
store that owns the sector (`LmdbStore.identity`, made when the store was created). Files are
written only where the marker is ours; existing files with another marker are refused, and so
are unmarked files, unless this store's own files index records them on that path (a repo made
before markers existed: its files are adopted and marked). The marker goes when the sector's
files are removed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..sched import SectorRef

if TYPE_CHECKING:
    from ..fsm import LmdbStore

#: The directory of markers under each storage path (beside Lotus's three).
OWNERS = "owners"
_KINDS = ("unsealed", "sealed", "cache")


class OwnerError(RuntimeError):
    """Sector files on disk belong to another repo (or to no known one)."""


class Owners:
    """Claims storage paths for this repo's sectors (one per backend's `Storage`)."""

    def __init__(self, miner: int, store_id: str) -> None:
        self.miner = miner
        self.store_id = store_id
        #: (path root, sector name) already checked or claimed in this process.
        self._claimed: set[tuple[Path, str]] = set()
        #: (path id, sector number) that this store's files index records: unmarked files
        #: there are this repo's own (written before markers existed) and are adopted.
        self.recorded: set[tuple[str, int]] = set()

    def _mine(self, sector: SectorRef) -> dict[str, object]:
        return {"miner": self.miner, "sector": sector.number, "store": self.store_id}

    def claim(self, path_id: str, root: Path, sector: SectorRef) -> None:
        """Make sure `sector`'s files on `root` are ours (writing our marker if new).

        `OwnerError` if the marker names another owner, or if the sector's files exist there
        with no marker at all (nothing proves they are this repo's).
        """
        name = str(sector)
        if (root, name) in self._claimed:
            return
        marker = root / OWNERS / name
        where = f"storage path {path_id!r} ({root})"
        try:
            found = json.loads(marker.read_text())
        except FileNotFoundError:
            found = None
        except (OSError, ValueError) as exc:
            raise OwnerError(f"{where}: owner marker {marker} cannot be read: {exc}") from None
        if found is None:
            existing = [k for k in _KINDS if os.path.lexists(root / k / name)]
            if existing and (path_id, sector.number) not in self.recorded:
                raise OwnerError(
                    f"{where}: {', '.join(existing)} files of {name} exist but no repo claims "
                    f"them (no {OWNERS}/{name}); refusing to write over them: move them away if "
                    "they are not needed, or restore the store that made them"
                )
            _write_marker(marker, self._mine(sector))
        elif found != self._mine(sector):
            raise OwnerError(
                f"{where}: the files of {name} belong to another repo (store "
                f"{str(found.get('store', '?'))[:8]}…, miner f0{found.get('miner', '?')}), not "
                f"to this one (store {self.store_id[:8]}…); refusing to write over them"
            )
        self._claimed.add((root, name))

    def forget(self, roots: Mapping[str, Path], sector: SectorRef) -> None:
        """Drop the sector's markers once its files are removed everywhere."""
        name = str(sector)
        for root in roots.values():
            (root / OWNERS / name).unlink(missing_ok=True)
            self._claimed.discard((root, name))


def _write_marker(marker: Path, owner: dict[str, object]) -> None:
    # Durable before any file it covers exists: a crash never leaves unclaimed files.
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f".{marker.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(owner, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, marker)
    fd = os.open(marker.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sector_files(roots: Mapping[str, Path]) -> list[Path]:
    """Sector files (or owner markers) under the storage paths, a few at most."""
    found: list[Path] = []
    for root in roots.values():
        for kind in (*_KINDS, OWNERS):
            try:
                with os.scandir(root / kind) as entries:
                    found.extend(
                        Path(e.path)
                        for e in entries
                        if e.name.startswith("s-t0") and len(found) < 3
                    )
            except OSError:
                continue  # no such directory: nothing there
    return found


def adopt_storage(store: LmdbStore, backend: object, miner: int) -> None:
    """Bind a file backend's storage to this repo; refuse a new store over old sector files.

    A store with no miner identity yet is new (or was lost: emptied, deleted). If the storage
    paths already hold sector files, they are another store's (or this one's, before it was
    lost): starting afresh would number sectors from 1 again over them.
    """
    from ..fsm.errors import StoreDamagedError
    from .requests import identity

    storage = getattr(backend, "storage", None)
    if storage is None:
        return  # (the sim backend keeps no files)
    if identity(store) is None:
        found = sector_files(storage.roots)
        if found:
            raise StoreDamagedError(
                f"the store {store.path} is new or empty, but the storage already holds sector "
                f"files ({', '.join(str(p) for p in found)}): if the store was lost, restore it "
                "from a backup; a new repo needs storage paths of its own"
            )
    storage.owners = Owners(miner, store.identity)
