"""`sectors cluster`: what an operator prepares before the engine reaches other machines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import Command, Group, fail

app = typer.Typer(
    name="cluster",
    help="Prepare a cluster of worker machines: certificates for mutual TLS.",
    no_args_is_help=True,
    cls=Group,
)


@app.command("certs", cls=Command)
def certs(
    directory: Annotated[
        Path, typer.Argument(metavar="DIR", help="Where ca.pem, ca.key, NAME.pem, NAME.key go.")
    ],
    worker: Annotated[
        list[str] | None,
        typer.Option(
            "--worker",
            metavar="NAME",
            help="A worker machine to certify (repeat the option for each).",
            show_default=False,
        ),
    ] = None,
    engine: Annotated[
        str, typer.Option("--engine", metavar="NAME", help="The engine's certificate name.")
    ] = "engine",
    days: Annotated[int, typer.Option("--days", help="Days the new certificates are valid.")] = 365,
) -> None:
    """Create the cluster CA (once) and a key and certificate for each new machine in DIR.

    Re-running adds new names under the same CA and never overwrites an existing file.

    Any holder of a certificate from this CA can run code on every worker: keep ca.key safe.
    """
    from ..sealing.backends.dask.certs import CertError, make_certs

    try:
        report = make_certs(directory, worker or [], engine=engine, days=days)
    except CertError as e:
        fail(str(e))
    for line in report.lines():
        typer.echo(line)


def register(root: typer.Typer) -> None:
    """Add `sectors cluster` to `root`."""
    root.add_typer(app)
