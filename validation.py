"""Checked config values: constrained types for the schema layer, and one-line error messages.

The config files and `Miner.open`'s arguments are validated with pydantic: the public records
(`SealingConfig`, `ChainParams`, ...) stay plain dataclasses whose fields carry the constraints
below, and the TOML tables that do not map one to one onto a record get a small model. A
failure becomes one line naming the key: `sectors.toml: [sealing.retry] base: must be a finite
number, got inf`.

This imports pydantic, so modules on the `sectors status`/`list` path must not import it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final

from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError

#: Sizes, ids and counters end up in msgpack records and LMDB keys: int64 at most.
MAX_INT: Final = (1 << 63) - 1

#: A TOML table: unknown keys are mistakes, and `true` is not a number.
TABLE = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
#: A record (dataclass): its instances are checked again when handed to `Miner.open`.
RECORD = ConfigDict(extra="forbid", revalidate_instances="always")

Flag = Annotated[bool, Strict()]
#: A whole number from 0 to int64's maximum.
Count = Annotated[int, Strict(), Field(ge=0, le=MAX_INT)]
#: A whole number from 1 to int64's maximum.
PositiveCount = Annotated[int, Strict(), Field(ge=1, le=MAX_INT)]
#: Seconds from 0 to a century: finite, and never a bool.
Seconds = Annotated[float, Strict(), Field(ge=0, le=3.2e9, allow_inf_nan=False)]
#: Seconds above 0, up to a century.
PositiveSeconds = Annotated[float, Strict(), Field(gt=0, le=3.2e9, allow_inf_nan=False)]
#: A finite number at least 1 (a growth factor).
Factor = Annotated[float, Strict(), Field(ge=1, le=1e6, allow_inf_nan=False)]


class ConfigError(ValueError):
    """A config value that cannot be used; the message is one line naming the key."""


def validate(
    kind: Any,
    data: object,
    where: str = "",
    nouns: Mapping[str, str] | None = None,
    at: tuple[str, ...] = (),
) -> Any:
    """`data` validated and converted to `kind`; a `ConfigError` naming the key otherwise.

    `at` is where `data` sits in the file (`("sealing",)`), for the message.
    """
    try:
        return _adapter(kind).validate_python(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc, where, data, nouns, at)) from None


_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def _adapter(kind: Any) -> TypeAdapter[Any]:
    # Building a validator costs milliseconds: once per type per process.
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        adapter = _ADAPTERS[kind] = TypeAdapter(kind)
    return adapter


def describe(
    exc: ValidationError,
    where: str,
    data: object = None,
    nouns: Mapping[str, str] | None = None,
    at: tuple[str, ...] = (),
) -> str:
    """The first error of `exc` as one line: `where: [table] key: must be ..., got ...`.

    `nouns` names what an unknown key is in a table (`{"": "section"}` for the top level),
    so the message reads `unknown section(s) extra` rather than a generic phrase.
    """
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = tuple(first["loc"])
    for part in reversed(at):
        data = {part: data}
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        table = loc[:-1]
        keys = sorted(
            str(e["loc"][-1])
            for e in errors
            if e["type"] == first["type"] and tuple(e["loc"][:-1]) == table
        )
        noun = (nouns or {}).get(".".join(map(str, at + table)), "key")
        text = f"unknown {noun}(s) {', '.join(keys)}"
        return _join(where, _place(at + table, data, table=True), text)
    message = _PLAIN.get(first["type"], str(first["msg"]))
    for old, new in (("Value error, ", ""), ("Input should be", "must be")):
        if message.startswith(old):
            message = new + message[len(old) :]
    if first["type"] != "value_error" and "input" in first and first["type"] != "missing":
        message += f", got {_shown(first['input'])}"
    more = len(errors) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    # A check of the whole table (two fields that disagree) is about the table, not a key.
    whole = not loc and first["type"] == "value_error"
    return _join(where, _place(at + loc, data, table=whole), message)


#: pydantic's wording where a TOML user would say it differently.
_PLAIN = {
    "missing": "is required",
    "bool_type": "must be true or false",
    "dataclass_type": "must be a table",
    "model_type": "must be a table",
    "dict_type": "must be a table",
    "model_attributes_type": "must be a table",
    "list_type": "must be a list",
}


def _join(*parts: str) -> str:
    return ": ".join(p for p in parts if p)


def _place(loc: Sequence[int | str], data: object, *, table: bool = False) -> str:
    """`[sealing.retry] base`, `workers[0] (pc1-a) paths[1] capacity` from a pydantic loc."""
    out: list[str] = []
    keys: list[str] = []
    node = data
    for part in loc:
        if isinstance(part, int):
            name = _name(node, part)
            out.append(f"{'.'.join(keys)}[{part}]" + (f" ({name})" if name else ""))
            keys = []
        else:
            keys.append(part)
        node = _child(node, part)
    if keys and table:
        return " ".join([*out, f"[{'.'.join(keys)}]"])
    if not out and len(keys) > 1:
        return f"[{'.'.join(keys[:-1])}] {keys[-1]}"
    return " ".join([*out, ".".join(keys)]).strip()


def _name(node: object, i: int) -> str | None:
    """A list item's `name` (a worker's), to tell the operator which one is meant."""
    if isinstance(node, list) and i < len(node) and isinstance(node[i], Mapping):
        name = node[i].get("name")
        return name if isinstance(name, str) and name else None
    return None


def _child(node: object, part: int | str) -> object:
    if isinstance(part, int) and isinstance(node, list) and part < len(node):
        return node[part]
    if isinstance(part, str) and isinstance(node, Mapping):
        return node.get(part)
    return None


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_toml(path: Path, error: type[Exception]) -> dict[str, Any]:
    """The TOML document in `path`; `error` with one line if it is missing, unreadable or bad."""
    where = str(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"config file {where} does not exist") from None
    except OSError as exc:
        raise error(f"cannot read config file {where}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{where} is not valid TOML: {exc}") from None
