"""The `sectors` typer app (entry point of the console script and `python -m sectorfsm`)."""

from __future__ import annotations

import typer

from .. import __version__

app = typer.Typer(
    name="sectors",
    help="Run and inspect Filecoin sector lifecycles (sectorfsm).",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sectorfsm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Run and inspect Filecoin sector lifecycles (sectorfsm)."""


def main() -> None:
    """Console-script entry point."""
    app()
