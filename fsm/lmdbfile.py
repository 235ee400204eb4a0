"""Checks a store's `data.mdb` against LMDB's own meta pages before it is mapped.

LMDB maps the whole file: a page it believes exists but that a truncation removed is read
through the map and the process dies of SIGBUS, with no message. LMDB records in its two meta
pages (the first two pages of the file, see `mdb_env_read_header` in LMDB's mdb.c) the page
size and the last page in use, so a file shorter than those pages is detected here, with a
message, before `lmdb.open` ever maps it. An empty file is refused too: LMDB would silently
initialise it as a new store and the old records would be gone.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreDamagedError

MAGIC = 0xBEEFC0DE
#: `MDB_DATA_VERSION` of the LMDB that py-lmdb bundles.
DATA_VERSION = 1
_P_META = 0x08
_PAGE_HEADER = 16  # mp_pgno (8), mp_pad (2), mp_flags (2), mp_lower (2), mp_upper (2)
# Offsets inside MDB_meta: magic, version, then address and mapsize (8 each), then two MDB_db
# of 48 bytes (the first one's md_pad holds the page size), then mm_last_pg and mm_txnid.
_PSIZE = 24
_LAST_PG = 120
_META_SIZE = 136
_RECOVER = "restore the store directory from a backup"


@dataclass(frozen=True, slots=True)
class Meta:
    """What one LMDB meta page says."""

    page_size: int
    last_page: int
    txnid: int


def _meta(page: bytes) -> Meta | None:
    if len(page) < _PAGE_HEADER + _META_SIZE:
        return None
    (flags,) = struct.unpack_from("<H", page, 10)
    magic, version = struct.unpack_from("<II", page, _PAGE_HEADER)
    if magic != MAGIC or version != DATA_VERSION or not flags & _P_META:
        return None
    (psize,) = struct.unpack_from("<I", page, _PAGE_HEADER + _PSIZE)
    last, txnid = struct.unpack_from("<QQ", page, _PAGE_HEADER + _LAST_PG)
    return Meta(psize, last, txnid)


def check_data_file(path: Path) -> Meta | None:
    """Refuse a damaged `data.mdb` (`StoreDamagedError`); None if there is no file yet."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreDamagedError(f"cannot read {path}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, _PAGE_HEADER + _META_SIZE, 0)
        first = _meta(head)
        second = None
        if first is not None and first.page_size >= _PAGE_HEADER + _META_SIZE:
            second = _meta(os.pread(fd, _PAGE_HEADER + _META_SIZE, first.page_size))
    except OSError as exc:
        raise StoreDamagedError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if size == 0:
        raise StoreDamagedError(
            f"store file {path} is empty (0 bytes), so its records are gone: {_RECOVER}; "
            "it is not reused as a new store"
        )
    if first is None:
        raise StoreDamagedError(
            f"store file {path} is not an LMDB file, or its first meta page is damaged "
            f"({size} bytes): {_RECOVER}"
        )
    # LMDB uses the meta page with the newer transaction; the other may be a torn write.
    meta = first if second is None or first.txnid >= second.txnid else second
    needed = (meta.last_page + 1) * meta.page_size
    if size < needed:
        raise StoreDamagedError(
            f"store file {path} is truncated: {size} bytes, but its last transaction "
            f"({meta.txnid}) uses {needed}: {_RECOVER}"
        )
    return meta
