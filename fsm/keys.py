"""Byte keys for machine ids, ordered so that integer ids list in numeric order."""

from __future__ import annotations

from .errors import RecordError

MachineId = int | str
_INT_OFFSET = 1 << 63


def id_key(machine_id: MachineId) -> bytes:
    """Encode a machine id: ints as 9 sortable bytes, strings as UTF-8 with a NUL end."""
    if isinstance(machine_id, bool):
        raise TypeError("machine ids are ints or strs, not bools")
    if isinstance(machine_id, int):
        if not -_INT_OFFSET <= machine_id < _INT_OFFSET:
            raise ValueError(f"machine id {machine_id} does not fit in 64 bits")
        return b"i" + (machine_id + _INT_OFFSET).to_bytes(8, "big")
    if isinstance(machine_id, str):
        if not machine_id or "\x00" in machine_id:
            raise ValueError("string machine ids must be non-empty and contain no NUL")
        return b"s" + machine_id.encode() + b"\x00"
    raise TypeError(f"machine ids are ints or strs, not {type(machine_id).__name__}")


def split_id(key: bytes, offset: int = 0) -> tuple[MachineId, int]:
    """Decode the id that starts at `offset`; return it and the offset after it."""
    tag = key[offset : offset + 1]
    if tag == b"i":
        end = offset + 9
        if len(key) < end:
            raise RecordError(f"truncated machine key {key!r}")
        return int.from_bytes(key[offset + 1 : end], "big") - _INT_OFFSET, end
    if tag == b"s":
        end = key.find(b"\x00", offset + 1)
        if end < 0:
            raise RecordError(f"unterminated machine key {key!r}")
        return key[offset + 1 : end].decode(), end + 1
    raise RecordError(f"bad machine key {key!r}")


def seq_key(seq: int) -> bytes:
    """Eight big-endian bytes, so sequence numbers sort in order."""
    return seq.to_bytes(8, "big")
