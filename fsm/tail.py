"""Records of a state whose last field only grows: the entries already stored are not re-encoded.

A sector's log gains an entry or two per round and is most of its record, so encoding it whole
every round cost more than the rest of the state. When a state's last field is marked
`APPEND_ONLY` (fsm/codec.py), its record is built from three parts: the state's other fields
(packed as one flat tuple of names and values, whose bytes less its array header are the map's
items; the record's and the map's headers are kept per encoder), the field's array header, and
its entries, of which those the machine's previous record already ends with are copied from
there and only the new ones are encoded. The record's map is its last element and the field the
map's last key, so the bytes are exactly those of encoding the state whole: the store format
does not change, and nothing else needs to know.

A machine notes what its record ends with: `tail_count` entries in `tail_size` bytes, and in
`tail` the list object they came from while the machine holds it (the planner appends to that
same list; a list that was replaced, or a machine that let go of its state, is encoded whole).
A machine that shares its state with its step lets go of its record meanwhile but keeps those
bytes (`tail_bytes`, see `let_go`): its next round starts from the state it kept.
"""

from __future__ import annotations

import operator
from typing import Any

from .codec import new_packer
from .codegen import Encoder
from .machine import Machine


def array_header(n: int) -> bytes:
    """The msgpack header of an array of `n` items."""
    if n < 16:
        return _SMALL_HEADERS[n]
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


_SMALL_HEADERS = tuple(bytes((0x90 | n,)) for n in range(16))


def map_header(n: int) -> bytes:
    """The msgpack header of a map of `n` items."""
    if n < 16:
        return bytes((0x80 | n,))
    if n < 0x10000:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


def _header_size(n: int) -> int:
    """The length of `array_header(n)`."""
    return 1 if n < 16 else 3 if n < 0x10000 else 5


class TailEncoder:
    """Encodes machine records of one group whose state ends with an append-only list."""

    __slots__ = ("_get", "_head", "_item", "_key", "_pack", "_prefixes", "_schema")

    def __init__(self, schema: int, tail: tuple[str, Encoder | None, Encoder]) -> None:
        name, self._item, self._head = tail
        self._get = operator.attrgetter(name)
        self._schema = schema
        self._pack = new_packer()  # (used on the loop thread only)
        #: The field's packed name, which the entries' array header follows in a record.
        self._key = self._pack(name)
        #: `_prefix` by (finality, length of the head's pairs), for rounds with no error.
        self._prefixes: dict[tuple[bool, int], bytes] = {}

    def encode(self, m: Machine, state: Any, final: bool, last_error: str | None) -> bytes:
        """`m`'s record for `state`, reusing the entries its previous record ends with."""
        items = self._get(state)
        n = len(items)
        pack = self._pack
        count = size = 0
        kept: Any = b""
        if m.tail is items and m.tail_count <= n:
            record = m.record
            if record is not None:
                start = len(record) - m.tail_size
                mark = self._key + array_header(m.tail_count)
                if record[start - len(mark) : start] == mark:  # (a cheap check of the notes)
                    count, size = m.tail_count, m.tail_size
                    kept = memoryview(record)[start:]
            elif m.tail_bytes is not None and len(m.tail_bytes) == m.tail_size:
                count, size = m.tail_count, m.tail_size
                kept = m.tail_bytes
        pairs = self._head(state)
        k = len(pairs)
        if last_error is None and final.__class__ is bool:
            prefix = self._prefixes.get((final, k)) or self._prefix(final, None, k)
        else:
            prefix = self._prefix(final, last_error, k)
        # The map's items: the pairs' bytes less their array's header.
        head = memoryview(pack(pairs))[_header_size(k) :]
        if count == n:
            m.tail, m.tail_count, m.tail_bytes, m.tail_size = items, n, None, size
            return b"".join((prefix, head, array_header(n), kept))
        # The new entries packed as one array (one call however many), less its header.
        item = self._item
        if n - count == 1:  # (most rounds: the entry alone, its bytes are the same)
            last = items[count]
            new: Any = pack(last if item is None else item(last))
        else:
            fresh = items[count:] if item is None else [item(x) for x in items[count:]]
            new = memoryview(pack(fresh))[_header_size(n - count) :]
        m.tail, m.tail_count, m.tail_bytes = items, n, None
        m.tail_size = size + len(new)
        return b"".join((prefix, head, array_header(n), kept, new))

    def _prefix(self, final: Any, last_error: str | None, k: int) -> bytes:
        """The record's bytes before its map's items: its array's, its notes', the map's header.

        `k` is the length of the head's flat pairs, so the map has `(k + 1) // 2` items (the
        append-only field's value is not among the pairs). Kept for a plain finality and no
        error, as nearly every round has.
        """
        pack = self._pack
        prefix = b"".join(
            (
                array_header(4),
                pack(self._schema),
                pack(final),
                pack(last_error),
                map_header((k + 1) // 2),
            )
        )
        if last_error is None and final.__class__ is bool:
            self._prefixes[(final, k)] = prefix
        return prefix

    def bind(self, m: Machine, state: Any) -> None:
        """Note that `state`, just decoded from `m.record`, holds the entries it ends with."""
        items = self._get(state)
        m.tail = items if len(items) == m.tail_count else None
        m.tail_bytes = None

    @staticmethod
    def let_go(m: Machine, shared: bool) -> None:
        """`m` lets go of its record (and of its state unless `shared`) for its step."""
        record = m.record
        if shared and m.tail is not None and record is not None and m.tail_size:
            # The entries' bytes only: the rest of the record is most of it, and the round
            # after the step encodes that part anew anyway.
            m.tail_bytes = record[len(record) - m.tail_size :]
        else:
            m.tail = m.tail_bytes = None
        m.record = None
        if not shared:
            m.state = None
