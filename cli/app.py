"""The `sectors` typer app (entry point of the console script and `python -m sectorfsm`)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

from .. import __version__
from . import cluster, quarantine, run, sectors, simulate, statechart, views, worker
from .common import REPO_ENV, Command, Group

app = typer.Typer(
    name="sectors",
    help="Run and inspect Filecoin sector lifecycles (sectorfsm).",
    no_args_is_help=True,
    add_completion=False,
    cls=Group,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sectorfsm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    repo: Annotated[
        Path | None,
        typer.Option(
            "--repo",
            help=f"The repo for the command (as `lotus-miner --repo`); overrides {REPO_ENV}, "
            "a command's own --repo overrides it.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run and inspect Filecoin sector lifecycles (sectorfsm)."""
    if repo is None:
        return
    # Every command reads its --repo with SECTORFSM_REPO as the fallback, so setting the
    # variable for the command gives the precedence lotus-miner has (the command's own flag,
    # then this one, then the environment) to all of them, wherever they are declared.
    before = os.environ.get(REPO_ENV)
    os.environ[REPO_ENV] = str(repo)

    def restore() -> None:
        if before is None:
            os.environ.pop(REPO_ENV, None)
        else:
            os.environ[REPO_ENV] = before

    ctx.call_on_close(restore)


@app.command(cls=Command)
def demo(
    machines: Annotated[
        int,
        typer.Option("--machines", "-n", min=1, max=1_000_000, help="How many demo sectors."),
    ] = 1000,
    repo: Annotated[
        Path | None,
        typer.Option(help="Keep the store here (re-run to resume); default: a temp dir."),
    ] = None,
    fail_rate: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Chance that a simulated PC2 step fails and retries."),
    ] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed of the simulated failures.")] = 1,
) -> None:
    """Drive toy sealing-shaped machines to Proving on the persisted FSM engine (virtual time).

    The engine alone, with toy stages: `sectors run` runs the real sealing pipeline.
    """
    from rich.console import Console
    from rich.table import Table

    from ..fsm import FsmError
    from .demo import ORDER, run_demo

    console = Console()
    try:
        summary = asyncio.run(run_demo(repo, machines, fail_rate, seed))
    except FsmError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    table = Table(title="engine demo (virtual clock)")
    table.add_column("state")
    table.add_column("machines", justify="right")
    for state in ORDER:
        if state in summary["states"]:
            table.add_row(state, str(summary["states"][state]))
    console.print(table)
    console.print(
        f"{summary['simulated_hours']:.1f} simulated hours in {summary['wall_seconds']:.2f}s "
        f"of wall time; {summary['retries']} step failures retried; "
        f"{summary['commits']} durable commits."
    )
    if set(summary["states"]) != {"Proving"}:
        console.print("[red]not every machine reached Proving[/red]")
        raise typer.Exit(1)


run.register(app)
sectors.register(app)
quarantine.register(app)
views.register(app)
statechart.register(app)
cluster.register(app)
worker.register(app)
simulate.register(app)
for _info in app.registered_commands:
    if _info.cls is None or _info.cls is TyperCommand:
        _info.cls = Command


def main() -> None:
    """Console-script entry point."""
    app()
