"""Crash tests of the sealing pipeline: a real engine process SIGKILLed in every phase.

`tests/sealing_proc.py` runs a miner on a real clock and a fast devnet (50-80 ms blocks),
pledges CC sectors and adds a deal piece, and seals until everything is Proving. The parent
kills it with SIGKILL (after a random number of state changes, or as soon as a sector entered
a chosen phase),
reads the persisted sectors and chain messages of the dead process, and starts it again with
`--resume` (no pledging), until every sector is Proving. The crash loop runs with `group`
and with `sync` durability (one transaction per unit instead of merged commits).

What must hold (no faults are injected, so the happy path is the only path):

* every sector reaches Proving and is active on chain;
* exactly one PreCommit* and one ProveCommit* message names each sector, and both executed
  with exit Ok: a handler that resent a message after a restart fails this;
* at every kill, a sector has a message of a family iff its persisted state is past the state
  that sends it (message and event commit together);
* each sector's log replays through the graph from UndefinedSectorState, every event valid in
  the state it was applied in, each happy-path event exactly once: an event applied twice
  (or re-sent by a re-run step after its first copy was applied) fails this.

Set SEALING_CRASH_SEED=<n> to change the random kill points.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG_GUARD, Child, Spawner
from sealtools import HAPPY

from sectorfsm.fsm import LmdbStore, RealClock, StateGroup
from sectorfsm.sched import TaskType
from sectorfsm.sealing import graph
from sectorfsm.sealing.backends.sim import SimBackend
from sectorfsm.sealing.chain import ExitCode
from sectorfsm.sealing.devnet import DevnetChain
from sectorfsm.sealing.events import ALL_EVENTS, EVENTS_BY_NAME
from sectorfsm.sealing.info import SectorInfo
from sectorfsm.sealing.miner import GROUP
from sectorfsm.sealing.states import SectorState

S = SectorState
PROC = Path(__file__).with_name("sealing_proc.py")
SEED = int(os.environ.get("SEALING_CRASH_SEED", "20250611"))
SECTOR_SIZE = 2048

#: The phase each (happy-path) state belongs to, for the kill-coverage report.
PHASES: dict[SectorState, str] = {
    S.WaitDeals: "deals",
    S.AddPiece: "deals",
    S.Packing: "compute",
    S.GetTicket: "compute",
    S.PreCommit1: "compute",
    S.PreCommit2: "compute",
    S.PreCommitting: "precommit",
    S.SubmitPreCommitBatch: "precommit",
    S.PreCommitBatchWait: "precommit",
    S.PreCommitWait: "precommit",
    S.WaitSeed: "seed",
    S.Committing: "committing",
    S.SubmitCommit: "commit",
    S.SubmitCommitAggregate: "commit",
    S.CommitAggregateWait: "commit",
    S.CommitWait: "commit",
    S.FinalizeSector: "finalize",
    S.Proving: "proving",
}
#: States in which the sector's PreCommit* message must exist (it is sent, with the event
#: that leaves SubmitPreCommitBatch/PreCommitting, in one commit); before them, it must not.
PRECOMMIT_SENT = frozenset(
    {
        S.PreCommitBatchWait,
        S.PreCommitWait,
        S.WaitSeed,
        S.Committing,
        S.SubmitCommit,
        S.SubmitCommitAggregate,
        S.CommitAggregateWait,
        S.CommitWait,
        S.FinalizeSector,
        S.Proving,
    }
)
PROVECOMMIT_SENT = frozenset({S.CommitAggregateWait, S.CommitWait, S.FinalizeSector, S.Proving})

#: The happy path's events after the creating one.
SEALING_EVENTS = HAPPY[1:]
CC_EVENTS = ("SectorStartCC", *SEALING_EVENTS)
DEAL_EVENTS = (
    "SectorStart",
    "SectorAddPiece",
    "SectorPieceAdded",
    "SectorStartPacking",
    *SEALING_EVENTS,
)


# -- the child process ---------------------------------------------------------------------


@dataclass
class Run:
    """One child process and the lines it printed."""

    child: Child

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.child.popen

    def lines(self) -> list[list[str]]:
        return [line.split() for line in list(self.child.lines)]

    def first(self, word: str, *rest: str) -> list[str] | None:
        return _first(self.lines(), word, *rest)

    def stderr(self) -> str:
        return self.child.stderr()

    def wait_line(self, word: str, *rest: str) -> list[str]:
        """Wait until the child printed a line starting with `word rest...`."""
        return self.child.wait_for(
            lambda lines: _first([line.split() for line in lines], word, *rest),
            f"a line starting with {' '.join((word, *rest))!r}",
        )

    def state_times(self, number: int) -> list[tuple[float, str]]:
        """`(monotonic time, state)` the child saw sector `number` enter, in order."""
        return [
            (float(line[1]), line[3])
            for line in self.lines()
            if line[0] == "state" and int(line[2]) == number
        ]


def _first(lines: list[list[str]], word: str, *rest: str) -> list[str] | None:
    for line in lines:
        if line[: 1 + len(rest)] == [word, *rest]:
            return line
    return None


class Children:
    """Spawns `sealing_proc.py` processes through the `spawn` fixture (which kills them all)."""

    def __init__(self, spawn: Spawner, tmp: Path) -> None:
        self.spawn_child = spawn
        self.tmp = tmp

    def spawn(self, repo: Path, *args: str) -> Run:
        child = self.spawn_child.python(
            PROC, "--repo", repo, *args, name="engine", cwd=self.tmp, merge_stderr=False
        )
        return Run(child)

    def kill(self, run: Run) -> None:
        run.child.kill()

    def finish(self, run: Run, repo: Path) -> None:
        """Wait for a child that must seal to the end and exit cleanly.

        If it hangs, it is killed and the repo checked, so the failure names the broken
        invariant (say, a message sent twice) rather than only the hang guard.
        """
        try:
            run.proc.wait(timeout=HANG_GUARD)
        except subprocess.TimeoutExpired:
            run.child.kill_group()
            snap = read_repo(repo)
            check_final(snap, set(snap.sectors), f"[after the child hung, repo {repo}]")
            pytest.fail(f"hang guard: the child did not finish: {run.child.describe()}")
        rc = run.child.finish()
        assert rc == 0 and run.first("done") is not None, (
            f"child exited with {rc}: {run.child.describe()}"
        )


@pytest.fixture
def children(spawn: Spawner, tmp_path: Path) -> Children:
    return Children(spawn, tmp_path)


def flags(**options: object) -> list[str]:
    """flags(time_scale=3) -> ["--time-scale", "3"]."""
    return [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]


# -- reading a dead engine's repo ----------------------------------------------------------


def _no_planner(events: list[Any], info: SectorInfo) -> tuple[None, int]:
    raise AssertionError("a read-only group never plans")


@dataclass
class Snapshot:
    """What a repo holds, read without starting an engine."""

    sectors: dict[int, SectorInfo]
    errors: dict[int, str]
    #: `(cid, method, sectors, exit code or None if not executed yet)`, oldest first.
    messages: list[tuple[str, str, list[int], ExitCode | None]]
    active: list[int]
    inbox: int
    mailbox: int
    quarantine: int
    #: Per sector, the events durable in its inbox but not planned yet (a kill can land
    #: between the commit of a message-and-event and the round that plans the event).
    queued: dict[int, list[str]] = dataclasses.field(default_factory=dict)

    def named(self, prefix: str) -> collections.Counter[int]:
        """How many messages of a method family (a prefix) name each sector."""
        return collections.Counter(
            n
            for _, method, numbers, _ in self.messages
            if method.startswith(prefix)
            for n in numbers
        )


def read_repo(repo: Path) -> Snapshot:
    store = LmdbStore(repo / "store")
    try:
        group: StateGroup[SectorInfo] = StateGroup(
            store, GROUP, _no_planner, SectorInfo, events=ALL_EVENTS
        )
        sectors = {int(n): info for n, info in group.records.list()}
        queued: dict[int, list[str]] = {}
        for n in sectors:
            key = group.records.key(n)
            for _, raw in group.records.pending(key):
                event = group.records.codec.decode_event(raw, f"inbox event of sector {n}")
                queued.setdefault(n, []).append(type(event).__name__)
        errors = {}
        for n in sectors:
            mi = group.records.info(n)
            if mi is not None and mi.last_error:
                errors[n] = mi.last_error
        chain = DevnetChain(store, RealClock(), miner=1000)
        messages = []
        for cid, method, numbers in chain.messages():
            receipt = chain.search_msg(cid)
            messages.append((cid, method, numbers, None if receipt is None else receipt.exit_code))
        active = chain.active_sectors()
        with store.read() as txn:
            inbox = txn.stat(store.db("inbox"))["entries"]
            mailbox = txn.stat(store.db("mailbox"))["entries"]
            quarantine = txn.stat(store.db("quarantine"))["entries"]
    finally:
        store.close()
    return Snapshot(sectors, errors, messages, active, inbox, mailbox, quarantine, queued)


# -- checks --------------------------------------------------------------------------------


def replay(info: SectorInfo) -> tuple[list[str], list[str]]:
    """Replay the sector's log through the graph: `(event names, problems)`.

    Every logged event must have an edge from the state it was applied in; no error entries
    may appear (no faults were injected), and the replay must end in the sector's state.
    """
    state = S.UndefinedSectorState
    names: list[str] = []
    problems: list[str] = []
    for i, entry in enumerate(info.log):
        kind, _, name = entry.kind.partition(";")
        if kind != "event":
            problems.append(f"log[{i}] {entry.kind}: {entry.message[:300]}")
            continue
        names.append(name)
        if name in graph.GLOBAL_EDGES:
            problems.append(f"log[{i}] global event {name} in {state.name}")
            continue
        e = graph.edge(state, name)
        if e is None:
            how = "ignored" if getattr(EVENTS_BY_NAME[name], "ignorable", False) else "invalid"
            problems.append(f"log[{i}] {name} is {how} in {state.name}")
            continue
        if e.kind in ("on", "continue", "no_apply"):
            assert e.dest is not None
            state = e.dest
        elif e.kind not in ("apply", "seed"):
            problems.append(f"log[{i}] {name}: unexpected edge kind {e.kind} in {state.name}")
    if state is not info.state:
        problems.append(f"the log replays to {state.name}, the sector is in {info.state.name}")
    return names, problems


def check_events_once(info: SectorInfo) -> None:
    names, problems = replay(info)
    assert not problems, f"sector {info.number}: {problems}; log: {names}"
    twice = sorted(n for n, c in collections.Counter(names).items() if c > 1)
    assert not twice, f"sector {info.number}: events applied more than once: {twice}; {names}"
    expected = DEAL_EVENTS if info.has_deals else CC_EVENTS
    assert sorted(names) == sorted(expected), (
        f"sector {info.number}: logged events differ from the happy path: "
        f"missing {sorted(set(expected) - set(names))}, extra {sorted(set(names) - set(expected))}"
    )


def check_messages_match_states(snap: Snapshot, note: str) -> None:
    """Message and event commit together: a message exists iff the state is past sending it."""
    pre, prove = snap.named("PreCommit"), snap.named("ProveCommit")
    for n, info in snap.sectors.items():
        queued = set(snap.queued.get(n, ()))
        # An event that records the message may still wait in the inbox: it is durable too.
        pre_queued = bool(queued & {"SectorPreCommitBatchSent", "SectorPreCommitted"})
        prove_queued = bool(queued & {"SectorCommitAggregateSent", "SectorCommitSubmitted"})
        want_pre = 1 if info.state in PRECOMMIT_SENT or pre_queued else 0
        want_prove = 1 if info.state in PROVECOMMIT_SENT or prove_queued else 0
        assert (pre[n], prove[n]) == (want_pre, want_prove), (
            f"sector {n} in {info.state.name}: {pre[n]} PreCommit* and {prove[n]} ProveCommit* "
            f"messages name it, expected {want_pre} and {want_prove} {note}"
        )
        if want_pre and not pre_queued:
            assert info.precommit_message in {c for c, m, ns, _ in snap.messages if n in ns}
        if want_prove and not prove_queued:
            assert info.commit_message in {c for c, m, ns, _ in snap.messages if n in ns}
    unknown = {n for _, _, ns, _ in snap.messages for n in ns} - set(snap.sectors)
    assert not unknown, f"messages name sectors that do not exist: {unknown} {note}"


def check_final(snap: Snapshot, numbers: set[int], note: str) -> None:
    """Everything sealed, each sector's messages sent once and its events applied once."""
    assert set(snap.sectors) == numbers, f"sectors {sorted(snap.sectors)} {note}"
    pre, prove = snap.named("PreCommit"), snap.named("ProveCommit")
    for n in sorted(numbers):
        assert pre[n] <= 1, f"sector {n}: {pre[n]} PreCommit* messages name it {note}"
        assert prove[n] <= 1, f"sector {n}: {prove[n]} ProveCommit* messages name it {note}"
    methods = {m for _, m, _, _ in snap.messages}
    assert methods <= {
        "PreCommitSector",
        "PreCommitSectorBatch",
        "ProveCommitSector",
        "ProveCommitAggregate",
    }, f"{methods} {note}"
    failed = [(c, x) for c, _, _, x in snap.messages if x is not ExitCode.Ok]
    assert not failed, f"messages that did not execute with exit Ok: {failed} {note}"
    for info in snap.sectors.values():
        check_events_once(info)
    states = {n: i.state.name for n, i in snap.sectors.items()}
    assert all(i.state is S.Proving for i in snap.sectors.values()), f"{states} {note}"
    for n in sorted(numbers):
        assert (pre[n], prove[n]) == (1, 1), f"sector {n}: {pre[n]}, {prove[n]} messages {note}"
    check_messages_match_states(snap, note)
    assert snap.active == sorted(numbers), f"active on chain: {snap.active} {note}"
    assert not snap.errors, f"machines recorded errors: {snap.errors} {note}"
    assert (snap.inbox, snap.mailbox, snap.quarantine) == (0, 0, 0), note


# -- tests ---------------------------------------------------------------------------------


#: Phases a targeted kill aims at, in pipeline order (finalize lasts ~10 ms: left to chance).
TARGETS = ("compute", "precommit", "seed", "committing", "commit")
ORDER = {p: i for i, p in enumerate(("deals", *TARGETS, "finalize", "proving"))}


def _done(lines: list[list[str]]) -> str | None:
    return "done" if _first(lines, "done") is not None else None


def wait_for_phase(run: Run, target: str) -> str:
    """Wait until the child reports a sector in a state of phase `target` (or it is done)."""

    def check(raw: list[str]) -> str | None:
        lines = [line.split() for line in raw]
        for line in lines:
            if line[0] == "state" and PHASES.get(S[line[3]]) == target:
                return "phase"
        return _done(lines)

    return run.child.wait_for(check, f"a sector entering phase {target}")


def wait_for_transitions(run: Run, count: int) -> str:
    """Wait until the child reports `count` state changes of this run (or it is done).

    The first state it reports of each sector is where the sector was when the run began,
    not a change.
    """

    def check(raw: list[str]) -> str | None:
        lines = [line.split() for line in raw]
        seen: set[str] = set()
        changes = 0
        for line in lines:
            if line[0] == "state":
                changes += line[2] in seen
                seen.add(line[2])
        return "transitions" if changes >= count else _done(lines)

    return run.child.wait_for(check, f"{count} state changes")


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["group", "sync"])
def test_sigkill_in_every_phase_resumes_each_sector_exactly_once(
    children: Children, tmp_path: Path, durability: str
) -> None:
    """Up to 12 SIGKILLs while 6 CC sectors and 1 deal sector seal, then a clean run.

    Kills alternate between one aimed at a phase (as soon as the child reports a sector
    entering it) and one after a random number of state changes, so every phase gets hit
    whatever the machine's speed, while the other rounds let the pipeline move on.
    """
    rng = random.Random(SEED)
    repo = tmp_path / "repo"
    # PreCommit1 ~0.375 s, PC2 ~45 ms, C1+C2 ~65 ms; batch waits 0.4 s; WaitSeed ~0.9 s.
    common = flags(
        time_scale=500, block_time=0.08, wait_deals=0.3, durability=durability, max_seconds=120
    )
    max_kills = 12
    kills: list[tuple[str, dict[int, str]]] = []  # (how, persisted state per sector at kill)
    pledged: set[int] = set()
    phase_of: dict[int, str] = {}
    targets = list(TARGETS)
    t0 = time.monotonic()
    finished: Run | None = None
    while finished is None:
        first = not kills
        opts = flags(sectors=6, deals=1, stagger=0.1) if first else ["--resume"]
        run = children.spawn(repo, *common, *opts)
        run.wait_line("ready")
        if first:
            run.wait_line("allpledged")
            pledged = {int(line[1]) for line in run.lines() if line[0] == "pledged"}
        if len(kills) >= max_kills:
            children.finish(run, repo)
            finished = run
            break
        # A phase some sector can still enter, in turn; else a random number of changes.
        reachable = [
            t for t in targets if any(ORDER.get(p, 0) <= ORDER[t] for p in phase_of.values())
        ]
        if first or (len(kills) % 2 == 0 and reachable):
            target = "compute" if first else reachable[0]
            if target in targets:  # to the back of the line
                targets.remove(target)
                targets.append(target)
            how = f"aimed at {target}"
            outcome = wait_for_phase(run, target)
        else:
            changes = rng.randint(1, 8)
            how = f"after {changes} state changes"
            outcome = wait_for_transitions(run, changes)
        if outcome == "done":
            children.finish(run, repo)  # it sealed everything before this round's kill
            finished = run
            break
        children.kill(run)
        snap = read_repo(repo)
        note = f"[kill {len(kills) + 1} {how}, {durability}, seed {SEED}, repo {repo}]"
        # Every pledge that returned is durable; none appears twice.
        assert pledged <= set(snap.sectors), f"lost sectors {pledged - set(snap.sectors)} {note}"
        check_messages_match_states(snap, note)
        kills.append((how, {n: i.state.name for n, i in snap.sectors.items()}))
        phase_of = {n: PHASES.get(i.state, "other") for n, i in snap.sectors.items()}

    elapsed = time.monotonic() - t0
    final = read_repo(repo)
    note = f"[seed {SEED}, {durability}, {len(kills)} kills, repo {repo}]"
    check_final(final, pledged, note)
    assert any(i.has_deals for i in final.sectors.values()), "no deal sector was sealed"

    hit = collections.Counter(
        PHASES.get(S[state], state) for _, states in kills for state in states.values()
    )
    print(
        f"\n{durability}: {len(kills)} kills in {elapsed:.1f}s (seed {SEED}); "
        f"sector-phases at kill: {hit}"
    )
    for i, (how, states) in enumerate(kills, 1):
        print(f"  kill {i} {how}: {states}")
    methods = collections.Counter(m for _, m, _, _ in final.messages)
    print(f"  messages: {dict(methods)}")
    assert len(kills) >= 6, f"only {len(kills)} kills landed before the sectors were sealed"
    phases = set(hit) - {"proving"}
    assert len(phases) >= 4, f"kills landed in too few phases: {hit} {note}"


def test_sigkill_during_a_long_precommit1_reruns_it(children: Children, tmp_path: Path) -> None:
    """Killed during a 1 s PreCommit1: the restart runs PC1 again, once, in full."""
    repo = tmp_path / "repo"
    scale = 1333.0  # PreCommit1 of a 2 KiB sector: 1 s
    pc1 = SimBackend(RealClock(), 1000, time_scale=scale).duration(
        TaskType.PRE_COMMIT1, SECTOR_SIZE
    )
    assert 0.8 < pc1 < 1.5
    common = flags(time_scale=scale, block_time=0.05, max_seconds=120)
    first = children.spawn(repo, *common, *flags(sectors=1, deals=0))
    first.wait_line("ready")
    # Killed as soon as it reports PreCommit1 (it polls every 5 ms): long before PC1 ends.
    first.child.wait_for(
        lambda _: next((s for _, s in first.state_times(1) if s == "PreCommit1"), None),
        "sector 1 entering PreCommit1",
    )
    children.kill(first)

    snap = read_repo(repo)
    [info] = snap.sectors.values()
    kinds = [e.kind for e in info.log]
    assert info.state is S.PreCommit1, f"killed in {info.state.name}: {kinds}"
    assert "event;SectorPreCommit1" not in kinds
    ticket = (info.ticket_value, info.ticket_epoch)
    assert snap.messages == []

    second = children.spawn(repo, *common, "--resume")
    ready = float(second.wait_line("ready")[1])
    children.finish(second, repo)
    seen = second.state_times(1)
    assert seen[0][1] == "PreCommit1", f"the restart did not resume in PreCommit1: {seen}"
    pc2_at = next(t for t, state in seen if state == "PreCommit2")
    # The whole PreCommit1 ran again in the new process (the sim sleeps its full duration;
    # a lower bound, which load can only make longer).
    assert pc2_at - ready >= pc1 * 0.95, (
        f"PreCommit1 took only {pc2_at - ready:.3f}s after the restart; it lasts {pc1:.3f}s"
    )
    runs = json.loads(" ".join(second.wait_line("runs")[1:]))
    assert runs.get("PRE_COMMIT1") == 1 and runs.get("ADD_PIECE", 0) == 0, runs

    final = read_repo(repo)
    check_final(final, {info.number}, f"[repo {repo}]")
    [done] = final.sectors.values()
    assert (done.ticket_value, done.ticket_epoch) == ticket, "the ticket changed on restart"
    pre = [m for m in final.messages if m[1].startswith("PreCommit")]
    assert len(pre) == 1 and pre[0][3] is ExitCode.Ok, final.messages
