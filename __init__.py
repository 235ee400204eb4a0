"""sectorfsm: the full lifecycle of Filecoin storage sectors on a persisted state-machine engine.

`sectorfsm.fsm` is the embeddable engine. The sealing lifecycle, the scheduler and the
`sectors` CLI build on it.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
