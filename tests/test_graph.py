"""`sealing.graph` is Lotus v1.11.3's planner table edge by edge, plus only its named deviations.

The table (`fsmPlanners` of `extern/storage-sealing/fsm.go@v1.11.3`, commit a0ddb10de) is
extracted row by row into `tests/data/lotus_v1_11_3_planner.txt`, which carries the digest of
its rows so an accidental edit fails here.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sectorfsm.sealing import graph, states
from sectorfsm.sealing.graph import DEVIATIONS, EDGES, FINAL_PLANNER_STATES, PLANNERS, Edge
from sectorfsm.sealing.states import FAILED_STATES, SectorState

S = SectorState
ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "tests" / "data" / "lotus_v1_11_3_planner.txt"

#: Lotus's five global events (`globalMutator` in extern/storage-sealing/fsm_events.go@v1.11.3)
#: and where their `applyGlobal` leads (None: the state stays or the event chooses it).
LOTUS_GLOBALS: dict[str, SectorState | None] = {
    "SectorRestart": None,
    "SectorFatalError": None,
    "SectorForceState": None,
    "SectorTerminate": S.Terminating,
    "SectorRemove": S.Removing,
}

#: `planCommitting` (extern/storage-sealing/fsm.go@v1.11.3) calls no `apply()` for these; the
#: rows' notes say it for some.
COMMITTING_NO_APPLY = {
    "SectorComputeProofFailed",
    "SectorSealPreCommit1Failed",
    "SectorCommitFailed",
    "SectorRetryCommitWait",
}

#: Every edge that is not Lotus v1.11.3, as (source, event, dest, kind, deviation). Adding one
#: is a decision: document it in graph.DEVIATIONS and here.
EXPECTED_DEVIATIONS: set[tuple[SectorState | None, str, SectorState | None, str, str]] = {
    (None, "SectorRetriesExhausted", S.FailedUnrecoverable, "global", "unrecoverable"),
    (None, graph.STEP_FAILED, None, "global", "step-failed"),
    (S.AddPieceFailed, "SectorRetryWaitDeals", S.WaitDeals, "on", "addpiece-retry"),
    (S.AddPieceFailed, "SectorStartPacking", None, "apply", "addpiece-retry"),
    (S.AddPieceFailed, "SectorAddPiece", None, "apply", "addpiece-retry"),
    (S.FailedUnrecoverable, "SectorRetryNow", None, "resume", "retry-now"),
    *(
        (s, "SectorRetryNow", None, "apply", "retry-now")
        for s in FAILED_STATES - {S.FailedUnrecoverable}
    ),
}


@dataclass(frozen=True)
class Row:
    """One row of the Lotus table."""

    source: str
    event: str
    dest: str
    notes: str


def _rows() -> list[Row]:
    rows = []
    for line in TABLE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(" | ", 3)]
        assert len(parts) == 4, f"malformed table row: {line!r}"
        rows.append(Row(*parts))
    return rows


ROWS = _rows()
#: Table rows that are real edges (not `<globalMutator>` / `<any other type>` notes).
EDGE_ROWS = [r for r in ROWS if not r.event.startswith("<")]


def _expected(row: Row) -> tuple[SectorState, str, SectorState | None, str]:
    """`(source, event, dest, kind)` that `graph.EDGES` must hold for a table row."""
    source = S[row.source]
    if row.dest == "(stay)":
        assert row.notes.startswith("apply: mutate only"), row
        return source, row.event, None, "apply"
    if row.dest == "<state.Return>":
        assert row.notes.startswith("onReturning"), row
        return source, row.event, None, "return"
    dest = S[row.dest]
    if source is S.Committing:
        assert row.notes.startswith("planCommitting"), row
        if "does NOT stop batch" in row.notes:
            return source, row.event, dest, "continue"
        if "SeedEpoch" in row.notes:
            return source, row.event, dest, "seed"
        if "apply() NOT called" in row.notes:
            assert row.event in COMMITTING_NO_APPLY
        assert row.event in COMMITTING_NO_APPLY, f"unclassified Committing row {row}"
        return source, row.event, dest, "no_apply"
    assert row.notes == "-", row
    return source, row.event, dest, "on"


def _key(e: Edge) -> tuple[SectorState | None, str, SectorState | None, str]:
    return e.source, e.event, e.dest, e.kind


def _non_deviation_state_edges() -> list[Edge]:
    return [e for e in EDGES if e.source is not None and e.deviation is None]


def test_the_table_file_parses_and_covers_every_state() -> None:
    assert len(ROWS) == 113
    assert {r.source for r in ROWS} == {s.name for s in SectorState}
    for r in EDGE_ROWS:
        S[r.source]  # every named state exists
        if not r.dest.startswith(("(", "<")):
            S[r.dest]


def test_the_table_file_is_the_extracted_table_unchanged() -> None:
    text = TABLE.read_text()
    recorded = re.search(r"^# rows-sha256: ([0-9a-f]{64})$", text, re.M)
    assert recorded is not None, "the table file lost its rows-sha256 line"
    rows = "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))
    assert hashlib.sha256(rows.encode()).hexdigest() == recorded.group(1)


def test_every_lotus_edge_is_in_the_graph_exactly_once() -> None:
    graph_keys = [_key(e) for e in _non_deviation_state_edges()]
    for row in EDGE_ROWS:
        expected = _expected(row)
        assert graph_keys.count(expected) == 1, f"Lotus row {row} -> {expected}"


def test_every_graph_edge_without_deviation_is_a_lotus_edge() -> None:
    lotus = [_expected(r) for r in EDGE_ROWS]
    assert len(set(lotus)) == len(lotus)
    for e in _non_deviation_state_edges():
        assert _key(e) in lotus, f"{e} is neither a Lotus edge nor a deviation"
    assert len(_non_deviation_state_edges()) == len(lotus)


def test_one_edge_per_state_and_event() -> None:
    keys = [(e.source, e.event) for e in EDGES]
    assert len(keys) == len(set(keys))


def test_deviation_edges_are_exactly_the_documented_ones() -> None:
    deviating = {(*_key(e), e.deviation) for e in EDGES if e.deviation is not None}
    assert deviating == EXPECTED_DEVIATIONS
    for e in EDGES:
        if e.deviation is not None:
            assert e.deviation in DEVIATIONS, f"{e}: undocumented deviation key"


def test_global_mutator_only_states_accept_nothing_else_but_deviations() -> None:
    only = [r for r in ROWS if r.event == "<globalMutator only>"]
    assert {r.source for r in only} == {
        "AddPieceFailed",
        "PackingFailed",
        "DealsExpired",
        "TerminateFailed",
        "RemoveFailed",
    }
    for row in only:
        state = S[row.source]
        assert PLANNERS[state] == "plan_one"
        assert state not in FINAL_PLANNER_STATES
        for e in EDGES:
            if e.source is state:
                assert e.deviation is not None, f"{e}: {state} only accepts globals in v1.11.3"


def test_final_rows_are_the_final_planner_states() -> None:
    finals = {
        S[r.source] for r in ROWS if r.event == "<globalMutator>" and r.notes.startswith("final:")
    }
    assert finals == FINAL_PLANNER_STATES
    for state in finals:
        assert PLANNERS[state] == "final"
        for e in EDGES:
            if e.source is state:
                assert e.deviation is not None, f"{e}: {state} is final in v1.11.3"


def test_committing_has_its_own_planner() -> None:
    notes = {r.event: r.notes for r in ROWS if r.source == "Committing"}
    assert notes["<globalMutator>"].startswith("planCommitting")
    assert "<any other type>" in notes
    # v1.11.3 stops the machine on an unknown event; we log and consume it (documented).
    assert "unexpected-event" in DEVIATIONS
    assert PLANNERS[S.Committing] == "committing"
    assert {p for s, p in PLANNERS.items() if s is not S.Committing} <= {"plan_one", "final"}


def test_every_state_has_a_planner_and_every_planner_a_state() -> None:
    assert set(PLANNERS) == set(SectorState)
    assert len(PLANNERS) == len(SectorState)
    assert all(isinstance(s, SectorState) for s in PLANNERS)


def test_lotus_global_events_are_global_edges() -> None:
    for event, dest in LOTUS_GLOBALS.items():
        edge = graph.GLOBAL_EDGES[event]
        assert edge.source is None and edge.kind == "global" and edge.deviation is None
        assert edge.dest is dest
    ours = {e for e, edge in graph.GLOBAL_EDGES.items() if edge.deviation is not None}
    assert set(graph.GLOBAL_EDGES) == set(LOTUS_GLOBALS) | ours
    assert graph.RESTART == "SectorRestart"


def test_edge_lookup_matches_the_table() -> None:
    for e in EDGES:
        if e.source is not None:
            assert graph.edge(e.source, e.event) is e
    assert graph.edge(S.Proving, "SectorPacked") is None
    assert graph.edge(S.Proving, "SectorRemove") is None  # globals live in GLOBAL_EDGES


def test_the_machine_has_no_model_and_holds_exactly_the_edges() -> None:
    machine = graph.MACHINE
    assert machine.models == []
    assert list(machine.states) == [s.name for s in SectorState]
    assert machine.initial == S.UndefinedSectorState.name
    internal = ("apply", "return", "resume")
    expected: dict[tuple[str, str], tuple[str | None, Edge]] = {}
    for e in EDGES:
        dest = None if e.dest is None or e.kind in internal else e.dest.name
        sources = list(SectorState) if e.source is None else [e.source]
        for s in sources:
            assert (s.name, e.event) not in expected, f"two edges for {s.name} --{e.event}-->"
            expected[(s.name, e.event)] = (dest, e)
    actual: dict[tuple[str, str], tuple[str | None, Edge]] = {}
    for name, event in machine.events.items():
        for source, transitions in event.transitions.items():
            assert len(transitions) == 1, f"{source} --{name}--> has {len(transitions)} transitions"
            actual[(source, name)] = (transitions[0].dest, transitions[0].edge)
    assert actual == expected


def test_export_transitions_expands_runtime_targets() -> None:
    triples = list(graph.export_transitions())
    assert len(triples) == len(set(triples))
    returns = {d for s, e, d in triples if s == "RecoverDealIDs" and e == "SectorUpdateDealIDs"}
    assert returns == {s.name for s in graph.RETURN_STATES}
    resumes = {d for s, e, d in triples if s == "FailedUnrecoverable" and e == "SectorRetryNow"}
    assert resumes == {s.name for s in FAILED_STATES - {S.FailedUnrecoverable}}
    assert ("*", "SectorTerminate", "Terminating") in triples
    assert ("*", "SectorForceState", "*") in triples


def test_edge_and_planner_kinds_are_enums() -> None:
    assert all(isinstance(e.kind, graph.EdgeKind) for e in EDGES)
    assert all(isinstance(p, graph.PlannerKind) for p in PLANNERS.values())
    # Stored and exported as their Lotus-style names: the values never change.
    assert [k.value for k in graph.EdgeKind] == [
        "on", "apply", "return", "continue", "no_apply", "seed", "resume", "global"
    ]  # fmt: skip
    assert {k.value for k in graph.PlannerKind} == {"plan_one", "final", "committing"}
    assert {e.kind for e in EDGES if e.source is None} == {graph.EdgeKind.GLOBAL}


def test_every_state_that_works_has_a_handler_and_the_others_none() -> None:
    handlers = graph.handlers()
    idle = set(SectorState) - set(handlers)
    # Nothing to do: not started, sealed, or parked until an operator acts. PackingFailed
    # never runs: the planner moves it on to DealsExpired, as Lotus's plan() does.
    assert idle == {
        S.UndefinedSectorState,
        S.Proving,
        S.FaultedFinal,
        S.Removed,
        S.FailedUnrecoverable,
        S.PackingFailed,
    }
    assert idle >= graph.STUCK_STATES  # `wait` gives up there: nothing would move it on
    assert all(callable(h) for h in handlers.values())


def test_the_piece_sets_agree_with_the_table() -> None:
    takes = {s for s in SectorState if graph.edge(s, "SectorAddPiece") is not None}
    assert takes == graph.TAKES_PIECES
    # An open deal sector is one that takes pieces and is not parked after a failed write.
    assert graph.TAKES_PIECES - {S.AddPieceFailed} == graph.OPEN_SECTOR_STATES
    assert graph.OPEN_SECTOR_STATES <= graph.STAGING_STATES
    assert tuple(sorted(FAILED_STATES - {S.FailedUnrecoverable})) == graph.RESUME_STATES
    # The cheap sets the CLI reads from states.py are the graph's own.
    assert graph.FAILED_STATES is FAILED_STATES
    assert graph.DORMANT_STATES is states.DORMANT_STATES


def test_reading_the_graph_loads_neither_handlers_nor_scheduler() -> None:
    code = (
        "import sys\n"
        "from sectorfsm.sealing import graph\n"
        "list(graph.export_transitions())\n"
        "print(sorted(m for m in sys.modules if m.startswith(('sectorfsm.sealing.handlers',"
        " 'sectorfsm.sched', 'sectorfsm.sealing.sealer'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
