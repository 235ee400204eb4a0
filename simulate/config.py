"""The `sectors simulate` input: the `sectors run` TOML plus a `[simulate]` section, and what-ifs.

```toml
[simulate]
sector_size = "32GiB"          # default 32GiB
chain = "mainnet"              # mainnet (30 s epochs, the default) | devnet
assigners = ["balanced", "lotus"]
sample_hours = 1               # utilisation, disk and state counts sampled this often
warmup_hours = 30              # default: the pipeline's latency; excluded from steady state

[simulate.pledge]              # one plan
mode = "rate"                  # rate | fill | deals | auto
per_day = 20                   # rate: CC pledges per day, evenly spaced
every_hours = 6                # fill: `sectors pledge --fill` from cron, this often
deals_per_day = 10             # deals: full-sector deals arriving as a Poisson process
                               # auto: the AutoPledgeDiff rule of the workers' policies

[simulate.durations]           # seconds per task at this sector size, on every worker
PC1 = 12600                    # (or "3.5h", "25m", "90s"); default: the sim sealer's
[simulate.worker_durations.gpu-box]
PC2 = "15m"                    # faster hardware on one worker

[simulate.faults]
worker_mtbf_hours = 0          # mean hours between crashes of each worker (0: none)
worker_repair_hours = 4        # hours a crashed worker stays down
message_failure_rate = 0.0     # chance that a PreCommit/ProveCommit message fails on chain
```

`[[workers]]` and `[sealing]` are read as `sectors run` reads them; `[miner]`, `[sealer]`,
`[metrics]` and `[cluster]` do not apply (the simulation always runs the `sim` sealer in
process). Every mistake is a one-line `SimulateConfigError` naming the file and the key.

What-ifs (`--what-if`): `add-worker NAME` adds a copy of worker NAME (its paths copied too);
`policy NAME Key=Value ...` sets myscheduler.json keys on worker NAME (values as JSON:
`PreCommit1Max=6`, `PreCommit2Max=null`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field

from ..sched import TaskType, WorkerPolicy, WorkerSpec, load_policy, parse_policy
from ..sched.config import read_workers
from ..sched.filetypes import parse_sector_size
from ..sched.workers import SEALING_TASKS
from ..sealing.config import SealingConfig, seal_proof_for
from ..validation import TABLE, ConfigError, Count, PositiveSeconds, read_toml, validate

__all__ = [
    "PledgePlanConfig",
    "SimulateConfig",
    "SimulateConfigError",
    "WhatIf",
    "load_simulate_config",
    "parse_simulate_config",
    "parse_what_if",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$", re.I)
_UNIT = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class SimulateConfigError(ValueError):
    """A simulate config or what-if that cannot be used as written."""


def _seconds(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT[(m.group(2) or "").lower()]
    else:
        raise ValueError(f"expected seconds or a duration like 3.5h, 25m, 90s, got {value!r}")
    if not 0 < seconds < 1e8:
        raise ValueError(f"a task takes more than 0 and less than 1e8 seconds, got {value!r}")
    return seconds


def _task_table(value: object) -> dict[TaskType, float]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a table of task names to seconds, got {value!r}")
    out: dict[TaskType, float] = {}
    for key, seconds in value.items():
        task = TaskType.parse(str(key))
        if task not in SEALING_TASKS:
            raise ValueError(f"{key!r} is not a sealing task")
        out[task] = _seconds(seconds)
    return out


TaskSeconds = Annotated[dict[TaskType, float], BeforeValidator(_task_table)]
Hours = Annotated[float, Field(gt=0, le=24 * 3650, allow_inf_nan=False)]
Rate = Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]


class _PledgeTable(BaseModel):
    model_config = TABLE

    mode: Literal["rate", "fill", "deals", "auto"] = "rate"
    per_day: Rate | None = None
    every_hours: Hours | None = None
    deals_per_day: Rate | None = None


class _FaultsTable(BaseModel):
    model_config = TABLE

    worker_mtbf_hours: Annotated[float, Field(ge=0, le=1e7, allow_inf_nan=False)] = 0.0
    worker_repair_hours: Hours = 4.0
    message_failure_rate: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.0


class _SimulateTable(BaseModel):
    model_config = TABLE

    sector_size: str | int = "32GiB"
    chain: Literal["mainnet", "devnet"] = "mainnet"
    assigners: Annotated[list[Literal["balanced", "lotus"]], Field(min_length=1)] = [
        "balanced",
        "lotus",
    ]
    sample_hours: Hours = 1.0
    warmup_hours: Annotated[float, Field(ge=0, le=24 * 3650, allow_inf_nan=False)] | None = None
    pledge: _PledgeTable = _PledgeTable()
    durations: TaskSeconds = {}
    worker_durations: dict[str, TaskSeconds] = {}
    faults: _FaultsTable = _FaultsTable()
    seed: Count = 0
    #: Devnet only: seconds per epoch.
    block_time: PositiveSeconds | None = None


_NOUNS = {"simulate": "[simulate] key"}


@dataclass(frozen=True, slots=True)
class PledgePlanConfig:
    """How sectors arrive: `rate` (CC per day), `fill` (cron), `deals` (Poisson), `auto`."""

    mode: str = "rate"
    per_day: float = 0.0
    every_hours: float = 0.0
    deals_per_day: float = 0.0


@dataclass(frozen=True, slots=True)
class FaultsConfig:
    """Worker crashes (exponential, mean `worker_mtbf_hours`) and chain message failures."""

    worker_mtbf_hours: float = 0.0
    worker_repair_hours: float = 4.0
    message_failure_rate: float = 0.0


@dataclass(frozen=True, slots=True)
class WhatIf:
    """One variant of the cluster: `add-worker NAME` or `policy NAME Key=Value ...`."""

    kind: Literal["add-worker", "policy"]
    worker: str
    #: `policy`: myscheduler.json keys and their values.
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """The variant's name in the summary, as it was given on the command line."""
        if self.kind == "add-worker":
            return f"add-worker {self.worker}"
        kv = " ".join(f"{k}={json.dumps(v)}" for k, v in self.settings)
        return f"policy {self.worker} {kv}"


@dataclass(slots=True)
class SimulateConfig:
    """Everything one `sectors simulate` needs, checked."""

    workers: list[WorkerSpec]
    sector_size: int = 32 << 30
    chain: str = "mainnet"
    block_time: float | None = None
    assigners: tuple[str, ...] = ("balanced", "lotus")
    sample_hours: float = 1.0
    warmup_hours: float | None = None
    pledge: PledgePlanConfig = field(default_factory=PledgePlanConfig)
    #: Seconds per task at this sector size: every worker, then per worker.
    durations: dict[TaskType, float] = field(default_factory=dict)
    worker_durations: dict[str, dict[TaskType, float]] = field(default_factory=dict)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    sealing: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    source: str = "<config>"

    def worker(self, name: str) -> WorkerSpec:
        """The declared worker `name`; `SimulateConfigError` if there is none."""
        for spec in self.workers:
            if spec.name == name:
                return spec
        known = ", ".join(w.name for w in self.workers)
        raise SimulateConfigError(f"no worker named {name!r} in {self.source} (workers: {known})")


def load_simulate_config(path: Path) -> SimulateConfig:
    """Read and check a config file; `SimulateConfigError` (one line) if it cannot be used."""
    return parse_simulate_config(read_toml(path, SimulateConfigError), str(path), path.parent)


def parse_simulate_config(
    raw: dict[str, Any], where: str = "<config>", base: Path | None = None
) -> SimulateConfig:
    """A `SimulateConfig` from parsed TOML data (`SimulateConfigError` naming the key)."""
    try:
        return _convert(raw, where, base or Path("."))
    except (ConfigError, ValueError) as exc:
        if isinstance(exc, SimulateConfigError):
            raise
        raise SimulateConfigError(str(exc)) from None


def _convert(raw: dict[str, Any], where: str, base: Path) -> SimulateConfig:
    section = raw.get("simulate", {})
    if not isinstance(section, dict):
        raise SimulateConfigError(f"{where}: [simulate]: must be a table")
    table: _SimulateTable = validate(_SimulateTable, section, where, _NOUNS, ("simulate",))
    try:
        size = parse_sector_size(table.sector_size)
        seal_proof_for(size)
    except (TypeError, ValueError) as exc:
        raise SimulateConfigError(f"{where}: [simulate] sector_size: {exc}") from None
    if table.block_time is not None and table.chain != "devnet":
        raise SimulateConfigError(f"{where}: [simulate] block_time: only the devnet's can be set")
    sealing = raw.get("sealing", {})
    try:
        SealingConfig.from_dict(sealing)
    except ConfigError as exc:
        raise SimulateConfigError(f"{where}: {exc}") from None
    if "workers" not in raw:
        raise SimulateConfigError(f"{where}: no [[workers]]: a simulation needs the cluster")
    from ..sched.config import check_workers

    workers = read_workers(raw, where, base).workers
    try:
        check_workers(workers, size)
    except ConfigError as exc:
        raise SimulateConfigError(f"{where}: {exc}") from None
    names = {w.name for w in workers}
    unknown = sorted(set(table.worker_durations) - names)
    if unknown:
        raise SimulateConfigError(
            f"{where}: [simulate.worker_durations]: no worker named {', '.join(unknown)}"
        )
    for spec in workers:
        if spec.policy_file is not None:
            load_policy(spec.policy_file)  # a broken policy file: PolicyError, one line
    _check_ticket_window(table, size, workers, where)
    cfg = SimulateConfig(
        workers=workers,
        sector_size=size,
        chain=table.chain,
        block_time=table.block_time,
        assigners=tuple(dict.fromkeys(table.assigners)),
        sample_hours=table.sample_hours,
        warmup_hours=table.warmup_hours,
        pledge=_pledge(table.pledge, where),
        durations=dict(table.durations),
        worker_durations={w: dict(t) for w, t in table.worker_durations.items()},
        faults=FaultsConfig(**table.faults.model_dump()),
        sealing=dict(sealing),
        seed=table.seed,
        source=where,
    )
    return cfg


def _check_ticket_window(
    table: _SimulateTable, size: int, workers: list[WorkerSpec], where: str
) -> None:
    """Refuse durations whose PreCommit1 + PreCommit2 outlast the chain's sealing ticket."""
    from ..sealing.backends.sim import DURATIONS_32G
    from ..sealing.chain import ChainParams
    from ..sealing.options import chain_params

    chain = ChainParams.devnet(table.block_time) if table.block_time else table.chain
    params = chain_params(chain, sector_size=size, sealer="sim")
    window = params.ticket_window() * params.block_time
    for w in workers:
        seconds = 0.0
        for task in (TaskType.PRE_COMMIT1, TaskType.PRE_COMMIT2):
            default = DURATIONS_32G[task] * size / (32 << 30)
            own = table.worker_durations.get(w.name, {})
            seconds += own.get(task, table.durations.get(task, default))
        if seconds >= window:
            raise SimulateConfigError(
                f"{where}: [simulate] durations: PC1 + PC2 take {seconds / 3600:.1f} h on "
                f"{w.name}, but {params.name} sealing tickets expire after "
                f"{window / 3600:.1f} h: no sector could be precommitted"
            )


def _pledge(table: _PledgeTable, where: str) -> PledgePlanConfig:
    needs = {"rate": "per_day", "fill": "every_hours", "deals": "deals_per_day"}
    key = needs.get(table.mode)
    if key is not None and getattr(table, key) is None:
        raise SimulateConfigError(
            f"{where}: [simulate.pledge] {key}: required with mode = {table.mode!r}"
        )
    return PledgePlanConfig(
        mode=table.mode,
        per_day=table.per_day or 0.0,
        every_hours=table.every_hours or 0.0,
        deals_per_day=table.deals_per_day or 0.0,
    )


# -- what-ifs -------------------------------------------------------------------------------


def parse_what_if(text: str, cfg: SimulateConfig) -> WhatIf:
    """A `--what-if` checked against the config; `SimulateConfigError` (one line) if not."""
    words = text.split()
    if len(words) == 2 and words[0] == "add-worker":
        cfg.worker(words[1])
        return WhatIf("add-worker", words[1])
    if len(words) >= 3 and words[0] == "policy":
        spec = cfg.worker(words[1])
        settings: list[tuple[str, Any]] = []
        for word in words[2:]:
            key, eq, value = word.partition("=")
            if not eq or not key:
                raise SimulateConfigError(f"what-if {text!r}: expected Key=Value, got {word!r}")
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                raise SimulateConfigError(
                    f"what-if {text!r}: {key}: {value!r} is not a value (a number, true, "
                    "false or null)"
                ) from None
            settings.append((key, parsed))
        what = WhatIf("policy", words[1], tuple(settings))
        try:
            policy_for(what, spec)
        except ValueError as exc:
            raise SimulateConfigError(f"what-if {text!r}: {exc}") from None
        return what
    raise SimulateConfigError(
        f"what-if {text!r}: expected 'add-worker NAME' or 'policy NAME Key=Value ...'"
    )


def policy_for(what: WhatIf, spec: WorkerSpec) -> WorkerPolicy:
    """The worker's policy with the what-if's keys set (its file's, or no restrictions)."""
    current = load_policy(spec.policy_file) if spec.policy_file is not None else WorkerPolicy()
    data: dict[str, object] = dict(current.as_myscheduler())
    data.update(dict(what.settings))
    return parse_policy(data, source=f"what-if policy {spec.name}")


def added_worker(spec: WorkerSpec, taken: set[str]) -> WorkerSpec:
    """A copy of `spec` under a fresh name (`NAME-2`, ...), its storage paths renamed too."""
    n = 2
    while f"{spec.name}-{n}" in taken:
        n += 1
    name = f"{spec.name}-{n}"
    paths = tuple(replace(p, id=f"{p.id}-{n}", worker=name) for p in spec.paths)
    return dataclasses.replace(spec, name=name, paths=paths)
