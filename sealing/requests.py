"""Durable requests from other processes (the CLI) to the engine: pledge and add-piece.

Events for existing sectors go straight into the engine's mailbox. Creating sectors needs
the engine's sector-number counter and its open-sector bookkeeping, so those requests are
queued in the `requests` sub-database instead. The engine polls it; executing a request, the
sector events it causes, deleting the request and writing its result all land in one commit,
so a request is executed exactly once even across crashes.

The CLI side is `submit`/`take_result` (and `pledge_offline` while no engine runs); the
engine side is `RequestServer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from ..fsm import LmdbStore
from ..fsm.codec import packb, unpackb
from .config import seal_proof_for
from .errors import SealingError
from .events import SectorStartCC
from .info import SectorInfo
from .input import check_sealing_limit, pending_piece, stored_limit, take_numbers
from .store_view import sector_records

if TYPE_CHECKING:
    from ..sched import Scheduler
    from .devnet import DevnetChain
    from .input import SectorInput

log = logging.getLogger("sectorfsm.sealing")

DB = "requests"
_PENDING = b"q/"
_DONE = b"done/"
META_MINER = b"sealing/miner"
#: Seconds between looks at the request queue (the CLI's pledge and add-piece).
POLL = 0.2


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


class RequestServer:
    """The engine side: executes queued requests, each in one commit with its sector events."""

    def __init__(
        self,
        store: LmdbStore,
        sector_input: SectorInput,
        chain: DevnetChain,
        sched: Scheduler | None = None,
    ) -> None:
        self.store = store
        self.input = sector_input
        self.chain = chain
        #: Counts AP slots for `pledge --fill/--per-worker`.
        self.sched = sched
        self._serving: set[bytes] = set()  # executed, their commit is on the way
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Serve what is queued now, then poll every `POLL` seconds until `stop`."""
        self.serve()
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        """Stop polling (a request being executed has already been staged whole)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL)
            try:
                self.serve()
            except Exception:
                log.exception("serving queued requests")

    def serve(self) -> int:
        """Execute every queued request not already executed; returns how many."""
        done = 0
        for rid, request in pending(self.store):
            if rid in self._serving:
                continue
            self._serving.add(rid)
            try:
                result = self._execute(request)
            except (ValueError, SealingError) as exc:
                # The CLI that queued it may be gone: the log is where the operator sees it.
                log.error("queued request %s failed: %s", request, exc)
                result = {"error": str(exc)}
            stage_done(self.store, rid, result)
            self.store.committer.on_commit(lambda rid, err: self._serving.discard(rid), rid)
            done += 1
        return done

    def _execute(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "pledge":
            count = int(request.get("count", 1))
            return {"sectors": [n for n, _ in self.input.new_cc_sectors(count)]}
        if op == "pledge_plan":
            from .autopledge import execute_plan, plan_pledge

            if self.sched is None:
                raise ValueError("this engine has no scheduler to count AP slots with")
            plan = plan_pledge(
                self.sched,
                self.input.group,
                self.input.config.max_sealing_sectors,
                self.input.sector_size,
                str(request.get("mode")),
            )
            plan.dry_run = bool(request.get("dry_run"))
            if not plan.dry_run:
                execute_plan(plan, self.input)
            return {"plan": plan.to_dict()}
        if op == "add_piece":
            piece = pending_piece(
                self.chain,
                self.input.sector_size,
                request["piece_cid"],
                int(request["size"]),
                request.get("data_path"),
            )
            [n] = self.input.assign([piece])
            return {"sector": n, "deal": piece.deal.deal_id}
        raise ValueError(f"unknown request {op!r}")
