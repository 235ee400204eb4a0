"""sectorfsm: the full lifecycle of Filecoin storage sectors on a persisted state-machine engine.

`sectorfsm.Miner` runs sectors from pledge or deal pieces to Proving (see `sectorfsm.sealing`).
`sectorfsm.fsm` is the embeddable engine and `sectorfsm.sched` the window scheduler; the
`sectors` CLI builds on all three.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# A library never prints on its own: hosts decide where sectorfsm's log records go.
logging.getLogger("sectorfsm").addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from .sealing import Miner, SectorInfo, SectorState

__all__ = ["Miner", "SectorInfo", "SectorState", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `sectors status` and `import sectorfsm.fsm` do not pay for the sealing stack.
    if name in ("Miner", "SectorInfo", "SectorState"):
        from . import sealing

        return getattr(sealing, name)
    raise AttributeError(f"module 'sectorfsm' has no attribute {name!r}")
