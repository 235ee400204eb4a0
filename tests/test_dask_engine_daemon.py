"""`sectors run` with `[cluster]`: the daemon runs a Dask scheduler and shows remote workers.

The daemon and the `dask worker` processes (declaring a contract identity through
tests/daskpreload.py) are real processes; every wait is on a line the daemon prints or on
what `sectors workers --json` reports.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from conftest import Spawner, until
from test_dask_engine import identity, start_worker

from sectorfsm.sched.tasks import TaskType

CONFIG = '[miner]\nsealer = "sim"\nblock_time = 0.1\n[cluster]\nlisten = "tcp://127.0.0.1:0"\n'


def _env(repo: Path) -> dict[str, str]:
    return {**os.environ, "SECTORFSM_REPO": str(repo), "COLUMNS": "200"}


def workers_json(spawn: Spawner, repo: Path) -> dict[str, Any]:
    """`sectors workers --json` ({} while no snapshot is published yet)."""
    proc = spawn.run([sys.executable, "-m", "sectorfsm", "workers", "--json"], env=_env(repo))
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def test_run_starts_the_scheduler_and_shows_remote_workers(spawn: Spawner, tmp_path: Path) -> None:
    repo, config = tmp_path / "repo", tmp_path / "sectors.toml"
    config.write_text(CONFIG)
    daemon = spawn.python(
        "-m", "sectorfsm", "run", "--config", config, env=_env(repo), name="daemon"
    )
    address = daemon.wait_for_line(r"cluster: Dask scheduler running (tcp://127\.0\.0\.1:\d+)")[1]
    worker = start_worker(
        spawn,
        address,
        "rw1",
        identity("rw1", (TaskType.PRE_COMMIT1,)),
        free={"rw1-ssd": 7 << 30},
    )
    broken = identity("broken", (TaskType.PRE_COMMIT1,))
    del broken["resources"]
    start_worker(spawn, address, "broken", broken)
    daemon.wait_for_line(r"cluster: worker rw1 joined from tcp://127\.0\.0\.1:\d+", anywhere=True)

    def remote_row() -> dict[str, Any] | None:
        snap = workers_json(spawn, repo)
        row = next((w for w in snap.get("workers", []) if w["name"] == "rw1"), None)
        if row is None or not snap.get("refused") or not row["remote"]["free"]:
            return None
        return {**row, "refused": snap["refused"]}

    row = until(remote_row, "rw1 and the refused worker in `sectors workers --json`")
    assert row["remote"]["host"] == "127.0.0.1"
    assert row["remote"]["address"].startswith("tcp://127.0.0.1:")
    assert row["remote"]["free"] == {"rw1-ssd": 7 << 30}
    assert row["remote"]["heartbeat_age_s"] is not None
    (why,) = row["refused"].values()
    assert "resources" in why
    # The local worker is kept (local_worker defaults to true).
    assert len(workers_json(spawn, repo)["workers"]) == 2
    table = spawn.run([sys.executable, "-m", "sectorfsm", "workers"], env=_env(repo)).stdout
    assert "Remote worker" in table and "rw1-ssd:7.0GiB" in table
    worker.kill()
    daemon.wait_for_line(r"cluster: worker rw1 left", anywhere=True)
    daemon.interrupt()
    assert daemon.finish() == 0
