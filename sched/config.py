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
capacity = "8TiB"
seal = true
store = false
```

Every mistake is a `WorkerConfigError` that names the file, the worker and the key.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .ledger import WorkerResources
from .resources import ResourceConfigError, parse_overrides
from .storage import StoragePath
from .tasks import TaskType
from .workers import SEALING_TASKS, WorkerSpec

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(I?B)?\s*$", re.I)
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(BIT|B)(?:/S|PS)?\s*$", re.I)
_WORKER_KEYS = {
    "name",
    "cpus",
    "memory",
    "swap",
    "gpus",
    "tasks",
    "heartbeat_grace",
    "bandwidth",
    "policy",
    "resources",
    "paths",
}
_PATH_KEYS = {"id", "capacity", "seal", "store", "weight", "used"}


class WorkerConfigError(ValueError):
    """A worker config that cannot be used as written."""


def parse_size(value: object, what: str) -> int:
    """Bytes from an int or text like `512GiB`, `8TiB`, `1.5G`."""
    if isinstance(value, bool):
        raise WorkerConfigError(f"{what}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise WorkerConfigError(f"{what}: a size cannot be negative ({value})")
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        number, unit, _ = m.groups()
        return int(float(number) * _UNITS[unit.upper()])
    raise WorkerConfigError(f"{what}: expected a size like 512GiB, got {value!r}")


def parse_rate(value: object, what: str) -> float:
    """Bytes per second from a number or text like `10Gbit`, `400MB/s`."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value <= 0:
            raise WorkerConfigError(f"{what}: a bandwidth must be positive ({value})")
        return float(value)
    if isinstance(value, str) and (m := _RATE.match(value)):
        number, unit, kind = m.groups()
        scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit.upper()]
        rate = float(number) * scale / (8 if kind.upper() == "BIT" else 1)
        if rate > 0:
            return rate
    raise WorkerConfigError(f"{what}: expected a bandwidth like 10Gbit or 400MB/s, got {value!r}")


def _worker(raw: Mapping[str, Any], where: str, base: Path) -> WorkerSpec:
    unknown = set(raw) - _WORKER_KEYS
    if unknown:
        raise WorkerConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise WorkerConfigError(f"{where}: every worker needs a non-empty `name`")
    where = f"{where} ({name})"
    cpus = raw.get("cpus")
    if not isinstance(cpus, int) or isinstance(cpus, bool) or cpus < 1:
        raise WorkerConfigError(f"{where}: cpus must be a whole number >= 1, got {cpus!r}")
    if "memory" not in raw:
        raise WorkerConfigError(f'{where}: memory is required (e.g. memory = "256GiB")')
    gpus = raw.get("gpus", [])
    if not isinstance(gpus, list) or not all(isinstance(g, str) for g in gpus):
        raise WorkerConfigError(f"{where}: gpus must be a list of device names")
    resources = WorkerResources(
        cpus=cpus,
        mem_physical=parse_size(raw["memory"], f"{where}: memory"),
        mem_swap=parse_size(raw.get("swap", 0), f"{where}: swap"),
        gpus=tuple(gpus),
    )
    tasks = SEALING_TASKS
    if "tasks" in raw:
        if not isinstance(raw["tasks"], list):
            raise WorkerConfigError(f"{where}: tasks must be a list of task names")
        try:
            tasks = frozenset(TaskType.parse(str(t)) for t in raw["tasks"])
        except ValueError as exc:
            raise WorkerConfigError(f"{where}: tasks: {exc}") from None
    try:
        overrides = parse_overrides(raw.get("resources", {}))
    except ResourceConfigError as exc:
        raise WorkerConfigError(f"{where}: resources: {exc}") from None
    grace = raw.get("heartbeat_grace", 30)
    if not isinstance(grace, int | float) or isinstance(grace, bool) or grace <= 0:
        raise WorkerConfigError(f"{where}: heartbeat_grace must be seconds > 0, got {grace!r}")
    paths = []
    for i, p in enumerate(raw.get("paths", [])):
        pw = f"{where}: paths[{i}]"
        if not isinstance(p, dict) or set(p) - _PATH_KEYS or "id" not in p:
            raise WorkerConfigError(
                f"{pw}: needs `id` and `capacity`; allowed keys {sorted(_PATH_KEYS)}"
            )
        paths.append(
            StoragePath(
                str(p["id"]),
                name,
                parse_size(p.get("capacity"), f"{pw}: capacity"),
                can_seal=bool(p.get("seal", True)),
                can_store=bool(p.get("store", False)),
                weight=int(p.get("weight", 1)),
                used=parse_size(p.get("used", 0), f"{pw}: used"),
            )
        )
    policy = raw.get("policy")
    if policy is not None and not isinstance(policy, str):
        raise WorkerConfigError(f"{where}: policy must be a file path")
    return WorkerSpec(
        name=name,
        resources=resources,
        task_types=tasks,
        paths=tuple(paths),
        overrides=overrides,
        policy_file=(base / policy) if policy else None,
        heartbeat_grace=float(grace),
        bandwidth=parse_rate(raw.get("bandwidth", "10Gbit"), f"{where}: bandwidth"),
    )


def parse_workers(
    data: Mapping[str, Any], source: str = "<config>", base: Path | None = None
) -> list[WorkerSpec]:
    """Worker specs from parsed config data (a `workers` array of tables)."""
    raw = data.get("workers", [])
    if not isinstance(raw, list):
        raise WorkerConfigError(f"{source}: `workers` must be an array of tables ([[workers]])")
    specs = [
        _worker(w, f"{source}: workers[{i}]", base or Path("."))
        if isinstance(w, dict)
        else _bad(source, i)
        for i, w in enumerate(raw)
    ]
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise WorkerConfigError(f"{source}: duplicate worker name(s) {dupes}")
    return specs


def load_workers(path: str | Path) -> list[WorkerSpec]:
    """Worker specs from a TOML file; policy paths are relative to it."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise WorkerConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise WorkerConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_workers(data, str(path), path.parent)


def _bad(source: str, i: int) -> WorkerSpec:
    raise WorkerConfigError(f"{source}: workers[{i}] must be a table")
