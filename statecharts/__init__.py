"""Diagrams of the sector state graph: Mermaid, Graphviz (DOT, SVG, PNG), SCXML, PlantUML, JSON.

`render(format, highlight=...)` draws the graph of `sectorfsm.sealing.graph`;
`path_from_log(log)` rebuilds the path a sector took, to highlight it. The rendered diagrams
are committed beside this file (`lifecycle.*`); `python -m sectorfsm.statecharts` rewrites
them and `--check` tells whether they are stale.
"""

from .export import (
    COMMITTED,
    FORMATS,
    GraphvizError,
    GraphvizMissing,
    render,
    render_text,
    stale_diagrams,
    write_diagrams,
)
from .model import Triple
from .path import LogEntryLike, path_from_log

__all__ = [
    "COMMITTED",
    "FORMATS",
    "GraphvizError",
    "GraphvizMissing",
    "LogEntryLike",
    "Triple",
    "path_from_log",
    "render",
    "render_text",
    "stale_diagrams",
    "write_diagrams",
]
