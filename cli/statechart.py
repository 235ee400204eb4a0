"""`sectors statechart`: the sector state graph as a diagram, optionally with a sector's path.

Everything heavy (the graph, the renderers, the store) is imported inside the command, so
`sectors --help` does not pay for it.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .common import DEFAULT_REPO, MAX_SECTOR

if TYPE_CHECKING:
    from ..statecharts import LogEntryLike


class ChartFormat(enum.StrEnum):
    """The `--format` choices (the same as `sectorfsm.statecharts.FORMATS`)."""

    mermaid = "mermaid"
    dot = "dot"
    svg = "svg"
    png = "png"
    scxml = "scxml"
    plantuml = "plantuml"
    json = "json"


def load_sector_log(repo: Path, number: int) -> Sequence[LogEntryLike] | None:
    """Sector `number`'s log read from the store at `repo` without an engine (None: no sector)."""
    from ..sealing.store_view import read_sector

    info = read_sector(repo, number)
    return None if info is None else info.log


def _fail(message: str) -> typer.Exit:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(1)


def statechart(
    fmt: Annotated[
        ChartFormat, typer.Option("--format", "-f", help="Diagram format.")
    ] = ChartFormat.mermaid,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the diagram here instead of to stdout."),
    ] = None,
    sector: Annotated[
        int | None,
        typer.Option(
            min=0, max=MAX_SECTOR, help="Highlight the path this sector took (read from its log)."
        ),
    ] = None,
    repo: Annotated[
        Path,
        typer.Option(envvar="SECTORFSM_REPO", help="The sectorfsm store (for --sector)."),
    ] = DEFAULT_REPO,
) -> None:
    """Export the sector state graph as mermaid, dot, svg, png, scxml, plantuml or json.

    svg and png run Graphviz's `dot`; without it the whole-graph svg is the copy shipped with
    the package, and png or a `--sector` highlight in svg say how to install Graphviz.
    """
    from ..statecharts import GraphvizError, path_from_log, render

    highlight = None
    if sector is not None:
        repo = repo.expanduser()
        log = load_sector_log(repo, sector)
        if log is None:
            raise _fail(f"sector {sector} not found in {repo}")
        highlight = path_from_log(log)
    if fmt is ChartFormat.png and output is None and sys.stdout.isatty():
        raise _fail("png is binary: pass --output FILE (or redirect stdout)")
    try:
        diagram = render(fmt.value, highlight=highlight)
    except GraphvizError as exc:
        raise _fail(str(exc)) from None
    if output is not None:
        try:
            if isinstance(diagram, bytes):
                output.write_bytes(diagram)
            else:
                output.write_text(diagram, encoding="utf-8")
        except OSError as exc:
            raise _fail(f"cannot write {output}: {exc.strerror or exc}") from None
        typer.echo(f"wrote {fmt.value} statechart to {output}", err=True)
    elif isinstance(diagram, bytes):
        sys.stdout.buffer.write(diagram)
        sys.stdout.buffer.flush()
    else:
        typer.echo(diagram, nl=False)


def register(app: typer.Typer) -> None:
    """Add the `statechart` command to `app`."""
    app.command("statechart")(statechart)
