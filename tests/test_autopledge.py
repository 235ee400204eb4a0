"""Auto-pledge (`AutoPledgeDiff`) on the virtual clock: kept fed, MaxSealingSectors, draining.

Each test waits on what it checks (the pledger's count, a sector's state), never on time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import HANG_GUARD, Spawner, until
from sealtools import miner, run

from sectorfsm.sched import SectorRef, TaskType, WorkerPolicy
from sectorfsm.sched.resources import parse_overrides
from sectorfsm.sealing.autopledge import AutoPledger
from sectorfsm.sealing.backends.sim import sim_worker
from sectorfsm.sealing.miner import Miner
from sectorfsm.sealing.notify import StateChange, StateChanges
from sectorfsm.sealing.states import SectorState

OPEN: dict[str, Any] = {
    "AddPieceMax": None,
    "PreCommit1Max": None,
    "PreCommit2Max": None,
    "Commit2Max": None,
    "ForceP1FromLocalAP": True,
    "ForceP2FromLocalP1": False,
    "AllowDelay": 0,
}
#: An auto-pledged sector still counts in its worker's AP + PC1 pipeline in these states.
FEEDING = {
    SectorState.UndefinedSectorState,
    SectorState.Packing,
    SectorState.GetTicket,
    SectorState.PreCommit1,
}


def policy_file(tmp_path: Path, **policy: Any) -> Path:
    path = tmp_path / "a.json"
    path.write_text(json.dumps({**OPEN, **policy}))
    return path


def worker(path: Path) -> Any:
    spec = sim_worker("a")
    spec.policy_file = path
    return spec


async def pledged(m: Miner, count: int) -> None:
    """Wait, state change by state change, until auto-pledge has made `count` durable sectors."""
    sub = m.subscribe()
    try:
        for _ in range(10_000):  # hang guard, in state changes
            if len(auto_sectors(m)) >= count:
                return
            await asyncio.wait_for(anext(sub), timeout=HANG_GUARD)
        raise AssertionError(f"auto-pledge made {m.autopledge.pledged}, not {count}")
    finally:
        sub.close()


def auto_sectors(m: Miner) -> list[Any]:
    return [info for info in m.list() if info.auto_pledged]


def test_keeps_the_worker_fed_to_pc1_max(tmp_path: Path) -> None:
    path = policy_file(tmp_path, PreCommit1Max=3, AutoPledgeDiff=1)

    async def main() -> None:
        async with miner(tmp_path, workers=[worker(path)]) as m:
            await pledged(m, 3)
            first = auto_sectors(m)
            assert [(i.ap_worker, i.auto_pledged) for i in first] == [("a", True)] * 3
            assert m.autopledge.state()["a"]["in_flight"] == 3
            assert m.autopledge.pledged == 3  # full: nothing more until work leaves PC1
            # Two sectors leaving PC1 put it 2 below PreCommit1Max (more than 1): it refills
            # back to 3. It never goes past 3, and one more may have left PC1 since (2 is
            # not more than 1 below: no refill yet).
            await pledged(m, 5)
            feeding = [i for i in auto_sectors(m) if i.state in FEEDING]
            assert 3 - 1 <= len(feeding) <= 3
            assert sum(m.status(i.number).state not in FEEDING for i in first) >= 2

    run(main)


def test_evaluations_read_no_sector_state(tmp_path: Path) -> None:
    # A pledged sector leaves the count as its state change past PC1 lands, so an evaluation
    # (after every scheduling cycle) reads no sector's state, and the rule still holds.
    path = policy_file(tmp_path, PreCommit1Max=3, AutoPledgeDiff=1)
    reads: list[int] = []

    async def main() -> None:
        async with miner(tmp_path, workers=[worker(path)]) as m:
            group = m.input.group
            peek = group.peek  # (its only caller in the engine is auto-pledge)

            def counted(n: Any) -> Any:
                reads.append(n)
                return peek(n)

            group.peek = counted  # type: ignore[method-assign]
            await pledged(m, 7)  # two refills past the first three
            feeding = [i for i in auto_sectors(m) if i.state in FEEDING]
            assert 3 - 1 <= len(feeding) <= 3
            assert m.autopledge.state()["a"]["in_flight"] <= 3

    run(main)
    assert reads == []


def test_pc1_queued_behind_a_full_box_counts_in_flight(tmp_path: Path) -> None:
    # The box runs one PC1 at a time, so PC1s queue after their AP: a queued PC1 follows its
    # unsealed file and is not pinned, yet it is in the box's pipeline. Not counting it
    # pledged sector after sector while the queue grew.
    path = policy_file(tmp_path, PreCommit1Max=4, AutoPledgeDiff=1)
    spec = worker(path)
    spec.overrides = parse_overrides({"PC1_MAX_CONCURRENT": 1})

    async def main() -> None:
        async with miner(tmp_path, workers=[spec]) as m:
            sub = m.subscribe()
            try:
                most = 0
                while m.autopledge.pledged < 8:  # two refills past the first four
                    feeding = [i for i in auto_sectors(m) if i.state in FEEDING]
                    most = max(most, len(feeding))
                    assert len(feeding) <= 4, [(i.number, i.state) for i in feeding]
                    await asyncio.wait_for(anext(sub), timeout=HANG_GUARD)
                assert most == 4
            finally:
                sub.close()

    run(main)


def test_stops_at_max_sealing_sectors(tmp_path: Path) -> None:
    path = policy_file(tmp_path, PreCommit1Max=4, AutoPledgeDiff=1)

    async def main() -> None:
        config = {"max_sealing_sectors": 2}
        async with miner(tmp_path, workers=[worker(path)], config=config) as m:
            await pledged(m, 2)
            assert len(auto_sectors(m)) == 2
            state = m.autopledge.state()["a"]
            assert state["note"] == "stopped by MaxSealingSectors (2)"
            assert m.autopledge.evaluate() == 0  # the limit still holds it

    run(main)


def test_pauses_while_draining_and_resumes(tmp_path: Path) -> None:
    path = policy_file(tmp_path, PreCommit1Max=2, AutoPledgeDiff=1, IsPlanOffline=True)

    async def main() -> None:
        async with miner(tmp_path, workers=[worker(path)]) as m:
            assert m.autopledge.evaluate() == 0
            assert m.autopledge.state()["a"]["note"] == "draining (IsPlanOffline)"
            assert auto_sectors(m) == []
            path.write_text(json.dumps({**OPEN, "PreCommit1Max": 2, "AutoPledgeDiff": 1}))
            m.sched.check_workers()  # the policy reload runs a cycle, which re-evaluates
            await pledged(m, 2)
            assert [i.ap_worker for i in auto_sectors(m)] == ["a", "a"]
            assert m.autopledge.state()["a"]["active"] is True

    run(main)


def test_global_switch_off_pledges_nothing(tmp_path: Path) -> None:
    path = policy_file(tmp_path, PreCommit1Max=2, AutoPledgeDiff=1)

    async def main() -> None:
        async with miner(tmp_path, workers=[worker(path)], config={"auto_pledge": False}) as m:
            assert m.autopledge.evaluate() == 0
            assert m.autopledge.state()["a"]["note"].startswith("off")
            assert auto_sectors(m) == []

    run(main)


# --- the daemon ------------------------------------------------------------------------------

CONFIG = """\
[miner]
sealer = "sim"
block_time = 0.1

[sealing]
max_sealing_sectors = 2

[[workers]]
name = "w1"
cpus = 8
memory = "16GiB"
policy = "myscheduler.json"

[[workers.paths]]
id = "w1-ssd"
capacity = "1TiB"
seal = true
store = true
"""


def test_the_daemon_runs_auto_pledge_and_shows_it(spawn: Spawner, tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(CONFIG)
    (tmp_path / "myscheduler.json").write_text(
        json.dumps({**OPEN, "PreCommit1Max": 2, "AutoPledgeDiff": 1})
    )
    repo = tmp_path / "repo"
    env = {**os.environ, "SECTORFSM_REPO": str(repo), "COLUMNS": "200"}
    daemon = spawn.python("-m", "sectorfsm", "run", "--config", config, env=env)
    try:
        # Held at MaxSealingSectors (2) until sectors 1 and 2 prove, then it pledges again.
        daemon.wait_for_line(r"sector 3: ", anywhere=True)
        cli = [sys.executable, "-m", "sectorfsm"]
        status = spawn.run([*cli, "status", "1"], env=env)
        assert "Pledged:\tauto-pledge for worker w1" in status.stdout, status.stdout

        def auto_state() -> dict[str, Any] | None:
            out = spawn.run([*cli, "workers", "--json"], env=env)
            [w1] = json.loads(out.stdout)["workers"]
            return w1["auto_pledge"]  # type: ignore[no-any-return]

        state = until(auto_state, "auto-pledge state in sectors workers --json")
        assert state["diff"] == 1 and state["pc1_max"] == 2
        table = spawn.run([*cli, "workers"], env=env).stdout
        assert "AP:- PC1:2 PC2:- C2:-" in table and "diff 1," in table, table
        daemon.interrupt()
        assert daemon.finish() == 0, daemon.describe()
    finally:
        daemon.kill_group()


# --- the count between cycles ----------------------------------------------------------------


class _Index:
    def __init__(self) -> None:
        self.held: dict[int, set[str]] = {}

    def holders(self, sector: SectorRef, files: Any) -> set[str]:
        return self.held.get(sector.number, set())


class _Sched:
    """Just what `AutoPledger`'s count reads: the AP and PC1 tasks, and the index's holders."""

    def __init__(self) -> None:
        self.tasks: list[tuple[SectorRef, TaskType, str | None, bool]] = []
        self.index = _Index()

    def tasks_of(self, types: Any) -> list[tuple[SectorRef, TaskType, str | None, bool]]:
        return list(self.tasks)  # a new list each time, as the scheduler's


def test_the_count_is_kept_until_a_task_a_pledge_or_a_holder_can_move_it() -> None:
    # Most scheduling cycles move no AP or PC1 task: the count of the last one stands (the
    # same object), and any change of what it is counted from counts again.
    sched = _Sched()
    changes = StateChanges(lambda *a: None)
    ap = AutoPledger(sched, None, None, enabled=True, changes=changes)  # type: ignore[arg-type]
    one, two = SectorRef(1000, 1, 2048), SectorRef(1000, 2, 2048)
    sched.tasks = [(one, TaskType.ADD_PIECE, "a", False), (two, TaskType.PRE_COMMIT1, "b", True)]
    ap._pending[3] = "a"  # pledged by the rule, between its tasks
    first = ap._in_flight()
    assert first == {"a": 2, "b": 1}
    assert ap._in_flight() is first  # nothing moved: not counted again
    sched.tasks = [(two, TaskType.PRE_COMMIT1, "b", True)]  # the AP is done
    assert ap._in_flight() == {"a": 1, "b": 1}
    # Sector 3 leaves PC1 (a state change): the rule's pending sectors changed.
    ap._changed(StateChange(3, SectorState.PreCommit1, SectorState.PreCommit2, "x"))
    assert ap._in_flight() == {"b": 1}
    # A queued PC1 of a sector the rule did not pledge counts for its unsealed file's holder,
    # which may move with no task moving: such a count is never kept.
    sched.tasks = [(one, TaskType.PRE_COMMIT1, None, False)]
    sched.index.held[1] = {"c"}
    assert ap._in_flight() == {"c": 1}
    sched.index.held[1] = {"d"}
    assert ap._in_flight() == {"d": 1}


def test_an_evaluation_reading_what_the_last_quiet_one_read_does_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # After every cycle: most move nothing the rule reads, and the workers are not gone
    # through again. A new policy, a disk quota (the index) or a move in flight do.
    import sectorfsm.sealing.autopledge as autopledge

    asked: list[str] = []
    refusal = autopledge._refusal
    monkeypatch.setattr(autopledge, "_refusal", lambda w, i: asked.append(w.name) or refusal(w, i))
    sched = _Sched()
    full = WorkerPolicy(pre_commit1_max=2, auto_pledge_diff=1)
    a = SimpleNamespace(name="a", enabled=True, disabled_reason="", watcher=object(), policy=full)
    sched.workers_for = lambda task: [a]  # type: ignore[attr-defined]
    ref = SectorRef(1000, 1, 2048)
    sched.tasks = [(ref, TaskType.PRE_COMMIT1, "a", True), (ref, TaskType.PRE_COMMIT1, "a", True)]
    puts: list[bytes] = []
    store = SimpleNamespace(committer=SimpleNamespace(put=lambda db, k, v: puts.append(v)))
    sector_input = SimpleNamespace(config=SimpleNamespace(max_sealing_sectors=0), group=None)
    changes = StateChanges(lambda *a: None)
    ap = AutoPledger(sched, sector_input, store, enabled=True, changes=changes)  # type: ignore[arg-type]
    assert ap.evaluate() == 0 and asked == ["a"] and len(puts) == 1
    assert ap.evaluate() == 0 and asked == ["a"]  # the same inputs: not gone through again
    a.policy = dataclasses.replace(full, add_piece_max=0)  # reloaded: AP disabled
    assert ap.evaluate() == 0 and asked == ["a", "a"]
    assert ap.state()["a"]["note"] == "AP disabled (AddPieceMax = 0)" and len(puts) == 2
    a.policy = dataclasses.replace(full, disk_hold_max=5)  # a quota: the index is read
    sched.index.file_counts = lambda name: {}  # type: ignore[attr-defined]
    assert ap.evaluate() == 0 and ap.evaluate() == 0 and asked == ["a"] * 4
    a.policy = full
    ap.evaluate()
    sched.tasks = sched.tasks[:1]  # a PC1 left: the pipeline is one below, not more than 1
    assert ap.evaluate() == 0 and asked == ["a"] * 6
    assert ap.state()["a"]["in_flight"] == 1
