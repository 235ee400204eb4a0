"""`sectors run` runs the scheduler's background work: the policy file's hot reload.

Through the real daemon: every wait is on a line it prints or a snapshot it publishes.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from conftest import Spawner, until

CONFIG = """\
[miner]
sealer = "sim"
block_time = 0.1

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
#: Every stage allowed but PC1 (the file's omitted keys would disable them all).
OPEN = {
    "AddPieceMax": None,
    "PreCommit1Max": None,
    "PreCommit2Max": None,
    "Commit2Max": None,
    "ForceP1FromLocalAP": False,
    "ForceP2FromLocalP1": False,
    "AllowDelay": 0,
}
#: Long enough for a loaded machine; the daemon re-reads the file within a second or two.
RELOAD_GUARD = 60.0


def _env(repo: Path) -> dict[str, str]:
    return {**os.environ, "SECTORFSM_REPO": str(repo), "COLUMNS": "200"}


def _diag(spawn: Spawner, repo: Path) -> list[dict[str, object]]:
    proc = spawn.run([sys.executable, "-m", "sectorfsm", "sched-diag", "--json"], env=_env(repo))
    assert proc.returncode == 0, proc.stderr
    diag: list[dict[str, object]] = json.loads(proc.stdout)["diag"]
    return diag


def _state(spawn: Spawner, repo: Path, number: int) -> str:
    args = [sys.executable, "-m", "sectorfsm", "status", str(number), "--json"]
    proc = spawn.run(args, env=_env(repo))
    assert proc.returncode == 0, proc.stderr
    return str(json.loads(proc.stdout)["state"])


def _pc1_reasons(spawn: Spawner, repo: Path, needle: str) -> str | None:
    """The w1 reason of a queued PC1 in the published diagnosis, once it contains `needle`."""
    for d in _diag(spawn, repo):
        reason = str(d["reasons"]["w1"])  # type: ignore[index]
        if d["task"] == "PC1" and needle in reason:
            return reason
    return None


def test_policy_edits_reach_the_running_daemon(spawn: Spawner, tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(CONFIG)
    policy = tmp_path / "myscheduler.json"
    policy.write_text(json.dumps({**OPEN, "PreCommit1Max": 0}))
    repo = tmp_path / "repo"
    daemon = spawn.python(
        "-m", "sectorfsm", "run", "--config", config, "--pledge", "2", env=_env(repo)
    )
    try:
        for n in (1, 2):
            daemon.wait_for_line(rf"sector {n}: .*-> PreCommit1\b", anywhere=True)
        until(
            lambda: _pc1_reasons(spawn, repo, "PC1 disabled on this worker"),
            "PC1 held by the policy in sched-diag",
            interval=0.2,
        )
        # A broken edit keeps the last good policy (PC1 still disabled), and sched-diag says so.
        policy.write_text('{"PreCommit1Max": 3,')
        reason = until(
            lambda: _pc1_reasons(spawn, repo, "last good policy kept"),
            "the rejected edit in sched-diag",
            timeout=RELOAD_GUARD,
            interval=0.2,
        )
        assert "invalid JSON" in reason and str(policy) in reason, reason
        assert _state(spawn, repo, 1) == "PreCommit1"
        # A good edit, no restart: the held sectors go on to Proving.
        policy.write_text(json.dumps(OPEN))
        for n in (1, 2):
            daemon.wait_for_line(rf"sector {n}: .*-> Proving\b", RELOAD_GUARD, anywhere=True)
        daemon.interrupt()
        assert daemon.finish() == 0, daemon.describe()
    finally:
        daemon.kill_group()


def test_miner_policy_file_reaches_workers_without_their_own(
    spawn: Spawner, tmp_path: Path
) -> None:
    config = tmp_path / "run.toml"
    config.write_text(CONFIG.replace('policy = "myscheduler.json"\n', ""))
    repo = tmp_path / "repo"
    init = spawn.run(
        [sys.executable, "-m", "sectorfsm", "init", "--config", str(config)], env=_env(repo)
    )
    assert init.returncode == 0, init.stderr
    miner = repo / "testOpenSource.json"
    miner.write_text(json.dumps({**OPEN, "PreCommit1Max": 0}))
    daemon = spawn.python(
        "-m", "sectorfsm", "run", "--config", config, "--pledge", "2", env=_env(repo)
    )
    try:
        shown = re.escape(str(miner))
        daemon.wait_for_line(rf"miner policy {shown} applies to workers: w1", anywhere=True)
        for n in (1, 2):
            daemon.wait_for_line(rf"sector {n}: .*-> PreCommit1\b", anywhere=True)
        until(
            lambda: _pc1_reasons(spawn, repo, "PC1 disabled on this worker"),
            "PC1 held by the miner policy in sched-diag",
            interval=0.2,
        )
        miner.write_text("[1, 2]")
        reason = until(
            lambda: _pc1_reasons(spawn, repo, "last good policy kept"),
            "the rejected miner-policy edit in sched-diag",
            timeout=RELOAD_GUARD,
            interval=0.2,
        )
        assert f"{miner}: expected a JSON object" in reason, reason
        assert _state(spawn, repo, 1) == "PreCommit1"
        miner.write_text(json.dumps(OPEN))
        for n in (1, 2):
            daemon.wait_for_line(rf"sector {n}: .*-> Proving\b", RELOAD_GUARD, anywhere=True)
        daemon.interrupt()
        assert daemon.finish() == 0, daemon.describe()
    finally:
        daemon.kill_group()
