"""`sectors simulate`: how many sectors a day this cluster seals, where the bottleneck is, and
what a change would buy, from the real engine on virtual time (`sectorfsm/simulate/`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import Command, fail


def simulate(
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            "-c",
            metavar="FILE",
            # (rich markup: a bracket that opens a table name is escaped)
            help="The `sectors run` TOML (\\[\\[workers]], \\[sealing]) with a \\[simulate] "
            "section.",
        ),
    ],
    days: Annotated[
        float, typer.Option("--days", min=0.01, max=3650, help="Simulated days per run.")
    ] = 30.0,
    seed: Annotated[
        int | None,
        typer.Option("--seed", min=0, help="Seed of every draw (default: \\[simulate] seed, 0)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Write DIR/summary.json and DIR/report.html (plots inlined) there.",
        ),
    ] = None,
    no_report: Annotated[
        bool,
        typer.Option("--no-report", help="With --out: write summary.json only, no HTML report."),
    ] = False,
    what_if: Annotated[
        list[str] | None,
        typer.Option(
            "--what-if",
            metavar="CHANGE",
            help="A variant run beside the baseline: 'add-worker NAME' or "
            "'policy NAME Key=Value ...' (repeat for more).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Simulate the cluster for some days per assigner and what-if; print and save the summary.

    Runs the real engine, scheduler, policy and simulated chain with the `sim` sealer on a
    virtual clock, in a temporary repo. The same seed gives the same summary.
    """
    from ..simulate import SimulateConfigError, load_simulate_config, parse_what_if, run_all
    from ..simulate import summary as make_summary

    try:
        cfg = load_simulate_config(config)
        what_ifs = [parse_what_if(text, cfg) for text in what_if or []]
    except (SimulateConfigError, ValueError) as exc:
        fail(str(exc))
    if out is not None and out.exists() and not out.is_dir():
        fail(f"--out {out}: exists and is not a directory")
    run_seed = cfg.seed if seed is None else seed
    started = time.perf_counter()
    try:
        results = _run(cfg, what_ifs, days, run_seed, run_all)
    except (SimulateConfigError, ValueError) as exc:
        fail(str(exc))
    summary = make_summary(cfg, days, run_seed, [w.label for w in what_ifs], results)
    wall = time.perf_counter() - started
    _print(summary)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        target = out / "summary.json"
        target.write_text(json.dumps(summary, indent=1, sort_keys=False) + "\n")
        typer.echo(f"summary written to {target}")
        if not no_report:
            _report(summary, out)
    typer.echo(f"{len(results)} run(s) of {days:g} simulated days in {wall:.1f} s of wall time")


def _report(summary: dict[str, Any], out: Path) -> None:
    from ..simulate.report import ReportError, ReportUnavailable, write_report

    try:
        typer.echo(f"report written to {write_report(summary, out)}")
    except ReportUnavailable as exc:
        # The JSON is already written: a missing optional dependency is a hint, not a failure.
        typer.echo(str(exc), err=True)
    except ReportError as exc:
        fail(str(exc))


def _run(cfg: Any, what_ifs: list[Any], days: float, seed: int, run_all: Any) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .common import err_console

    runs = (1 + len(what_ifs)) * len(cfg.assigners)
    total = days * 86400 * runs
    done_before: dict[str, float] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err_console(),
        transient=True,
    ) as bar:
        task = bar.add_task("simulating", total=total)

        def progress(label: str, t: float) -> None:
            if label not in done_before:
                done_before[label] = len(done_before) * days * 86400
            bar.update(task, completed=done_before[label] + t, description=label)

        return run_all(cfg, what_ifs, days, seed, progress)


def _print(summary: dict[str, Any]) -> None:
    from rich.table import Table

    from .common import out_console

    table = Table(title=f"sectors simulate: {summary['config']['days']:g} days")
    for name in ("variant", "assigner", "steady/day", "bound/day", "ratio", "proving", "limits"):
        table.add_column(name, justify="left" if name in ("variant", "assigner") else "right")
    for r in summary["runs"]:
        s, b = r["sectors"], r["bound"]
        table.add_row(
            r["variant"],
            r["assigner"],
            "-" if s["steady_per_day"] is None else f"{s['steady_per_day']:.1f}",
            f"{b['per_day']:.1f}",
            "-" if b["ratio"] is None else f"{b['ratio']:.3f}",
            str(s["proving_total"]),
            ", ".join(b["limiting"]),
        )
    out = out_console()
    out.print(table)
    for r in summary["runs"]:
        out.print(f"{r['variant']} / {r['assigner']}: {r['bottleneck']['text']}", markup=False)
    for c in summary["comparison"]:
        delta = c["delta_per_day"]
        shown = "-" if delta is None else f"{delta:+.1f}"
        out.print(
            f"{c['variant']} / {c['assigner']}: {shown} sectors/day against the baseline "
            f"(bound {c['baseline_bound_per_day']:.1f} -> {c['bound_per_day']:.1f})",
            markup=False,
        )


def register(root: typer.Typer) -> None:
    """Add `sectors simulate` to `root`."""
    root.command("simulate", cls=Command)(simulate)
