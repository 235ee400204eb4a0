"""The record codec: round trips, its plain-dataclass fast paths, and its errors."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import threading
import time
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
from fsmtoy import Note

from sectorfsm.fsm import RecordCodec, RecordError
from sectorfsm.fsm.codec import packb, unpackb
from sectorfsm.fsm.codegen import generated_encoder, list_encoder, optional_encoder

# -- plain-dataclass fast paths -------------------------------------------------------------


@dataclass
class Lean:
    """Every field decodes as msgpack hands it over: both codec fast paths apply."""

    name: str = ""
    nums: list[int] = field(default_factory=list)
    grid: list[list[int]] = field(default_factory=list)
    note: str | None = None
    count: int = 0


@dataclass
class Flat:
    """Like `Lean` plus a dict field (decoded through a converter: the slow decode path)."""

    name: str = ""
    nums: list[int] = field(default_factory=list)
    grid: list[list[int]] = field(default_factory=list)
    tags: dict[str, int] = field(default_factory=dict)
    note: str | None = None
    count: int = 0


def _through_bytes(payload: Any) -> Any:
    return unpackb(packb(payload))


def test_plain_dataclass_fast_paths_share_nothing_between_decodes() -> None:
    lean: RecordCodec[Lean] = RecordCodec(Lean, [])
    obj = Lean("a", [1, 2], [[3], [4, 5]], None, 7)
    payload = lean.encode_state_fields(obj)
    # Encoder fast path: the instance dict is the payload (no copy).
    assert payload is obj.__dict__
    raw = packb(payload)
    fresh = unpackb(raw)
    back = lean.decode_state_fields(fresh)
    assert back == obj and type(back) is Lean
    # Decoder fast path: a complete record becomes the instance dict.
    assert back.__dict__ is fresh

    one, two = (lean.decode_state_fields(unpackb(raw)) for _ in range(2))
    one.nums.append(99)
    one.grid[0].append(99)
    one.count = -1
    assert two == obj, "decodes of one record share mutable state"
    assert obj == Lean("a", [1, 2], [[3], [4, 5]], None, 7)


@pytest.mark.parametrize("note", [None, "n"])
def test_plain_dataclass_with_list_dict_optional_fields_round_trips(note: str | None) -> None:
    codec: RecordCodec[Flat] = RecordCodec(Flat, [])
    obj = Flat("a", [1, 2], [[3], []], {"x": 1, "y": -2}, note, 7)
    raw = packb(codec.encode_state_fields(obj))
    back = codec.decode_state_fields(unpackb(raw))
    assert back == obj and type(back) is Flat
    other = codec.decode_state_fields(unpackb(raw))
    back.tags["z"] = 3
    back.grid[1].append(1)
    assert other == obj


def test_extra_instance_attribute_is_not_encoded() -> None:
    codec: RecordCodec[Flat] = RecordCodec(Flat, [])
    obj = Flat("a", [1])
    obj.extra = 1  # type: ignore[attr-defined]
    payload = codec.encode_state_fields(obj)
    assert set(payload) == {f.name for f in dataclasses.fields(Flat)}
    back = codec.decode_state_fields(_through_bytes(payload))
    assert back == obj and not hasattr(back, "extra")
    assert obj.extra == 1  # type: ignore[attr-defined]  # the instance itself is untouched


@dataclass
class Single:
    n: int = 0


def test_extra_attribute_on_a_single_field_dataclass_is_not_encoded() -> None:
    codec: RecordCodec[Single] = RecordCodec(Single, [])
    obj = Single(3)
    obj.extra = 1  # type: ignore[attr-defined]
    assert codec.encode_state_fields(obj) == {"n": 3}


def test_record_missing_a_field_decodes_with_its_default() -> None:
    codec: RecordCodec[Flat] = RecordCodec(Flat, [])
    older = _through_bytes({"name": "old", "count": 2})  # written before nums/grid/... existed
    back = codec.decode_state_fields(older)
    assert back == Flat("old", count=2)
    again = codec.decode_state_fields(_through_bytes({"name": "old"}))
    back.nums.append(1)
    assert again.nums == [], "a default_factory list was shared between decodes"


@dataclass
class Normalised:
    name: str = ""
    runs: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = self.name.strip().lower()
        self.runs.append(len(self.runs))


@dataclass(slots=True)
class Slotted:
    a: int = 0
    xs: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Frozen:
    a: int = 0
    label: str = ""
    xs: tuple[int, ...] = ()


def test_post_init_slots_and_frozen_dataclasses_round_trip() -> None:
    post: RecordCodec[Normalised] = RecordCodec(Normalised, [])
    payload = _through_bytes(post.encode_state_fields(Normalised(" AB ")))
    assert payload == {"name": "ab", "runs": [0]}
    # A complete record, yet __post_init__ must still run (no dict-install shortcut).
    back = post.decode_state_fields(payload)
    assert back.name == "ab" and back.runs == [0, 1], "__post_init__ did not run on decode"
    back = post.decode_state_fields(_through_bytes({"name": " CD", "runs": [7]}))
    assert back.name == "cd" and back.runs == [7, 1]

    slotted: RecordCodec[Slotted] = RecordCodec(Slotted, [])
    s = Slotted(1, [2, 3])
    assert slotted.decode_state_fields(_through_bytes(slotted.encode_state_fields(s))) == s

    frozen: RecordCodec[Frozen] = RecordCodec(Frozen, [])
    f = Frozen(1, "x", (2, 3))
    fb = frozen.decode_state_fields(_through_bytes(frozen.encode_state_fields(f)))
    assert fb == f and hash(fb) == hash(f) and fb.xs == (2, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fb.a = 2  # type: ignore[misc]


def test_unknown_field_raises_record_error_naming_it() -> None:
    codec: RecordCodec[Flat] = RecordCodec(Flat, [Note])
    complete = codec.encode_state_fields(Flat())
    with pytest.raises(RecordError, match=r"unknown field\(s\) \['bogus'\] for Flat"):
        codec.decode_state_fields(_through_bytes({**complete, "bogus": 1}))
    with pytest.raises(RecordError, match=r"rec 9: unknown field\(s\) \['zzz'\] for Note"):
        codec.decode_event(packb([1, "Note", {"uid": 1, "zzz": 0}]), "rec 9")
    with pytest.raises(RecordError, match="expected a mapping for Flat"):
        codec.decode_state_fields([1, 2])


@dataclass
class WithInit:
    n: int = 0
    m: int = 0

    def __init__(self, n: int = 0, m: int = 0) -> None:  # a hand-written __init__
        self.n = n
        self.m = m
        self.total = n + m


def test_dataclass_with_its_own_init_runs_it_on_decode() -> None:
    codec: RecordCodec[WithInit] = RecordCodec(WithInit, [])
    back = codec.decode_state_fields(_through_bytes(codec.encode_state_fields(WithInit(2, 3))))
    assert (back.n, back.m) == (2, 3)
    assert getattr(back, "total", None) == 5


class _YieldingDict(dict[str, Any]):
    """msgpack packs a dict subclass through `.items()`: this lets other threads in mid-pack."""

    def items(self) -> Any:
        for kv in super().items():
            time.sleep(0)  # releases the GIL
            yield kv


def test_packb_is_safe_from_many_threads() -> None:
    """Packers are per thread: concurrent packs never mix up their buffers."""
    threads, per_thread = 4, 5_000
    errors: list[str] = []
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            obj: list[Any] = [t, i, f"t{t}-{i}" * (i % 7), {"k": [i] * (i % 5)}, b"\x00" * (i % 11)]
            if i % 20 == 0:
                # A pack that is suspended half-way while other threads pack: a Packer
                # shared between threads garbles both outputs.
                obj.append(_YieldingDict(a=t, b=[i] * (i % 4), c=f"x{i}"))
            try:
                back = unpackb(packb(obj))
            except Exception as exc:
                errors.append(f"thread {t} item {i}: {exc!r}")
                return
            if back != obj:
                errors.append(f"thread {t} item {i}: {back!r}")
                return

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert errors == []


@dataclass(slots=True)
class SlotBase:
    a: int = 1


@dataclass
class PlainOnSlots(SlotBase):
    """Not slotted itself (it has a __dict__), but its base keeps `a` in a slot."""

    b: int = 2


def test_plain_subclass_of_a_slots_dataclass_round_trips() -> None:
    """No dict fast path when a field lives in a base class's slot."""
    codec = RecordCodec(PlainOnSlots, [])
    st = PlainOnSlots(a=5, b=6)
    back = codec.decode_state_fields(unpackb(packb(codec.encode_state_fields(st))))
    assert back == st
    own = codec.own_state_decoder(unpackb(packb(codec.encode_state_fields(st))))
    assert own == st


def test_list_field_holding_a_set_still_encodes() -> None:
    """A `list[int]` field passes through the codec as it is; a set in it is packed as a list."""

    @dataclass
    class Listy:
        seen: list[int] = field(default_factory=list)

    codec = RecordCodec(Listy, [])
    st = Listy(seen={3, 1})  # type: ignore[arg-type]
    back = codec.decode_state_fields(unpackb(packb(codec.encode_state_fields(st))))
    assert sorted(back.seen) == [1, 3]
    with pytest.raises(TypeError, match="can not serialize 'date'"):
        packb({"when": datetime.date(2024, 1, 1)})


# -- types, errors -------------------------------------------------------------------------


class Color(enum.StrEnum):
    RED = "Red"
    BLUE = "Blue"


@dataclass(slots=True)
class Piece:
    size: int
    cid: str | None = None


@dataclass(slots=True)
class Rich:
    color: Color = Color.RED
    pieces: list[Piece] = field(default_factory=list)
    by_name: dict[str, Piece] = field(default_factory=dict)
    pair: tuple[int, str] = (0, "")
    blob: bytes = b""
    maybe: Piece | None = None
    ratio: float = 0.0


@dataclass(frozen=True, slots=True)
class Moved:
    to: Color
    piece: Piece


def test_codec_round_trips_nested_types() -> None:
    codec: RecordCodec[Rich] = RecordCodec(Rich, [Moved])
    state = Rich(
        Color.BLUE,
        [Piece(2048, "baga"), Piece(4096)],
        {"x": Piece(1)},
        (3, "t"),
        b"\x00\xff",
        Piece(9),
        1.0,
    )
    back = codec.decode_state_fields(codec.encode_state_fields(state))
    assert back == state and isinstance(back.color, Color) and isinstance(back.pieces[0], Piece)
    assert isinstance(back.ratio, float)
    ev = Moved(Color.RED, Piece(5, "c"))
    assert codec.decode_event(codec.encode_event(ev), "test") == ev


def test_codec_errors_name_the_record() -> None:
    codec: RecordCodec[Rich] = RecordCodec(Rich, [Moved])
    with pytest.raises(RecordError, match="rec 1: corrupt event record"):
        codec.decode_event(b"\xc1\xc1", "rec 1")
    with pytest.raises(RecordError, match="rec 2: unknown event type 'Nope'"):
        from sectorfsm.fsm.codec import packb

        codec.decode_event(packb([1, "Nope", {}]), "rec 2")
    with pytest.raises(RecordError, match="rec 3: event schema version 9"):
        codec.decode_event(packb([9, "Moved", {}]), "rec 3")
    with pytest.raises(RecordError, match="rec 4: cannot rebuild event Moved"):
        codec.decode_event(packb([1, "Moved", {"to": "Green", "piece": {"size": 1}}]), "rec 4")
    with pytest.raises(TypeError, match="not a registered event type"):
        codec.encode_event(Piece(1))


def test_codec_rejects_unsupported_types() -> None:
    @dataclass
    class Opaque:
        when: object = None

    @dataclass
    class Ambiguous:
        either: int | Piece = 0

    with pytest.raises(TypeError, match="not supported by the msgpack record codec"):
        RecordCodec(Opaque, [])
    with pytest.raises(TypeError, match="unions of non-primitive types are not encodable"):
        RecordCodec(Ambiguous, [])


# -- generated codecs of slotted (non-plain) dataclasses -----------------------------------


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Shade(enum.Enum):
    DARK = "dark"
    DIM = "dark"  # an alias: decodes as DARK
    LIGHT = "light"

    @classmethod
    def _missing_(cls, value: object) -> Shade | None:
        return cls.LIGHT if value == "pale" else None


@dataclass(slots=True)
class Entry:
    at: int
    what: str
    why: str = ""


@dataclass(slots=True, kw_only=True)
class Keyed:
    level: Level = Level.LOW
    shade: Shade = Shade.DARK
    color: Color = Color.RED
    log: list[Entry] = field(default_factory=list)
    ratio: float = 0.0
    tag: str = field(default="", kw_only=False)


def test_slotted_records_round_trip_through_their_generated_codecs() -> None:
    codec: RecordCodec[Keyed] = RecordCodec(Keyed, [])
    st = Keyed("t", level=Level.HIGH, shade=Shade.LIGHT, color=Color.BLUE, log=[Entry(1, "a", "b")])
    payload = codec.encode_state_fields(st)
    # The stored form is unchanged: each enum as its value, each entry as a map of its fields.
    assert packb(payload) == packb(
        {
            "level": 2,
            "shade": "light",
            "color": "Blue",
            "log": [{"at": 1, "what": "a", "why": "b"}],
            "ratio": 0.0,
            "tag": "t",
        }
    )
    back = codec.decode_state_fields(_through_bytes(payload))
    assert back == st and type(back.level) is Level and type(back.color) is Color
    own = codec.own_state_decoder(_through_bytes(payload))
    assert own == st and type(own.log[0]) is Entry
    # An int ratio is stored by an older writer: it still decodes as a float.
    assert type(codec.decode_state_fields(_through_bytes({**payload, "ratio": 3})).ratio) is float


def test_generated_decoder_falls_back_for_old_unknown_and_odd_values() -> None:
    codec: RecordCodec[Keyed] = RecordCodec(Keyed, [])
    complete = _through_bytes(codec.encode_state_fields(Keyed()))
    # As many keys as fields, but one unknown in place of a known one: named, not misread.
    swapped = {k: v for k, v in complete.items() if k != "tag"} | {"bogus": 1}
    with pytest.raises(RecordError, match=r"unknown field\(s\) \['bogus'\] for Keyed"):
        codec.decode_state_fields(swapped)
    older = codec.decode_state_fields(_through_bytes({"log": [{"at": 5, "what": "x"}]}))
    assert older == Keyed(log=[Entry(5, "x")])
    odd = codec.decode_state_fields({**complete, "shade": "pale"})
    assert odd.shade is Shade.LIGHT  # found by the enum's `_missing_`
    assert codec.decode_state_fields({**complete, "shade": "dark"}).shade is Shade.DARK
    with pytest.raises(ValueError, match="'purple' is not a valid Shade"):
        codec.decode_state_fields({**complete, "shade": "purple"})


@dataclass(slots=True)
class Holder:
    pieces: list[Piece] = field(default_factory=list)
    maybe: Piece | None = None
    count: int = 0


def test_generated_encoder_inlines_list_and_optional_conversions() -> None:
    """A list or optional field of converted values is converted in the generated encoder.

    The list's and the optional's own encoders are not called (a call per field per record
    before); the output is what they would give: an empty list is a new empty list, a set in
    a list field still converts, a wrong value still fails.
    """
    piece = RecordCodec(Piece, []).encode_state_fields
    fields = ("pieces", "maybe", "count")
    convs = {"pieces": list_encoder(piece), "maybe": optional_encoder(piece)}
    generated = generated_encoder(Holder, fields, convs)
    env = generated.__globals__
    codes = [generated.__code__]
    codes += [c for c in codes[0].co_consts if isinstance(c, types.CodeType)]  # (comprehensions)
    called = {n: env[n] for code in codes for n in code.co_names if n.startswith("c") and n in env}
    # All it calls for `pieces` and `maybe` is the item's own encoder.
    assert len(called) == 2 and all(fn == piece for fn in called.values())
    encode = RecordCodec(Holder, []).encode_state_fields
    assert generated(Holder([Piece(1)], Piece(2), 3)) == encode(Holder([Piece(1)], Piece(2), 3))
    empty = Holder()
    out = encode(empty)
    assert out == {"pieces": [], "maybe": None, "count": 0}
    assert out["pieces"] is not empty.pieces
    out = encode(Holder(pieces=[Piece(1, "a"), Piece(2)], maybe=Piece(3, "c"), count=2))
    assert out == {
        "pieces": [{"size": 1, "cid": "a"}, {"size": 2, "cid": None}],
        "maybe": {"size": 3, "cid": "c"},
        "count": 2,
    }
    out = encode(Holder(pieces=(Piece(4),)))  # type: ignore[arg-type]
    assert out["pieces"] == [{"size": 4, "cid": None}]
    with pytest.raises(TypeError):
        encode(Holder(pieces=None))  # type: ignore[arg-type]
