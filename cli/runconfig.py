"""The `sectors run` config file (TOML), and the embedded defaults used without one.

```toml
[miner]
id = 1000
sector_size = "2KiB"
sealer = "reference"        # sim | reference | command
chain = "devnet"            # devnet (simulated, fast) | mainnet (simulated, mainnet timings)
block_time = 0.2            # devnet only: seconds per epoch

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

[[workers]]                 # see sched/config.py; default: one local worker
name = "local"
```

Every mistake is a `RunConfigError` naming the file and the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Seconds per epoch of the embedded devnet: a pledge reaches Proving in seconds.
DEFAULT_BLOCK_TIME = 0.2
DEFAULT_SEALER = "reference"
_MINER_KEYS = {"id", "sector_size", "sealer", "chain", "block_time"}
_TOP_KEYS = {"miner", "sealing", "sealer", "workers"}


class RunConfigError(ValueError):
    """A config file that cannot be used as written."""


@dataclass(slots=True)
class RunConfig:
    """Everything `sectors run` needs to open the miner."""

    miner: int = 1000
    sector_size: str = "2KiB"
    sealer: str = DEFAULT_SEALER
    chain: str = "devnet"
    block_time: float = DEFAULT_BLOCK_TIME
    sealing: dict[str, Any] = field(default_factory=dict)
    sealer_options: dict[str, Any] = field(default_factory=dict)
    workers: list[Any] | None = None
    source: str = "embedded defaults"

    def open_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `Miner.open`."""
        from ..sealing.chain import ChainParams

        chain = ChainParams.devnet(self.block_time) if self.chain == "devnet" else self.chain
        return {
            "sealer": self.sealer,
            "sector_size": self.sector_size,
            "chain": chain,
            "config": self.sealing or None,
            "workers": self.workers,
            "miner": self.miner,
            "sealer_options": self.sealer_options,
        }


def load_run_config(path: Path | None) -> RunConfig:
    """Read and validate a config file; None gives the embedded defaults."""
    if path is None:
        return RunConfig()
    where = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunConfigError(f"config file {where} does not exist") from None
    except OSError as exc:
        raise RunConfigError(f"cannot read config file {where}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RunConfigError(f"{where} is not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise RunConfigError(f"{where}: unknown section(s) {', '.join(unknown)}")
    cfg = RunConfig(source=where)
    miner = _table(raw, "miner", where)
    bad = sorted(set(miner) - _MINER_KEYS)
    if bad:
        raise RunConfigError(f"{where}: unknown [miner] key(s) {', '.join(bad)}")
    cfg.miner = _int(miner.get("id", cfg.miner), "miner.id", where)
    cfg.sector_size = str(miner.get("sector_size", cfg.sector_size))
    cfg.sealer = str(miner.get("sealer", cfg.sealer))
    cfg.chain = str(miner.get("chain", cfg.chain))
    if cfg.chain not in ("devnet", "mainnet"):
        raise RunConfigError(f"{where}: miner.chain must be devnet or mainnet, not {cfg.chain!r}")
    block_time = miner.get("block_time", cfg.block_time)
    if not isinstance(block_time, int | float) or block_time <= 0:
        raise RunConfigError(f"{where}: miner.block_time must be a positive number of seconds")
    cfg.block_time = float(block_time)
    try:
        from ..sched import parse_sector_size

        parse_sector_size(cfg.sector_size)
    except ValueError as exc:
        raise RunConfigError(f"{where}: miner.sector_size: {exc}") from None
    cfg.sealing = _table(raw, "sealing", where)
    try:
        from ..sealing.config import SealingConfig

        SealingConfig.from_dict(cfg.sealing)
    except (TypeError, ValueError) as exc:
        raise RunConfigError(f"{where}: [sealing]: {exc}") from None
    cfg.sealer_options = _table(raw, "sealer", where)
    if "workers" in raw:
        from ..sched.config import WorkerConfigError, parse_workers

        try:
            cfg.workers = parse_workers(raw, where, path.parent)
        except WorkerConfigError as exc:
            raise RunConfigError(str(exc)) from None
    return cfg


def _table(raw: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise RunConfigError(f"{where}: [{name}] must be a table")
    return value


def _int(value: object, key: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RunConfigError(f"{where}: {key} must be a non-negative integer")
    return value
