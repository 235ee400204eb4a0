"""The `sectors run` config file (TOML), and the embedded defaults used without one.

```toml
[miner]
id = 1000
sector_size = "2KiB"
sealer = "reference"        # sim | reference | command | dask (needs [cluster])
chain = "devnet"            # devnet (simulated, fast) | mainnet (simulated, mainnet timings)
block_time = 0.2            # devnet only: seconds per epoch (default: 0.2, longer if the
                            # sim sealer's sector size needs it; see sealing/options.py)

[sealing]                   # Lotus [Sealing] knobs, snake_case (see sealing/config.py)
batch_pre_commits = true
[sealing.retry]
base = 60.0                 # seconds before the first retry
factor = 2.0
cap = 3600.0
budget = 16

[sealer]                    # backend options (the `command` backend's executables, ...)
timeout = 3600
[sealer.commands]
PC1 = ["/opt/sealer/pc1"]

[metrics]                   # off by default; `sectors run --metrics HOST:PORT` overrides
listen = "127.0.0.1:9283"   # serve Prometheus metrics at http://127.0.0.1:9283/metrics

[cluster]                   # optional: remote `sectors worker` machines over Dask
listen = "tls://0.0.0.0:8786"   # run a Dask scheduler inside the engine, or instead:
# scheduler = "tls://HOST:8786" # connect to one started with `dask scheduler`
certs = "certs"             # `sectors cluster certs` directory (relative to this file)
insecure = false            # allow plain tcp:// off loopback (anyone reaching it runs code)
local_worker = true         # keep the in-process worker as well (never with sealer dask)
worker_ttl = 60             # seconds without a heartbeat before Dask drops a worker
heartbeat_grace = 30        # seconds before the scheduler disables a silent worker (< worker_ttl)

[[workers]]                 # see sched/config.py; default: one local worker
name = "local"
cpus = 8
memory = "32GiB"
[[workers.paths]]
id = "nvme"
path = "nvme-dir"           # relative to this file; created if missing
capacity = "1TiB"
```

The file is validated by a pydantic schema (`_RunFile`, with `SealingConfig` and the worker
tables' own schemas); every mistake is a one-line `RunConfigError` naming the file and the
key, e.g. `sectors.toml: [sealing.retry] base: must be a finite number, got inf`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator
from pydantic_core import PydanticCustomError

from ..sched import parse_sector_size
from ..sealing.chain import BlockTime
from ..validation import TABLE, ConfigError, Count, Flag, PositiveSeconds, read_toml, validate

#: Seconds per epoch of the embedded devnet: a pledge reaches Proving in seconds.
DEFAULT_BLOCK_TIME = 0.2
DEFAULT_SEALER = "reference"


class RunConfigError(ValueError):
    """A config file that cannot be used as written."""


def _sector_size(value: str | int) -> str | int:
    from ..sealing.config import seal_proof_for

    seal_proof_for(parse_sector_size(value))
    return value


def _sealer(value: object) -> object:
    """A registered sealer name, refused as a choice among them (the registry is the list)."""
    from ..sealing.backends import sealers

    names = sealers()
    if value not in names:
        *most, last = (repr(n) for n in names)
        choices = f"{', '.join(most)} or {last}" if most else last
        raise PydanticCustomError(
            "literal_error", "Input should be {expected}", {"expected": choices}
        )
    return value


class _MinerTable(BaseModel):
    model_config = TABLE

    id: Count = 1000
    sector_size: Annotated[str | int, AfterValidator(_sector_size)] = "2KiB"
    sealer: Annotated[str, BeforeValidator(_sealer)] = DEFAULT_SEALER
    chain: Literal["devnet", "mainnet"] = "devnet"
    block_time: BlockTime | None = None


def _listen(value: str) -> str:
    """A `HOST:PORT` the metrics server can be asked to bind (checked again when it binds)."""
    from ..sealing.metrics import LISTEN_FORMAT, MetricsError, parse_listen

    try:
        parse_listen(value)
    except MetricsError:
        raise PydanticCustomError("listen", LISTEN_FORMAT) from None
    return value


class _MetricsTable(BaseModel):
    model_config = TABLE

    listen: Annotated[str, AfterValidator(_listen)] | None = None


class _ClusterTable(BaseModel):
    model_config = TABLE

    listen: str | None = None
    scheduler: str | None = None
    certs: str | None = None
    insecure: Flag = False
    local_worker: Flag | None = None
    worker_ttl: PositiveSeconds = 60.0
    heartbeat_grace: PositiveSeconds | None = None


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """`[cluster]`: where remote workers meet the engine, and how they are authenticated."""

    #: Run a Dask scheduler in the engine's process on this address...
    listen: str | None = None
    #: ...or connect to this external one (exactly one of the two is set).
    scheduler: str | None = None
    #: The `sectors cluster certs` directory; None: plain (loopback or `insecure`) only.
    certs: Path | None = None
    insecure: bool = False
    local_worker: bool = True
    worker_ttl: float = 60.0
    #: Seconds without a heartbeat before the scheduler disables a remote worker (its unstarted
    #: tasks go elsewhere); shorter than `worker_ttl`, after which Dask drops the worker.
    heartbeat_grace: float = 30.0
    #: The warning to print when `insecure` lets a plain address through.
    warning: str | None = None

    @property
    def address(self) -> str:
        """The scheduler address: the one to listen on, or the one to connect to."""
        return self.listen or self.scheduler or ""


class _RunFile(BaseModel):
    model_config = TABLE

    miner: _MinerTable = _MinerTable()
    metrics: _MetricsTable = _MetricsTable()
    cluster: _ClusterTable | None = None
    # Checked by their own schemas (SealingConfig, sched.config, the sealer backend).
    sealing: dict[str, Any] = {}
    sealer: dict[str, Any] = {}
    workers: list[Any] | None = None


_NOUNS = {
    "": "section",
    "miner": "[miner] key",
    "metrics": "[metrics] key",
    "cluster": "[cluster] key",
}


@dataclass(slots=True)
class RunConfig:
    """Everything `sectors run` needs to open the miner."""

    miner: int = 1000
    sector_size: str = "2KiB"
    sealer: str = DEFAULT_SEALER
    chain: str = "devnet"
    #: Devnet seconds per epoch; None: `DEFAULT_BLOCK_TIME`, or longer if the sector size
    #: needs it with the sim sealer.
    block_time: float | None = None
    sealing: dict[str, Any] = field(default_factory=dict)
    sealer_options: dict[str, Any] = field(default_factory=dict)
    workers: list[Any] | None = None
    #: `[metrics] listen`: where `sectors run` serves Prometheus metrics (None: nowhere).
    metrics_listen: str | None = None
    #: `[cluster]`: remote workers over Dask (None: everything runs in this process).
    cluster: ClusterConfig | None = None
    source: str = "embedded defaults"

    def open_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `Miner.open`."""
        from ..sealing.chain import ChainParams
        from ..sealing.options import devnet_for

        chain: str | ChainParams = self.chain
        if self.chain == "devnet" and self.block_time is not None:
            chain = ChainParams.devnet(self.block_time)
        elif self.chain == "devnet":
            size = parse_sector_size(self.sector_size)
            chain = devnet_for(size, self.sealer, block_time=DEFAULT_BLOCK_TIME)
        return {
            "sealer": self.sealer,
            "sector_size": self.sector_size,
            "chain": chain,
            "config": self.sealing or None,
            "workers": self.workers,
            "miner": self.miner,
            "sealer_options": (
                # The dask sealer's factory refuses to start without a cluster to run on.
                {**self.sealer_options, "cluster": self.cluster is not None}
                if self.sealer == "dask"
                else self.sealer_options
            ),
        }


def load_run_config(path: Path | None) -> RunConfig:
    """Read and validate a config file; None gives the embedded defaults."""
    if path is None:
        return RunConfig()
    where = str(path)
    raw = read_toml(path, RunConfigError)
    try:
        return _convert(raw, where, path.parent)
    except ConfigError as exc:
        raise RunConfigError(str(exc)) from None


def _convert(raw: dict[str, Any], where: str, base: Path) -> RunConfig:
    from ..sealing.config import SealingConfig

    parsed: _RunFile = validate(_RunFile, raw, where, _NOUNS)
    miner = parsed.miner
    if miner.block_time is not None and miner.chain != "devnet":
        raise ConfigError(f"{where}: [miner] block_time: only the devnet's can be chosen")
    try:
        SealingConfig.from_dict(parsed.sealing)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    cfg = RunConfig(
        miner=miner.id,
        sector_size=str(miner.sector_size),
        sealer=miner.sealer,
        chain=miner.chain,
        block_time=miner.block_time,
        sealing=parsed.sealing,
        sealer_options=parsed.sealer,
        metrics_listen=parsed.metrics.listen,
        cluster=(
            _cluster(parsed.cluster, where, base, miner.sealer)
            if parsed.cluster is not None
            else None
        ),
        source=where,
    )
    size = parse_sector_size(cfg.sector_size)
    if parsed.workers is not None:
        from ..sched.config import check_workers, read_workers

        declared = read_workers(raw, where, base)
        try:
            check_workers(declared.workers, size)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        cfg.workers = declared.workers
        if declared.directories:
            cfg.sealer_options = _with_directories(cfg.sealer_options, declared.directories, where)
    if cfg.chain == "devnet" and cfg.block_time is not None:
        from ..sealing.chain import ChainParams
        from ..sealing.options import timing_conflict

        conflict = timing_conflict(ChainParams.devnet(cfg.block_time), size, cfg.sealer)
        if conflict:
            raise ConfigError(f"{where}: [miner] block_time: {conflict.removeprefix('chain: ')}")
    return cfg


def _cluster(table: _ClusterTable, where: str, base: Path, sealer: str) -> ClusterConfig:
    """Check `[cluster]` (addresses, certificates) without importing Dask."""
    local = table.local_worker
    if sealer == "dask" and local:
        raise ConfigError(
            f"{where}: [cluster] local_worker: the dask sealer runs every task on a "
            "`sectors worker`, never in the engine's process (drop it or set it to false)"
        )
    if local is None:  # a kept local worker would take tasks the dask sealer must refuse
        local = sealer != "dask"
    from ..sealing.backends.dask.certs import ENGINE, CertError
    from ..sealing.backends.dask.security import AddressError, check_address, tls_files

    if (table.listen is None) == (table.scheduler is None):
        raise ConfigError(
            f"{where}: [cluster]: give exactly one of listen (run a scheduler here) "
            "or scheduler (connect to one)"
        )
    key = "listen" if table.listen is not None else "scheduler"
    address = table.listen or table.scheduler or ""
    try:
        warning = check_address(address, insecure=table.insecure)
    except AddressError as exc:
        raise ConfigError(f"{where}: [cluster] {key}: {exc}") from None
    certs = None
    if table.certs is not None:
        certs = (base / table.certs).expanduser()
        try:
            tls_files(certs, ENGINE)
        except CertError as exc:
            raise ConfigError(f"{where}: [cluster] certs: {exc}") from None
    elif address.lower().startswith(("tls://", "wss://")):
        raise ConfigError(
            f"{where}: [cluster] certs: {address} needs the cluster certificates "
            "(certs = DIR made by `sectors cluster certs`)"
        )
    grace = table.heartbeat_grace
    if grace is None:
        grace = min(30.0, table.worker_ttl / 2)
    elif grace >= table.worker_ttl:
        raise ConfigError(
            f"{where}: [cluster] heartbeat_grace: {grace:g} s must be shorter than worker_ttl "
            f"({table.worker_ttl:g} s), after which Dask drops a silent worker"
        )
    return ClusterConfig(
        listen=table.listen,
        scheduler=table.scheduler,
        certs=certs,
        insecure=table.insecure,
        local_worker=local,
        worker_ttl=table.worker_ttl,
        heartbeat_grace=grace,
        warning=warning,
    )


def _with_directories(
    options: dict[str, Any], directories: dict[str, Path], where: str
) -> dict[str, Any]:
    """`[sealer.storage]` plus each `[[workers.paths]]` directory (each given once)."""
    storage = options.get("storage", {})
    if not isinstance(storage, dict):
        raise ConfigError(f"{where}: [sealer.storage]: must map path ids to directories")
    given_twice = sorted(set(storage) & set(directories))
    if given_twice:
        raise ConfigError(
            f"{where}: storage path(s) {', '.join(given_twice)} have a directory both in "
            "[sealer.storage] and in [[workers.paths]]: keep one"
        )
    return {**options, "storage": {**storage, **{k: str(v) for k, v in directories.items()}}}
