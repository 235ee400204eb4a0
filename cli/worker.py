"""`sectors worker`: run this machine as a remote sealing worker of an engine's Dask cluster."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from .common import Command, fail


def worker(
    scheduler: Annotated[
        str | None,
        typer.Option(
            "--scheduler", metavar="ADDR", help="The Dask scheduler, e.g. tls://HOST:8786."
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="This worker's name (its certificate's name).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", metavar="FILE", help="worker.toml: resources, paths, policy."),
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option("--tasks", metavar="AP,PC1", help="Task types to accept (replaces tasks)."),
    ] = None,
    path: Annotated[
        list[str] | None,
        typer.Option(
            "--path",
            metavar="[ID=]DIR",
            help="A sealing storage path (repeat; replaces the file's paths).",
        ),
    ] = None,
    certs: Annotated[
        Path | None,
        typer.Option(
            "--certs", metavar="DIR", help="Cluster certificates (from sectors cluster certs)."
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option("--host", help="The address this worker listens on.")
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="Allow plain tcp:// off loopback (anyone can run code)."),
    ] = False,
) -> None:
    """Join a sectors cluster as a sealing worker and stay up: reconnect when the scheduler goes.

    Running jobs keep running while the scheduler is away; SIGTERM or SIGINT stops the worker
    and kills its jobs.
    """
    from ..sealing.backends.dask.worker import WorkerSetupError, load_config, run_worker

    task_list = None if tasks is None else [t.strip() for t in tasks.split(",") if t.strip()]
    try:
        cfg = load_config(
            config,
            scheduler=scheduler,
            name=name,
            tasks=task_list,
            paths=path,
            certs=certs,
            host=host,
            insecure=insecure,
        )
    except WorkerSetupError as exc:
        fail(str(exc), code=2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_worker(cfg)


def register(root: typer.Typer) -> None:
    """Add `sectors worker` to `root`."""
    root.command("worker", cls=Command)(worker)
