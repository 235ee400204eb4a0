"""Dataclass <-> msgpack codec for machine states and events.

Records are msgpack arrays that start with a schema version, so a store written by a newer or
older schema is recognised instead of being silently misread. Each dataclass type gets a
compiled encoder/decoder pair (built once from its type hints), which keeps the per-transition
cost to a few dictionary operations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import operator
import threading
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

import msgpack

from .codegen import (
    Decoder,
    Encoder,
    generated_decoder,
    generated_encoder,
    generated_pairs,
    identity,
    list_encoder,
    optional_encoder,
    plain_name,
)
from .errors import RecordError

T = TypeVar("T")

_PRIMITIVES: tuple[type, ...] = (int, float, str, bytes, bool, type(None))


class _TypeCodecs:
    """Compiles and caches per-type encoders/decoders."""

    def __init__(self) -> None:
        self._enc: dict[Any, Encoder] = {}
        self._dec: dict[Any, Decoder] = {}
        #: Dataclasses whose complete payloads become the instance dict as they are.
        self.plain: set[type] = set()

    def encoder(self, tp: Any) -> Encoder:
        """Return the encoder for type `tp` (compiled once)."""
        try:
            return self._enc[tp]
        except (KeyError, TypeError):
            pass
        fn = self._compile_enc(tp)
        with contextlib.suppress(TypeError):  # unhashable type forms are compiled each time
            self._enc[tp] = fn
        return fn

    def decoder(self, tp: Any) -> Decoder:
        """Return the decoder for type `tp` (compiled once)."""
        try:
            return self._dec[tp]
        except (KeyError, TypeError):
            pass
        fn = self._compile_dec(tp)
        with contextlib.suppress(TypeError):
            self._dec[tp] = fn
        return fn

    # -- compilation -------------------------------------------------------------------------

    def _compile_enc(self, tp: Any) -> Encoder:
        if tp is Any or tp in _PRIMITIVES:
            return identity
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            # msgpack packs a str or int subclass by its content: a member whose content is
            # its value is packed as it is, with no conversion call.
            return identity if _packs_as_value(tp) else _enum_value
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            return self._dataclass_enc(tp)
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (list, set, frozenset):
            item = self.encoder(args[0]) if args else identity
            if item is identity:
                # msgpack packs any list or tuple as an array; only sets need converting.
                return identity if origin is list else list
            return list_encoder(item)
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                item = self.encoder(args[0])
                return list if item is identity else (lambda v: [item(x) for x in v])
            encs = [self.encoder(a) for a in args]
            return lambda v: [e(x) for e, x in zip(encs, v, strict=True)]
        if origin is dict:
            kenc = self.encoder(args[0]) if args else identity
            venc = self.encoder(args[1]) if args else identity
            if kenc is identity and venc is identity:
                return identity
            return lambda v: {kenc(k): venc(x) for k, x in v.items()}
        if origin in (typing.Union, types.UnionType):
            members = [a for a in args if a is not type(None)]
            if len(members) == 1:
                inner = self.encoder(members[0])
                if inner is identity:
                    return identity
                return optional_encoder(inner)
            if all(m in _PRIMITIVES for m in members):
                return identity
            raise TypeError(f"unions of non-primitive types are not encodable: {tp!r}")
        if origin is typing.Literal:
            return identity
        raise TypeError(f"type {tp!r} is not supported by the msgpack record codec")

    def _compile_dec(self, tp: Any) -> Decoder:
        if tp is Any or tp in _PRIMITIVES:
            if tp is float:
                return float
            return identity
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return _enum_decoder(tp)
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            return self._dataclass_dec(tp)
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (list, set, frozenset):
            item = self.decoder(args[0]) if args else identity
            ctor: Callable[[Any], Any] = origin
            if item is identity:
                # msgpack hands back a fresh list: no copy needed.
                return identity if origin is list else ctor
            if origin is list:
                return lambda v: [item(x) for x in v]
            return lambda v: ctor(item(x) for x in v)
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                item = self.decoder(args[0])
                return tuple if item is identity else (lambda v: tuple(item(x) for x in v))
            decs = [self.decoder(a) for a in args]
            return lambda v: tuple(d(x) for d, x in zip(decs, v, strict=True))
        if origin is dict:
            kdec = self.decoder(args[0]) if args else identity
            vdec = self.decoder(args[1]) if args else identity
            if kdec is identity and vdec is identity:
                return dict
            return lambda v: {kdec(k): vdec(x) for k, x in v.items()}
        if origin in (typing.Union, types.UnionType):
            members = [a for a in args if a is not type(None)]
            if len(members) == 1:
                inner = self.decoder(members[0])
                if inner is identity:
                    return identity
                return lambda v: None if v is None else inner(v)
            return identity
        if origin is typing.Literal:
            return identity
        raise TypeError(f"type {tp!r} is not supported by the msgpack record codec")

    def _dataclass_enc(self, cls: type) -> Encoder:
        hints = typing.get_type_hints(cls)
        fields = tuple(f.name for f in dataclasses.fields(cls))
        convs = [(i, self.encoder(hints[n])) for i, n in enumerate(fields)]
        converted = [(fields[i], e) for i, e in convs if e is not identity]
        if not fields:
            return lambda obj: {}
        getter = operator.attrgetter(*fields)
        if not converted and _plain_dataclass(cls):
            # Fast path for flat states: the instance dict already is the payload.
            field_set = frozenset(fields)

            def enc_plain(obj: Any) -> dict[str, Any]:
                d: dict[str, Any] = obj.__dict__
                if d.keys() == field_set:
                    return d
                return {name: getattr(obj, name) for name in fields}  # extra attributes

            return enc_plain
        if len(fields) == 1:
            name = fields[0]
            only = self.encoder(hints[name])
            return lambda obj: {name: only(getattr(obj, name))}
        if all(plain_name(n) for n in fields):
            return generated_encoder(cls, fields, dict(converted))

        def enc(obj: Any) -> dict[str, Any]:
            out = dict(zip(fields, getter(obj), strict=True))
            for n, e in converted:
                out[n] = e(out[n])
            return out

        return enc

    def _dataclass_dec(self, cls: type) -> Decoder:
        hints = typing.get_type_hints(cls)
        all_fields = frozenset(f.name for f in dataclasses.fields(cls))
        init_fields = frozenset(f.name for f in dataclasses.fields(cls) if f.init)
        # Fields outside __init__ (`init=False`) are restored after construction.
        late_fields = tuple(all_fields - init_fields)
        decs = {n: self.decoder(hints[n]) for n in all_fields}
        converted_items = tuple((n, d) for n, d in decs.items() if d is not identity)
        # A complete record of a plain dataclass is installed as the instance dict directly:
        # the generated __init__ would only assign the same fields one by one.
        plain = _plain_dataclass(cls) and not late_fields and not converted_items
        frozen = cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
        if plain and not frozen:
            self.plain.add(cls)
        new: Any = cls.__new__
        set_attr = object.__setattr__

        def slow(data: Any) -> Any:
            if plain and type(data) is dict and data.keys() == init_fields:
                # Every field present, none unknown (`plain` means none needs converting).
                obj: Any = new(cls)
                if frozen:
                    set_attr(obj, "__dict__", data)
                else:
                    obj.__dict__ = data
                return obj
            if not isinstance(data, dict):
                raise RecordError(
                    f"expected a mapping for {cls.__name__}, got {type(data).__name__}"
                )
            if not all_fields.issuperset(data):
                unknown = sorted(data.keys() - all_fields)
                raise RecordError(f"unknown field(s) {unknown} for {cls.__name__}")
            # `data` comes fresh from msgpack, so converting in place is safe.
            for name, conv in converted_items:
                if name in data:
                    data[name] = conv(data[name])
            late = [(n, data.pop(n)) for n in late_fields if n in data]
            obj = cls(**data)
            for name, value in late:
                set_attr(obj, name, value)
            return obj

        if plain or late_fields or not _constructible(cls):
            return slow
        return generated_decoder(cls, decs, slow)


def _constructible(cls: type) -> bool:
    """True if `cls(**fields)` builds an instance (every field in __init__, no InitVar)."""
    fields = dataclasses.fields(cls)
    declared = getattr(cls, "__dataclass_fields__", {})
    return (
        len(declared) == len(fields)
        and all(f.init and plain_name(f.name) for f in fields)
        and getattr(cls, "__dataclass_params__", None) is not None
        and cls.__dataclass_params__.init  # type: ignore[attr-defined]
    )


def _packs_as_value(tp: type[enum.Enum]) -> bool:
    """True if msgpack packs each member of `tp` exactly as it packs the member's value."""
    members: list[Any] = list(tp)  # (str or int members, when the checks below pass)
    if issubclass(tp, str):
        return all(type(m.value) is str and str.__str__(m) == m.value for m in members)
    if issubclass(tp, int) and not issubclass(tp, bool):
        return all(type(m.value) is int and operator.index(m) == m.value for m in members)
    return False


def _enum_decoder(tp: type[enum.Enum]) -> Decoder:
    """`tp(value)` through a dict of the members by value (the enum call costs ~10x more)."""
    by_value: dict[Any, enum.Enum] = {}
    for m in tp:
        with contextlib.suppress(TypeError):  # (an unhashable value: the enum call finds it)
            by_value.setdefault(m.value, m)

    def dec(value: Any) -> Any:
        try:
            return by_value[value]
        except (KeyError, TypeError):
            return tp(value)  # a value found by `_missing_`, or the enum's own ValueError

    return dec


def _own_payload_decoder(cls: type) -> Decoder:
    new: Any = cls.__new__

    def dec(data: Any) -> Any:
        obj = new(cls)
        obj.__dict__ = data
        return obj

    return dec


def _plain_dataclass(cls: type) -> bool:
    """A dataclass whose instances hold exactly their fields in `__dict__`, set by __init__."""
    params = getattr(cls, "__dataclass_params__", None)
    init = getattr(cls, "__init__", None)
    code = getattr(init, "__code__", None)
    return (
        params is not None
        and params.init
        # The decorator's generated __init__ is compiled from a string; a class's own is not.
        and code is not None
        and code.co_filename == "<string>"
        and not hasattr(cls, "__post_init__")
        and all("__dataclass_fields__" in c.__dict__ or c is object for c in cls.__mro__)
        # Every field must live in the instance dict: none in a slot (of this class or a
        # base) or behind another data descriptor.
        and not any("__slots__" in c.__dict__ for c in cls.__mro__ if c is not object)
        and not any(
            hasattr(type(getattr(cls, f.name, None)), "__set__") for f in dataclasses.fields(cls)
        )
    )


def _enum_value(value: enum.Enum) -> Any:
    return value.value


_CODECS = _TypeCodecs()

#: `metadata` of a dataclass's last field, a list that only ever grows at its end: entries
#: already in it are never changed or removed in place (to drop some, assign a new list).
#: Records of a state whose last field is marked so are encoded reusing the bytes of the
#: entries the previous record already holds (fsm/tail.py); the record format is unchanged.
APPEND_ONLY: Mapping[str, bool] = types.MappingProxyType({"sectorfsm.append_only": True})


def append_only_tail(cls: type) -> tuple[str, Encoder | None, Encoder] | None:
    """`(name, item encoder, head encoder)` if `cls`'s last field is marked `APPEND_ONLY`.

    The item encoder is None if items are packed as they are; the head encoder gives the
    state's other fields as one flat tuple `(name, value, ..., name of that field)`: the items
    of the state's map in order, that field's value left out (fsm/tail.py packs it).
    """
    fields = dataclasses.fields(cls)
    if not fields or not fields[-1].metadata.get("sectorfsm.append_only"):
        return None
    hints = typing.get_type_hints(cls)
    tail = fields[-1].name
    if typing.get_origin(hints[tail]) is not list:
        raise TypeError(f"append-only field {cls.__name__}.{tail} must be a list[...]")
    (item_type,) = typing.get_args(hints[tail]) or (Any,)
    names = tuple(f.name for f in fields)
    if all(plain_name(n) for n in names):
        convs = {n: _CODECS.encoder(hints[n]) for n in names[:-1]}
        convs = {n: e for n, e in convs.items() if e is not identity}
        head = generated_pairs(cls, names[:-1], convs, last=tail)
    else:
        full = _CODECS.encoder(cls)

        def head(obj: Any) -> tuple[Any, ...]:
            pairs: list[Any] = []
            for name, value in full(obj).items():
                if name != tail:
                    pairs += (name, value)
            pairs.append(tail)
            return tuple(pairs)

    item = _CODECS.encoder(item_type)
    return tail, None if item is identity else item, head


def _as_array(obj: Any) -> Any:
    # msgpack packs lists and tuples natively; a set in a `list[...]` field (which the codec
    # passes through as it is) is packed as an array too.
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    raise TypeError(f"can not serialize {type(obj).__name__!r} object")


def new_packer() -> Callable[[Any], bytes]:
    """A fresh msgpack `pack` function, for one thread's exclusive use."""
    pack: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True, default=_as_array).pack
    return pack


# A Packer reuses one buffer and is not thread-safe (the commit thread encodes events too).
_packers = threading.local()


def packb(obj: Any) -> bytes:
    """msgpack-encode `obj` (bin type for bytes, str for text)."""
    try:
        pack: Callable[[Any], bytes] = _packers.pack
    except AttributeError:
        pack = _packers.pack = new_packer()
    return pack(obj)


#: msgpack-decode bytes, strictly (no trailing bytes, raw strings decoded as UTF-8).
unpackb: Callable[[bytes], Any] = functools.partial(
    msgpack.unpackb, raw=False, strict_map_key=False, use_list=True
)

_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def field_names(cls: type) -> tuple[str, ...]:
    """A dataclass's field names, in order (`dataclasses.fields` builds its tuple per call)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


S = TypeVar("S")


class RecordCodec(Generic[S]):
    """Encodes one group's state type and event types under a schema version."""

    def __init__(
        self,
        state_type: type[S],
        event_types: Iterable[type],
        schema_version: int = 1,
    ) -> None:
        if not (dataclasses.is_dataclass(state_type) and isinstance(state_type, type)):
            raise TypeError(f"state type {state_type!r} must be a dataclass")
        self.state_type = state_type
        self.schema_version = schema_version
        self._state_enc = _CODECS.encoder(state_type)
        self._state_dec = _CODECS.decoder(state_type)
        self._own_dec = self._state_dec
        if state_type in _CODECS.plain:
            self._own_dec = _own_payload_decoder(state_type)
        self._event_enc: dict[type, tuple[str, Encoder]] = {}
        self._event_dec: dict[str, Decoder] = {}
        for et in event_types:
            self.register_event(et)

    def register_event(self, event_type: type, tag: str | None = None) -> None:
        """Make `event_type` encodable; its tag defaults to the class name."""
        if not (dataclasses.is_dataclass(event_type) and isinstance(event_type, type)):
            raise TypeError(f"event type {event_type!r} must be a dataclass")
        tag = tag or event_type.__name__
        known = self._event_dec.get(tag)
        if known is not None and self._event_enc.get(event_type, ("",))[0] != tag:
            raise ValueError(f"two event types share the tag {tag!r}")
        self._event_enc[event_type] = (tag, _CODECS.encoder(event_type))
        self._event_dec[tag] = _CODECS.decoder(event_type)

    def knows_event(self, event_type: type) -> bool:
        """True if events of this class can be encoded."""
        return event_type in self._event_enc

    def event_tag(self, event: object) -> str:
        """The tag under which `event` is stored."""
        try:
            return self._event_enc[type(event)][0]
        except KeyError:
            raise TypeError(
                f"{type(event).__name__} is not a registered event type of this group"
            ) from None

    @property
    def state_encoder(self) -> Callable[[S], Any]:
        """The compiled function behind `encode_state_fields` (for hot loops)."""
        return self._state_enc

    @property
    def own_state_decoder(self) -> Callable[[Any], S]:
        """`decode_state_fields` for payloads this codec encoded itself (checks nothing).

        The encoder writes exactly the state's fields, so for a plain dataclass such a payload
        needs no checking: the engine uses this for the copy each step gets.
        """
        return self._own_dec

    def encode_state_fields(self, state: S) -> Any:
        """The msgpack-ready payload of a state (used inside machine records).

        Pack it right away: it may share objects with `state` (a plain dataclass's payload is
        its own `__dict__`), so it is not a copy.
        """
        return self._state_enc(state)

    def decode_state_fields(self, payload: Any) -> S:
        """Rebuild a state from its payload, taking ownership of it.

        The payload must be fresh from msgpack (the state may keep its dict and lists); for a
        copy of a live state, decode packed bytes instead.
        """
        result: S = self._state_dec(payload)
        return result

    def encode_event(self, event: object, from_step: bool = False) -> bytes:
        """Encode an event as `[schema, tag, fields]`, plus a trailing 1 if a step sent it."""
        try:
            tag, enc = self._event_enc[type(event)]
        except KeyError:
            raise TypeError(
                f"{type(event).__name__} is not a registered event type of this group"
            ) from None
        record = [self.schema_version, tag, enc(event)]
        if from_step:
            record.append(1)
        data: bytes = packb(record)
        return data

    def encode_step_event(self, event: object) -> bytes:
        """`encode_event(event, from_step=True)`, as a one-argument function."""
        return self.encode_event(event, True)

    def decode_event(self, data: bytes, what: str) -> object:
        """Decode an event record; `what` names the record in errors."""
        return self.decode_inbox_event(data, what)[0]

    def decode_inbox_event(self, data: bytes, what: str) -> tuple[object, bool]:
        """Decode an event record, and whether the machine's own step sent it."""
        try:
            version, tag, payload, *mark = unpackb(data)
            if mark not in ([], [1]):
                raise ValueError(f"unexpected trailing fields {mark!r}")
        except RecordError:
            raise
        except Exception as exc:
            raise RecordError(f"{what}: corrupt event record ({exc})") from exc
        if version != self.schema_version:
            raise RecordError(
                f"{what}: event schema version {version!r}, this code reads {self.schema_version}"
            )
        dec = self._event_dec.get(tag) if isinstance(tag, str) else None
        if dec is None:
            raise RecordError(f"{what}: unknown event type {tag!r}")
        try:
            return dec(payload), bool(mark)
        except RecordError as exc:
            raise RecordError(f"{what}: {exc}") from exc
        except Exception as exc:
            raise RecordError(f"{what}: cannot rebuild event {tag}: {exc}") from exc
