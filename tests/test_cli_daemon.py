"""`sectors run` as a real background process, driven by other `sectors` processes.

Every wait is on something the daemon prints (its start banner, `Created CC sector: N` once a
pledge is durable, one `sector N: A -> B` line per transition), never on elapsed time.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Child, Spawner, until

SIM = '[miner]\nsealer = "sim"\nblock_time = 0.1\n'
#: 8 MiB sim sectors: PreCommit1 takes about 3 s of real time, long enough to kill it.
SLOW = '[miner]\nsealer = "sim"\nsector_size = "8MiB"\nblock_time = 0.1\n'
#: Printed once the engine holds the repo (before it pledges or resumes anything).
BANNER = r"sectorfsm engine on "
#: A transition in the daemon's plain log (not the `- -> State` line of a sector first seen).
TRANSITION = r"sector (\d+): (?!- )\S+ -> "
#: The last words of `run --until-proving` once it has nothing left to wait for.
ALL_PROVING = r"all \d+ sector\(s\) are Proving"


def _env(repo: Path) -> dict[str, str]:
    return {**os.environ, "SECTORFSM_REPO": str(repo), "COLUMNS": "200"}


def sectors(
    spawn: Spawner, repo: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the `sectors` CLI in its own process, to completion."""
    proc = spawn.run([sys.executable, "-m", "sectorfsm", *args], env=_env(repo))
    if check and proc.returncode != 0:
        raise AssertionError(f"sectors {' '.join(args)} failed: {proc.stdout}{proc.stderr}")
    return proc


def start_daemon(spawn: Spawner, repo: Path, config: Path, *args: str) -> Child:
    """Start `sectors run` in the background; returns once the engine holds the repo."""
    daemon = spawn.python(
        "-m", "sectorfsm", "run", "--config", config, *args, env=_env(repo), name="daemon"
    )
    daemon.wait_for_line(BANNER)
    return daemon


def wait_state(daemon: Child, number: int, state: str) -> None:
    """Wait until the daemon printed that sector `number` entered `state`."""
    daemon.wait_for_line(rf"sector {number}: .*-> {state}\b", anywhere=True)


def wait_stored(spawn: Spawner, repo: Path, number: int, state: str) -> None:
    """Wait until the repo holds sector `number` in `state`.

    For a dormant sector woken by an operator command: it may go back to sleep between two
    ticks of the daemon's view, which then prints nothing about it.
    """
    until(
        lambda: status(spawn, repo, number)["state"] == state,
        f"sector {number} in {state}",
        interval=0.2,
    )


def status(spawn: Spawner, repo: Path, number: int) -> dict[str, object]:
    """`sectors status N --json`."""
    out = sectors(spawn, repo, "status", str(number), "--json").stdout
    info: dict[str, object] = json.loads(out)
    return info


@pytest.fixture
def daemon(spawn: Spawner, tmp_path: Path) -> Iterator[tuple[Path, Child]]:
    config = tmp_path / "sim.toml"
    config.write_text(SIM)
    repo = tmp_path / "repo"
    yield repo, start_daemon(spawn, repo, config)


def test_pledge_from_another_process_reaches_proving(
    daemon: tuple[Path, Child], spawn: Spawner, tmp_path: Path
) -> None:
    repo, proc = daemon
    out = sectors(spawn, repo, "pledge").stdout
    assert out.startswith("Created CC sector: 1"), out
    wait_state(proc, 1, "Proving")
    info = status(spawn, repo, 1)
    assert info["state"] == "Proving"
    assert [e["kind"] for e in info["log"]][-1] == "event;SectorFinalized"  # type: ignore[attr-defined]
    piece = tmp_path / "piece.bin"
    piece.write_bytes(b"hello sectorfsm " * 8)
    out = sectors(spawn, repo, "add-piece", str(piece)).stdout
    assert "added to sector 2" in out
    # The scheduler views read the snapshot the daemon publishes (every half second), with
    # its age: fresh, even on a loaded machine.
    workers = json.loads(sectors(spawn, repo, "workers", "--json").stdout)
    assert workers["workers"][0]["name"] == "sim-worker" and 0 <= workers["age_s"] < 30
    assert "snapshot taken" in sectors(spawn, repo, "jobs").stdout
    assert "json" not in sectors(spawn, repo, "sched-diag", "--json").stderr
    wait_state(proc, 2, "Proving")
    # Operator commands reach the running engine through its inbox.
    sectors(spawn, repo, "update-state", "2", "Removing", "--really-do-it")
    wait_stored(spawn, repo, 2, "Removed")
    sectors(spawn, repo, "terminate", "1", "--really-do-it")
    wait_stored(spawn, repo, 1, "Removed")
    retry = sectors(spawn, repo, "retry", "1", check=False)
    assert retry.returncode == 1 and "not a failed state" in retry.stderr
    # A second engine on the same repo is refused, clearly.
    second = sectors(spawn, repo, "run", check=False)
    assert second.returncode == 1 and "already running" in second.stderr
    assert "Traceback" not in second.stderr
    # Ctrl-C stops the daemon cleanly.
    proc.interrupt()
    assert proc.finish() == 0, proc.describe()
    assert "stopping" in proc.output()


def test_kill_9_mid_seal_loses_nothing(spawn: Spawner, tmp_path: Path) -> None:
    config = tmp_path / "slow.toml"
    config.write_text(SLOW)
    repo = tmp_path / "repo"
    proc = start_daemon(spawn, repo, config, "--pledge", "2")
    proc.wait_for_line(r"Created CC sector: 2")
    wait_state(proc, 2, "PreCommit1")  # PreCommit1 lasts ~3 s: killed in the middle of it
    proc.kill()
    killed_in = {n: status(spawn, repo, n)["state"] for n in (1, 2)}
    assert "Proving" not in killed_in.values(), killed_in
    proc = start_daemon(spawn, repo, config, "--until-proving")
    assert proc.finish() == 0, proc.describe()
    for n in (1, 2):
        info = status(spawn, repo, n)
        assert info["state"] == "Proving", info
        kinds = [e["kind"] for e in info["log"]]  # type: ignore[attr-defined]
        for once in (
            "event;SectorStartCC",
            "event;SectorPacked",
            "event;SectorTicket",
            "event;SectorPreCommit1",
            "event;SectorPreCommit2",
            "event;SectorPreCommitLanded",
            "event;SectorSeedReady",
            "event;SectorProving",
            "event;SectorFinalized",
        ):
            assert kinds.count(once) == 1, (n, once, kinds)


def test_run_pledge_until_proving(spawn: Spawner, tmp_path: Path) -> None:
    config = tmp_path / "sim.toml"
    config.write_text(SIM)
    proc = spawn.run(
        [
            sys.executable,
            "-m",
            "sectorfsm",
            "run",
            "--config",
            str(config),
            "--pledge",
            "3",
            "--until-proving",
            "--repo",
            str(tmp_path / "repo"),
        ],
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all 3 sector(s) are Proving" in proc.stdout + proc.stderr
    assert "-> Proving" in proc.stdout


def test_kill_9_with_real_sector_files_loses_nothing(spawn: Spawner, tmp_path: Path) -> None:
    """Up to six SIGKILLs of a reference-sealer daemon, each a few transitions into its run."""
    config = tmp_path / "ref.toml"
    config.write_text('[miner]\nsealer = "reference"\nblock_time = 0.2\n')
    repo = tmp_path / "repo"
    rng = random.Random(7)
    # With --until-proving each daemon exits once all sectors are Proving, and says so.
    proc = start_daemon(spawn, repo, config, "--pledge", "3", "--until-proving")
    proc.wait_for_line(r"Created CC sector: 3")  # every pledge is durable from here on
    kills = 0
    for _ in range(6):
        # Kill after 0-4 transitions of this run (0: while it resumes), unless the pipeline
        # gets to the end first.
        wanted = rng.randint(0, 4)

        def moved(lines: list[str], n: int = wanted) -> str | None:
            if any(re.search(ALL_PROVING, line) for line in lines):
                return "all proving"
            transitions = sum(1 for line in lines if re.search(TRANSITION, line))
            return "moved" if transitions >= n else None

        if proc.wait_for(moved, f"{wanted} transitions") == "all proving":
            break
        proc.kill_group()
        if proc.popen.returncode != -signal.SIGKILL:
            # The transitions counted were its last ones: it finished before the kill landed.
            assert proc.popen.returncode == 0, proc.describe()
            proc.wait_for_line(ALL_PROVING, anywhere=True)
            break
        kills += 1
        proc = start_daemon(spawn, repo, config, "--until-proving")
    assert proc.finish() == 0, proc.describe()
    assert kills >= 3, f"only {kills} kills landed before every sector was Proving"
    for n in (1, 2, 3):
        info = status(spawn, repo, n)
        assert info["state"] == "Proving", info
        kinds = [e["kind"] for e in info["log"]]  # type: ignore[attr-defined]
        for once in ("event;SectorPreCommit2", "event;SectorProving", "event;SectorFinalized"):
            assert kinds.count(once) == 1, (n, kinds)
        name = f"s-t01000-{n}"
        assert (repo / "storage" / "sealed" / name).is_file()
        assert not (repo / "storage" / "unsealed" / name).exists()  # CC: finalize dropped it
