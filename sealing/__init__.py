"""The sector lifecycle on the `fsm` engine: Lotus v1.11.3's state graph, handlers and chain.

Quick tour::

    async with Miner.open("repo", sealer="sim", clock="virtual") as miner:
        n = await miner.pledge()
        info = await miner.wait(n, "Proving")
        print(info.state, info.comm_r, [e.kind for e in info.log])

`graph.py` is the whole transition table (and its documented differences from Lotus),
`planner.py` folds events into `SectorInfo`, `handlers/` holds one module per phase,
`devnet.py` is the *simulated* chain and `sim.py` the simulated sealer backend.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .chain import ChainParams, ExitCode
    from .config import RetryPolicy, SealingConfig
    from .devnet import DevnetChain
    from .graph import DEVIATIONS
    from .info import DealInfo, LogEntry, Piece, SectorInfo
    from .miner import (
        Miner,
        NotFailedError,
        SealingError,
        SectorStuckError,
        UnknownSectorError,
    )
    from .states import SectorState

#: Where each public name lives; imported on first use, so the CLI's read-only commands
#: (which import `sealing.store_view`) do not pay for the engine, scheduler and chain.
_HOME = {
    "ChainParams": "chain",
    "ExitCode": "chain",
    "RetryPolicy": "config",
    "SealingConfig": "config",
    "DevnetChain": "devnet",
    "DEVIATIONS": "graph",
    "DealInfo": "info",
    "LogEntry": "info",
    "Piece": "info",
    "SectorInfo": "info",
    "Miner": "miner",
    "NotFailedError": "miner",
    "SealingError": "miner",
    "SectorStuckError": "miner",
    "UnknownSectorError": "miner",
    "SectorState": "states",
}

__all__ = [
    "DEVIATIONS",
    "ChainParams",
    "DealInfo",
    "DevnetChain",
    "ExitCode",
    "LogEntry",
    "Miner",
    "NotFailedError",
    "Piece",
    "RetryPolicy",
    "SealingConfig",
    "SealingError",
    "SectorInfo",
    "SectorState",
    "SectorStuckError",
    "UnknownSectorError",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'sectorfsm.sealing' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{home}", __name__), name)
