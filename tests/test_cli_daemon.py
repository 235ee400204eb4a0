"""`sectors run` as a real background process, driven by other `sectors` processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SIM = '[miner]\nsealer = "sim"\nblock_time = 0.1\n'
#: 8 MiB sim sectors: PreCommit1 takes about 3 s of real time, long enough to kill it.
SLOW = '[miner]\nsealer = "sim"\nsector_size = "8MiB"\nblock_time = 0.1\n'


def sectors(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the `sectors` CLI in its own process."""
    env = {**os.environ, "SECTORFSM_REPO": str(repo), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "sectorfsm", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sectors {' '.join(args)} failed: {proc.stdout}{proc.stderr}")
    return proc


def start_daemon(repo: Path, config: Path, *args: str) -> subprocess.Popen[str]:
    """Start `sectors run` in the background."""
    env = {**os.environ, "SECTORFSM_REPO": str(repo)}
    return subprocess.Popen(
        [sys.executable, "-m", "sectorfsm", "run", "--config", str(config), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_state(repo: Path, number: int, state: str, timeout: float = 40.0) -> dict[str, object]:
    """Poll `sectors status N --json` until the sector is in `state`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        proc = sectors(repo, "status", str(number), "--json", check=False)
        if proc.returncode == 0:
            last = json.loads(proc.stdout)
            if last["state"] == state:
                return last
        time.sleep(0.2)
    raise AssertionError(f"sector {number} did not reach {state}: {last}")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    config = tmp_path / "sim.toml"
    config.write_text(SIM)
    repo = tmp_path / "repo"
    proc = start_daemon(repo, config)
    deadline = time.monotonic() + 20
    while not (repo / "store" / "engine.lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    yield repo, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.timeout(90)
def test_pledge_from_another_process_reaches_proving(
    daemon: tuple[Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    repo, proc = daemon
    out = sectors(repo, "pledge").stdout
    assert out.startswith("Created CC sector: 1")
    info = wait_state(repo, 1, "Proving")
    assert [e["kind"] for e in info["log"]][-1] == "event;SectorFinalized"  # type: ignore[index]
    piece = tmp_path / "piece.bin"
    piece.write_bytes(b"hello sectorfsm " * 8)
    out = sectors(repo, "add-piece", str(piece)).stdout
    assert "added to sector 2" in out
    # The scheduler views read the snapshot the daemon publishes, with its age.
    workers = json.loads(sectors(repo, "workers", "--json").stdout)
    assert workers["workers"][0]["name"] == "sim-worker" and workers["age_s"] < 5
    assert "snapshot taken" in sectors(repo, "jobs").stdout
    assert "json" not in sectors(repo, "sched-diag", "--json").stderr
    wait_state(repo, 2, "Proving")
    # Operator commands reach the running engine through its inbox.
    sectors(repo, "update-state", "2", "Removing", "--really-do-it")
    wait_state(repo, 2, "Removed")
    sectors(repo, "terminate", "1", "--really-do-it")
    wait_state(repo, 1, "Removed")
    retry = sectors(repo, "retry", "1", check=False)
    assert retry.returncode == 1 and "not a failed state" in retry.stderr
    # A second engine on the same repo is refused, clearly.
    second = sectors(repo, "run", check=False)
    assert second.returncode == 1 and "already running" in second.stderr
    assert "Traceback" not in second.stderr
    # Ctrl-C stops the daemon cleanly.
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    assert "stopping" in out


@pytest.mark.timeout(120)
def test_kill_9_mid_seal_loses_nothing(tmp_path: Path) -> None:
    config = tmp_path / "slow.toml"
    config.write_text(SLOW)
    repo = tmp_path / "repo"
    proc = start_daemon(repo, config, "--pledge", "2")
    wait_state(repo, 2, "PreCommit1", timeout=30)
    time.sleep(1.0)  # in the middle of PreCommit1
    proc.kill()
    proc.wait()
    killed_in = {n: sectors(repo, "status", str(n), "--json") for n in (1, 2)}
    assert all(p.returncode == 0 for p in killed_in.values())
    proc = start_daemon(repo, config, "--until-proving")
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    for n in (1, 2):
        info = wait_state(repo, n, "Proving", timeout=5)
        kinds = [e["kind"] for e in info["log"]]  # type: ignore[index]
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


@pytest.mark.timeout(90)
def test_run_pledge_until_proving(tmp_path: Path) -> None:
    config = tmp_path / "sim.toml"
    config.write_text(SIM)
    proc = subprocess.run(
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
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all 3 sector(s) are Proving" in proc.stdout
    assert "sector 3: CommitAggregateWait -> Proving" in proc.stdout or "-> Proving" in proc.stdout


@pytest.mark.timeout(150)
def test_kill_9_with_real_sector_files_loses_nothing(tmp_path: Path) -> None:
    import random

    config = tmp_path / "ref.toml"
    config.write_text('[miner]\nsealer = "reference"\nblock_time = 0.2\n')
    repo = tmp_path / "repo"
    rng = random.Random(7)
    proc = start_daemon(repo, config, "--pledge", "3")
    for _ in range(6):
        time.sleep(rng.uniform(0.3, 1.2))
        proc.kill()
        proc.wait()
        proc = start_daemon(repo, config)
    proc.send_signal(signal.SIGINT)
    proc.wait(20)
    proc = start_daemon(repo, config, "--until-proving")
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    for n in (1, 2, 3):
        info = wait_state(repo, n, "Proving", timeout=5)
        kinds = [e["kind"] for e in info["log"]]  # type: ignore[index]
        for once in ("event;SectorPreCommit2", "event;SectorProving", "event;SectorFinalized"):
            assert kinds.count(once) == 1, (n, kinds)
        name = f"s-t01000-{n}"
        assert (repo / "storage" / "sealed" / name).is_file()
        assert not (repo / "storage" / "unsealed" / name).exists()  # CC: finalize dropped it
