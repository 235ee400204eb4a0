"""The `sectors simulate` HTML report: `DIR/report.html` from a summary (`summary.py`'s schema).

The page is self-contained (SVG plots inlined, no scripts, nothing fetched) and is drawn with
matplotlib, an optional dependency (`pip install 'sectorfsm[simulate]'`) imported only when a
report is written, so the rest of `sectors` never loads it. The summary is checked first
against the part of the schema the report reads: a malformed one is a one-line `ReportError`
and nothing is written.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..validation import ConfigError, validate

__all__ = [
    "HINT",
    "ReportError",
    "ReportUnavailable",
    "Summary",
    "load_summary",
    "save_main_plot",
    "write_report",
]

#: What to do when matplotlib is missing (the summary JSON does not need it).
HINT = "no HTML report: it needs matplotlib: pip install 'sectorfsm[simulate]'"

_MODEL = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)
_Count = Field(ge=0)


class ReportError(ValueError):
    """A summary that does not follow the schema; the message is one line naming the key."""


class ReportUnavailable(RuntimeError):
    """matplotlib is not installed; the message is `HINT`."""


class Sectors(BaseModel):
    """A run's sector counts and rates."""

    model_config = _MODEL
    pledged: int = _Count
    refused: int = _Count
    proving_total: int = _Count
    proving_per_day: list[int]
    steady_per_day: float | None


class BoundFigures(BaseModel):
    """The analytic bound of a run."""

    model_config = _MODEL
    per_day: float = Field(ge=0)
    ratio: float | None
    limiting: list[str]


class Bottleneck(BaseModel):
    """The bottleneck sentence (its per-stage figures are not drawn)."""

    model_config = _MODEL
    text: str


class StageUse(BaseModel):
    """One stage on one worker: slots and busy fraction per sample."""

    model_config = _MODEL
    slots: int | None
    tasks: int = _Count
    steady: float | None
    series: list[float]


class Utilisation(BaseModel):
    """Per worker, per stage utilisation."""

    model_config = _MODEL
    sample_hours: float = Field(gt=0)
    workers: dict[str, dict[str, StageUse]]


class Wait(BaseModel):
    """Queue wait of one task type."""

    model_config = _MODEL
    count: int = _Count
    p50_s: float = Field(ge=0)
    p95_s: float = Field(ge=0)


class Pair(BaseModel):
    """Bytes fetched from one worker to another."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)
    source: str = Field(alias="from")
    to: str
    bytes: int = _Count


class Fetch(BaseModel):
    """Fetches between workers."""

    model_config = _MODEL
    pairs: list[Pair]
    total_bytes: int = _Count


class DiskPath(BaseModel):
    """One storage path: capacity and use per sample."""

    model_config = _MODEL
    capacity: int = _Count
    peak: int = _Count
    series: list[int]


class Disk(BaseModel):
    """Disk use per path."""

    model_config = _MODEL
    sample_hours: float = Field(gt=0)
    paths: dict[str, DiskPath]


class Failures(BaseModel):
    """Failures, retries, crashes and failed messages of a run."""

    model_config = _MODEL
    by_state: dict[str, int]
    retries_by_state: dict[str, int]
    worker_crashes: dict[str, int]
    worker_down_hours: dict[str, float]
    failed_messages: dict[str, int]


class Run(BaseModel):
    """One (variant, assigner) run."""

    model_config = _MODEL
    variant: str
    assigner: str
    warmup_hours: float = Field(ge=0)
    sectors: Sectors
    bound: BoundFigures
    bottleneck: Bottleneck
    utilisation: Utilisation
    queue_wait: dict[str, Wait]
    fetch: Fetch
    disk: Disk
    failures: Failures

    @property
    def label(self) -> str:
        """`baseline / balanced`."""
        return f"{self.variant} / {self.assigner}"


class Comparison(BaseModel):
    """A what-if against its baseline under one assigner."""

    model_config = _MODEL
    variant: str
    assigner: str
    steady_per_day: float | None
    baseline_per_day: float | None
    delta_per_day: float | None
    bound_per_day: float
    baseline_bound_per_day: float


class RunConfig(BaseModel):
    """What was simulated."""

    model_config = _MODEL
    source: str
    sector_size: int = Field(gt=0)
    chain: str
    days: float = Field(gt=0)
    seed: int


class Summary(BaseModel):
    """The part of summary.json the report reads."""

    model_config = _MODEL
    schema_: Literal[1] = Field(alias="schema")
    config: RunConfig
    runs: list[Run] = Field(min_length=1)
    comparison: list[Comparison]

    @property
    def baselines(self) -> list[Run]:
        """The baseline run of each assigner (the runs every per-run plot compares)."""
        return [r for r in self.runs if r.variant == "baseline"] or self.runs[:1]


def load_summary(data: object) -> Summary:
    """`data` (a parsed summary.json) checked; a one-line `ReportError` naming the key if not."""
    if isinstance(data, Summary):
        return data
    try:
        checked: Summary = validate(Summary, data, "summary")
    except ConfigError as exc:
        raise ReportError(str(exc)) from None
    return checked


def _matplotlib() -> None:
    try:
        import matplotlib
    except ImportError:
        raise ReportUnavailable(HINT) from None
    # Never an interactive backend: the report is drawn to files only.
    matplotlib.use("Agg", force=False)


def write_report(summary: Mapping[str, Any] | Summary, out: Path) -> Path:
    """Write `out/report.html` (plots inlined as SVG) for `summary`; the path written.

    `ReportError` for a malformed summary and `ReportUnavailable` without matplotlib, both
    before anything is written.
    """
    checked = load_summary(summary)
    _matplotlib()
    from .plots import figures

    page = _page(checked, figures(checked))
    out.mkdir(parents=True, exist_ok=True)
    target = out / "report.html"
    tmp = target.with_suffix(".html.part")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    return target


def save_main_plot(summary: Mapping[str, Any] | Summary, path: Path, dpi: int = 110) -> Path:
    """Save the main plot (Proving per day against the bound) to `path` (.png or .svg)."""
    checked = load_summary(summary)
    _matplotlib()
    from .plots import proving_figure, save

    save(proving_figure(checked), path, dpi)
    return path


_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
.bottleneck { background: #fff6d5; border-left: 4px solid #e0a800; padding: 0.5em 1em; }
figure { margin: 1em 0 2em; } svg { max-width: 100%; height: auto; }
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _num(x: float | None, fmt: str = ".1f", sign: bool = False) -> str:
    if x is None:
        return "-"
    return format(x, ("+" if sign else "") + fmt)


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _page(s: Summary, plots: list[tuple[str, str, str]]) -> str:
    c = s.config
    size = f"{c.sector_size / 2**30:g} GiB"
    title = f"sectors simulate: {c.source}, {c.days:g} days"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p>{_e(size)} sectors on the {_e(c.chain)} chain, seed {c.seed}; "
        f"{len(s.runs)} run(s) of the real engine on virtual time.</p>",
        "<h2>Bottleneck</h2>",
    ]
    for r in s.runs:
        parts.append(f'<p class="bottleneck"><b>{_e(r.label)}</b>: {_e(r.bottleneck.text)}</p>')
    parts.append("<h2>Runs</h2>")
    parts.append(
        _table(
            ["run", "steady/day", "bound/day", "ratio", "proving", "pledged", "refused", "limits"],
            [
                [
                    r.label,
                    _num(r.sectors.steady_per_day),
                    _num(r.bound.per_day),
                    _num(r.bound.ratio, ".3f"),
                    str(r.sectors.proving_total),
                    str(r.sectors.pledged),
                    str(r.sectors.refused),
                    ", ".join(r.bound.limiting),
                ]
                for r in s.runs
            ],
        )
    )
    parts.append("<h2>What-if</h2>")
    if s.comparison:
        parts.append(
            _table(
                ["what-if", "assigner", "steady/day", "baseline/day", "difference", "bound/day"],
                [
                    [
                        w.variant,
                        w.assigner,
                        _num(w.steady_per_day),
                        _num(w.baseline_per_day),
                        _num(w.delta_per_day, sign=True),
                        f"{w.baseline_bound_per_day:.1f} -> {w.bound_per_day:.1f}",
                    ]
                    for w in s.comparison
                ],
            )
        )
    else:
        parts.append(
            '<p>No what-if in this run: add <code>--what-if "add-worker NAME"</code> or '
            '<code>--what-if "policy NAME Key=Value"</code> to compare a change.</p>'
        )
    for anchor, heading, svg in plots:
        parts.append(f'<h2 id="{_e(anchor)}">{_e(heading)}</h2><figure>{svg}</figure>')
    parts.append("<h2>Crashes and failed messages</h2>")
    parts.append(
        _table(
            ["run", "worker crashes", "hours down", "failed messages"],
            [
                [
                    r.label,
                    _counts(r.failures.worker_crashes),
                    _counts({k: round(v, 1) for k, v in r.failures.worker_down_hours.items()}),
                    _counts(r.failures.failed_messages),
                ]
                for r in s.runs
            ],
        )
    )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _counts(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in values.items()) or "none"
