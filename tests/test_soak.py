"""bench/soak.py: its checks catch what they claim to, and its quick mode holds on the tree.

The quick soak (slow-marked, about 90 s) runs the real `sectors run` daemon with the `sim`
and `reference` sealers under kill -9, stray CLI commands, chain faults and a corrupted
store copy; it exits 1 with each broken invariant on a line of its report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import soak_checks  # noqa: E402
from soak_hooks import applied_events  # noqa: E402

from sectorfsm.sealing.info import LogEntry, Piece, SectorInfo  # noqa: E402
from sectorfsm.sealing.states import SectorState  # noqa: E402


def _log(*kinds: str) -> list[LogEntry]:
    return [LogEntry(0, kind, "") for kind in kinds]


def test_a_rejected_or_ignorable_event_is_not_a_new_attempt() -> None:
    log = _log(
        "event;SectorStartCC",
        "event;SectorAddPiece",
        "error;PlanError",
        "event;SectorStartPacking",
        "event;SectorPacked",
        "error;StepFailed",
    )
    assert applied_events(log) == 3


def test_two_runs_of_one_attempt_in_one_engine_run_are_reported(tmp_path: Path) -> None:
    log = tmp_path / "execs.log"
    run = {"inc": 1, "sector": 6, "task": "PC1", "state": "PreCommit1", "gen": 3, "where": ""}
    again_after_restart = {**run, "inc": 2}
    filler_elsewhere = {**run, "task": "AP", "state": "Packing", "where": "1024"}
    lines = [run, run, again_after_restart, filler_elsewhere, {**filler_elsewhere, "where": "0"}]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    count, found = soak_checks.exec_violations(log)
    assert count == 5
    assert found == [
        "PC1 ran 2 times for sector 6 in PreCommit1 in engine run 1 with no new event "
        "applied in between (attempt 3)"
    ]


def _sector(n: int, state: SectorState, first: str, cids: list[str], err: str = "") -> SectorInfo:
    from sectorfsm.sealing.info import DealInfo

    pieces = [Piece(c, 128, DealInfo(i + 1)) for i, c in enumerate(cids)]
    return SectorInfo(state=state, number=n, pieces=pieces, log=_log(first), last_err=err)


def test_store_checks_find_lost_doubled_and_misrouted_work() -> None:
    led = soak_checks.Ledger(confirmed=Counter({1: 1, 2: 2, 9: 1}))
    led.piece_acks.update(["a", "b", "c"])
    infos = {
        1: _sector(1, SectorState.Proving, "event;SectorStartCC", ["a"]),
        2: _sector(2, SectorState.PreCommit1, "event;SectorStartCC", []),
        3: _sector(3, SectorState.Proving, "event;SectorStart", ["b", "b"]),
    }
    found = soak_checks.store_violations(infos, led, final=True)
    assert "sector number 2 was confirmed to 2 different pledges" in found
    assert "confirmed pledge of sector 9 is not in the store" in found
    assert "deal piece(s) ['a'] were routed into CC sector 1" in found
    assert "piece b is in sectors 2 times, acknowledged 1" in found
    assert "piece c acknowledged 1 times, in sectors 0 times" in found
    assert "sector 2 ended in PreCommit1 with no error saying why" in found
    infos[2].last_err = "ticket expired"
    assert "sector 2 ended in PreCommit1 with no error saying why" not in (
        soak_checks.store_violations(infos, led, final=True)
    )


def test_storage_check_compares_finalized_sectors_with_the_disk(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    for kind, size in (("sealed", 2048), ("unsealed", 2048)):
        (storage / kind).mkdir(parents=True)
        (storage / kind / "s-t01000-1").write_bytes(b"\0" * size)
    (storage / "cache" / "s-t01000-1").mkdir(parents=True)
    (storage / "cache" / "s-t01000-1" / "p_aux").write_bytes(b"\0" * 500)
    (storage / "sealed" / "s-t01000-2").write_bytes(b"\0" * 2048)
    disk = soak_checks.storage_on_disk(storage, 1000)
    assert disk == {1: 4596, 2: 2048}
    done = SimpleNamespace(state=SectorState.Proving)
    sealing = SimpleNamespace(state=SectorState.PreCommit2)
    assert soak_checks.storage_violations({1: 4300, 2: 30000}, disk, {1: done, 2: sealing}) == []
    [found] = soak_checks.storage_violations({1: 30924}, disk, {1: done})
    assert "1: 30924 counted / 4596 on disk" in found
    assert "2: 0 counted / 2048 on disk" in found  # files no record explains


@pytest.mark.slow
def test_quick_soak_finds_no_violation(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    cmd = [sys.executable, str(BENCH / "soak.py"), "--quick", "--seed", "1", "--json", str(report)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    data = json.loads(report.read_text())
    assert data["kills"] >= 4 and data["corrupt_checks"] == 1, out
    assert sum(data["faults"].values()) > 0 and sum(data["commands"].values()) > 5, out
    assert sum(data["sectors"].values()) > 0, out
    assert data["wall_s"] < 180, out
    assert proc.returncode == 0 and data["violations"] == [], out
