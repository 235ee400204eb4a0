"""The base of every sector event, and the registry the codec reads.

Every subclass of `SectorEvent` registers itself under its class name when it is defined, so
an event cannot be left out of the codec by forgetting to re-export it. The class name is the
tag the store keeps (`fsm/codec.py` tags an event with its class name), hence two events with
the same name are refused as soon as the second is defined.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any, ClassVar

from ...fsm.codec import field_names
from ..info import SectorInfo

#: `json.dumps(..., separators=(",", ":"), sort_keys=True)` without a new encoder per call
#: (every event is described in its sector's log).
_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True)

#: The message of an event without fields (besides `error`).
_NO_FIELDS = _JSON.encode({"User": {}})
#: Per event class: its fields but `error`, sorted, each with its JSON key and colon; and
#: whether it has an `error` (the trace).
_PLANS: dict[type, tuple[tuple[tuple[str, str], ...], bool]] = {}

#: Every sector event class by name (its stored tag), filled as each class is defined.
EVENTS_BY_NAME: dict[str, type[SectorEvent]] = {}


@dataclass(frozen=True, slots=True)
class SectorEvent:
    """Base of sector events: `apply` does nothing unless an event overrides it."""

    #: Lotus's `Ignorable`: skipped silently by a state with no edge for it.
    ignorable: ClassVar[bool] = False
    #: Global events are accepted in every state (Lotus's `globalMutator`,
    #: `extern/storage-sealing/fsm_events.go@v1.11.3`).
    is_global: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Zero-argument super() would name the class `slots=True` replaced: spell it out.
        super(SectorEvent, cls).__init_subclass__(**kwargs)
        _register(cls)

    def apply(self, info: SectorInfo, now: float) -> None:
        """Mutate `info` as Lotus's `apply()` does (default: nothing)."""

    def apply_global(self, info: SectorInfo) -> bool:
        """Global events only: mutate `info`; True stops the batch."""
        raise TypeError(f"{type(self).__name__} is not a global event")

    @property
    def name(self) -> str:
        """The event's Lotus name, e.g. `SectorPacked`."""
        return type(self).__name__

    def describe(self) -> tuple[str, str]:
        """`(message, trace)` for the sector log: JSON of the fields, the error as trace."""
        keys, has_error = _describe_plan(type(self))
        trace = str(self.error) if has_error else ""  # type: ignore[attr-defined]
        if not keys:
            return _NO_FIELDS, trace
        # The bytes `_JSON.encode({"User": {field: _jsonable(value)}})` writes (keys sorted),
        # common values written directly: every event is described once.
        parts = [key + _json_of(getattr(self, name)) for name, key in keys]
        return '{"User":{' + ",".join(parts) + "}}", trace


def _json_of(value: Any) -> str:
    """`_JSON.encode(_jsonable(value))`, lists and dataclasses written directly."""
    # A CC sector's `SectorPacked` lists its filler piece: it ran the encoder once per sector.
    kind = type(value)
    if kind is str:
        return _json_str(value)
    if kind is int:
        return int.__repr__(value)
    if kind is bool:
        return "true" if value else "false"
    if value is None:
        return "null"
    if kind is bytes:
        return '"' + bytes.hex(value) + '"'
    if kind is list or kind is tuple:
        return "[" + ",".join(map(_json_of, value)) + "]"
    keys = _VALUE_KEYS.get(kind, ())
    if keys == ():
        keys = _VALUE_KEYS[kind] = (
            tuple((n, _json_str(n) + ":") for n in sorted(field_names(kind)))
            if dataclasses.is_dataclass(kind)
            else None
        )
    if keys is None:
        return _JSON.encode(_jsonable(value))
    return "{" + ",".join([key + _json_of(getattr(value, name)) for name, key in keys]) + "}"


#: Per type `_json_of` met: a dataclass's fields, sorted, with their JSON keys; None for others.
_VALUE_KEYS: dict[type, tuple[tuple[str, str], ...] | None] = {}


def _describe_plan(cls: type) -> tuple[tuple[tuple[str, str], ...], bool]:
    """`cls`'s fields as `describe` writes them (see `_PLANS`), computed once per class."""
    plan = _PLANS.get(cls)
    if plan is None:
        names = field_names(cls)
        keys = tuple((n, _json_str(n) + ":") for n in sorted(names) if n != "error")
        plan = _PLANS[cls] = (keys, "error" in names)
    return plan


def registered_events() -> tuple[type[SectorEvent], ...]:
    """Every sector event class defined so far, in the order they were defined."""
    return tuple(EVENTS_BY_NAME.values())


def registered_global_events() -> tuple[type[SectorEvent], ...]:
    """The registered events accepted in every state (Lotus's `globalMutator`)."""
    return tuple(cls for cls in EVENTS_BY_NAME.values() if cls.is_global)


def _register(cls: type[SectorEvent]) -> None:
    name = cls.__name__
    known = EVENTS_BY_NAME.get(name)
    if known is not None and not _slotted_copy(cls, of=known):
        raise TypeError(
            f"two sector events are named {name!r} ({_where(known)} and {_where(cls)}): "
            "the name is the tag the store keeps, so rename one"
        )
    EVENTS_BY_NAME[name] = cls


def _slotted_copy(cls: type, of: type) -> bool:
    """True if `cls` is the class `@dataclass(slots=True)` built to replace `of`.

    That decorator defines the class a second time (so this hook runs twice per event), and
    the copy shares the original's field table: a different class of the same name cannot.
    """
    fields = of.__dict__.get("__dataclass_fields__")
    return fields is not None and cls.__dict__.get("__dataclass_fields__") is fields


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # What `dataclasses.asdict` gives, without its deep copy of every value.
        return {k: _jsonable(getattr(value, k)) for k in field_names(type(value))}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value
