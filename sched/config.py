"""Declared workers from a TOML config: resources, task types, storage paths, policy, links.

```toml
[[workers]]
name = "pc1-a"
cpus = 64
memory = "512GiB"
swap = "64GiB"
gpus = ["RTX 3090"]
tasks = ["AP", "PC1", "FIN", "GET"]     # Lotus short names (default: every sealing task)
heartbeat_grace = 30                     # seconds
bandwidth = "10Gbit"                     # the worker's link: "1Gbit", "10Gbit", "400MB/s", bytes/s
policy = "pc1-a/myscheduler.json"        # relative to the config file
resources = { PC1_32G_MAX_CONCURRENT = 4 }

[[workers.paths]]
id = "pc1-a-nvme"
path = "/mnt/nvme/sectors"               # its directory; relative to the config file, ~ expanded
capacity = "8TiB"
seal = true
store = false
```

Every mistake is a `WorkerConfigError` that names the file, the worker and the key. The
tables are validated by a pydantic schema (`_WorkerTable`) and converted to `WorkerSpec`s;
`check_workers` then refuses, for a given sector size, a worker that could never run a task
it declares.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field

from ..validation import MAX_INT, TABLE, ConfigError, Flag, PositiveCount, validate
from .ledger import Ledger, WorkerResources
from .resources import ResourceConfigError, describe_bytes, parse_overrides, resource_spec
from .storage import StoragePath
from .tasks import TaskType
from .workers import SEALING_TASKS, WorkerSpec

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(I?B)?\s*$", re.I)
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(BIT|B)(?:/S|PS)?\s*$", re.I)
#: The tasks the sealing pipeline schedules: each must fit on some worker, or sectors wait
#: for ever.
PIPELINE_TASKS = (
    TaskType.ADD_PIECE,
    TaskType.PRE_COMMIT1,
    TaskType.PRE_COMMIT2,
    TaskType.COMMIT1,
    TaskType.COMMIT2,
    TaskType.FINALIZE,
)


class WorkerConfigError(ConfigError):
    """A worker config that cannot be used as written."""


def parse_size(value: object, what: str) -> int:
    """Bytes from an int or text like `512GiB`, `8TiB`, `1.5G` (at most 8 EiB)."""
    try:
        return _size(value)
    except ValueError as exc:
        raise WorkerConfigError(f"{what}: {exc}") from None


def parse_rate(value: object, what: str) -> float:
    """Bytes per second from a number or text like `10Gbit`, `400MB/s`."""
    try:
        return _rate(value)
    except ValueError as exc:
        raise WorkerConfigError(f"{what}: {exc}") from None


def _size(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        number, unit, _ = m.groups()
        size = int(float(number) * _UNITS[unit.upper()])
    else:
        raise ValueError(f"expected a size like 512GiB, got {value!r}")
    if size < 0:
        raise ValueError(f"a size cannot be negative ({value!r})")
    if size > MAX_INT:
        raise ValueError(f"{value!r} is more than any disk or memory (8 EiB at most)")
    return size


def _rate(value: object) -> float:
    rate = -1.0
    if isinstance(value, int | float) and not isinstance(value, bool):
        rate = float(value)
    elif isinstance(value, str) and (m := _RATE.match(value)):
        number, unit, kind = m.groups()
        scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit.upper()]
        rate = float(number) * scale / (8 if kind.upper() == "BIT" else 1)
    if not 0 < rate < 1e15:  # also refuses nan and inf
        raise ValueError(f"expected a bandwidth like 10Gbit or 400MB/s, got {value!r}")
    return rate


def _tasks(value: list[str]) -> frozenset[TaskType]:
    if not value:
        raise ValueError("a worker must run at least one task (omit `tasks` for all of them)")
    return frozenset(TaskType.parse(t) for t in value)


def _overrides(value: dict[str, Any]) -> Any:
    try:
        return parse_overrides(value)
    except ResourceConfigError as exc:
        raise ValueError(str(exc)) from None


Size = Annotated[int, BeforeValidator(_size)]
Rate = Annotated[float, BeforeValidator(_rate)]


class _PathTable(BaseModel):
    model_config = TABLE

    id: Annotated[str, Field(min_length=1)]
    capacity: Size
    path: Annotated[str, Field(min_length=1)] | None = None
    seal: Flag = True
    store: Flag = False
    weight: PositiveCount = 1
    used: Size = 0


class _WorkerTable(BaseModel):
    model_config = TABLE

    name: Annotated[str, Field(min_length=1)]
    cpus: Annotated[int, Field(ge=1, le=1 << 20)]
    memory: Size
    swap: Size = 0
    gpus: list[str] = []
    tasks: Annotated[list[str], AfterValidator(_tasks)] | None = None
    heartbeat_grace: Annotated[float, Field(gt=0, le=86400, allow_inf_nan=False)] = 30.0
    bandwidth: Rate = 1.25e9
    policy: Annotated[str, Field(min_length=1)] | None = None
    resources: Annotated[dict[str, Any], AfterValidator(_overrides)] = {}
    paths: list[_PathTable] = []


class _WorkersFile(BaseModel):
    # Other sections belong to whoever reads the rest of the file.
    model_config = TABLE.copy() | {"extra": "ignore"}

    workers: list[_WorkerTable] = []


@dataclass(frozen=True, slots=True)
class WorkersConfig:
    """The declared workers, and the directory of each storage path that names one."""

    workers: list[WorkerSpec]
    #: Storage path id -> directory (absolute), for `[[workers.paths]]` with a `path`.
    directories: dict[str, Path] = field(default_factory=dict)


def read_workers(
    data: Mapping[str, Any], source: str = "<config>", base: Path | None = None
) -> WorkersConfig:
    """Worker specs and storage directories from parsed config data (`[[workers]]` tables)."""
    base = base or Path(".")
    if not isinstance(data.get("workers", []), list):
        raise WorkerConfigError(f"{source}: `workers` must be an array of tables ([[workers]])")
    try:
        parsed: _WorkersFile = validate(_WorkersFile, dict(data), source)
    except ConfigError as exc:
        raise WorkerConfigError(str(exc)) from None
    names = [w.name for w in parsed.workers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise WorkerConfigError(f"{source}: duplicate worker name(s) {dupes}")
    ids = [p.id for w in parsed.workers for p in w.paths]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise WorkerConfigError(f"{source}: duplicate storage path id(s) {dupes}")
    directories = {
        p.id: (base / Path(p.path).expanduser()).absolute()
        for w in parsed.workers
        for p in w.paths
        if p.path is not None
    }
    return WorkersConfig([_spec(w, base) for w in parsed.workers], directories)


def _spec(w: _WorkerTable, base: Path) -> WorkerSpec:
    paths = tuple(
        StoragePath(
            p.id,
            w.name,
            p.capacity,
            can_seal=p.seal,
            can_store=p.store,
            weight=p.weight,
            used=p.used,
        )
        for p in w.paths
    )
    return WorkerSpec(
        name=w.name,
        resources=WorkerResources(
            cpus=w.cpus, mem_physical=w.memory, mem_swap=w.swap, gpus=tuple(w.gpus)
        ),
        task_types=SEALING_TASKS if w.tasks is None else w.tasks,  # type: ignore[arg-type]
        paths=paths,
        overrides=w.resources or None,  # type: ignore[arg-type]
        policy_file=(base / w.policy) if w.policy else None,
        heartbeat_grace=w.heartbeat_grace,
        bandwidth=w.bandwidth,
    )


def parse_workers(
    data: Mapping[str, Any], source: str = "<config>", base: Path | None = None
) -> list[WorkerSpec]:
    """Worker specs from parsed config data (a `workers` array of tables)."""
    return read_workers(data, source, base).workers


def load_workers(path: str | Path) -> list[WorkerSpec]:
    """Worker specs from a TOML file; policy and storage paths are relative to it."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise WorkerConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise WorkerConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_workers(data, str(path), path.parent)


def check_workers(specs: Iterable[WorkerSpec], sector_size: int) -> None:
    """Refuse workers whose sectors would wait for ever: a `WorkerConfigError` says why.

    Each worker must be able to run every pipeline task it declares on sectors of this size
    (an idle worker's memory, swap and cores, as the scheduler's ledger counts them), and
    every pipeline task must be declared by some worker.
    """
    specs = list(specs)
    if not specs:
        raise WorkerConfigError("no workers: nothing could run the sealing tasks")
    for spec in specs:
        if not spec.task_types:
            raise WorkerConfigError(f"worker {spec.name!r} declares no tasks")
        # Memory other programs use now is not the worker's fault: judge it idle.
        ledger = Ledger(replace(spec.resources, mem_used=0, mem_swap_used=0))
        for task in PIPELINE_TASKS:
            if task not in spec.task_types:
                continue
            why = ledger.refusal(task, resource_spec(task, sector_size, spec.overrides))
            if why is not None:
                raise WorkerConfigError(
                    f"worker {spec.name!r} can never run {task.short} on "
                    f"{describe_bytes(sector_size)} sectors: it {why} when idle; give it "
                    f"more or drop {task.short} from its tasks"
                )
    missing = [t.short for t in PIPELINE_TASKS if not any(t in s.task_types for s in specs)]
    if missing:
        raise WorkerConfigError(
            f"no worker runs {', '.join(missing)}: sectors would wait there for ever "
            "(add the task to some worker's `tasks`)"
        )
