"""The sector lifecycle on the `fsm` engine: Lotus v1.11.3's state graph, handlers and chain.

Quick tour::

    async with Miner.open("repo", sealer="sim", clock="virtual") as miner:
        n = await miner.pledge()
        info = await miner.wait(n, "Proving")
        print(info.state, info.comm_r, [e.kind for e in info.log])

`graph.py` is the whole lifecycle (the transition table, its documented differences from
Lotus, the state -> handler map and every state set), `planner.py` folds events into
`SectorInfo` and returns the handler to run, `input.py` is sector input (open deal sectors,
piece assignment, sector numbers, the sealing limit), `handlers/` holds one module per phase,
`devnet.py` is the *simulated* chain and `backends/` the sealer backends, by name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .chain import ChainParams, ExitCode
    from .config import RetryPolicy, SealingConfig
    from .devnet import DevnetChain
    from .errors import NotFailedError, SealingError, SectorStuckError, UnknownSectorError
    from .graph import DEVIATIONS
    from .info import DealInfo, LogEntry, Piece, SectorInfo
    from .miner import Miner
    from .notify import Gap, StateChange, Subscription
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
    "NotFailedError": "errors",
    "SealingError": "errors",
    "SectorStuckError": "errors",
    "UnknownSectorError": "errors",
    "SectorState": "states",
    "Gap": "notify",
    "StateChange": "notify",
    "Subscription": "notify",
}

__all__ = [
    "DEVIATIONS",
    "ChainParams",
    "DealInfo",
    "DevnetChain",
    "ExitCode",
    "Gap",
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
    "StateChange",
    "Subscription",
    "UnknownSectorError",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'sectorfsm.sealing' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{home}", __name__), name)
