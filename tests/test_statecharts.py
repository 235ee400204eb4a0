"""Statechart export: every format parses and holds the whole graph; highlights; the CLI.

The committed diagrams under `statecharts/` must equal `render(...)`. The SVG is compared by
the digest of the DOT it was rendered from (carried in a comment), not byte for byte:
Graphviz's output depends on its version and the fonts installed, the DOT does not.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from sectorfsm.cli import statechart as cli_statechart
from sectorfsm.sealing import graph
from sectorfsm.sealing.states import FAILED_STATES, SectorState, group_of
from sectorfsm.statecharts import (
    COMMITTED,
    FORMATS,
    GraphvizMissing,
    export,
    path_from_log,
    render,
    render_text,
    stale_diagrams,
    write_diagrams,
)
from sectorfsm.statecharts.export import HERE, dot_digest, svg_source_digest

S = SectorState
ROOT = Path(__file__).resolve().parents[1]
NS = "{http://www.w3.org/2005/07/scxml}"
SFSM = "{urn:sectorfsm:statechart}"
HAS_DOT = shutil.which("dot") is not None
STATE_NAMES = [s.name for s in SectorState]
FAILED_NAMES = {s.name for s in FAILED_STATES}
EVENTS = {e for _, e, _ in graph.export_transitions()}

#: A CC sector's happy path, as its log records it (message, then the expected transition).
PLEDGE = [
    ("SectorStartCC", {"id": 1}, ("UndefinedSectorState", "Packing")),
    ("SectorPacked", {}, ("Packing", "GetTicket")),
    ("SectorTicket", {}, ("GetTicket", "PreCommit1")),
    ("SectorPreCommit1", {}, ("PreCommit1", "PreCommit2")),
    ("SectorPreCommit2", {}, ("PreCommit2", "PreCommitting")),
    ("SectorPreCommitted", {}, ("PreCommitting", "PreCommitWait")),
    ("SectorPreCommitLanded", {}, ("PreCommitWait", "WaitSeed")),
    ("SectorSeedReady", {}, ("WaitSeed", "Committing")),
    ("SectorCommitted", {}, ("Committing", "SubmitCommit")),
    ("SectorCommitSubmitted", {}, ("SubmitCommit", "CommitWait")),
    ("SectorProving", {}, ("CommitWait", "FinalizeSector")),
    ("SectorFinalized", {}, ("FinalizeSector", "Proving")),
]
PLEDGE_PATH = [(src, event, dest) for event, _, (src, dest) in PLEDGE]


def entry(event: str, kind: str = "event;{}", **fields: Any) -> SimpleNamespace:
    """A log entry as the engine writes it."""
    message = json.dumps({"User": fields})
    return SimpleNamespace(timestamp=0, kind=kind.format(event), message=message, trace="")


def pledge_log() -> list[SimpleNamespace]:
    """The log of a sector that went from pledge to Proving."""
    return [entry(event, **fields) for event, fields, _ in PLEDGE]


# -- json ------------------------------------------------------------------------------------


def test_json_is_the_design_schema_and_the_whole_graph() -> None:
    doc = json.loads(render_text("json"))
    assert set(doc) == {"states", "transitions"}
    assert [s["name"] for s in doc["states"]] == STATE_NAMES
    for s in doc["states"]:
        assert set(s) == {"name", "group", "final"}
        assert s["group"] == group_of(S[s["name"]])
        assert s["final"] is (S[s["name"]] in graph.FINAL_PLANNER_STATES)
    assert doc["transitions"] == [
        {"source": s, "event": e, "dest": d} for s, e, d in graph.export_transitions()
    ]
    globals_ = {t["event"] for t in doc["transitions"] if t["source"] == "*"}
    assert globals_ == set(graph.GLOBAL_EDGES)
    names = set(STATE_NAMES) | {"*"}
    assert all(t["source"] in names and t["dest"] in names for t in doc["transitions"])


def test_json_highlight_adds_only_the_path() -> None:
    doc = json.loads(render_text("json", highlight=PLEDGE_PATH))
    assert set(doc) == {"states", "transitions", "path"}
    assert [(p["source"], p["event"], p["dest"]) for p in doc["path"]] == PLEDGE_PATH


# -- scxml -----------------------------------------------------------------------------------


def _scxml(highlight: list[tuple[str, str, str]] | None = None) -> ET.Element:
    return ET.fromstring(render_text("scxml", highlight=highlight))


def test_scxml_is_valid_and_holds_every_state_and_edge() -> None:
    root = _scxml()
    assert root.tag == f"{NS}scxml"
    assert root.get("version") == "1.0"
    ids = [el.get("id") for el in root.iter() if el.get("id") is not None]
    assert len(ids) == len(set(ids)), "duplicate ids"
    assert set(STATE_NAMES) <= set(ids)
    assert root.get("initial") in ids
    for el in root.iter():
        if el.get("initial") is not None:
            assert el.get("initial") in ids
    for t in root.iter(f"{NS}transition"):
        for target in (t.get("target") or "").split():
            assert target in ids, f"dangling target {target}"
        assert t.get("event"), "every transition has an event"
        cond = t.get("cond")
        if cond is not None:  # the null data model only has In()
            match = re.fullmatch(r"In\('(\w+)'\)", cond)
            assert match is not None and match.group(1) in ids
    finals = {el.get("id") for el in root.iter(f"{NS}final")}
    assert finals == {s.name for s in graph.FINAL_PLANNER_STATES}
    for el in root.iter(f"{NS}final"):
        assert len(el) == 0, "a <final> holds no transition"
    # Every per-state edge is a transition of its state (or, for a final, guarded by In()).
    by_id = {el.get("id"): el for el in root.iter() if el.get("id") is not None}
    wrapper = by_id["sector"]
    for source, event, dest in graph.export_transitions():
        if source == "*":
            events = {t.get("event", "").split(".")[0] for t in wrapper.findall(f"{NS}transition")}
            assert event in events
            continue
        holder = by_id[source] if source not in finals else wrapper
        found = [
            t
            for t in holder.findall(f"{NS}transition")
            if t.get("event") == event and t.get("target", source) == dest
        ]
        assert found, f"{source} --{event}--> {dest} missing"


def test_scxml_highlight_marks_steps_and_visited_states() -> None:
    root = _scxml(PLEDGE_PATH)
    steps = {
        (t.get("event"), t.get("target")): t.get(f"{SFSM}steps")
        for t in root.iter(f"{NS}transition")
        if t.get(f"{SFSM}steps")
    }
    assert steps[("SectorPacked", "GetTicket")] == "2"
    assert len(steps) == len(PLEDGE_PATH)
    visited = {el.get("id") for el in root.iter() if el.get(f"{SFSM}visited") == "true"}
    assert visited == {name for s, _, d in PLEDGE_PATH for name in (s, d)}


# -- mermaid, dot, plantuml --------------------------------------------------------------------


def test_mermaid_has_every_state_event_and_failure_style() -> None:
    text = render_text("mermaid")
    assert text.startswith("stateDiagram-v2\n")
    lines = [line.strip() for line in text.splitlines()]
    for name in STATE_NAMES:
        assert name in lines, f"{name} not declared"
    for event in EVENTS:  # globals without a fixed target are in the "any state" note
        assert re.search(rf"(: |^\s+|, ){event}\b", text, re.M), f"{event} not drawn"
    classes = {cls: set(names.split(",")) for names, cls in re.findall(r"class (\S+) (\w+)", text)}
    styled_failed = set().union(*(v for k, v in classes.items() if k.startswith("failed")))
    assert styled_failed == FAILED_NAMES
    assert "classDef failed fill:#ffebe9" in text


def test_mermaid_highlight() -> None:
    text = render_text("mermaid", highlight=PLEDGE_PATH)
    assert "Packing --> GetTicket: SectorPacked [2]" in text
    visited = {
        n
        for names, cls in re.findall(r"class (\S+) (\w+)", text)
        if cls.endswith("isited")
        for n in names.split(",")
    }
    assert visited == {name for s, _, d in PLEDGE_PATH for name in (s, d)}


def _dot_lines(text: str) -> dict[str, str]:
    return {m.group(1): m.group(0) for m in re.finditer(r'^\s*"(\w+)"( \[.*\])?;$', text, re.M)}


def test_dot_is_valid_and_styles_failures() -> None:
    text = render_text("dot")
    assert text.count("{") == text.count("}") and "digraph sector_lifecycle {" in text
    nodes = _dot_lines(text)
    for name in STATE_NAMES:
        assert name in nodes
        assert ("#cf222e" in nodes[name]) is (name in FAILED_NAMES)
    for event in EVENTS:  # globals without a fixed target are in the "any state" note
        assert event in text, f"{event} not drawn"
    if HAS_DOT:
        proc = subprocess.run(["dot", "-Tsvg"], input=text.encode(), capture_output=True)
        assert proc.returncode == 0, proc.stderr.decode()


def test_dot_highlight_is_bold_and_blue() -> None:
    path = [*PLEDGE_PATH, ("Proving", "SectorRemove", "Removing")]
    text = render_text("dot", highlight=path)
    edge = re.search(r'"Packing" -> "GetTicket" \[(.*)\];', text)
    assert edge is not None and "#0969da" in edge.group(1) and "penwidth" in edge.group(1)
    assert 'label="SectorPacked [2]"' in edge.group(1)
    assert re.search(r'"Proving" -> "Removing" \[label="SectorRemove \(global\) \[13\]"', text)
    assert "penwidth" in _dot_lines(text)["Proving"]
    assert "penwidth" not in _dot_lines(text)["Removed"]


def test_plantuml_is_a_state_diagram_with_styles() -> None:
    text = render_text("plantuml")
    lines = text.splitlines()
    assert lines[0] == "@startuml" and lines[-1] == "@enduml"
    for name in STATE_NAMES:
        state_line = next(line for line in lines if re.match(rf"state {name}\b", line))
        assert ("#FFEBE9" in state_line) is (name in FAILED_NAMES)
    highlighted = render_text("plantuml", highlight=PLEDGE_PATH)
    assert "Packing -[#0969DA,bold]-> GetTicket : SectorPacked [2]" in highlighted


# -- svg, png, graphviz ------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_DOT, reason="Graphviz `dot` is not installed")
def test_svg_and_png_render() -> None:
    svg = render_text("svg", highlight=PLEDGE_PATH)
    root = ET.fromstring(svg.encode())
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert "#cf222e" in svg and "#0969da" in svg
    assert svg_source_digest(svg) == dot_digest(render_text("dot", highlight=PLEDGE_PATH))
    png = render("png")
    assert isinstance(png, bytes) and png.startswith(b"\x89PNG")


def test_missing_graphviz_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _: None)
    for fmt, highlight in (("svg", PLEDGE_PATH), ("png", None)):
        with pytest.raises(GraphvizMissing, match="apt-get install graphviz") as info:
            render(fmt, highlight=highlight)
        assert "brew install graphviz" in str(info.value)
        assert "https://graphviz.org/download/" in str(info.value)
        assert "\n" not in str(info.value)
    assert render("dot")  # the text formats need nothing


def test_whole_graph_svg_without_graphviz_is_the_committed_copy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no `dot` anywhere
    assert shutil.which("dot") is None
    svg = render_text("svg")
    assert svg == (HERE / COMMITTED["svg"]).read_text()
    assert svg_source_digest(svg) == dot_digest(render_text("dot"))
    assert ET.fromstring(svg.encode()).tag == "{http://www.w3.org/2000/svg}svg"
    assert render_text("svg", highlight=[]) == svg  # an empty path is the whole graph


def test_a_stale_committed_svg_is_never_served(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(shutil, "which", lambda _: None)
    stale = (HERE / COMMITTED["svg"]).read_text().replace(dot_digest(render_text("dot")), "0" * 64)
    (tmp_path / COMMITTED["svg"]).write_text(stale)
    monkeypatch.setattr(export, "HERE", tmp_path)
    with pytest.raises(GraphvizMissing, match="apt-get install graphviz"):
        render("svg")
    (tmp_path / COMMITTED["svg"]).unlink()
    with pytest.raises(GraphvizMissing):
        render("svg")


def test_unknown_format_and_bad_highlight() -> None:
    with pytest.raises(ValueError, match="choose one of mermaid"):
        render("gif")
    with pytest.raises(ValueError, match="not a sector state"):
        render("dot", highlight=[("Nowhere", "SectorPacked", "GetTicket")])
    with pytest.raises(ValueError, match="not an edge"):
        render("dot", highlight=[("Packing", "SectorTicket", "PreCommit1")])
    with pytest.raises(ValueError, match="not an edge"):
        render("dot", highlight=[("Packing", "SectorRemove", "Proving")])


# -- committed diagrams -------------------------------------------------------------------------


def test_committed_diagrams_are_up_to_date() -> None:
    """Fails when the graph changed: run `python -m sectorfsm.statecharts` and commit."""
    assert HERE == ROOT / "statecharts"
    for fmt, name in COMMITTED.items():
        committed = (HERE / name).read_text()
        if fmt == "svg":  # by the DOT it was rendered from (see the module docstring)
            assert svg_source_digest(committed) == dot_digest(render_text("dot")), name
        else:
            assert committed == render_text(fmt), f"{name} is stale"
    assert stale_diagrams() == []


def test_write_diagrams_and_stale_check(tmp_path: Path) -> None:
    written = {p.name for p in write_diagrams(tmp_path)}
    expected = set(COMMITTED.values()) - (set() if HAS_DOT else {"lifecycle.svg"})
    assert written == expected
    assert stale_diagrams(tmp_path) == ([] if HAS_DOT else ["lifecycle.svg"])
    (tmp_path / "lifecycle.mmd").write_text("stateDiagram-v2\n")
    assert "lifecycle.mmd" in stale_diagrams(tmp_path)


# -- path_from_log -----------------------------------------------------------------------------


def test_path_from_log_follows_a_pledge_to_proving() -> None:
    assert path_from_log(pledge_log()) == PLEDGE_PATH


def test_path_from_log_force_state_and_lotus_kinds() -> None:
    log = [
        entry("SectorStartCC", kind="event;sealing.{}"),  # Lotus writes the Go package
        SimpleNamespace(kind="error;*xerrors.wrapError", message="state machine error"),
        entry("SectorTicket"),  # unexpected in Packing: consumed, skipped
        entry("SectorForceState", state="PreCommit2"),
        entry("SectorPreCommit2"),
        entry("SectorFatalError"),
        entry("SectorTerminate"),
    ]
    assert path_from_log(log) == [
        ("UndefinedSectorState", "SectorStartCC", "Packing"),
        ("Packing", "SectorForceState", "PreCommit2"),
        ("PreCommit2", "SectorPreCommit2", "PreCommitting"),
        ("PreCommitting", "SectorFatalError", "PreCommitting"),
        ("PreCommitting", "SectorTerminate", "Terminating"),
    ]


def test_path_from_log_apply_edges_stay() -> None:
    log = [entry("SectorStart"), entry("SectorAddPiece"), entry("SectorStartPacking")]
    log += [entry("SectorAddPiece"), entry("SectorPieceAdded")]
    assert path_from_log(log) == [
        ("UndefinedSectorState", "SectorStart", "WaitDeals"),
        ("WaitDeals", "SectorAddPiece", "AddPiece"),
        ("AddPiece", "SectorStartPacking", "AddPiece"),
        ("AddPiece", "SectorAddPiece", "AddPiece"),
        ("AddPiece", "SectorPieceAdded", "WaitDeals"),
    ]


def _to_precommit1() -> list[SimpleNamespace]:
    return [entry("SectorStartCC"), entry("SectorPacked"), entry("SectorTicket")]


def test_path_from_log_return_state_from_the_message() -> None:
    log = [*_to_precommit1(), entry("SectorInvalidDealIDs", return_state="PreCommit1")]
    log += [entry("SectorUpdateDealIDs", updates={})]
    path = path_from_log(log)
    assert path[-2:] == [
        ("PreCommit1", "SectorInvalidDealIDs", "RecoverDealIDs"),
        ("RecoverDealIDs", "SectorUpdateDealIDs", "PreCommit1"),
    ]


def test_path_from_log_return_state_from_the_next_events() -> None:
    log = [*_to_precommit1(), entry("SectorInvalidDealIDs"), entry("SectorUpdateDealIDs")]
    log += [entry("SectorPreCommit1"), entry("SectorPreCommit2")]
    path = path_from_log(log)
    assert ("RecoverDealIDs", "SectorUpdateDealIDs", "PreCommit1") in path
    assert path[-1] == ("PreCommit2", "SectorPreCommit2", "PreCommitting")
    # Nothing after the return: the target is unknown, so the transition is left out.
    unknown = [*_to_precommit1(), entry("SectorInvalidDealIDs"), entry("SectorUpdateDealIDs")]
    assert path_from_log(unknown)[-1] == ("PreCommit1", "SectorInvalidDealIDs", "RecoverDealIDs")


def test_path_from_log_unrecoverable_and_resume() -> None:
    log = [*_to_precommit1(), entry("SectorSealPreCommit1Failed", error="boom")]
    log += [entry("SectorRetriesExhausted"), entry("SectorRetryNow")]
    log += [entry("SectorRetrySealPreCommit1")]
    assert path_from_log(log)[-4:] == [
        ("PreCommit1", "SectorSealPreCommit1Failed", "SealPreCommit1Failed"),
        ("SealPreCommit1Failed", "SectorRetriesExhausted", "FailedUnrecoverable"),
        ("FailedUnrecoverable", "SectorRetryNow", "SealPreCommit1Failed"),
        ("SealPreCommit1Failed", "SectorRetrySealPreCommit1", "PreCommit1"),
    ]


def test_a_path_from_a_log_renders_in_every_text_format() -> None:
    log = [*pledge_log(), entry("SectorForceState", state="Removing"), entry("SectorRemoved")]
    path = path_from_log(log)
    assert path[-2:] == [
        ("Proving", "SectorForceState", "Removing"),
        ("Removing", "SectorRemoved", "Removed"),
    ]
    for fmt in ("mermaid", "dot", "scxml", "plantuml", "json"):
        assert "SectorForceState" in render_text(fmt, highlight=path)
    assert "Proving --> Removing: SectorForceState (global) [13]" in render_text(
        "mermaid", highlight=path
    )
    root = ET.fromstring(render_text("scxml", highlight=path))
    steps = {t.get("event"): t.get(f"{SFSM}steps") for t in root.iter(f"{NS}transition")}
    assert steps["SectorForceState.Removing"] == "13"
    assert steps["SectorRemoved"] == "14"


def test_path_from_log_packing_failed_moves_on_to_deals_expired() -> None:
    log = [entry("SectorStartCC"), entry("SectorForceState", state="PackingFailed")]
    log += [entry("SectorRemove")]
    assert path_from_log(log)[-1] == ("DealsExpired", "SectorRemove", "Removing")


# -- CLI -------------------------------------------------------------------------------------


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """A root, so `statechart` stays a subcommand."""

    cli_statechart.register(app)
    return app


def test_cli_formats_match_the_renderer() -> None:
    assert [f.value for f in cli_statechart.ChartFormat] == list(FORMATS)


def test_cli_json_to_stdout() -> None:
    result = CliRunner().invoke(_app(), ["statechart", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(render_text("json"))


def test_cli_default_is_mermaid_and_output_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(_app(), ["statechart"])
    assert result.exit_code == 0 and result.stdout == render_text("mermaid")
    out = tmp_path / "chart.scxml"
    result = CliRunner().invoke(_app(), ["statechart", "-f", "scxml", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text() == render_text("scxml")
    assert result.stdout == ""


@pytest.mark.skipif(not HAS_DOT, reason="Graphviz `dot` is not installed")
def test_cli_png_is_binary(tmp_path: Path) -> None:
    out = tmp_path / "chart.png"
    result = CliRunner().invoke(_app(), ["statechart", "--format", "png", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(b"\x89PNG")
    result = CliRunner().invoke(_app(), ["statechart", "--format", "png"])  # stdout: no tty
    assert result.exit_code == 0 and result.stdout_bytes.startswith(b"\x89PNG")


def test_cli_bad_format_is_a_clear_error() -> None:
    result = CliRunner().invoke(_app(), ["statechart", "--format", "gif"])
    assert result.exit_code == 2  # a usage error
    assert "Traceback" not in result.output
    assert "'gif'" in result.output and "mermaid" in result.output


def test_cli_missing_graphviz(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(shutil, "which", lambda _: None)
    monkeypatch.setattr(cli_statechart, "load_sector_log", lambda repo, number: pledge_log())
    for args in (["-f", "png"], ["-f", "svg", "--sector", "1"]):
        out = tmp_path / "x"
        result = CliRunner().invoke(_app(), ["statechart", *args, "-o", str(out)])
        assert result.exit_code == 1, args
        assert "apt-get install graphviz" in result.output and "brew install" in result.output
        assert "Traceback" not in result.output and not out.exists()


def test_cli_whole_graph_svg_without_graphviz(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    out = tmp_path / "chart.svg"
    result = CliRunner().invoke(_app(), ["statechart", "-f", "svg", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text() == (HERE / COMMITTED["svg"]).read_text()
    result = CliRunner().invoke(_app(), ["statechart", "--format", "svg"])
    assert result.exit_code == 0 and result.stdout == out.read_text()


def test_cli_sector_highlights_its_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[tuple[Path, int]] = []

    def fake_load(repo: Path, number: int) -> list[SimpleNamespace] | None:
        seen.append((repo, number))
        return pledge_log() if number == 3 else None

    monkeypatch.setattr(cli_statechart, "load_sector_log", fake_load)
    env = {"SECTORFSM_REPO": str(tmp_path)}
    result = CliRunner().invoke(_app(), ["statechart", "-f", "json", "--sector", "3"], env=env)
    assert result.exit_code == 0, result.output
    path = json.loads(result.stdout)["path"]
    assert [(p["source"], p["event"], p["dest"]) for p in path] == PLEDGE_PATH
    assert seen == [(tmp_path, 3)]

    result = CliRunner().invoke(_app(), ["statechart", "--sector", "7", "--repo", str(tmp_path)])
    assert result.exit_code == 1
    assert f"sector 7 not found in {tmp_path}" in result.output
    assert "Traceback" not in result.output
