"""The persisted form of one group's machines: keys, records, reads and client-side writes.

Layout (all sub-databases are shared by every group of a store; keys start with the group name
and a NUL):

* `states`  ``<group>\\0<id>`` -> msgpack ``[schema, final, last_error, state_fields]``
* `live`    ``<group>\\0<id>`` -> empty; present while the machine is not final
* `inbox`   ``<group>\\0<id><seq:8>`` -> an encoded event, pending for that machine
* `mailbox` ``<seq:8>`` -> msgpack ``[group, state_key, encoded_event]``, written by clients
* `quarantine` ``<db>/<key>`` -> msgpack ``[reason, raw_bytes]``: records set aside because
  they cannot be read (a machine's is ``states/<group>\\0<id>``), kept for recovery
* `counts` machines per `count_by` key, for a group that has one (fsm/counts.py)
* `counted` which machines have each `count_by` key (the same module)

Everything here is synchronous and safe to call from any thread or process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import msgpack

from .codec import RecordCodec, new_packer, packb, unpackb
from .counts import GroupCounts
from .errors import MachineExistsError, RecordError, UnknownMachineError
from .keys import MachineId, id_key, seq_key, split_id
from .machine import MachineInfo
from .store import LmdbStore

S = TypeVar("S")
_PAGE = 1000
#: Called with `(id, raw_record, error)` for a record that cannot be read, instead of raising.
OnError = Callable[[MachineId, bytes, RecordError], None]
#: What `_decode_or_report` returns for a record it reported to `on_error`.
_UNREADABLE: Any = object()
#: Quarantine keys of machine records start with this.
STATES_QUARANTINE = b"states/"


def _new_unpacker() -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, strict_map_key=False, use_list=True)


class GroupRecords(Generic[S]):
    """Reads and writes one group's records in a store."""

    def __init__(
        self,
        store: LmdbStore,
        name: str,
        codec: RecordCodec[S],
        final: Callable[[S], bool] | None,
        count_by: Callable[[S], str] | None = None,
    ) -> None:
        self.store = store
        self.name = name
        self.codec = codec
        self.final = final
        self.prefix = name.encode() + b"\x00"
        #: Machines per `count_by` key, kept with every write (None: the group counts nothing).
        self.counts = GroupCounts(store, name, count_by) if count_by is not None else None
        # The codec's compiled functions, bound once: records are encoded on every transition.
        self._schema = codec.schema_version
        self._state_enc = codec.state_encoder
        self._own_dec = codec.own_state_decoder
        # A streaming unpacker fed one whole record at a time: ~0.2 us cheaper per record
        # than `msgpack.unpackb`, which sets up a new unpacker on every call.
        self._unpacker = _new_unpacker()

    # -- keys and records -------------------------------------------------------------------

    def key(self, machine_id: MachineId) -> bytes:
        """The `states` key of a machine (validates the id)."""
        return self.prefix + id_key(machine_id)

    def machine_id(self, key: bytes) -> tuple[MachineId, int]:
        """The machine id in a key of this group, and the offset after it."""
        return split_id(key, len(self.prefix))

    def what(self, machine_id: MachineId, kind: str) -> str:
        """How errors name a record."""
        return f"{kind} of {self.name} machine {machine_id!r}"

    def is_final(self, state: S) -> bool:
        """The group's finality predicate."""
        return bool(self.final and self.final(state))

    def encode(self, state: S, final: bool, last_error: str | None) -> bytes:
        """A machine record."""
        return packb([self._schema, final, last_error, self._state_enc(state)])

    def local_encoder(self) -> Callable[[S, bool, str | None], bytes]:
        """`encode` for one thread's exclusive use (it owns a Packer), for the engine's rounds."""
        pack = new_packer()
        schema, encode_state = self._schema, self._state_enc

        def encode(state: S, final: bool, last_error: str | None) -> bytes:
            data: bytes = pack([schema, final, last_error, encode_state(state)])
            return data

        return encode

    def decode(self, raw: bytes, machine_id: MachineId) -> tuple[S, bool, str | None]:
        """`(state, final, last_error)` from a record; `RecordError` names a bad one."""
        try:
            version, final, last_error, payload = unpackb(raw)
        except Exception as exc:
            raise RecordError(
                f"{self.what(machine_id, 'state record')} is corrupt: its {len(raw)} bytes "
                f"are not a valid record ({_why(exc)})"
            ) from exc
        if version != self.codec.schema_version:
            raise RecordError(
                f"{self.what(machine_id, 'state record')} has schema version {version!r}, "
                f"this code reads {self.codec.schema_version}"
            )
        try:
            state = self.codec.decode_state_fields(payload)
        except Exception as exc:
            what = self.what(machine_id, "state record")
            raise RecordError(f"{what} cannot be read: {_why(exc)}") from exc
        return state, bool(final), last_error

    def decode_state(self, raw: bytes, machine_id: MachineId) -> S:
        """Only the state of a record this process encoded (a machine whose step holds its state).

        The engine hands a machine's state to the step its round started and decodes the record
        that round wrote when the machine is planned next, so the record never comes from an
        older schema: its payload needs no checking.

        Engine-only: it reuses one streaming unpacker, so it must not be called from two
        threads at once (the engine calls it on its event loop).
        """
        unpacker = self._unpacker
        try:
            unpacker.feed(raw)
            state: S = self._own_dec(unpacker.unpack()[3])
        except Exception:
            self._unpacker = _new_unpacker()  # whatever the bad record left in it is dropped
            return self.decode(raw, machine_id)[0]  # raises a RecordError naming the record
        return state

    # -- reads ------------------------------------------------------------------------------

    def raw(self, key: bytes) -> bytes | None:
        """The stored record under `key`, if any."""
        with self.store.read() as txn:
            value: bytes | None = txn.get(key, db=self.store.db("states"))
            return value

    def raw_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The stored records under `keys`, in that order (None: absent), in one transaction."""
        with self.store.read() as txn:
            get, states = txn.get, self.store.db("states")
            return [get(key, db=states) for key in keys]

    def info(self, machine_id: MachineId) -> MachineInfo[S] | None:
        """The persisted state plus engine bookkeeping, or None."""
        key = self.key(machine_id)
        with self.store.read() as txn:
            raw = txn.get(key, db=self.store.db("states"))
            if raw is None:
                return None
            pending = sum(1 for _ in scan(txn, self.store.db("inbox"), key, values=False))
        state, final, last_error = self.decode(raw, machine_id)
        return MachineInfo(machine_id, state, final, last_error, pending)

    def list(
        self,
        filter: Callable[[S], bool] | None = None,
        *,
        start_after: MachineId | None = None,
        page_size: int = _PAGE,
        on_error: OnError | None = None,
    ) -> Iterator[tuple[MachineId, S]]:
        """Yield `(id, state)` in id order, one short read transaction per page.

        A record that cannot be read raises `RecordError`, or with `on_error` is reported
        there and skipped.
        """
        lower = self.prefix if start_after is None else self.key(start_after) + b"\x00"
        while True:
            with self.store.read() as txn:
                page = []
                for item in scan(txn, self.store.db("states"), self.prefix, start=lower):
                    page.append(item)
                    if len(page) >= page_size:
                        break
            for key, value in page:
                mid = self.machine_id(key)[0]
                state = self._decode_or_report(value, mid, on_error)
                if state is not _UNREADABLE and (filter is None or filter(state)):
                    yield mid, state
            if len(page) < page_size:
                return
            lower = page[-1][0] + b"\x00"

    def list_keys(
        self, keys: Sequence[bytes], on_error: OnError | None = None, page_size: int = _PAGE
    ) -> Iterator[tuple[MachineId, S]]:
        """Yield `(id, state)` of the machines stored under `keys`, in that order.

        One short read transaction per page; a key whose record is gone meanwhile is skipped,
        an unreadable record as in `list`.
        """
        states = self.store.db("states")
        for start in range(0, len(keys), page_size):
            with self.store.read() as txn:
                get = txn.get
                page = [(key, get(key, db=states)) for key in keys[start : start + page_size]]
            for key, raw in page:
                if raw is None:
                    continue
                mid = self.machine_id(key)[0]
                state = self._decode_or_report(raw, mid, on_error)
                if state is not _UNREADABLE:
                    yield mid, state

    def live_ids(self) -> Sequence[MachineId]:
        """Ids of the machines not in a final state (the live index; no record is decoded)."""
        with self.store.read() as txn:
            keys = list(scan(txn, self.store.db("live"), self.prefix, values=False))
        return [self.machine_id(key)[0] for key in keys]

    def list_live(self, on_error: OnError | None = None) -> Iterator[tuple[MachineId, S]]:
        """Yield `(id, state)` of the machines not in a final state (read from the live index).

        `on_error` as in `list`.
        """
        for mid in self.live_ids():
            raw = self.raw(self.key(mid))
            if raw is None:
                continue
            state = self._decode_or_report(raw, mid, on_error)
            if state is not _UNREADABLE:
                yield mid, state

    def _decode_or_report(self, raw: bytes, mid: MachineId, on_error: OnError | None) -> Any:
        """The record's state; `_UNREADABLE` once `on_error` was told it cannot be read."""
        try:
            return self.decode(raw, mid)[0]
        except RecordError as exc:
            if on_error is None:
                raise
            on_error(mid, raw, exc)
            return _UNREADABLE

    # -- quarantine -------------------------------------------------------------------------

    def quarantine_key(self, machine_id: MachineId) -> bytes:
        """Where a machine's unreadable record is kept in `quarantine`."""
        return STATES_QUARANTINE + self.key(machine_id)

    def quarantined(self, machine_id: MachineId) -> tuple[str, bytes] | None:
        """`(reason, raw_record)` if this machine's record was set aside, else None."""
        with self.store.read() as txn:
            value = txn.get(self.quarantine_key(machine_id), db=self.store.db("quarantine"))
        if value is None:
            return None
        why, raw = unpackb(value)
        return str(why), bytes(raw)

    def list_quarantined(self) -> Sequence[tuple[MachineId, str, bytes]]:
        """`(id, reason, raw_record)` of every machine of this group set aside, in id order."""
        prefix = STATES_QUARANTINE + self.prefix
        with self.store.read() as txn:
            items = list(scan(txn, self.store.db("quarantine"), prefix))
        out = []
        for key, value in items:
            why, raw = unpackb(value)
            out.append((self.machine_id(key[len(STATES_QUARANTINE) :])[0], str(why), bytes(raw)))
        return out

    def set_aside(self, txn: Any, machine_id: MachineId, raw: bytes, why: str) -> None:
        """In `txn`: move a machine's unreadable record to quarantine, bytes and reason kept.

        Its pending inbox events stay where they are, for when the record is restored.
        """
        key = self.key(machine_id)
        txn.put(self.quarantine_key(machine_id), packb([why, raw]), db=self.store.db("quarantine"))
        txn.delete(key, db=self.store.db("states"))
        txn.delete(key, db=self.store.db("live"))
        if self.counts is not None:
            self.counts.forget(txn)  # its count key is unknown: the engine rebuilds the counts

    def restore(self, txn: Any, machine_id: MachineId, raw: bytes) -> None:
        """In `txn`: put a (repaired) record back in place of the quarantined one.

        `RecordError` if `raw` cannot be read either; nothing is changed then.
        """
        state, final, _ = self.decode(raw, machine_id)
        final = final or self.is_final(state)
        key = self.key(machine_id)
        if self.counts is not None:
            if txn.get(key, db=self.store.db("states")) is not None:
                self.counts.forget(txn)  # (it replaces a record: the engine recounts)
            self.counts.add_in(txn, state, final, 1, key)
        txn.put(key, raw, db=self.store.db("states"))
        if final:
            txn.delete(key, db=self.store.db("live"))
        else:
            txn.put(key, b"", db=self.store.db("live"))
        txn.delete(self.quarantine_key(machine_id), db=self.store.db("quarantine"))

    def pending(self, key: bytes) -> Sequence[tuple[bytes, bytes]]:
        """The inbox entries `(inbox_key, encoded_event)` of one machine, in order."""
        with self.store.read() as txn:
            return list(scan(txn, self.store.db("inbox"), key))

    # -- client writes (any process; the engine ingests the mailbox) ------------------------

    def client_begin(
        self,
        txn: Any,
        machine_id: MachineId,
        key: bytes,
        record: bytes,
        final: bool,
        state: S | None = None,
    ) -> None:
        """Create a machine record in `txn`; `MachineExistsError` if the id is taken.

        `state` is the record's (decoded from it when not given, if the group counts).
        """
        if txn.get(key, db=self.store.db("states")) is not None:
            raise MachineExistsError(f"{self.name} machine {machine_id!r} already exists")
        if txn.get(STATES_QUARANTINE + key, db=self.store.db("quarantine")) is not None:
            # Its number is taken: a new machine must not replace the set-aside record.
            raise MachineExistsError(
                f"{self.name} machine {machine_id!r} exists but its record is in quarantine"
            )
        if self.counts is not None:
            if state is None:
                state = self.decode(record, machine_id)[0]
            self.counts.add_in(txn, state, final, 1, key)
        txn.put(key, record, db=self.store.db("states"))
        if not final:
            txn.put(key, b"", db=self.store.db("live"))

    def client_send(
        self, txn: Any, machine_id: MachineId, raw: bytes, create: Callable[[], S] | None
    ) -> None:
        """Append an encoded event to the mailbox in `txn` (creating the machine if allowed)."""
        key = self.key(machine_id)
        if txn.get(key, db=self.store.db("states")) is None:
            if txn.get(STATES_QUARANTINE + key, db=self.store.db("quarantine")) is not None:
                raise RecordError(f"{self.what(machine_id, 'state record')} is in quarantine")
            if create is None:
                raise UnknownMachineError(f"{self.name} has no machine {machine_id!r}")
            state = create()
            final = self.is_final(state)
            record = self.encode(state, final, None)
            self.client_begin(txn, machine_id, key, record, final, state)
        counters = self.store.db("counters")
        last = txn.get(b"mailbox_seq", db=counters)
        seq = (int.from_bytes(last, "big") if last else 0) + 1
        txn.put(b"mailbox_seq", seq_key(seq), db=counters)
        txn.put(seq_key(seq), packb([self.name, key, raw]), db=self.store.db("mailbox"))


def _why(exc: BaseException) -> str:
    """An exception as a reason: its message, or its type when it has none."""
    text = str(exc).removeprefix("Unpack failed: ")
    return text if text else f"msgpack {type(exc).__name__}"


def scan(
    txn: Any, db: Any, prefix: bytes, *, start: bytes | None = None, values: bool = True
) -> Iterator[Any]:
    """Iterate the keys (and values) of `db` that start with `prefix`, in key order."""
    cur = txn.cursor(db=db)
    if not cur.set_range(start if start is not None else prefix):
        return
    for item in cur.iternext(keys=True, values=values):
        key = item[0] if values else item
        if not key.startswith(prefix):
            return
        yield item
