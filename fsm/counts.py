"""Per-key machine counts, kept in the commit of every transition (`StateGroup(count_by=...)`).

A group given `count_by` (state -> a short string, e.g. the state's name) keeps, in the
`counts` sub-database, how many of its machines have each key, split by finality:

* ``<group>\\0L<key>`` -> msgpack int: machines not final whose `count_by` is `<key>`
* ``<group>\\0F<key>`` -> msgpack int: final machines whose `count_by` is `<key>`
* ``<group>\\0`` -> msgpack int `COUNTS_VERSION`: present while the counts are exact

and, in the `counted` sub-database, which machines have each key (so listing the machines of
a few keys reads those machines only, never the whole group):

* ``<group>\\0<key>\\0<machine id key>`` -> empty

Every write that changes a machine's key or finality adds its +1/-1 (and moves its index
entry) in the same transaction (the engine through `Committer.add`, clients through `add`), so
reading a count is a few key reads, never a scan, and a crash cannot make them drift: they
commit or vanish with the state. What the counts cannot follow (a record set aside in
quarantine because it cannot be read, so its key is unknown) removes the marker; the engine
then rebuilds them from a full scan. At every start the engine also checks the live half
against the live index it loads anyway, so the start stays O(live machines) while a stored
count that disagrees is logged and repaired (with the key index rebuilt). A store written
before the key index existed (marker version 1) is rebuilt once, by the same scan, at the
first start of an engine that keeps it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .codec import packb, unpackb
from .errors import RecordError, StoreError

if TYPE_CHECKING:
    from .keys import MachineId
    from .records import GroupRecords
    from .store import LmdbStore

log = logging.getLogger("sectorfsm.fsm.counts")

#: The sub-database holding every counting group's counts.
COUNTS_DB = "counts"
#: The sub-database indexing every counting group's machines by count key.
INDEX_DB = "counted"
#: Version of the counts layout; the marker holds it while the counts are exact.
#: 2: the `counted` key index is kept with them (1: counts only, rebuilt at start).
COUNTS_VERSION = 2
_LIVE = b"L"
_FINAL = b"F"
_VERSION = packb(COUNTS_VERSION)


def add(txn: Any, db: Any, key: bytes, delta: int) -> None:
    """Add `delta` to the msgpack int under `key` in write transaction `txn` (0: deleted)."""
    raw = txn.get(key, db=db)
    value = (int(unpackb(raw)) if raw is not None else 0) + delta
    if value:
        txn.put(key, packb(value), db=db)
    elif raw is not None:
        txn.delete(key, db=db)


class GroupCounts:
    """One group's counts: the keys, the staging of changes, the readers and the start check."""

    def __init__(self, store: LmdbStore, name: str, count_by: Callable[[Any], str]) -> None:
        self.store = store
        self.key_of = count_by
        self.marker = name.encode() + b"\x00"
        self._live = self.marker + _LIVE
        self._final = self.marker + _FINAL
        self._committer = store.committer
        #: `entries[final][name]`: the `counts` key, made once per key, so the engine compares
        #: a machine's old and new entries by identity.
        self.entries: tuple[dict[str, bytes], dict[str, bytes]] = ({}, {})
        #: `counts` entry -> the prefix of its machines' keys in the `counted` index.
        self._index: dict[bytes, bytes] = {}
        #: `counts` entry -> its count key (what a machine's watchers are told: fsm/watch.py).
        self.names: dict[bytes | None, str] = {}
        self._group_len = len(self.marker)

    def entry(self, name: str, final: bool) -> bytes:
        """The `counts` key of machines with count key `name` and this finality."""
        table = self.entries[final]
        key = table.get(name)
        if key is None:
            if "\x00" in name:
                raise ValueError(f"count key {name!r} contains a NUL")
            key = table[name] = (self._final if final else self._live) + name.encode()
            self._index[key] = self.index_prefix(name)
            self.names[key] = name
        return key

    def index_prefix(self, name: str) -> bytes:
        """The prefix of the `counted` keys of machines whose count key is `name`."""
        return self.marker + name.encode() + b"\x00"

    def index_key(self, entry: bytes, machine_key: bytes) -> bytes:
        """The `counted` key of the machine stored under `machine_key`, counted in `entry`."""
        return self._index[entry] + machine_key[self._group_len :]

    # -- writes ----------------------------------------------------------------------------

    def stage(self, entry: bytes, delta: int, machine_key: bytes | None = None) -> None:
        """Stage `delta` for a `counts` key into the engine's current commit.

        With `machine_key`, the machine joins (+1) or leaves (-1) that key's index too.
        """
        committer = self._committer
        committer.add(COUNTS_DB, entry, delta)
        if machine_key is not None:
            key = self.index_key(entry, machine_key)
            if delta > 0:
                committer.put(INDEX_DB, key, b"")
            else:
                committer.delete(INDEX_DB, key)

    def moved(self, old: bytes, new: bytes, machine_key: bytes | None = None) -> None:
        """Stage one machine moving between two `counts` keys (from a pre-commit hook)."""
        committer = self._committer
        adds = committer.adding(COUNTS_DB)
        adds[old] = adds.get(old, 0) - 1
        adds[new] = adds.get(new, 0) + 1
        if machine_key is not None:
            index = self._index
            old_prefix, new_prefix = index[old], index[new]
            if old_prefix != new_prefix:  # (not only its finality changed)
                # Straight into the hook's staging: nothing puts a `fresh` key in this
                # database, so a delete is a `None` there, as `Committer.delete` would stage.
                ops = committer.staging(INDEX_DB)
                tail = machine_key[self._group_len :]
                ops[old_prefix + tail] = None
                ops[new_prefix + tail] = b""

    def add_in(
        self, txn: Any, state: Any, final: bool, delta: int, machine_key: bytes | None = None
    ) -> None:
        """In write transaction `txn`, before the record is written: count one machine.

        With `machine_key` (its `states` key), its entry in the key index is written too.

        The counts of a group with no record yet are exact by definition: the first write
        marks them so, and readers of a repo no engine ran on need no scan either.
        """
        db = self.store.db(COUNTS_DB)
        if txn.get(self.marker, db=db) is None and not self._any_record(txn):
            txn.put(self.marker, _VERSION, db=db)
        entry = self.entry(self.key_of(state), final)
        add(txn, db, entry, delta)
        if machine_key is not None:
            index = self.store.db(INDEX_DB)
            if delta > 0:
                txn.put(self.index_key(entry, machine_key), b"", db=index)
            else:
                txn.delete(self.index_key(entry, machine_key), db=index)

    def _any_record(self, txn: Any) -> bool:
        cur = txn.cursor(db=self.store.db("states"))
        return bool(cur.set_range(self.marker)) and bytes(cur.key()).startswith(self.marker)

    def forget(self, txn: Any) -> None:
        """In `txn`: the counts are no longer exact (the engine rebuilds them)."""
        txn.delete(self.marker, db=self.store.db(COUNTS_DB))

    # -- reads -----------------------------------------------------------------------------

    def stored(self, txn: Any) -> tuple[dict[str, int], dict[str, int]] | None:
        """`(live, final)` counts by key as stored in `txn`; None if they are not exact."""
        from .records import scan

        db = self.store.db(COUNTS_DB)
        if txn.get(self.marker, db=db) != _VERSION:  # (absent, or written before the index)
            return None
        live: dict[str, int] = {}
        final: dict[str, int] = {}
        start = len(self.marker) + 1
        for key, value in scan(txn, db, self.marker, start=self._final):
            (final if key[start - 1 : start] == _FINAL else live)[key[start:].decode()] = int(
                unpackb(value)
            )
        return live, final

    def read(self) -> dict[str, int] | None:
        """Machines per key (final or not), as stored; None if the counts are not exact."""
        try:
            with self.store.read() as txn:
                split = self.stored(txn)
        except StoreError:  # a read-only store written before counts existed
            return None
        if split is None:
            return None
        return dict(Counter(split[0]) + Counter(split[1]))

    def keys_with(self, names: Iterable[str]) -> list[bytes] | None:
        """The `states` keys of machines whose count key is in `names`, in key order.

        Read from the key index; None if it is not exact (the caller scans instead).
        """
        from .records import scan

        group = self.marker
        try:
            with self.store.read() as txn:
                if txn.get(group, db=self.store.db(COUNTS_DB)) != _VERSION:
                    return None
                index = self.store.db(INDEX_DB)
                keys: list[bytes] = []
                for name in set(names):
                    prefix = self.index_prefix(name)
                    cut = len(prefix)
                    keys.extend(group + k[cut:] for k in scan(txn, index, prefix, values=False))
        except StoreError:  # a read-only store written before the index existed
            return None
        keys.sort()
        return keys

    def scanned(self, records: GroupRecords[Any]) -> dict[str, int]:
        """Machines per key by a full scan of the records (unreadable ones skipped)."""
        counts: Counter[str] = Counter()
        for _, state in records.list(on_error=lambda *_: None):
            counts[self.key_of(state)] += 1
        return dict(counts)

    # -- the start check -------------------------------------------------------------------

    def check(self, records: GroupRecords[Any], known: Mapping[MachineId, str]) -> str:
        """Make the stored counts exact, in one write transaction; say what was done.

        `known` gives the keys of live machines the engine already decoded. With the marker in
        place only the live half is compared with the live index (O(live)); without it (a new
        store, or a record quarantined) every record is scanned once.
        """
        db = self.store.db(COUNTS_DB)
        for name in ("states", "live"):
            self.store.db(name)

        def run(txn: Any) -> str:
            split = self.stored(txn)
            if split is None:
                return self._rebuild(txn, db, records)
            live = self._live_scan(txn, records, known)
            if live == split[0]:
                return "ok"
            # The key index drifted with them: both are rebuilt from the records.
            self._rebuild(txn, db, records)
            return f"live counts repaired: stored {_diff(split[0], live)}"

        outcome = self.store.write(run)
        if outcome.startswith("live counts repaired"):
            log.error("group %s: %s", records.name, outcome)
        elif outcome != "ok":
            log.warning("group %s: %s", records.name, outcome)
        return outcome

    def _live_scan(
        self, txn: Any, records: GroupRecords[Any], known: Mapping[MachineId, str]
    ) -> dict[str, int]:
        from .records import scan

        counts: Counter[str] = Counter()
        states = self.store.db("states")
        for key in scan(txn, self.store.db("live"), records.prefix, values=False):
            mid = records.machine_id(key)[0]
            name = known.get(mid)
            if name is None:  # created by a client since the engine read the live index
                raw = txn.get(key, db=states)
                try:
                    name = self.key_of(records.decode(raw, mid)[0]) if raw is not None else None
                except RecordError:
                    name = None
            if name is not None:
                counts[name] += 1
        return dict(counts)

    def _rebuild(self, txn: Any, db: Any, records: GroupRecords[Any]) -> str:
        from .records import scan

        live: Counter[str] = Counter()
        final: Counter[str] = Counter()
        index = self.store.db(INDEX_DB)
        stale = list(scan(txn, index, self.marker, values=False))
        for key in stale:
            txn.delete(key, db=index)
        for key, raw in scan(txn, self.store.db("states"), records.prefix):
            mid = records.machine_id(key)[0]
            try:
                state, is_final, _ = records.decode(raw, mid)
            except RecordError:
                continue  # not counted, as readers skip it; the engine sets it aside
            is_final = is_final or records.is_final(state)
            name = self.key_of(state)
            (final if is_final else live)[name] += 1
            txn.put(self.index_key(self.entry(name, is_final), bytes(key)), b"", db=index)
        old_live, old_final = (
            self._raw_half(txn, db, self._live),
            self._raw_half(txn, db, self._final),
        )
        self._replace(txn, db, self._live, old_live, dict(live))
        self._replace(txn, db, self._final, old_final, dict(final))
        txn.put(self.marker, _VERSION, db=db)
        scanned = sum(live.values()) + sum(final.values())
        return f"counts rebuilt from a scan of {scanned} records" if scanned else "ok"

    def _raw_half(self, txn: Any, db: Any, prefix: bytes) -> dict[str, int]:
        from .records import scan

        return {key[len(prefix) :].decode(): int(unpackb(v)) for key, v in scan(txn, db, prefix)}

    def _replace(
        self, txn: Any, db: Any, prefix: bytes, old: Mapping[str, int], new: Mapping[str, int]
    ) -> None:
        for name in old.keys() - new.keys():
            txn.delete(prefix + name.encode(), db=db)
        for name, n in new.items():
            if old.get(name) != n:
                txn.put(prefix + name.encode(), packb(n), db=db)


def _diff(stored: Mapping[str, int], actual: Mapping[str, int]) -> str:
    """`key: stored -> actual` for every key that differs."""
    names = sorted(stored.keys() | actual.keys())
    return ", ".join(
        f"{n or '<empty>'}: {stored.get(n, 0)} -> {actual.get(n, 0)}"
        for n in names
        if stored.get(n, 0) != actual.get(n, 0)
    )
