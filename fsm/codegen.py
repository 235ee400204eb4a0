"""Record encoders and decoders compiled from source: one dict display, or one constructor call.

Per-field loops in Python cost a call and a few dictionary operations per field; a function
generated for one dataclass does the same work in one expression (fsm/codec.py uses these).
"""

from __future__ import annotations

import dataclasses
import keyword
import weakref
from collections.abc import Callable
from typing import Any

Encoder = Callable[[Any], Any]
Decoder = Callable[[Any], Any]

#: What a list or optional encoder made by `list_encoder`/`optional_encoder` applies, so a
#: generated encoder can write that conversion inline instead of calling it (a call per field
#: per record: the pieces of every sector's record, the deal of every piece).
_SHAPES: weakref.WeakKeyDictionary[Encoder, tuple[str, Encoder]] = weakref.WeakKeyDictionary()


def identity(value: Any) -> Any:
    """The converter of a value msgpack packs, and hands back, as it is."""
    return value


def list_encoder(item: Encoder) -> Encoder:
    """The encoder of a list whose items `item` converts."""

    def enc(v: Any) -> Any:
        return [item(x) for x in v]

    _SHAPES[enc] = ("list", item)
    return enc


def optional_encoder(inner: Encoder) -> Encoder:
    """The encoder of an optional value that `inner` converts when it is not None."""

    def enc(v: Any) -> Any:
        return None if v is None else inner(v)

    _SHAPES[enc] = ("optional", inner)
    return enc


def _inline(name: str, conv: str, shape: tuple[str, Encoder] | None) -> str:
    """The source of a converted field's value, with a known shape's conversion inlined."""
    if shape is None:
        return f"{conv}(obj.{name})"
    if shape[0] == "optional":
        return f"(None if (v := obj.{name}) is None else {conv}(v))"
    # An empty list becomes a new empty list, as the comprehension would make it, without
    # the comprehension's call; anything else (a set, or a wrong value) goes through it.
    return f"([] if not (v := obj.{name}) and type(v) is list else [{conv}(x) for x in v])"


def _values(
    fields: tuple[str, ...], convs: dict[str, Encoder], env: dict[str, Any]
) -> list[tuple[str, str]]:
    """Each field's name and the expression of its converted value (converters go in `env`)."""
    out = []
    for i, name in enumerate(fields):
        if name in convs:
            shape = _SHAPES.get(convs[name])
            env[f"c{i}"] = convs[name] if shape is None else shape[1]
            out.append((name, _inline(name, f"c{i}", shape)))
        else:
            out.append((name, f"obj.{name}"))
    return out


def generated_encoder(cls: type, fields: tuple[str, ...], convs: dict[str, Encoder]) -> Encoder:
    """`{field: converted value}` as one dict display: no per-field loop or call in Python."""
    env: dict[str, Any] = {}
    items = [f"{name!r}: {value}" for name, value in _values(fields, convs, env)]
    src = f"def enc(obj):\n    return {{{', '.join(items)}}}\n"
    return _compile_source(src, env, "enc", cls)


def generated_pairs(
    cls: type, fields: tuple[str, ...], convs: dict[str, Encoder], last: str
) -> Encoder:
    """`(name, converted value, ..., last)` as one tuple display: a map's items, flattened.

    msgpack packs that tuple as an array header followed by exactly the bytes of the map
    `{name: value, ..., last: ...}` less its header and `last`'s value, and a tuple costs less
    to build and to pack than a dict (no hashing, no insertions, no dict to walk).
    """
    env: dict[str, Any] = {}
    items = [f"{name!r}, {value}" for name, value in _values(fields, convs, env)]
    items.append(repr(last))
    src = f"def enc(obj):\n    return ({', '.join(items)},)\n"
    return _compile_source(src, env, "enc", cls)


def generated_decoder(cls: type, decs: dict[str, Decoder], slow: Decoder) -> Decoder:
    """A complete record as one constructor call; anything else goes to `slow`.

    A dict of exactly as many keys as the class has fields, each of them found by name, holds
    exactly its fields; the call is then the one `slow` would make (`cls(**data)`) with each
    value converted, without checking or copying the record first. A record missing a field
    (written before the field existed) or with an unknown one takes `slow`, which fills in
    defaults or names the culprit.
    """
    env: dict[str, Any] = {"cls": cls, "slow": slow}
    fields = dataclasses.fields(cls)
    # The dataclass's generated __init__ takes its fields in order; any other, by name.
    by_position = generated_init(cls)
    args: list[str] = []
    keywords: list[str] = []
    for i, f in enumerate(fields):
        value = f"data[{f.name!r}]"
        if decs[f.name] is not identity:
            env[f"d{i}"] = decs[f.name]
            value = f"d{i}({value})"
        if by_position and not f.kw_only:
            args.append(value)
        else:
            keywords.append(f"{f.name}={value}")
    args += keywords
    src = (
        "def dec(data):\n"
        f"    if type(data) is dict and len(data) == {len(fields)}:\n"
        "        try:\n"
        f"            return cls({', '.join(args)})\n"
        "        except KeyError:\n"
        "            pass\n"
        "    return slow(data)\n"
    )
    return _compile_source(src, env, "dec", cls)


def _compile_source(src: str, env: dict[str, Any], name: str, cls: type) -> Callable[[Any], Any]:
    code = compile(src, f"<record codec of {cls.__qualname__}>", "exec")
    # (The source holds only field names, checked to be identifiers, and names of `env`.)
    exec(code, env)
    fn: Callable[[Any], Any] = env[name]
    return fn


def plain_name(name: str) -> bool:
    """True if `name` can be written as an attribute and a keyword in generated source."""
    return name.isidentifier() and not keyword.iskeyword(name)


def generated_init(cls: type) -> bool:
    """True if `cls.__init__` is the one the dataclass decorator generated."""
    code = getattr(getattr(cls, "__init__", None), "__code__", None)
    return code is not None and code.co_filename == "<string>"
