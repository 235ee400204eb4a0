"""The `sectors simulate` report's plots, drawn with matplotlib into SVG text (or a file).

Imported only by `report.py` once matplotlib is known to be there. Figures are built with
`matplotlib.figure.Figure`, never pyplot, so no GUI backend or global figure state is involved.
Plots of one run's internals (utilisation, waits, fetches, disk, failures) compare the baseline
of each assigner; the what-ifs are compared in the Proving plot and the report's table.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .report import Summary

__all__ = ["figures", "proving_figure", "save"]

#: Most workers or paths drawn in one figure (the busiest or fullest first).
MAX_PANELS = 12
#: Most points per line: a month of hourly samples is averaged (busy) or maxed (disk) in
#: blocks, so the lines stay readable and the page small.
MAX_POINTS = 180
_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
_STYLES = ["-", "--", ":", "-."]
#: Text stays text in the SVG (searchable, smaller); ids salted per figure so that several
#: figures inlined in one page never share an id.
_RC: dict[Any, Any] = {"svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10}


def _colour(assigners: list[str], name: str) -> str:
    i = assigners.index(name) if name in assigners else len(assigners)
    return _COLOURS[i % len(_COLOURS)]


def _assigners(s: Summary) -> list[str]:
    seen: list[str] = []
    for r in s.runs:
        if r.assigner not in seen:
            seen.append(r.assigner)
    return seen


def _bytes(n: float) -> tuple[float, str]:
    for unit, scale in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return scale, unit
    return 1, "B"


def _coarse(series: Sequence[float], hours: float, mean: bool) -> tuple[list[float], list[float]]:
    """(days, values) with at most `MAX_POINTS` points: means of busy time, peaks of disk use."""
    step = max(1, -(-len(series) // MAX_POINTS))
    chunks = [series[i : i + step] for i in range(0, len(series), step)]
    values = [sum(c) / len(c) if mean else max(c) for c in chunks]
    return [i * step * hours / 24 for i in range(len(chunks))], values


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def proving_figure(s: Summary) -> Figure:
    """Sectors reaching Proving per day, one line per run, against each variant's bound."""
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(9, 4.5), layout="constrained")
        ax = fig.add_subplot()
        assigners = _assigners(s)
        variants: list[str] = []
        for r in s.runs:
            if r.variant not in variants:
                variants.append(r.variant)
        for r in s.runs:
            style = _STYLES[variants.index(r.variant) % len(_STYLES)]
            days = [i + 0.5 for i in range(len(r.sectors.proving_per_day))]
            ratio = "-" if r.bound.ratio is None else f"{r.bound.ratio:.2f}"
            steady = r.sectors.steady_per_day
            ax.plot(
                days,
                r.sectors.proving_per_day,
                style,
                marker="o",
                markersize=3,
                color=_colour(assigners, r.assigner),
                label=f"{r.label}: steady {'-' if steady is None else f'{steady:.1f}'}/day, "
                f"ratio {ratio}",
            )
        # Each assigner has its bound (Lotus fetches beside the work, simulate/bound.py):
        # one line per distinct bound of a variant, named by its assigners when they differ.
        bounds: dict[tuple[str, float], list[str]] = {}
        for r in s.runs:
            bounds.setdefault((r.variant, round(r.bound.per_day, 1)), []).append(r.assigner)
        for (variant, per_day), names in bounds.items():
            style = _STYLES[variants.index(variant) % len(_STYLES)]
            alone = sum(1 for v, _ in bounds if v == variant) == 1
            whose = "" if alone else f", {'/'.join(names)}"
            ax.axhline(
                per_day, color="black" if alone else _colour(assigners, names[0]),
                linestyle=style, linewidth=1, label=f"bound ({variant}): {per_day:.1f}/day{whose}",
            )  # fmt: skip
        warmup = max(r.warmup_hours for r in s.runs) / 24
        if warmup > 0:
            ax.axvspan(0, warmup, color="#eeeeee", label="warm-up (not in the steady rate)")
        base = s.baselines
        ratios = ", ".join(
            f"{r.assigner} {'-' if r.bound.ratio is None else f'{r.bound.ratio:.2f}'}" for r in base
        )
        levels = sorted({f"{r.bound.per_day:.1f}" for r in base})
        each = ", ".join(f"{r.assigner} {r.bound.per_day:.1f}" for r in base)
        ax.set_title(
            f"Sectors reaching Proving per day against the bound "
            f"({levels[0] if len(levels) == 1 else each}/day);\nratio to the bound: {ratios}"
        )
        ax.set_xlabel("simulated day")
        ax.set_ylabel("sectors reaching Proving")
        ax.set_xlim(0, max(s.config.days, 1))
        ax.set_ylim(bottom=0)
        fig.legend(loc="outside lower center", ncols=2, fontsize=8)
        return fig


def _utilisation(s: Summary) -> Figure:
    base = s.baselines
    assigners = _assigners(s)
    workers = list(base[0].utilisation.workers)

    def busiest(w: str) -> float:
        return max(
            (u.steady or 0.0 for r in base for u in r.utilisation.workers.get(w, {}).values()),
            default=0.0,
        )

    shown = sorted(workers, key=lambda w: -busiest(w))[:MAX_PANELS]
    shown = [w for w in workers if w in shown]
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(9, 1.0 + 1.9 * len(shown)), layout="constrained")
        axes = fig.subplots(len(shown), len(base), squeeze=False, sharex=True, sharey=True)
        for row, worker in enumerate(shown):
            for col, r in enumerate(base):
                ax = axes[row][col]
                hours = r.utilisation.sample_hours
                drawn = False
                for i, (task, use) in enumerate(r.utilisation.workers.get(worker, {}).items()):
                    if use.slots is None or not use.tasks:
                        continue  # unlimited stages have no fraction busy
                    days, series = _coarse(use.series, hours, mean=True)
                    busy = "-" if use.steady is None else f"{use.steady:.0%}"
                    label = f"{task} ({use.slots} slot{'s' * (use.slots != 1)}, {busy})"
                    ax.plot(days, series, color=_COLOURS[i % len(_COLOURS)], label=label)
                    drawn = True
                ax.set_title(f"{worker} ({r.assigner})", color=_colour(assigners, r.assigner))
                ax.set_ylim(0, 1.05)
                if drawn:
                    ax.legend(loc="upper right", fontsize=7)
                if col == 0:
                    ax.set_ylabel("busy")
        for ax in axes[-1]:
            ax.set_xlabel("simulated day")
        more = len(workers) - len(shown)
        fig.suptitle(
            "Per-stage utilisation over time per worker (slot time / slots; steady share)"
            + (f"; {more} less busy worker(s) not shown" if more else "")
        )
        return fig


def _queue_wait(s: Summary) -> Figure:
    base = s.baselines
    assigners = _assigners(s)
    tasks: list[str] = []
    for r in base:
        tasks += [t for t in r.queue_wait if t not in tasks]
    top = max((w.p95_s for r in base for w in r.queue_wait.values()), default=0.0)
    scale, unit = (3600, "hours") if top >= 7200 else (60, "minutes")
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(9, 4), layout="constrained")
        ax = fig.add_subplot()
        if not tasks:
            _empty(ax, "no tasks ran")
        width = 0.8 / max(1, 2 * len(base))
        for j, r in enumerate(base):
            colour = _colour(assigners, r.assigner)
            for k, (pct, hatch) in enumerate((("p50", ""), ("p95", "//"))):
                xs = [i + (2 * j + k - len(base) + 0.5) * width for i in range(len(tasks))]
                ys = [
                    getattr(r.queue_wait[t], f"{pct}_s") / scale if t in r.queue_wait else 0.0
                    for t in tasks
                ]
                ax.bar(
                    xs, ys, width, color=colour, hatch=hatch, alpha=1.0 if k == 0 else 0.55,
                    edgecolor="white" if k == 0 else colour, label=f"{r.assigner} {pct}",
                )  # fmt: skip
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_ylabel(f"wait in the queue ({unit})")
        ax.set_title("Queue wait per task type: p50 and p95 per assigner (baseline)")
        if tasks:
            ax.legend(fontsize=8)
        return fig


def _fetch(s: Summary) -> Figure:
    base = s.baselines
    assigners = _assigners(s)
    pairs: list[tuple[str, str]] = []
    for r in base:
        pairs += [(p.source, p.to) for p in r.fetch.pairs if (p.source, p.to) not in pairs]
    top = max((p.bytes for r in base for p in r.fetch.pairs), default=0)
    scale, unit = _bytes(top)
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(9, 1.5 + 0.45 * max(1, len(pairs)) * len(base)))
        fig.set_layout_engine("constrained")
        ax = fig.add_subplot()
        totals = ", ".join(f"{r.assigner} {r.fetch.total_bytes / scale:.1f} {unit}" for r in base)
        ax.set_title(f"Bytes fetched between workers (baseline; total: {totals})")
        if not pairs:
            _empty(ax, "no fetches between workers")
            return fig
        height = 0.8 / len(base)
        for j, r in enumerate(base):
            got = {(p.source, p.to): p.bytes for p in r.fetch.pairs}
            ys = [i + (j - (len(base) - 1) / 2) * height for i in range(len(pairs))]
            ax.barh(
                ys, [got.get(p, 0) / scale for p in pairs], height,
                color=_colour(assigners, r.assigner), label=r.assigner,
            )  # fmt: skip
        ax.set_yticks(range(len(pairs)), [f"{a} -> {b}" for a, b in pairs])
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        ax.legend(fontsize=8)
        return fig


def _disk(s: Summary) -> Figure:
    base = s.baselines
    assigners = _assigners(s)
    paths = list(base[0].disk.paths)

    def fullest(p: str) -> float:
        return max(
            (d.peak / d.capacity if d.capacity else 0.0)
            for r in base
            if (d := r.disk.paths.get(p)) is not None
        )

    shown = sorted(paths, key=lambda p: -fullest(p))[:MAX_PANELS]
    shown = [p for p in paths if p in shown]
    cols = 2 if len(shown) > 1 else 1
    rows = max(1, -(-len(shown) // cols))
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(9, 1.0 + 2.3 * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        flat = [ax for row in axes for ax in row]
        if not shown:
            _empty(flat[0], "no storage paths")
        for ax, path in zip(flat, shown, strict=False):
            peak = max(r.disk.paths[path].peak for r in base if path in r.disk.paths)
            capacity = base[0].disk.paths[path].capacity
            scale, unit = _bytes(max(peak, 1))
            for r in base:
                d = r.disk.paths.get(path)
                if d is None:
                    continue
                days, series = _coarse(d.series, r.disk.sample_hours, mean=False)
                ax.plot(
                    days, [v / scale for v in series],
                    color=_colour(assigners, r.assigner), label=r.assigner,
                )  # fmt: skip
            share = f" ({peak / capacity:.0%})" if capacity else ""
            if capacity and capacity <= 3 * max(peak, 1):
                ax.axhline(capacity / scale, color="red", linestyle="--", label="capacity")
            cap_scale, cap_unit = _bytes(capacity)
            ax.set_title(
                f"{path}: peak {peak / scale:.1f} {unit} of {capacity / cap_scale:.0f} "
                f"{cap_unit}{share}"
            )
            ax.set_ylabel(unit)
            ax.set_ylim(bottom=0)
            ax.legend(loc="upper right", fontsize=7)
        for ax in flat[len(shown) :] if shown else flat[1:]:
            ax.set_visible(False)
        more = len(paths) - len(shown)
        fig.suptitle(
            "Disk use per path over time against capacity (red dashes, when in range; x: day)"
            + (f"; {more} emptier path(s) not shown" if more else "")
        )
        return fig


def _failures(s: Summary) -> Figure:
    base = s.baselines
    assigners = _assigners(s)
    states: list[str] = []
    for r in base:
        for name in (*r.failures.by_state, *r.failures.retries_by_state):
            if name not in states:
                states.append(name)
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(9, 1.5 + 0.5 * max(1, len(states)) * len(base)))
        fig.set_layout_engine("constrained")
        ax = fig.add_subplot()
        ax.set_title("Failures and retries by state (baseline)")
        if not states:
            _empty(ax, "no failures: no sector entered a failed state")
            return fig
        height = 0.8 / (2 * len(base))
        for j, r in enumerate(base):
            colour = _colour(assigners, r.assigner)
            for k, (what, counts) in enumerate(
                (("failures", r.failures.by_state), ("retries", r.failures.retries_by_state))
            ):
                ys = [i + (2 * j + k - len(base) + 0.5) * height for i in range(len(states))]
                ax.barh(
                    ys, [counts.get(name, 0) for name in states], height, color=colour,
                    hatch="" if k == 0 else "//", alpha=1.0 if k == 0 else 0.55,
                    label=f"{r.assigner} {what}",
                )  # fmt: skip
        ax.set_yticks(range(len(states)), states)
        ax.invert_yaxis()
        ax.set_xlabel("times entered")
        ax.legend(fontsize=8)
        return fig


def _salted(salt: str) -> dict[Any, Any]:
    return {**_RC, "svg.hashsalt": salt}


def svg(fig: Figure, salt: str) -> str:
    """`fig` as an `<svg>` element to inline in HTML, its ids prefixed with `salt`; reproducible."""
    buf = io.StringIO()
    with matplotlib.rc_context(_salted(salt)):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    # matplotlib numbers its ids per figure (figure_1, patch_1): in one page they must differ.
    for ref in ('id="', "url(#", 'href="#'):
        text = text.replace(ref, f"{ref}{salt}-")
    return text


def save(fig: Figure, path: Path, dpi: int = 110) -> None:
    """Save `fig` to `path` in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"Date": None} if path.suffix == ".svg" else {}
    with matplotlib.rc_context(_salted("sectorfsm")):
        fig.savefig(path, dpi=dpi, metadata=meta)


#: The report's plots in order: anchor, heading, drawing.
_PLOTS = (
    ("proving", "Sectors reaching Proving per day", proving_figure),
    ("utilisation", "Per-stage utilisation per worker", _utilisation),
    ("queue-wait", "Queue wait per task type", _queue_wait),
    ("fetch", "Bytes fetched between workers", _fetch),
    ("disk", "Disk use per path", _disk),
    ("failures", "Failures and retries by state", _failures),
)


def figures(s: Summary) -> list[tuple[str, str, str]]:
    """Every plot of the report as (anchor, heading, inline SVG)."""
    return [(anchor, heading, svg(draw(s), anchor)) for anchor, heading, draw in _PLOTS]
