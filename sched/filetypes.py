"""Sector file types and the disk space they need (Lotus `storiface/filetype.go`)."""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterator


class FileType(enum.IntFlag):
    """One or more sector files, as a bit set."""

    NONE = 0
    UNSEALED = 1
    SEALED = 2
    CACHE = 4
    UPDATE = 8
    UPDATE_CACHE = 16
    PIECE = 32

    def each(self) -> Iterator[FileType]:
        """The single file types in this set, lowest bit first."""
        # From a table: a flag operation makes a new enum member each time, and the scheduler
        # and storage index split file sets several times per task.
        return iter(_EACH[int(self) & 0x3F])

    @property
    def dirname(self) -> str:
        """Lotus's directory for a single file type (`unsealed`, `sealed`, `cache`, ...)."""
        return _DIRS[self]


_SINGLE = (
    FileType.UNSEALED,
    FileType.SEALED,
    FileType.CACHE,
    FileType.UPDATE,
    FileType.UPDATE_CACHE,
    FileType.PIECE,
)
#: The single file types of every set, indexed by the set's bits.
_EACH = tuple(tuple(f for f in _SINGLE if bits & f.value) for bits in range(64))

_DIRS = {
    FileType.UNSEALED: "unsealed",
    FileType.SEALED: "sealed",
    FileType.CACHE: "cache",
    FileType.UPDATE: "update",
    FileType.UPDATE_CACHE: "update-cache",
    FileType.PIECE: "piece",
}

FS_OVERHEAD_DEN = 10
#: Space while sealing, in tenths of the sector size (Cache is 14.1x: the SDR layers).
FS_OVERHEAD_SEAL = {
    FileType.UNSEALED: 10,
    FileType.SEALED: 10,
    FileType.UPDATE: 10,
    FileType.UPDATE_CACHE: 21,
    FileType.CACHE: 141,
    FileType.PIECE: 10,
}
#: Space once finalized (the cache shrinks to the tree-r-last files).
FS_OVERHEAD_FINALIZED = {
    FileType.UNSEALED: 10,
    FileType.SEALED: 10,
    FileType.UPDATE: 10,
    FileType.UPDATE_CACHE: 1,
    FileType.CACHE: 1,
    FileType.PIECE: 10,
}


@functools.cache
def space_needed(files: FileType, sector_size: int, *, finalized: bool = False) -> int:
    """Bytes that `files` of one sector occupy (Lotus's overhead factors).

    For PC1's Cache|Sealed on a 32 GiB sector this is 518,832,049,356 bytes. Cached: the
    scheduler asks it for every placement test, and there are only 64 file sets per size.
    """
    table = FS_OVERHEAD_FINALIZED if finalized else FS_OVERHEAD_SEAL
    return sum(table[f] * sector_size // FS_OVERHEAD_DEN for f in files.each())


#: The sector sizes Lotus supports, with the short form used in resource overrides.
SECTOR_SIZES: dict[str, int] = {
    "2K": 2 << 10,
    "8M": 8 << 20,
    "512M": 512 << 20,
    "32G": 32 << 30,
    "64G": 64 << 30,
}


def size_short(sector_size: int) -> str:
    """`32G` for 32 GiB, as in `PC1_32G_MAX_CONCURRENT`."""
    for short, size in SECTOR_SIZES.items():
        if size == sector_size:
            return short
    raise ValueError(f"{sector_size} is not a supported sector size ({', '.join(SECTOR_SIZES)})")


def parse_sector_size(text: str | int) -> int:
    """A sector size from bytes or text like `32GiB`, `32G`, `2KiB`."""
    if isinstance(text, int):
        size_short(text)
        return text
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t in SECTOR_SIZES:
        return SECTOR_SIZES[t]
    if t.isdigit():
        return parse_sector_size(int(t))
    raise ValueError(f"unknown sector size {text!r} (use one of 2KiB, 8MiB, 512MiB, 32GiB, 64GiB)")
