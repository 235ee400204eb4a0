"""LMDB-backed store: one environment per repo directory, named sub-databases, msgpack values.

Writers from several processes are serialised by LMDB itself. Only one process may run an
*engine* on a repo (see `repolock`); any process may read, and may append to the mailbox, at
any time. `data.mdb` is checked against LMDB's meta pages before it is mapped (`lmdbfile`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import lmdb

from .commit import Committer
from .errors import DuplicateGroupError, StoreDamagedError, StoreError, StoreFullError
from .lmdbfile import check_data_file
from .repolock import ENGINE_WAIT, RepoLock

log = logging.getLogger("sectorfsm.fsm.store")

Durability = Literal["sync", "group", "nosync"]
DURABILITIES: tuple[str, ...] = ("sync", "group", "nosync")

#: Sub-databases every store has. Domains may open more with `LmdbStore.db(name)`.
CORE_DBS = (
    "states",
    "live",
    "inbox",
    "mailbox",
    "quarantine",
    "counters",
    "counts",
    "counted",
    "meta",
)
STORE_FORMAT = 1
#: The store's identity (see `LmdbStore.identity`), under this key of `meta`.
STORE_ID = b"store_id"
_MAX_DBS = 64
_DEFAULT_MAP = 64 << 20
R = TypeVar("R")

# LMDB forbids opening one environment twice in a process (its locks would break).
_OPEN_PATHS: set[str] = set()
_OPEN_LOCK = threading.Lock()


class _ResizeGate:
    """Lets many transactions run at once, but a map resize only when none is open.

    LMDB requires that no transaction of this process is active while `mdb_env_set_mapsize`
    runs, and reads happen on the event-loop thread while the committer writes on its own.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._resizing = False

    @contextmanager
    def txn(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if self._active == 0:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._resizing = True
            while self._active:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


class LmdbStore:
    """A persisted repo of machines, inboxes and domain records.

    `durability` chooses how commits reach the disk: `"sync"` fsyncs every logical write on its
    own, `"group"` (the default) coalesces all writes of an event-loop tick into one fsynced
    commit, and `"nosync"` never fsyncs (tests and simulations; a crash of the machine, not of
    the process, may lose recent commits).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        durability: Durability = "group",
        *,
        map_size: int = _DEFAULT_MAP,
        max_map_size: int | None = None,
        readonly: bool = False,
    ) -> None:
        if durability not in DURABILITIES:
            raise ValueError(f"durability must be one of {DURABILITIES}, not {durability!r}")
        self.path = Path(path)
        self.durability: Durability = durability
        self.max_map_size = max_map_size
        self._gate = _ResizeGate()
        self._lock = RepoLock(self.path)
        self._groups: set[str] = set()
        self._identity = ""
        self._closed = False
        #: Stages and group-commits writes for the engine (binds to an event loop on first use).
        self.committer = Committer(self)
        #: Opened for reading only, without LMDB's lock file: for a repo this user cannot write
        #: (every write raises StoreError). Readers are then not registered with a writer
        #: elsewhere, so a read that races its commits may see a record half-way.
        self.readonly = readonly
        try:
            if not readonly:
                self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create store directory {self.path}: {exc.strerror}") from exc
        if not readonly and not os.access(self.path, os.W_OK | os.X_OK):
            raise StoreError(f"store directory {self.path} is not writable by this user")
        self._real = os.path.realpath(self.path)
        with _OPEN_LOCK:
            if self._real in _OPEN_PATHS:
                raise StoreError(
                    f"store {self.path} is already open in this process; share that LmdbStore"
                )
            _OPEN_PATHS.add(self._real)
        try:
            self._open(map_size, max_map_size)
        except BaseException:
            env = getattr(self, "env", None)
            if env is not None:
                env.close()
            self._closed = True
            with _OPEN_LOCK:
                _OPEN_PATHS.discard(self._real)
            raise

    def _open(self, map_size: int, max_map_size: int | None) -> None:
        self._check_files()
        initial = map_size if max_map_size is None else min(map_size, max_map_size)
        sync = self.durability != "nosync"
        try:
            self.env = lmdb.open(
                str(self.path),
                map_size=initial,
                max_dbs=_MAX_DBS,
                sync=sync,
                metasync=sync,
                readahead=False,
                writemap=False,
                max_readers=256,
                lock=not self.readonly,
                readonly=self.readonly,
            )
        except lmdb.Error as exc:
            raise StoreError(f"cannot open store at {self.path}: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"cannot open store at {self.path}: {exc.strerror}") from exc
        self._dbs: dict[str, Any] = {}
        self._db_lock = threading.Lock()
        self._writing = threading.local()
        for name in CORE_DBS:
            if self.readonly:
                with contextlib.suppress(StoreError):  # absent: an error only when used
                    self.db(name)
            else:
                self.db(name)
        self._check_format()

    # -- sub-databases --------------------------------------------------------------------

    def db(self, name: str) -> Any:
        """Return the handle of sub-database `name`, creating it on first use."""
        handle = self._dbs.get(name)
        if handle is not None:
            return handle
        with self._db_lock:
            handle = self._dbs.get(name)
            if handle is None:
                if getattr(self._writing, "active", False):
                    # Opening a database needs its own write transaction: it would deadlock.
                    raise StoreError(
                        f"sub-database {name!r} must be opened (store.db) before the write "
                        "transaction that uses it"
                    )
                if len(self._dbs) >= _MAX_DBS - 1:
                    raise StoreError(f"too many sub-databases (limit {_MAX_DBS - 1})")
                if self.readonly:
                    try:
                        handle = self.env.open_db(name.encode(), create=False)
                    except lmdb.Error:
                        raise StoreError(f"{self.path} has no {name!r} records yet") from None
                else:
                    handle = self._call(lambda: self.env.open_db(name.encode(), create=True))
                self._dbs[name] = handle
        return handle

    def _check_files(self) -> None:
        data = self.path / "data.mdb"
        if check_data_file(data) is None:
            return
        if not (self.path / "lock.mdb").exists() and self._lock.engine_elsewhere():
            # A new lock.mdb would give this process a writer mutex of its own, and its
            # writes would interleave with the engine's: the store would be corrupted.
            raise StoreDamagedError(
                f"{self.path / 'lock.mdb'} was deleted while an engine (pid "
                f"{self._lock.holder()}) runs on this store; stop that engine (its next start "
                "re-creates the file), then retry"
            )

    def _check_format(self) -> None:
        from .codec import packb, unpackb

        def check(txn: Any) -> None:
            meta = self._dbs["meta"]
            raw = txn.get(b"store_format", db=meta)
            ident = txn.get(STORE_ID, db=meta)
            if ident is None and self.readonly:
                ident = b""
            if ident is None:
                ident = os.urandom(16).hex().encode()
                txn.put(STORE_ID, ident, db=meta)
            self._identity = bytes(ident).decode(errors="replace")
            if raw is None and self.readonly:
                return
            if raw is None:
                txn.put(b"store_format", packb(STORE_FORMAT), db=meta)
                return
            try:
                found = unpackb(raw)
            except Exception as exc:
                raise StoreError(f"{self.path}: corrupt store_format record") from exc
            if found != STORE_FORMAT:
                raise StoreError(
                    f"{self.path}: store format {found!r}, this version reads {STORE_FORMAT}"
                )

        if self.readonly:
            with self.read() as txn:
                check(txn)
            return
        self.write(check)

    # -- transactions ---------------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Any]:
        """A short read-only transaction (values as `bytes`); never blocks on writers."""
        self._ensure_open()
        with self._gate.txn():
            try:
                txn = self.env.begin(write=False, buffers=False)
            except lmdb.MapResizedError:
                txn = None
            if txn is None:
                # Another process grew the map: adopt its size, then retry.
                self._adopt_map_size()
                txn = self.env.begin(write=False, buffers=False)
            try:
                yield txn
            finally:
                txn.abort()

    def write(self, fn: Callable[[Any], R]) -> R:
        """Run `fn` in one write transaction and commit it; grows the map when full.

        `fn` may run more than once (after a map resize), so it must only touch the
        transaction. Errors leave the store exactly as it was.
        """
        self._ensure_open()
        while True:
            try:
                with self._gate.txn():
                    txn = self.env.begin(write=True)
                    self._writing.active = True
                    try:
                        result = fn(txn)
                    except BaseException:
                        txn.abort()
                        raise
                    finally:
                        self._writing.active = False
                    txn.commit()
                return result
            except lmdb.MapFullError:
                self._grow()
            except lmdb.MapResizedError:
                self._adopt_map_size()
            except lmdb.Error as exc:
                raise self._classify(exc) from exc

    def sync(self) -> None:
        """Force everything committed so far onto the disk."""
        self._ensure_open()
        self.env.sync(True)

    @property
    def map_size(self) -> int:
        """The current map size in bytes."""
        return int(self.env.info()["map_size"])

    def _grow(self) -> None:
        current = self.map_size
        target = current * 2
        if self.max_map_size is not None:
            if current >= self.max_map_size:
                raise StoreFullError(
                    f"store {self.path} is full: map size reached its ceiling of "
                    f"{self.max_map_size} bytes (max_map_size); nothing from this write was applied"
                )
            target = min(target, self.max_map_size)
        free = shutil.disk_usage(self.path).free
        log.info(
            "growing store map %s: %d -> %d bytes (%d free on disk)",
            self.path,
            current,
            target,
            free,
        )
        with self._gate.exclusive():
            self.env.set_mapsize(target)

    def _adopt_map_size(self) -> None:
        with self._gate.exclusive():
            self.env.set_mapsize(0)

    def _classify(self, exc: lmdb.Error) -> StoreError:
        text = str(exc)
        code = getattr(exc, "errno", None)
        full_codes = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
        # LMDB reports a short write (ENOSPC, EFBIG) at commit as EIO.
        if code in full_codes or any(
            s in text
            for s in ("No space left", "File too large", "Input/output error", "Disk quota")
        ):
            try:
                free = shutil.disk_usage(self.path).free
            except OSError:
                free = -1
            return StoreFullError(
                f"cannot write to store {self.path}: the disk is full or failing ({text}; "
                f"{free} bytes free); nothing from this write was applied"
            )
        return StoreError(f"store {self.path}: {text}")

    def _call(self, fn: Callable[[], R]) -> R:
        try:
            return fn()
        except lmdb.Error as exc:
            raise self._classify(exc) from exc

    def _ensure_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.path} is closed")

    # -- engine lock ----------------------------------------------------------------------

    def lock_engine(self, wait: float = ENGINE_WAIT) -> None:
        """Claim this repo for the engine of this process (re-entrant within the process).

        Waits up to `wait` seconds for CLI writers (see `offline_writer`), never for an engine.
        """
        self._ensure_open()
        self._lock.acquire(wait)

    def unlock_engine(self) -> None:
        """Release one claim taken with `lock_engine`."""
        self._lock.release()

    def engine_locked_elsewhere(self) -> bool:
        """True if some other process holds the engine lock of this repo."""
        return self._lock.engine_elsewhere()

    def lock_writer(self) -> bool:
        """Claim the repo for a CLI write while no engine runs; False if an engine runs.

        Engines cannot start until `unlock_writer`; other CLI writers can (LMDB serialises
        the writes themselves). A starting engine waits a few seconds for the claim to end.
        """
        self._ensure_open()
        return self._lock.acquire_writer()

    def unlock_writer(self) -> None:
        """Release a claim taken with `lock_writer`."""
        self._lock.release_writer()

    def offline_writer(self) -> contextlib.AbstractContextManager[bool]:
        """`with store.offline_writer() as offline:` keeps engines from starting meanwhile.

        `offline` is False if an engine runs (then the write belongs in its request queue).
        """
        return self._lock.offline_writer()

    def claim_group(self, name: str) -> None:
        """Register a started group; `DuplicateGroupError` if one of that name runs already."""
        if name in self._groups:
            raise DuplicateGroupError(
                f"a group named {name!r} is already running on store {self.path}; "
                "share that StateGroup (a second one would split its machines' events)"
            )
        self._groups.add(name)

    def release_group(self, name: str) -> None:
        """Undo `claim_group`."""
        self._groups.discard(name)

    @property
    def identity(self) -> str:
        """A random id made when the store was created (sector files' owner markers use it)."""
        return self._identity

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once `close()` ran."""
        return self._closed

    def close(self) -> None:
        """Close the environment and release the engine lock; pending group commits are lost."""
        if self._closed:
            return
        self.committer.shutdown()
        while self._lock.held:
            self.unlock_engine()
        self._lock.release_all_writers()
        self._closed = True
        self.env.close()
        with _OPEN_LOCK:
            _OPEN_PATHS.discard(self._real)

    async def aclose(self) -> None:
        """Flush pending group commits, then close."""
        if not self._closed:
            await self.committer.flush()
        self.close()

    async def __aenter__(self) -> LmdbStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __enter__(self) -> LmdbStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LmdbStore({str(self.path)!r}, durability={self.durability!r})"
