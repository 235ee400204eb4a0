"""`render(format)`: the sector state graph as a diagram, and the committed diagram files.

Formats: `mermaid`, `dot`, `svg`, `png` (the last two run Graphviz's `dot`; without it the
whole-graph svg is the committed `lifecycle.svg`), `scxml`, `plantuml` and `json` (its schema is
in `docs/architecture.md`). `highlight` marks a sector's path, as `path_from_log` rebuilds
it: bold, coloured arrows with their step numbers, visited states.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, overload

from ..sealing import graph
from ..sealing.states import SectorState, group_of
from .model import Chart, Triple, build
from .scxml import to_scxml
from .text import to_dot, to_mermaid, to_plantuml

#: Every format `render` knows, in the order the CLI lists them.
FORMATS: tuple[str, ...] = ("mermaid", "dot", "svg", "png", "scxml", "plantuml", "json")
#: Formats whose rendering needs the Graphviz `dot` binary.
GRAPHVIZ_FORMATS = frozenset({"svg", "png"})

#: The committed diagrams (under this package's directory), by format.
COMMITTED: dict[str, str] = {
    "mermaid": "lifecycle.mmd",
    "dot": "lifecycle.dot",
    "json": "lifecycle.json",
    "scxml": "lifecycle.scxml",
    "plantuml": "lifecycle.puml",
    "svg": "lifecycle.svg",
}
#: Where the committed diagrams live.
HERE = Path(__file__).resolve().parent

#: The SVG carries the digest of the DOT it was rendered from, so whether a committed SVG is
#: up to date can be checked without Graphviz (whose output varies with version and fonts).
_SVG_MARK = "sectorfsm-dot-sha256"
_SVG_MARK_RE = re.compile(rf"<!-- {_SVG_MARK}: ([0-9a-f]{{64}}) -->")

_INSTALL_HINT = (
    "Graphviz's `dot` is not installed (needed for png and for a highlighted svg; the "
    "whole-graph svg is served from the committed copy). Install it with "
    "`apt-get install graphviz` (Debian/Ubuntu) or `brew install graphviz` (macOS); "
    "other systems: https://graphviz.org/download/ . The mermaid, dot, scxml, plantuml "
    "and json formats need nothing."
)


class GraphvizError(RuntimeError):
    """Graphviz's `dot` failed to render."""


class GraphvizMissing(GraphvizError):
    """Graphviz's `dot` binary is not on PATH; the message says how to install it."""

    def __init__(self) -> None:
        super().__init__(_INSTALL_HINT)


def to_json(chart: Chart) -> str:
    """The json schema: `{"states": [{name, group, final}], "transitions": [...]}`.

    With a highlight, a `path` list of `{source, event, dest}` is added (the schema is
    otherwise unchanged).
    """
    doc: dict[str, Any] = {
        "states": [
            {
                "name": s.name,
                "group": group_of(s),
                "final": s in graph.FINAL_PLANNER_STATES,
            }
            for s in SectorState
        ],
        "transitions": [
            {"source": source, "event": event, "dest": dest}
            for source, event, dest in graph.export_transitions()
        ],
    }
    if chart.highlighted:
        doc["path"] = [{"source": s, "event": e, "dest": d} for s, e, d in chart.path]
    return json.dumps(doc, indent=2) + "\n"


def run_graphviz(source: str, fmt: str) -> bytes:
    """Render DOT `source` with `dot -T<fmt>`; `GraphvizMissing` if `dot` is not installed."""
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizMissing()
    proc = subprocess.run(
        [exe, f"-T{fmt}"], input=source.encode(), capture_output=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise GraphvizError(f"dot -T{fmt} failed (exit {proc.returncode}): {err}")
    return proc.stdout


def dot_digest(dot_source: str) -> str:
    """The digest an SVG rendered from `dot_source` carries."""
    return hashlib.sha256(dot_source.encode()).hexdigest()


def svg_source_digest(svg: str) -> str | None:
    """The digest of the DOT an SVG was rendered from (None: not rendered by `render`)."""
    match = _SVG_MARK_RE.search(svg)
    return match.group(1) if match else None


def committed_svg(dot_source: str) -> str | None:
    """The committed whole-graph SVG if it was rendered from `dot_source` (None: stale/absent)."""
    try:
        svg = (HERE / COMMITTED["svg"]).read_text(encoding="utf-8")
    except OSError:
        return None
    return svg if svg_source_digest(svg) == dot_digest(dot_source) else None


def _svg(dot_source: str, *, highlighted: bool) -> str:
    # Without Graphviz the whole graph still renders: the shipped copy is the same drawing
    # (its DOT digest proves it). Only a highlighted path truly needs `dot`.
    if not highlighted and shutil.which("dot") is None:
        shipped = committed_svg(dot_source)
        if shipped is not None:
            return shipped
    svg = run_graphviz(dot_source, "svg").decode()
    mark = f"<!-- {_SVG_MARK}: {dot_digest(dot_source)} -->\n"
    head, sep, rest = svg.partition("\n")  # after the XML declaration, which must stay first
    return head + sep + mark + rest if head.startswith("<?xml") else mark + svg


@overload
def render(format: Literal["png"], *, highlight: Sequence[Triple] | None = None) -> bytes: ...
@overload
def render(format: str, *, highlight: Sequence[Triple] | None = None) -> str | bytes: ...
def render(format: str, *, highlight: Sequence[Triple] | None = None) -> str | bytes:
    """The graph in `format` (bytes for png, text otherwise), with `highlight` marked."""
    if format not in FORMATS:
        choices = ", ".join(FORMATS)
        raise ValueError(f"unknown statechart format {format!r}; choose one of {choices}")
    chart = build(highlight)
    if format == "json":
        return to_json(chart)
    if format == "mermaid":
        return to_mermaid(chart)
    if format == "scxml":
        return to_scxml(chart)
    if format == "plantuml":
        return to_plantuml(chart)
    dot_source = to_dot(chart)
    if format == "svg":
        return _svg(dot_source, highlighted=chart.highlighted)
    if format == "png":
        return run_graphviz(dot_source, "png")
    return dot_source


def render_text(format: str, *, highlight: Sequence[Triple] | None = None) -> str:
    """`render` for the text formats (everything but png)."""
    out = render(format, highlight=highlight)
    if not isinstance(out, str):
        raise ValueError(f"{format} is a binary format")
    return out


def stale_diagrams(directory: Path = HERE) -> list[str]:
    """Committed diagram files that differ from the graph (svg: by the DOT digest it carries)."""
    stale = []
    dot_source = render_text("dot")
    for fmt, name in COMMITTED.items():
        path = directory / name
        if not path.exists():
            stale.append(name)
        elif fmt == "svg":
            if svg_source_digest(path.read_text()) != dot_digest(dot_source):
                stale.append(name)
        elif path.read_text() != render_text(fmt):
            stale.append(name)
    return stale


def write_diagrams(directory: Path = HERE) -> list[Path]:
    """Write the committed diagrams into `directory`; svg only if Graphviz is installed."""
    written = []
    for fmt, name in COMMITTED.items():
        if fmt in GRAPHVIZ_FORMATS and shutil.which("dot") is None:
            continue
        path = directory / name
        path.write_bytes(render_text(fmt).encode())
        written.append(path)
    return written
