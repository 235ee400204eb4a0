"""Group commit: every write staged during one event-loop tick lands in one transaction.

Writes are staged as *units* (one `send`, one planner round). In `group` and `nosync` mode all
units pending at a flush are merged into one LMDB transaction; a key that is put and deleted
within the same transaction (an event consumed in the tick it arrived) is never written at
all. In `sync` mode each unit is its own fsynced transaction. Commits run on one writer thread,
so the loop keeps planning the next batch while the previous one is being fsynced (`nosync`
commits, which never wait for the disk, run on the loop thread). One commit
is in flight at a time: the next batch is taken only once the previous one's callbacks ran.

**Staging into the current commit** is also the API for code outside the engine that must
write its own records atomically with the engine's (a domain index next to a state change):
`store.committer.put`/`delete` stage a write, `on_commit` a callback, and `waiter()` a future
for the unit being built. What is staged from the loop thread before the next `await` (or
before `end_unit()`) belongs to the same unit as the engine writes staged in that stretch, such
as the event `StateGroup.post` queued, and therefore:

* it lands in the same LMDB transaction as they do, or fails with them (never half of a unit);
* a later write of a key in the unit replaces an earlier one;
* `on_commit` callbacks and `waiter()` futures of the unit run once it is durable (fsynced,
  unless the store is `nosync`), or failed, with the error; the committer never retries a
  failed unit's writes (whoever staged them decides).

`add_listener` runs a callback after every batch; `transactions` counts LMDB commits and
`observe_commits` times them. All of it must be used on the event-loop thread the store's
engine runs on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .counts import add as add_int

if TYPE_CHECKING:
    from .clock import Clock
    from .store import LmdbStore

log = logging.getLogger("sectorfsm.fsm.commit")

CommitCallback = Callable[..., None]
#: A staged value: bytes, or `(encode, obj)` encoded only if the write survives elision.
Value = bytes | tuple[Callable[[Any], bytes], Any]
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 5.0
_SPARE_UNITS = 4


class _Unit:
    __slots__ = ("adds", "callbacks", "fresh", "futures", "ops")

    def __init__(self) -> None:
        # Per-database maps, so staging a write allocates no key tuple (less GC pressure).
        self.ops: dict[str, dict[bytes, Value | None]] = {}
        self.fresh: dict[str, set[bytes]] = {}
        #: Per-database sums to add to stored integers (`Committer.add`).
        self.adds: dict[str, dict[bytes, int]] = {}
        self.callbacks: list[tuple[CommitCallback, tuple[Any, ...]]] = []
        self.futures: list[asyncio.Future[None]] = []

    def empty(self) -> bool:
        return not (self.callbacks or self.futures or any(self.ops.values()) or self.adds)

    def reset(self) -> None:
        for ops in self.ops.values():
            ops.clear()
        self.adds.clear()
        for fresh in self.fresh.values():
            fresh.clear()
        self.callbacks.clear()
        self.futures.clear()


class Committer:
    """Stages writes and commits them in batches; one per store, bound to one event loop.

    Reached as `LmdbStore.committer`; see the module docstring for what staging guarantees.
    """

    def __init__(self, store: LmdbStore) -> None:
        self.store = store
        self.merge = store.durability != "sync"
        #: `nosync` commits run on the loop thread (see `_flush`).
        self._inline = store.durability == "nosync"
        self._units: list[_Unit] = [_Unit()]
        # Committed units are reset and reused: each holds a map per database that grows to
        # a whole batch, and a new big container is traversed by every minor GC collection.
        self._spare_units: list[_Unit] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._scheduled = False
        self._inflight = False
        self._hooks: list[Callable[[], None]] = []
        self._late_hooks: list[Callable[[], None]] = []
        self._listeners: list[Callable[[], None]] = []
        self._clocks: list[Clock] = []
        self._backoff = 0.0
        self._wanted = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._context = contextvars.Context()
        #: Number of batches taken for commit so far; lets callers tell which batch staged what.
        self.batch_no = 0
        #: Figures for benchmarks: batches committed and units in them.
        self.batches_committed = 0
        self.units_committed = 0
        #: LMDB transactions committed (one per batch in group mode, one per unit in sync mode).
        self.transactions = 0
        self._observers: list[Callable[[float], None]] = []

    # -- staging --------------------------------------------------------------------------

    def put(self, db: str, key: bytes, value: Value, *, fresh: bool = False) -> None:
        """Stage a put into the current commit; `fresh` promises the key is not stored yet.

        A `fresh` put and a delete of the same key in one unit cancel out (neither is written).

        `value` may be `(encode, obj)`: it is encoded at commit time, and never if a delete of
        the same key in the same transaction cancels the put.
        """
        unit = self._units[-1]
        ops = unit.ops.get(db)
        if ops is None:
            ops = unit.ops[db] = {}
            unit.fresh[db] = set()
        ops[key] = value
        if fresh:
            unit.fresh[db].add(key)
        if not self._scheduled:
            self.request_flush()

    def staging(self, db: str) -> dict[bytes, Value | None]:
        """The current unit's puts for `db`, for hot loops run inside a pre-commit hook.

        Assigning `key -> value` there is `put(db, key, value)` without the bookkeeping: valid
        only until the hook returns (the batch is taken right after the hooks run).
        """
        unit = self._units[-1]
        ops = unit.ops.get(db)
        if ops is None:
            ops = unit.ops[db] = {}
            unit.fresh[db] = set()
        return ops

    def delete(self, db: str, key: bytes) -> None:
        """Stage a delete into the current commit; a fresh put of the key in it cancels out."""
        unit = self._units[-1]
        ops = unit.ops.get(db)
        if ops is None:
            ops = unit.ops[db] = {}
            unit.fresh[db] = set()
        fresh = unit.fresh[db]
        if key in fresh:
            fresh.discard(key)
            del ops[key]
        else:
            ops[key] = None
        if not self._scheduled:
            self.request_flush()

    def add(self, db: str, key: bytes, delta: int) -> None:
        """Stage adding `delta` to the msgpack int under `key` (absent: 0; 0 deletes it).

        Applied inside the commit's transaction to the value found there, so another
        process's additions between commits are never overwritten (`fsm/counts.py`).
        """
        adds = self._units[-1].adds.get(db)
        if adds is None:
            adds = self._units[-1].adds[db] = {}
        adds[key] = adds.get(key, 0) + delta
        if not self._scheduled:
            self.request_flush()

    def adding(self, db: str) -> dict[bytes, int]:
        """The current unit's sums for `db`, for hot loops run inside a pre-commit hook.

        Adding to `key` there is `add(db, key, delta)` without the bookkeeping, valid (as with
        `staging`) only until the hook returns.
        """
        unit = self._units[-1]
        adds = unit.adds.get(db)
        if adds is None:
            adds = unit.adds[db] = {}
        return adds

    def on_commit(self, callback: CommitCallback, *args: Any) -> None:
        """Call `callback(*args, error_or_None)` once the current unit is durable (or failed).

        Callbacks run on the loop thread in the order registered, before `waiter()` futures'
        awaiting callers resume; one that raises is logged and does not stop the others.
        """
        self._units[-1].callbacks.append((callback, args))
        if not self._scheduled:
            self.request_flush()

    def waiter(self) -> asyncio.Future[None]:
        """A future of the caller's own, resolved when the current unit is durable (or failed).

        Each caller gets its own future, so cancelling one waiter never cancels another.
        """
        fut = self._get_loop().create_future()
        self._units[-1].futures.append(fut)
        self.request_flush()
        return fut

    def end_unit(self) -> None:
        """Close the current unit; in `sync` mode the next staged write starts a new commit."""
        if not self.merge and not self._units[-1].empty():
            self._units.append(self._new_unit())

    # -- hooks ----------------------------------------------------------------------------

    def add_hook(self, hook: Callable[[], None], *, late: bool = False) -> None:
        """Run `hook()` right before each batch is taken (groups plan their machines there).

        `late` hooks run after all the others, so they see what any of those added (groups
        stage the sent events no round consumed there, including events one group's planner
        sent to another group).
        """
        (self._late_hooks if late else self._hooks).append(hook)

    def remove_hook(self, hook: Callable[[], None]) -> None:
        """Undo `add_hook`."""
        for hooks in (self._hooks, self._late_hooks):
            if hook in hooks:
                hooks.remove(hook)

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every batch completes."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        """Undo `add_listener`."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def observe_commits(self, observer: Callable[[float], None]) -> None:
        """Call `observer(seconds)` with each LMDB commit's duration, on the writer thread.

        It runs off the event loop, after the write, so the engine never waits for it; it
        must be thread-safe and quick (a histogram observation).
        """
        self._observers.append(observer)

    def add_clock(self, clock: Clock) -> None:
        """Hold `clock` busy while a commit is in flight, so virtual time waits for the disk."""
        if clock not in self._clocks:
            self._clocks.append(clock)

    def remove_clock(self, clock: Clock) -> None:
        """Undo `add_clock`."""
        if clock in self._clocks:
            self._clocks.remove(clock)

    # -- flushing -------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """True if nothing is staged and no commit is in flight."""
        return not self._inflight and not self._scheduled and all(u.empty() for u in self._units)

    async def flush(self) -> None:
        """Wait until everything staged so far (and what hooks add) is committed."""
        while not self.idle:
            fut = self._get_loop().create_future()
            self._idle_waiters.append(fut)
            self.request_flush()
            await fut

    def shutdown(self) -> None:
        """Stop the writer thread; staged writes that were never flushed are dropped."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _new_unit(self) -> _Unit:
        return self._spare_units.pop() if self._spare_units else _Unit()

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return loop  # (a running loop is not closed)
        if self._loop is None or self._loop.is_closed():
            self._loop = loop
            return loop
        raise RuntimeError("a store's engine is bound to one event loop at a time")

    def request_flush(self) -> None:
        """Make sure a flush runs soon (hooks may have work even if nothing is staged)."""
        if self._inflight:
            self._wanted = True
            return
        if self._scheduled:
            return
        try:
            loop = self._get_loop()
        except RuntimeError:
            return  # no loop running: staged ops wait for the next flush()
        self._scheduled = True
        # In the committer's own empty context: not in that of whichever step asked first.
        if self._backoff:
            loop.call_later(self._backoff, self._flush, context=self._context)
        else:
            loop.call_soon(self._flush, context=self._context)

    def _flush(self) -> None:
        self._scheduled = False
        if self.store.closed:
            return
        if self._inflight:
            self._wanted = True  # (a request made while the batch was being built)
            return
        for hook in [*self._hooks, *self._late_hooks]:
            try:
                hook()
            except Exception:  # a hook bug must not stop commits of every other group
                log.exception("pre-commit hook failed")
        units = [u for u in self._units if not u.empty()]
        self._units = [self._new_unit()]
        if not units:
            # Nothing to commit, but the hooks may have settled something: listeners (a
            # group's `idle()`) re-check, as they do after a commit.
            for listener in list(self._listeners):
                listener()
            self._wake_idle()
            return
        self._inflight = True
        self.batch_no += 1
        for clock in self._clocks:
            clock.hold()
        loop = self._get_loop()
        if self._inline:
            # No fsync to overlap with the loop's work: handing the batch to the writer thread
            # and back costs two GIL hand-offs (about 1 ms each on a busy loop), far more than
            # a commit that never waits for the disk. `_done` still runs as its own callback.
            done: asyncio.Future[list[BaseException | None]] = loop.create_future()
            done.set_result(self._commit(units))
            loop.call_soon(self._done, units, done, context=self._context)
            return
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="sectorfsm-commit"
            )
        fut = loop.run_in_executor(self._executor, self._commit, units)
        fut.add_done_callback(lambda f: self._done(units, f), context=self._context)

    def _commit(self, units: list[_Unit]) -> list[BaseException | None]:
        # In merge mode there is only ever one unit per batch, so one unit is one transaction.
        # Handles are looked up before the write: opening a database needs its own transaction.
        store = self.store
        dbs = {name: store.db(name) for u in units for name in (*u.ops, *u.adds)}
        results: list[BaseException | None] = []
        failed: BaseException | None = None
        for ops, adds in ((u.ops, u.adds) for u in units):
            if failed is not None:
                # Sync mode: a later unit may build on a failed one (a round that consumed
                # the event whose put just failed), so the rest of the batch fails with it.
                results.append(failed)
                continue

            def apply(
                txn: Any,
                ops: dict[str, dict[bytes, Value | None]] = ops,
                adds: dict[str, dict[bytes, int]] = adds,
            ) -> None:
                delete = txn.delete
                for name, writes in ops.items():
                    db = dbs[name]
                    for key, value in writes.items():
                        if value is None:
                            delete(key, db=db)
                    # One putmulti keeps the GIL for the whole batch. `txn.put` releases and
                    # retakes it for every key, and each retake waits for a busy event loop
                    # to yield the GIL: measured ~60 us per key instead of ~0.5 us.
                    txn.cursor(db=db).putmulti(
                        (key, value[0](value[1]) if type(value) is tuple else value)
                        for key, value in writes.items()
                        if value is not None
                    )
                for name, sums in adds.items():
                    for key, delta in sums.items():
                        if delta:
                            add_int(txn, dbs[name], key, delta)

            try:
                if adds or any(ops.values()):
                    started = time.perf_counter()
                    self.store.write(apply)
                    self.transactions += 1
                    for observe in self._observers:
                        _observe(observe, time.perf_counter() - started)
                results.append(None)
            except BaseException as exc:  # handed to the callers, never swallowed
                results.append(exc)
                failed = exc
        return results

    def _done(self, units: list[_Unit], fut: asyncio.Future[list[BaseException | None]]) -> None:
        self._inflight = False
        for clock in self._clocks:
            clock.release()
        try:
            results = fut.result()
        except BaseException as exc:  # executor shut down under us
            results = [exc] * len(units)
        failed = False
        for unit, err in zip(units, results, strict=True):
            if err is not None:
                failed = True
            for waiter in unit.futures:
                if waiter.done():
                    continue  # its caller was cancelled
                if err is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(err)
                    # Marked retrieved: a `post()` whose caller never awaits it must not log
                    # "Future exception was never retrieved" (the failure is logged below).
                    # Whoever awaits it still gets the error.
                    waiter.exception()
            for cb, args in unit.callbacks:
                try:
                    cb(*args, err)
                except Exception:
                    log.exception("commit callback failed")
            if len(self._spare_units) < _SPARE_UNITS:
                unit.reset()
                self._spare_units.append(unit)
        self.batches_committed += 1
        self.units_committed += len(units)
        if failed:
            self._backoff = min(max(self._backoff * 2, _BACKOFF_MIN), _BACKOFF_MAX)
            log.error(
                "commit failed; retrying staged work in %.2fs: %s",
                self._backoff,
                next(e for e in results if e is not None),
            )
        else:
            self._backoff = 0.0
        for listener in list(self._listeners):
            listener()
        if self._wanted or any(not u.empty() for u in self._units):
            self._wanted = False
            self.request_flush()
        if self.idle:
            self._wake_idle()

    def _wake_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)


def _observe(observer: Callable[[float], None], seconds: float) -> None:
    """Call an observer; a broken one is logged, never taken for a failed commit."""
    try:
        observer(seconds)
    except Exception:
        log.exception("commit observer failed")
