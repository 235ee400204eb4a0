"""sectorfsm: the full lifecycle of Filecoin storage sectors on a persisted state-machine engine.

`sectorfsm.fsm` is the embeddable engine. The sealing lifecycle, the scheduler and the
`sectors` CLI build on it.
"""

import logging

__version__ = "0.1.0"

# A library never prints on its own: hosts decide where sectorfsm's log records go.
logging.getLogger("sectorfsm").addHandler(logging.NullHandler())

__all__ = ["__version__"]
