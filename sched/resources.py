"""What one task needs from a worker (Lotus `storiface/resources.go`), and per-worker overrides.

`RESOURCE_TABLE` is Lotus HEAD's default table with its exact byte numbers and aliases.
`parse_overrides` accepts, in one mapping:

* Lotus's env names `<Short>_<size>_<FIELD>` (`PC1_32G_MAX_CONCURRENT`) for one size and
  `<Short>_<FIELD>` (`AP_MAX_CONCURRENT`) for every size; the sized one wins. Case-insensitive.
* a nested table, as a TOML worker config gives: `{"PC1": {"32G": {"max_concurrent": 4},
  "max_parallelism": 2}}` (sizes as `32G`, `32GiB` or bytes; fields snake or upper case).
* with `env`, Lotus's multicore-SDR rule for PC1/UNS `MAX_PARALLELISM` (producers + 1) where
  no value was given. Without `env` the process environment is not read.

Unlike Lotus, which turns a malformed value into 0, anything malformed or unknown raises
`ResourceConfigError` naming the key and value. Lotus: `ResourceTable` and `ParseResourceEnv`
in `storage/sealer/storiface/resources.go@b835fab70`, `CanHandleRequest` in
`storage/sealer/sched_resources.go@b835fab70`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Final, TypeAlias

from .filetypes import SECTOR_SIZES, parse_sector_size
from .tasks import TaskType

#: `Threads()` gives multithreaded tasks 92% of the worker's cores (Lotus `ParallelNum/Denom`).
PARALLEL_NUM: Final = 92
PARALLEL_DENOM: Final = 100


@dataclass(frozen=True, slots=True)
class Resources:
    """One task's needs; field meanings, units (bytes) and defaults are Lotus's."""

    #: Must be in RAM for decent performance.
    min_memory: int
    #: Peak use, RAM plus swap.
    max_memory: int
    #: GPUs the task occupies (fractions allowed); > 0 means it can use a GPU.
    gpu_utilization: float
    #: Threads when no GPU is used; -1 means 92% of the worker's cores, 0 means none.
    max_parallelism: int
    #: Threads when a GPU is used; 0 means "same as max_parallelism".
    max_parallelism_gpu: int
    #: Memory shared between all running tasks of this type.
    base_min_memory: int
    #: Tasks of this type one worker may run at once; 0 means no limit.
    max_concurrent: int = 0

    def __post_init__(self) -> None:
        # A hand-built entry with a nonsense value would otherwise surface much later as a
        # negative thread count or free memory in the scheduler's ledger.
        for name in ("min_memory", "max_memory", "base_min_memory", "max_concurrent"):
            if getattr(self, name) < 0:
                raise ValueError(f"Resources.{name} must not be negative: {getattr(self, name)}")
        for name in ("max_parallelism", "max_parallelism_gpu"):
            if getattr(self, name) < -1:
                raise ValueError(f"Resources.{name} must be -1 or more: {getattr(self, name)}")
        if not (math.isfinite(self.gpu_utilization) and self.gpu_utilization >= 0):
            raise ValueError(
                f"Resources.gpu_utilization must be a finite number >= 0: {self.gpu_utilization}"
            )

    def threads(self, wcpus: int, gpus: int) -> int:
        """Cores this task takes on a worker with `wcpus` cores and `gpus` GPUs (Lotus Threads)."""
        mp = self.max_parallelism
        if self.gpu_utilization > 0 and gpus > 0 and self.max_parallelism_gpu != 0:
            mp = self.max_parallelism_gpu
        if mp == -1:
            n = wcpus * PARALLEL_NUM // PARALLEL_DENOM
            # A 1-core worker would otherwise get 0 threads and never fill up.
            return n if n else wcpus
        return mp


ZERO: Final = Resources(0, 0, 0.0, 0, 0, 0)

#: Per-worker replacements for table entries, keyed by (task type, sector size in bytes).
#: Each value is a complete entry (the table's, with the overridden fields replaced), as
#: Lotus's worker ships a whole table; `parse_overrides` builds one, a plain dict works too.
ResourceOverrides: TypeAlias = Mapping[tuple[TaskType, int], Resources]


class ResourceConfigError(ValueError):
    """A resource override has a malformed value, an unknown name, or targets no table entry."""


_KiB: Final = 1 << 10
_MiB: Final = 1 << 20
_GiB: Final = 1 << 30
_S2K, _S8M, _S512M, _S32G, _S64G = (SECTOR_SIZES[s] for s in ("2K", "8M", "512M", "32G", "64G"))


def _r(
    min_memory: int,
    max_memory: int,
    base_min_memory: int,
    max_parallelism: int,
    max_parallelism_gpu: int = 0,
    gpu_utilization: float = 0.0,
) -> Resources:
    # Argument order follows the reference table's columns, so rows can be checked by eye.
    return Resources(
        min_memory=min_memory,
        max_memory=max_memory,
        gpu_utilization=gpu_utilization,
        max_parallelism=max_parallelism,
        max_parallelism_gpu=max_parallelism_gpu,
        base_min_memory=base_min_memory,
    )


def _build_table() -> dict[TaskType, Mapping[int, Resources]]:
    t = TaskType
    table: dict[TaskType, dict[int, Resources]] = {
        t.ADD_PIECE: {
            _S2K: _r(2 * _KiB, 2 * _KiB, 2 * _KiB, 1),
            _S8M: _r(8 * _MiB, 8 * _MiB, 8 * _MiB, 1),
            _S512M: _r(1 * _GiB, 1 * _GiB, 1 * _GiB, 1),
            _S32G: _r(4 * _GiB, 4 * _GiB, 1 * _GiB, 1),
            _S64G: _r(8 * _GiB, 8 * _GiB, 1 * _GiB, 1),
        },
        t.PRE_COMMIT1: {
            _S2K: _r(2 * _KiB, 2 * _KiB, 2 * _KiB, 1),
            _S8M: _r(8 * _MiB, 8 * _MiB, 8 * _MiB, 1),
            _S512M: _r(768 * _MiB, 1 * _GiB, 1 * _MiB, 1),
            _S32G: _r(56 * _GiB, 64 * _GiB, 10 * _MiB, 1),
            _S64G: _r(112 * _GiB, 128 * _GiB, 10 * _MiB, 1),
        },
        t.PRE_COMMIT2: {
            _S2K: _r(2 * _KiB, 2 * _KiB, 2 * _KiB, -1),
            _S8M: _r(8 * _MiB, 8 * _MiB, 8 * _MiB, -1),
            _S512M: _r(1 * _GiB, 3 * _GiB // 2, 1 * _GiB, -1),
            _S32G: _r(15 * _GiB, 15 * _GiB, 1 * _GiB, -1, 6, 1.0),
            _S64G: _r(30 * _GiB, 30 * _GiB, 1 * _GiB, -1, 6, 1.0),
        },
        t.COMMIT1: {
            _S2K: _r(2 * _KiB, 2 * _KiB, 2 * _KiB, 0),
            _S8M: _r(8 * _MiB, 8 * _MiB, 8 * _MiB, 0),
            _S512M: _r(1 * _GiB, 1 * _GiB, 1 * _GiB, 0),
            _S32G: _r(1 * _GiB, 1 * _GiB, 1 * _GiB, 0),
            _S64G: _r(1 * _GiB, 1 * _GiB, 1 * _GiB, 0),
        },
        t.COMMIT2: {
            _S2K: _r(2 * _KiB, 2 * _KiB, 2 * _KiB, 1, 0, 1.0),
            _S8M: _r(8 * _MiB, 8 * _MiB, 8 * _MiB, 1, 0, 1.0),
            _S512M: _r(1 * _GiB, 3 * _GiB // 2, 10 * _GiB, 1, 0, 1.0),
            _S32G: _r(30 * _GiB, 150 * _GiB, 32 * _GiB, -1, 6, 1.0),
            _S64G: _r(60 * _GiB, 190 * _GiB, 64 * _GiB, -1, 6, 1.0),
        },
        t.FETCH: {size: _r(1 * _MiB, 1 * _MiB, 0, 0) for size in SECTOR_SIZES.values()},
        t.REPLICA_UPDATE: {
            _S2K: _r(2 * _KiB, 2 * _KiB, 2 * _KiB, 1, 0, 1.0),
            _S8M: _r(8 * _MiB, 8 * _MiB, 8 * _MiB, 1, 0, 1.0),
            _S512M: _r(1 * _GiB, 1 * _GiB, 1 * _GiB, 1, 0, 1.0),
            _S32G: _r(4 * _GiB, 4 * _GiB, 1 * _GiB, 1, 6, 1.0),
            _S64G: _r(8 * _GiB, 8 * _GiB, 1 * _GiB, 1, 6, 1.0),
        },
        t.PROVE_REPLICA_UPDATE1: {
            _S2K: _r(2 * _KiB, 2 * _KiB, 2 * _KiB, 0),
            _S8M: _r(8 * _MiB, 8 * _MiB, 8 * _MiB, 0),
            _S512M: _r(1 * _GiB, 1 * _GiB, 1 * _GiB, 0),
            _S32G: _r(1 * _GiB, 1 * _GiB, 1 * _GiB, 0),
            _S64G: _r(1 * _GiB, 1 * _GiB, 1 * _GiB, 0),
        },
        t.PROVE_REPLICA_UPDATE2: {
            _S2K: _r(2 * _KiB, 2 * _KiB, 2 * _KiB, 1, 0, 1.0),
            _S8M: _r(8 * _MiB, 8 * _MiB, 8 * _MiB, 1, 0, 1.0),
            _S512M: _r(1 * _GiB, 3 * _GiB // 2, 10 * _GiB, 1, 0, 1.0),
            _S32G: _r(30 * _GiB, 150 * _GiB, 32 * _GiB, -1, 6, 1.0),
            _S64G: _r(60 * _GiB, 190 * _GiB, 64 * _GiB, -1, 6, 1.0),
        },
        t.GENERATE_WINDOW_POST: {
            _S2K: _r(2 * _KiB, 2 * _KiB, 2 * _KiB, 1, 0, 1.0),
            _S8M: _r(8 * _MiB, 8 * _MiB, 8 * _MiB, 1, 0, 1.0),
            _S512M: _r(1 * _GiB, 3 * _GiB // 2, 10 * _GiB, 1, 0, 1.0),
            _S32G: _r(30 * _GiB, 96 * _GiB, 32 * _GiB, -1, 6, 1.0),
            _S64G: _r(60 * _GiB, 120 * _GiB, 64 * _GiB, -1, 6, 1.0),
        },
        t.GENERATE_WINNING_POST: {
            _S2K: _r(2 * _KiB, 2 * _KiB, 2 * _KiB, 1, 0, 1.0),
            _S8M: _r(8 * _MiB, 8 * _MiB, 8 * _MiB, 1, 0, 1.0),
            _S512M: _r(2 * _KiB, 2 * _KiB, 10 * _GiB, 1, 0, 1.0),
            _S32G: _r(1 * _GiB, 1 * _GiB, 32 * _GiB, -1, 6, 1.0),
            _S64G: _r(1 * _GiB, 1 * _GiB, 64 * _GiB, -1, 6, 1.0),
        },
    }
    # Lotus's init() aliases: unseal is "TODO: measure accurately" as PC1, regen-key is an
    # RU, the removed unsealread was a fetch, and DataCid is sector-size independent.
    table[t.UNSEAL] = dict(table[t.PRE_COMMIT1])
    table[t.REGEN_SECTOR_KEY] = dict(table[t.REPLICA_UPDATE])
    table[t.READ_UNSEALED] = dict(table[t.FETCH])
    table[t.DATA_CID] = dict.fromkeys(SECTOR_SIZES.values(), table[t.ADD_PIECE][_S32G])
    return {task: MappingProxyType(sizes) for task, sizes in table.items()}


#: Lotus HEAD's default table: task type -> sector size in bytes -> needs. Types absent here
#: (FIN, FUS, FRU, DL) need nothing: `resource_spec` gives them `ZERO`.
RESOURCE_TABLE: Final[Mapping[TaskType, Mapping[int, Resources]]] = MappingProxyType(_build_table())

_SIZE_NAMES: Final = {size: short for short, size in SECTOR_SIZES.items()}


def resource_spec(
    task_type: TaskType, sector_size: int, overrides: ResourceOverrides | None = None
) -> Resources:
    """The worker's override for this task and size if any, else the table's entry, else ZERO."""
    if sector_size not in _SIZE_NAMES:
        raise ValueError(
            f"unknown sector size {sector_size!r} (supported: "
            f"{', '.join(f'{s} ({b})' for s, b in SECTOR_SIZES.items())})"
        )
    if overrides:
        found = overrides.get((task_type, sector_size))
        if found is not None:
            return found
    sizes = RESOURCE_TABLE.get(task_type)
    return ZERO if sizes is None else sizes.get(sector_size, ZERO)


# --- overrides ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Field:
    attr: str
    is_float: bool
    minimum: int
    # Lotus parses these into uint64 / int (64-bit) / float64; larger values cannot round-trip.
    maximum: int


_U64: Final = (1 << 64) - 1
_I64: Final = (1 << 63) - 1
_FIELDS: Final[Mapping[str, _Field]] = MappingProxyType(
    {
        "MIN_MEMORY": _Field("min_memory", False, 0, _U64),
        "MAX_MEMORY": _Field("max_memory", False, 0, _U64),
        "GPU_UTILIZATION": _Field("gpu_utilization", True, 0, 0),
        "MAX_PARALLELISM": _Field("max_parallelism", False, -1, _I64),
        "MAX_PARALLELISM_GPU": _Field("max_parallelism_gpu", False, -1, _I64),
        "BASE_MIN_MEMORY": _Field("base_min_memory", False, 0, _U64),
        "MAX_CONCURRENT": _Field("max_concurrent", False, 0, _I64),
    }
)
_PRODUCERS_FIELD: Final = _Field("producers", False, 0, _I64)
_SDR_TASKS: Final = frozenset({TaskType.PRE_COMMIT1, TaskType.UNSEAL})

_BY_SHORT: Final = {t.short: t for t in TaskType}
_OVERRIDABLE: Final = ", ".join(sorted(t.short for t in RESOURCE_TABLE))
_SIZE_LIST: Final = ", ".join(SECTOR_SIZES)
_FIELD_LIST: Final = ", ".join(_FIELDS)
# Go's Atoi/ParseUint accept an optional sign and ASCII digits only (no `_`, no spaces).
_WHOLE_RE: Final = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# Looks like a sector size, so report it as an unknown size rather than an unknown field.
_SIZE_LIKE_RE: Final = re.compile(r"[0-9]+[A-Z]*")

# (task type, sector size or None for "every size", FIELD) -> (value, the key that gave it)
_Given: TypeAlias = dict[tuple[TaskType, int | None, str], tuple[int | float, str]]


def _fail(key: str, value: object, problem: str) -> ResourceConfigError:
    return ResourceConfigError(f"{key}={value!r} {problem}")


def _number(key: str, value: object, field: _Field) -> int | float:
    # bool is an int subclass; `true` in TOML is a mistake, never a count.
    if isinstance(value, bool):
        kind = "number" if field.is_float else "whole number"
        raise _fail(key, value, f"is a boolean, not a {kind}")
    if field.is_float:
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            number = float(value.strip())
        else:
            raise _fail(key, value, "is not a number")
        if not math.isfinite(number):
            raise _fail(key, value, "is not a finite number")
        if number < 0:
            raise _fail(key, value, "is negative")
        return number
    if isinstance(value, int):
        whole = value
    elif isinstance(value, str) and _WHOLE_RE.fullmatch(value.strip()):
        whole = int(value.strip())
    else:
        raise _fail(key, value, "is not a whole number")
    if whole < field.minimum:
        if field.minimum == 0:
            raise _fail(key, value, "is negative")
        raise _fail(key, value, f"is below {field.minimum} (-1 means 92% of the cores)")
    if whole > field.maximum:
        raise _fail(key, value, f"is too large (at most {field.maximum})")
    return whole


def _table_task(key: str, value: object, task: TaskType | None, name: str) -> TaskType:
    if task is None:
        raise _fail(
            key, value, f"names an unknown task type {name!r} (overridable: {_OVERRIDABLE})"
        )
    if task not in RESOURCE_TABLE:
        raise _fail(
            key,
            value,
            f"targets {task.short}, which has no resource table entry to override "
            f"(overridable: {_OVERRIDABLE})",
        )
    return task


def _field_name(key: str, value: object, name: str) -> str:
    field = name.upper()
    if not field:
        raise _fail(key, value, f"names no field (fields: {_FIELD_LIST})")
    if field not in _FIELDS:
        raise _fail(key, value, f"names an unknown field {name!r} (fields: {_FIELD_LIST})")
    return field


def _add(
    given: _Given, key: str, value: object, task: TaskType, size: int | None, field: str
) -> None:
    slot = (task, size, field)
    if slot in given:
        raise _fail(key, value, f"repeats a setting already given by {given[slot][1]}")
    given[slot] = (_number(key, value, _FIELDS[field]), key)


def _parse_flat(given: _Given, key: str, value: object) -> None:
    # `<Short>_<size>_<FIELD>` or `<Short>_<FIELD>`; short names and sizes never contain `_`.
    short, _, rest = key.upper().partition("_")
    task = _table_task(key, value, _BY_SHORT.get(short), key.partition("_")[0])
    size: int | None = None
    head, _, tail = rest.partition("_")
    if head in SECTOR_SIZES:
        size, rest = SECTOR_SIZES[head], tail
    elif _SIZE_LIKE_RE.fullmatch(head) and tail:
        raise _fail(key, value, f"names an unknown sector size {head!r} (sizes: {_SIZE_LIST})")
    _add(given, key, value, task, size, _field_name(key, value, rest))


def _is_size(name: object) -> bool:
    try:
        parse_sector_size(name if isinstance(name, str | int) else str(name))
    except ValueError:
        return False
    return True


def _parse_nested(given: _Given, key: str, table: Mapping[object, object]) -> None:
    try:
        found: TaskType | None = TaskType.parse(key)
    except ValueError:
        found = None
    task = _table_task(key, dict(table), found, key)
    for name, value in table.items():
        path = f"{key}.{name}"
        if not isinstance(value, Mapping):
            if str(name).upper() not in _FIELDS and _is_size(name):
                raise _fail(path, value, "should be a table of fields, not a value")
            _add(given, path, value, task, None, _field_name(path, value, str(name)))
            continue
        try:
            size = parse_sector_size(name if isinstance(name, str | int) else str(name))
        except ValueError:
            raise _fail(
                path, dict(value), f"names an unknown sector size {name!r} (sizes: {_SIZE_LIST})"
            ) from None
        for field_name, field_value in value.items():
            field_path = f"{path}.{field_name}"
            if isinstance(field_value, Mapping):
                raise _fail(field_path, dict(field_value), "should be a value, not a table")
            field = _field_name(field_path, field_value, str(field_name))
            _add(given, field_path, field_value, task, size, field)


def _sdr_threads(env: Mapping[str, str]) -> int | None:
    # Lotus's getSDRThreads: without multicore SDR it yields 1, which is the table's value
    # already, so only the multicore case changes anything.
    if env.get("FIL_PROOFS_USE_MULTICORE_SDR") != "1":
        return None
    key = "FIL_PROOFS_MULTICORE_SDR_PRODUCERS"
    raw = env.get(key)
    producers = 3 if raw is None else int(_number(key, raw, _PRODUCERS_FIELD))
    # The producers plus the one core that does the actual work.
    return producers + 1


def parse_overrides(
    values: Mapping[str, object], *, env: Mapping[str, str] | None = None
) -> ResourceOverrides:
    """Per-worker overrides from Lotus env-style names or a nested table; strict, unlike Lotus."""
    given: _Given = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            _parse_nested(given, key, value)
        else:
            _parse_flat(given, key, value)
    sdr = None if env is None else _sdr_threads(env)

    out: dict[tuple[TaskType, int], Resources] = {}
    for task, sizes in RESOURCE_TABLE.items():
        for size, default in sizes.items():
            ints: dict[str, int] = {}
            gpu: float | None = None
            for field_name, field in _FIELDS.items():
                # Sized beats unsized, as Lotus looks the sized name up first.
                hit = given.get((task, size, field_name)) or given.get((task, None, field_name))
                if hit is not None:
                    if field.is_float:
                        gpu = float(hit[0])
                    else:
                        ints[field.attr] = int(hit[0])
                elif sdr is not None and field_name == "MAX_PARALLELISM" and task in _SDR_TASKS:
                    ints[field.attr] = sdr
            if ints or gpu is not None:
                entry = replace(default, **ints)
                out[(task, size)] = entry if gpu is None else replace(entry, gpu_utilization=gpu)
    return MappingProxyType(out)


# --- display -------------------------------------------------------------------------------

_UNITS: Final = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def describe_bytes(n: int) -> str:
    """`n` bytes in the largest binary unit, at most two decimals: `56 GiB`, `1.5 GiB`, `2 KiB`."""
    sign, n = ("-", -n) if n < 0 else ("", n)
    i = 0
    while i < len(_UNITS) - 1 and n >= 1 << (10 * (i + 1)):
        i += 1
    scale = 1 << (10 * i)
    if n % scale == 0:
        # Integer arithmetic keeps exact values exact even beyond float precision.
        return f"{sign}{n // scale} {_UNITS[i]}"
    value = round(n / scale, 2)
    if value >= 1024 and i < len(_UNITS) - 1:
        # 1023.999 MiB would otherwise print as "1024 MiB".
        i += 1
        value = round(n / (1 << (10 * i)), 2)
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{sign}{text} {_UNITS[i]}"
