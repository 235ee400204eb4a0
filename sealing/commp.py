"""Filecoin piece commitments (CommP) and a sector's unsealed commitment (CommD).

A piece's commitment is the root of a binary merkle tree over its fr32-padded bytes: every
127-byte block of data becomes 128 bytes (four 254-bit field elements, each followed by two
zero bits), the padded bytes are cut into 32-byte leaves, and each parent is the
"sha2-256-trunc254-padded" hash of its two children: sha256 of the 64 bytes, with the top two
bits of the last byte cleared so that every node is a valid BLS12-381 field element.

The same tree over a whole sector's pieces (aligned, with zero pieces as filler) is CommD.
Everything here matches Lotus / go-commp-utils / rust-fil-proofs bit for bit (see
tests/test_commp.py for the published vectors).

Speed: each byte of data is hashed about four times over in 64-byte messages, and in CPython
every message costs one `hashlib` call (~0.4 µs, most of it call overhead rather than SHA-256
itself). Large inputs are therefore split into aligned subtrees hashed by worker processes,
and fr32 padding uses numpy when it is installed (a pure-Python path gives the same bytes).
bench/README.md ("bench_commp.py") has the figures and the approaches measured.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .commp_workers import Workers

NODE_SIZE = 32
FR32_IN = 127  # bytes of data per fr32 block
FR32_OUT = 128  # bytes of that block once padded
MIN_PADDED = 128

# Multiformats codes (multicodec table) of the two Filecoin commitment CIDs.
CODEC_UNSEALED = 0xF101  # fil-commitment-unsealed
CODEC_SEALED = 0xF102  # fil-commitment-sealed
MH_SHA256_TRUNC254 = 0x1012  # sha2-256-trunc254-padded
MH_POSEIDON = 0xB401  # poseidon-bls12_381-a2-fc1
_NAMES = {
    CODEC_UNSEALED: "fil-commitment-unsealed",
    CODEC_SEALED: "fil-commitment-sealed",
    0x70: "dag-pb",
    0x55: "raw",
    MH_SHA256_TRUNC254: "sha2-256-trunc254-padded",
    MH_POSEIDON: "poseidon-bls12_381-a2-fc1",
}

# Hashing work units: aligned subtrees (127 * 2^k bytes of data, a full tree once padded).
# 256 KiB padded when hashing in-process; 4 MiB per task for a worker process, which keeps
# the parent's share (a copy into shared memory, one request line) at ~1%.
SERIAL_CHUNK = FR32_IN << 11
PARALLEL_CHUNK = FR32_IN << 15
LEAF_BLOCK = FR32_IN << 9  # the unit of hashing proper (see subtree_root)
# Below this much data a process pool's start-up (~0.1-0.3 s) is not worth it.
PARALLEL_MIN_BYTES = 48 << 20

_TRUNC = bytes(b & 0x3F for b in range(256))  # clears the top two bits of a byte
_MASK254 = (1 << 254) - 1
_Q1, _Q2, _Q3 = _MASK254 << 254, _MASK254 << 508, _MASK254 << 762
_digest = type(hashlib.sha256()).digest


_NUMPY: Any = False  # False: not looked up yet
USE_NUMPY = True  # tests switch this off to check the pure-Python path gives the same bytes


def numpy_module() -> Any:
    """numpy if importable (the fast fr32 path), else None."""
    # Imported lazily (and through importlib, as numpy is optional): it costs ~0.1 s.
    global _NUMPY
    if _NUMPY is False:
        try:
            _NUMPY = importlib.import_module("numpy")
        except ImportError:
            _NUMPY = None
    return _NUMPY


# ---------------------------------------------------------------------------- sizes


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}")
    return value


def padded_size(unpadded: int) -> int:
    """The padded size of a valid unpadded piece size (127 * 2^k bytes, at least 127)."""
    _check_int(unpadded, "unpadded size")
    if unpadded < FR32_IN:
        raise ValueError(f"invalid unpadded piece size {unpadded}: minimum is 127 bytes")
    if unpadded % FR32_IN:
        raise ValueError(f"invalid unpadded piece size {unpadded}: not a multiple of 127")
    if not _is_pow2(unpadded // FR32_IN):
        raise ValueError(
            f"invalid unpadded piece size {unpadded}: padded size {unpadded // 127 * 128} "
            "is not a power of two"
        )
    return unpadded // FR32_IN * FR32_OUT


def unpadded_size(padded: int) -> int:
    """The unpadded size of a valid padded piece size (a power of two, at least 128)."""
    _check_int(padded, "padded size")
    if padded < MIN_PADDED:
        raise ValueError(f"invalid padded piece size {padded}: minimum is 128 bytes")
    if not _is_pow2(padded):
        raise ValueError(f"invalid padded piece size {padded}: not a power of two")
    if padded > 1 << 63:  # Lotus sizes are uint64
        raise ValueError(f"invalid padded piece size {padded}: more than 2^63 bytes")
    return padded - padded // FR32_OUT


def fit_unpadded(length: int) -> int:
    """The smallest valid unpadded size holding `length` bytes."""
    blocks = max(1, -(-length // FR32_IN))
    return FR32_IN << (blocks - 1).bit_length()


# ---------------------------------------------------------------------------- fr32


def _pad_block(block: bytes) -> bytes:
    # The block as one little-endian 1016-bit int; each 254-bit quarter moves up 2 bits more
    # than the one before, leaving the two zero bits after every field element.
    x = int.from_bytes(block, "little")
    y = (x & _MASK254) | ((x & _Q1) << 2) | ((x & _Q2) << 4) | ((x & _Q3) << 6)
    return y.to_bytes(FR32_OUT, "little")


@lru_cache(maxsize=64)
def _splitter(width: int, count: int) -> struct.Struct:
    return struct.Struct(f"{width}s" * count)


def _pad_blocks(data: bytes | memoryview) -> bytes:
    """fr32-pad whole 127-byte blocks (the caller checked the length)."""
    n = len(data) // FR32_IN
    np = numpy_module() if USE_NUMPY else None
    if np is None or n < 64:
        return b"".join(map(_pad_block, _splitter(FR32_IN, n).unpack(data)))
    # Bytes of quarter q start at bit 254q of the block = byte 31q + (6q // 8), shift 6q % 8.
    a = np.frombuffer(data, dtype=np.uint8).reshape(n, FR32_IN)
    out = np.empty((n, FR32_OUT), dtype=np.uint8)
    out[:, :32] = a[:, :32]
    np.bitwise_or(a[:, 31:63] >> 6, a[:, 32:64] << 2, out=out[:, 32:64])
    np.bitwise_or(a[:, 63:95] >> 4, a[:, 64:96] << 4, out=out[:, 64:96])
    np.bitwise_or(a[:, 95:126] >> 2, a[:, 96:127] << 6, out=out[:, 96:127])
    np.right_shift(a[:, 126], 2, out=out[:, 127])
    out[:, 31::32] &= 0x3F
    return bytes(out.data)


def fr32_pad(data: bytes) -> bytes:
    """fr32-pad `data` (a multiple of 127 bytes): two zero bits after every 254 bits."""
    if len(data) % FR32_IN:
        raise ValueError(f"fr32_pad needs a multiple of 127 bytes, got {len(data)} bytes")
    return _pad_blocks(data)


class Fr32Padder:
    """Streaming fr32 padding: feed any chunks, get the padded bytes of every whole block."""

    def __init__(self) -> None:
        self._rest = b""
        self.consumed = 0

    def update(self, data: bytes) -> bytes:
        """Take more data; return the padded form of the whole 127-byte blocks now complete."""
        self.consumed += len(data)
        buf = self._rest + data if self._rest else bytes(data)
        whole = len(buf) - len(buf) % FR32_IN
        self._rest = buf[whole:]
        return _pad_blocks(memoryview(buf)[:whole]) if whole else b""

    def finish(self) -> None:
        """Check the stream ended on a block boundary."""
        if self._rest:
            raise ValueError(
                f"fr32 stream of {self.consumed} bytes is not a multiple of 127 bytes "
                f"({len(self._rest)} bytes left over)"
            )


def fr32_pad_stream(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """fr32-pad a stream of chunks (a multiple of 127 bytes in all), yielding padded bytes."""
    padder = Fr32Padder()
    for chunk in chunks:
        out = padder.update(chunk)
        if out:
            yield out
    padder.finish()


# ---------------------------------------------------------------------------- tree


def _node(left: bytes, right: bytes) -> bytes:
    d = bytearray(hashlib.sha256(left + right).digest())
    d[31] &= 0x3F
    return bytes(d)


def _hash_level(buf: bytes | bytearray) -> bytearray:
    """Hash each 64-byte pair of nodes into its 32-byte parent."""
    # C-level iteration all the way (struct splits, map calls hashlib): the per-message cost
    # is then hashlib's own call overhead, which is the floor for CPython.
    n = len(buf) // 64
    out = bytearray(b"".join(map(_digest, map(hashlib.sha256, _splitter(64, n).unpack(buf)))))
    out[31::32] = out[31::32].translate(_TRUNC)
    return out


def subtree_root(data: bytes | bytearray | memoryview) -> bytes:
    """Root of the full tree over `data`, 127 * 2^k bytes of unpadded data."""
    # Hashed in blocks of 64 KiB padded: their buffers and the ~2k small objects of a level
    # stay in cache and in already-mapped memory. Whole-chunk levels (MiBs) ran 20% slower,
    # most of it page faults (measured: 4 MiB 60 MB/s, 64 KiB 79 MB/s).
    mv = memoryview(data)
    buf: bytes | bytearray
    if len(mv) > LEAF_BLOCK:
        buf = b"".join(
            [subtree_root(mv[i : i + LEAF_BLOCK]) for i in range(0, len(mv), LEAF_BLOCK)]
        )
    else:
        buf = _pad_blocks(mv)
    while len(buf) > NODE_SIZE:
        buf = _hash_level(buf)
    return bytes(buf)


# _ZERO[k]: the root of 2^k zero leaves. fr32 maps zeros to zeros, so a zero piece is a tree
# of zero leaves and each level is hash(z, z) of the one below. Built once (59 hashes, up to
# 2^63 bytes) so that readers on any thread see a complete table.
_ZERO = [bytes(NODE_SIZE)]
while len(_ZERO) < 59:
    _ZERO.append(_node(_ZERO[-1], _ZERO[-1]))


def _zero(padded: int) -> bytes:
    return _ZERO[padded.bit_length() - 6]  # 32 bytes = 2^5 is level 0


def zero_comm(padded_size: int) -> bytes:
    """The raw 32-byte commitment of an all-zero piece of this padded size."""
    unpadded_size(padded_size)  # validates
    return _zero(padded_size)


@functools.cache  # (a handful of sizes; asked several times per sector, base32 each time)
def zero_piece_cid(padded_size: int) -> str:
    """The piece CID of an all-zero piece of this padded size."""
    return commitment_to_cid(zero_comm(padded_size))


class _Stack:
    """Roots of aligned subtrees in order, merged as soon as two neighbours have one size."""

    def __init__(self) -> None:
        self.items: list[tuple[int, bytes]] = []  # (padded size, root), sizes decreasing

    def push(self, size: int, comm: bytes) -> None:
        """Append a subtree root, merging equal-sized neighbours."""
        items = self.items
        items.append((size, comm))
        while len(items) > 1 and items[-2][0] == items[-1][0]:
            (s, left), (_, right) = items[-2], items.pop()
            items[-1] = (2 * s, _node(left, right))

    def fill_to(self, size: int) -> bytes:
        """Zero-fill to one tree of `size` padded bytes and return its root."""
        if not self.items:
            return _zero(size)
        while len(self.items) > 1 or self.items[0][0] < size:
            self.push(self.items[-1][0], _zero(self.items[-1][0]))
        return self.items[0][1]


class CommPHasher:
    """Streaming CommP: `update()` with data in any chunks, then `digest()` or `cid()`.

    Memory is constant: data is hashed as aligned subtrees of `chunk` bytes and only their
    roots are kept. With `workers` > 1, subtrees are hashed by that many child processes
    (use it as a context manager, or call `digest()`, so that they stop).
    """

    def __init__(self, *, workers: int = 1, chunk: int | None = None) -> None:
        self._chunk = chunk or (PARALLEL_CHUNK if workers > 1 else SERIAL_CHUNK)
        padded_size(self._chunk)  # the chunk must be a whole subtree
        self._padded_chunk = self._chunk // FR32_IN * FR32_OUT
        self._buf = bytearray()
        self._stack = _Stack()
        self._done = False
        self.length = 0
        self._pool: Workers | None = None
        if workers > 1:
            try:
                from .commp_workers import Workers  # only large inputs need processes

                self._pool = Workers(workers, self._chunk)
            except OSError:  # no interpreter to start (embedded Python): hash in-process
                self._pool = None

    def __enter__(self) -> CommPHasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes, if any (`digest()` does it too)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Add data to the piece."""
        if self._done:
            raise ValueError("CommPHasher already finished")
        mv = memoryview(data).cast("B")
        self.length += len(mv)
        chunk = self._chunk
        if self._buf:
            take = chunk - len(self._buf)
            self._buf += mv[:take]
            mv = mv[take:]
            if len(self._buf) < chunk:
                return
            self._subtree(self._buf)
            self._buf.clear()
        while len(mv) >= chunk:
            self._subtree(mv[:chunk])
            mv = mv[chunk:]
        self._buf += mv

    def _subtree(self, data: bytes | bytearray | memoryview) -> None:
        pool = self._pool
        if pool is None:
            self._stack.push(self._padded_chunk, subtree_root(data))
            return
        root = pool.submit_data(data)
        if root is not None:
            self._stack.push(self._padded_chunk, root)

    def _update_from_file(self, path: str, length: int) -> None:
        # Workers read their own ranges of the file: the parent moves no data at all.
        pool = self._pool
        if pool is None or self.length:
            with open(path, "rb") as f:
                _feed(self, f, self._chunk)
            return
        whole = length // self._chunk
        for i in range(whole):
            root = pool.submit_file(path, i * self._chunk)
            if root is not None:
                self._stack.push(self._padded_chunk, root)
        self.length = whole * self._chunk
        with open(path, "rb") as f:
            f.seek(self.length)
            _feed(self, f, self._chunk)

    def digest(self, size: int | None = None) -> bytes:
        """Finish: the raw commitment, zero-filled up to `size` unpadded bytes (default: fit)."""
        if self._done:
            raise ValueError("CommPHasher already finished")
        self._done = True
        try:
            target = fit_unpadded(self.length) if size is None else size
            padded = padded_size(target)
            if self.length > target:
                raise ValueError(
                    f"piece data is {self.length} bytes, more than the declared unpadded "
                    f"size {size}"
                )
            while self._pool is not None and self._pool.pending:
                self._stack.push(self._padded_chunk, self._pool.result())
        finally:
            self.close()
        if self._buf:
            # The tail starts on a chunk boundary: zero-fill it to a whole chunk (or to the
            # whole piece when the piece is smaller than a chunk).
            whole = min(self._chunk, target)
            tail = bytes(self._buf) + bytes(whole - len(self._buf))
            self._buf.clear()
            self._stack.push(whole // FR32_IN * FR32_OUT, subtree_root(tail))
        return self._stack.fill_to(padded)

    def cid(self, size: int | None = None) -> str:
        """Finish: the piece CID (see `digest`)."""
        return commitment_to_cid(self.digest(size))


def _source_size(source: Any) -> int | None:
    if isinstance(source, bytes | bytearray | memoryview):
        return memoryview(source).nbytes
    if isinstance(source, str | os.PathLike):
        return os.stat(source).st_size
    try:
        st = os.fstat(source.fileno())
        return max(0, st.st_size - source.tell()) if st.st_size else None
    except (AttributeError, OSError, ValueError):
        return None


def default_workers() -> int:
    """How many processes hash a large piece by default: the cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _feed(hasher: CommPHasher, source: Any, read_size: int) -> None:
    if isinstance(source, bytes | bytearray | memoryview):
        hasher.update(source)
        return
    read = getattr(source, "read", None)
    if read is None:
        raise TypeError(f"piece source must be bytes, a path or a binary file, not {source!r}")
    while True:
        block = read(read_size)
        if not block:
            return
        if isinstance(block, str):
            raise TypeError("piece source is a text file; open it in binary mode ('rb')")
        hasher.update(block)


def piece_cid(
    source: bytes | bytearray | memoryview | str | os.PathLike[str] | IO[bytes],
    size: int | None = None,
    *,
    workers: int | None = None,
) -> str:
    """The piece CID (CommP) of bytes, a file path or a binary file, zero-filled to `size`."""
    # workers: processes to hash with; default: all cores for 48 MiB of data or more.
    if size is not None:
        padded_size(size)
    known = _source_size(source)
    if size is not None and known is not None and known > size:
        raise ValueError(
            f"piece data is {known} bytes, more than the declared unpadded size {size}"
        )
    if workers is None:
        big = (known if known is not None else size or 0) >= PARALLEL_MIN_BYTES
        workers = default_workers() if big else 1
    with CommPHasher(workers=workers) as hasher:
        if isinstance(source, str | os.PathLike):
            hasher._update_from_file(os.fsdecode(source), known or 0)
        else:
            _feed(hasher, source, hasher._chunk * (1 if workers > 1 else 4))
        return hasher.cid(size)


# ---------------------------------------------------------------------------- CommD


def unsealed_cid(sector_size: int, pieces: Sequence[tuple[str, int]]) -> str:
    """A sector's CommD from its `(piece_cid, padded_size)` pieces, as Lotus computes it."""
    unpadded_size(sector_size)  # validates
    todo: list[tuple[int, bytes]] = []
    end = 0
    for i, (cid, size) in enumerate(pieces):
        try:
            unpadded_size(size)
        except (TypeError, ValueError) as e:
            raise ValueError(f"piece {i} ({cid}): {e}") from None
        if size > sector_size:
            raise ValueError(
                f"piece {i} ({cid}): size {size} is larger than the sector ({sector_size})"
            )
        try:
            comm = parse_piece_cid(cid)
        except (TypeError, ValueError) as e:
            raise ValueError(f"piece {i}: {e}") from None
        end = -(-end // size) * size + size  # each piece starts aligned to its own size
        todo.append((size, comm))
    if end > sector_size:
        raise ValueError(
            f"pieces need {end} bytes with alignment padding, more than the sector size "
            f"{sector_size}"
        )
    # The stack combining of go-commp-utils PieceAggregateCommP (after rust-fil-proofs
    # pieces.rs): zero pieces before a piece that is bigger than the subtree under
    # construction, then zeros to fill the sector.
    stack = _Stack()
    for size, comm in todo:
        while stack.items and stack.items[-1][0] < size:
            stack.push(stack.items[-1][0], _zero(stack.items[-1][0]))
        stack.push(size, comm)
    return commitment_to_cid(stack.fill_to(sector_size))


# ---------------------------------------------------------------------------- CIDs


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out) + bytes([n])


def _read_varint(buf: bytes, pos: int, cid: str) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError(f"not a valid CID: {cid!r} (truncated varint)")
        byte = buf[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return n, pos


def commitment_to_cid(comm: bytes, *, sealed: bool = False) -> str:
    """A 32-byte commitment as a CIDv1 string: unsealed (CommP/CommD) or `sealed` (CommR)."""
    if len(comm) != NODE_SIZE:
        raise ValueError(f"a commitment is 32 bytes, got {len(comm)}")
    raw = _CID_PREFIX[sealed] + bytes(comm)
    return "b" + base64.b32encode(raw).decode("ascii").rstrip("=").lower()


#: A commitment CID's bytes before the digest, unsealed (False) or sealed (True): CIDv1, the
#: codec, the multihash and the digest length.
_CID_PREFIX = {
    sealed: _varint(1) + _varint(codec) + _varint(mh) + _varint(NODE_SIZE)
    for sealed, codec, mh in (
        (False, CODEC_UNSEALED, MH_SHA256_TRUNC254),
        (True, CODEC_SEALED, MH_POSEIDON),
    )
}


def _name(code: int) -> str:
    name = _NAMES.get(code)
    return f"0x{code:x} ({name})" if name else f"0x{code:x}"


def _parse_cid(cid: str, codec: int, mh: int) -> bytes:
    if not isinstance(cid, str):
        raise TypeError(f"a CID must be a str, got {cid!r}")
    if cid.startswith("Qm"):
        raise ValueError(f"{cid!r} is a CIDv0 (dag-pb, sha2-256), not a {_NAMES[codec]} CID")
    if cid[:1] not in ("b", "B"):
        raise ValueError(f"not a base32 CIDv1 (multibase 'b'): {cid!r}")
    body = cid[1:].upper()
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError:
        raise ValueError(f"not a valid CID: {cid!r} (bad base32)") from None
    version, pos = _read_varint(raw, 0, cid)
    got_codec, pos = _read_varint(raw, pos, cid)
    got_mh, pos = _read_varint(raw, pos, cid)
    length, pos = _read_varint(raw, pos, cid)
    if version != 1:
        raise ValueError(f"not a CIDv1: {cid!r} (version {version})")
    if got_codec != codec:
        raise ValueError(f"{cid!r} has codec {_name(got_codec)}, expected {_name(codec)}")
    if got_mh != mh:
        raise ValueError(f"{cid!r} has multihash {_name(got_mh)}, expected {_name(mh)}")
    if length != NODE_SIZE or len(raw) - pos != NODE_SIZE:
        raise ValueError(f"{cid!r}: digest is {len(raw) - pos} bytes, expected 32")
    return raw[pos:]


def parse_piece_cid(cid: str) -> bytes:
    """The 32-byte commitment in a piece / unsealed CID (fil-commitment-unsealed)."""
    return _parse_cid(cid, CODEC_UNSEALED, MH_SHA256_TRUNC254)


def parse_sealed_cid(cid: str) -> bytes:
    """The 32-byte commitment in a sealed CID (CommR, fil-commitment-sealed)."""
    return _parse_cid(cid, CODEC_SEALED, MH_POSEIDON)
