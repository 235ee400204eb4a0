"""Durable requests from other processes (the CLI) to the engine: pledge and add-piece.

Events for existing sectors go straight into the engine's mailbox. Creating sectors needs
the engine's sector-number counter and its open-sector bookkeeping, so those requests are
queued in the `requests` sub-database instead. The engine polls it; executing a request, the
sector events it causes, deleting the request and writing its result all land in one commit,
so a request is executed exactly once even across crashes.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from ..fsm import LmdbStore
from ..fsm.codec import packb, unpackb
from .config import seal_proof_for
from .events import SectorStartCC
from .info import SectorInfo
from .input import check_sealing_limit, stored_limit, take_numbers
from .store_view import sector_records

DB = "requests"
_PENDING = b"q/"
_DONE = b"done/"
META_MINER = b"sealing/miner"


def submit(store: LmdbStore, request: dict[str, Any]) -> bytes:
    """Queue `request` durably; returns its id."""
    rid = b"%020d-%08d" % (time.time_ns(), os.getpid())
    raw = packb(request)
    db = store.db(DB)
    store.write(lambda txn: txn.put(_PENDING + rid, raw, db=db))
    return rid


def pending(store: LmdbStore) -> list[tuple[bytes, dict[str, Any]]]:
    """Queued requests, oldest first."""
    db = store.db(DB)
    with store.read() as txn:
        cur = txn.cursor(db=db)
        out = []
        if cur.set_range(_PENDING):
            for key, raw in cur:
                if not key.startswith(_PENDING):
                    break
                out.append((key[len(_PENDING) :], unpackb(raw)))
    return out


def take_result(store: LmdbStore, rid: bytes) -> dict[str, Any] | None:
    """The result of request `rid` once the engine executed it (and forget it), else None."""
    db = store.db(DB)
    key = _DONE + rid
    with store.read() as txn:
        raw = txn.get(key, db=db)
    if raw is None:
        return None
    store.write(lambda txn: txn.delete(key, db=db))
    result: dict[str, Any] = unpackb(raw)
    return result


def stage_done(store: LmdbStore, rid: bytes, result: dict[str, Any]) -> None:
    """Engine side: retire request `rid` with `result`, in the current group commit."""
    store.committer.delete(DB, _PENDING + rid)
    store.committer.put(DB, _DONE + rid, packb(result))


def identity(store: LmdbStore) -> tuple[int, int] | None:
    """`(miner id, sector size)` the repo was created with, or None before its first run."""
    with store.read() as txn:
        raw = txn.get(META_MINER, db=store.db("meta"))
    if raw is None:
        return None
    miner, size = unpackb(raw)
    return int(miner), int(size)


def pledge_offline(store: LmdbStore, count: int) -> list[int] | None:
    """Create `count` CC sectors while no engine runs; None if an engine holds the repo.

    The repo is claimed as a CLI writer for the duration, so no engine can start and
    allocate numbers concurrently. Each sector's record exists at once, in
    UndefinedSectorState with its number; its SectorStartCC waits in the mailbox until the
    next `sectors run`. Raises `ValueError` for a repo that no engine ever opened (its
    sector size is not known yet), and `SealingLimitError` (a `ValueError`) where the
    engine's `pledge` would refuse too: numbers and the limit are the engine's, from
    `input.py`.
    """
    ident = identity(store)
    if ident is None:
        raise ValueError(
            f"{store.path.parent} has no miner identity yet: create it with `sectors init` "
            "or `sectors run`"
        )
    # A CLI writer's claim: a starting engine waits for it instead of taking it for an engine.
    if not store.lock_writer():
        return None
    try:
        records = sector_records(store)
        # The limit of the engine that last ran here (its config is not ours to read).
        check_sealing_limit(records, stored_limit(store), count)
        codec = records.codec
        proof = seal_proof_for(ident[1])
        meta = store.db("meta")
        for name in ("states", "live", "mailbox", "counters"):
            store.db(name)  # opened before the write transaction that uses them

        def create(txn: Any) -> list[int]:
            numbers = take_numbers(txn, meta, count)
            for n in numbers:
                event = codec.encode_event(SectorStartCC(n, proof))
                # The record carries its number from the start, so every reader shows this
                # sector as itself (in WaitingForEngine) until the engine applies the event.
                records.client_send(txn, n, event, functools.partial(SectorInfo, number=n))
            return numbers

        return store.write(create)
    finally:
        store.unlock_writer()
