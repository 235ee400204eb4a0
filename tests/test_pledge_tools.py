"""`pledge --fill/--per-worker` (myScheduler's `mypledge`/`mypledgeonce`) from Python and the CLI.

Each test runs a sim miner on the virtual clock with workers whose myscheduler.json caps AP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import Spawner, until
from sealtools import miner, run

from sectorfsm.sched import FileType, SectorRef
from sectorfsm.sealing.backends.sim import sim_worker
from sectorfsm.sealing.miner import Miner

#: Every stage open; PC1 stays where AP wrote the unsealed file, so the file shows where AP ran.
OPEN: dict[str, Any] = {
    "AddPieceMax": None,
    "PreCommit1Max": None,
    "PreCommit2Max": None,
    "Commit2Max": None,
    "ForceP1FromLocalAP": True,
    "ForceP2FromLocalP1": False,
    "AllowDelay": 0,
}


def workers(tmp_path: Path, **policies: dict[str, Any]) -> list[Any]:
    """Sim workers named after the keywords, each with its own policy file."""
    out = []
    for name, policy in policies.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**OPEN, **policy}))
        spec = sim_worker(name)
        spec.policy_file = path
        out.append(spec)
    return out


def ap_worker(m: Miner, n: int) -> set[str]:
    """Where the sector's unsealed file (written by AddPiece) is."""
    return m.sched.index.holders(SectorRef(m.miner_id, n, m.sector_size), FileType.UNSEALED)


def test_fill_counts_free_ap_slots_per_worker_and_pins_each_sector(tmp_path: Path) -> None:
    specs = workers(
        tmp_path,
        a={"AddPieceMax": 3},
        b={"AddPieceMax": 2},
        off={"AddPieceMax": 4, "IsPlanOffline": True},
        noap={"AddPieceMax": 0},
    )

    async def main() -> None:
        async with miner(tmp_path, workers=specs) as m:
            dry = await m.pledge_fill(dry_run=True)
            free = {s.worker: (s.free, s.note) for s in dry.slots}
            assert free == {
                "a": (3, ""),
                "b": (2, ""),
                "off": (0, "draining (IsPlanOffline)"),
                "noap": (0, "AP disabled (AddPieceMax = 0)"),
            }
            assert dry.sectors == [] and list(m.list()) == []

            plan = await m.pledge_fill()
            assert plan.granted == {"a": 3, "b": 2} and len(plan.sectors) == 5
            pins = {n: m.status(n).ap_worker for n in plan.sectors}
            assert sorted(pins.values()) == ["a", "a", "a", "b", "b"]
            # The pledged sectors hold the slots: a second fill finds none.
            again = await m.pledge_fill(dry_run=True)
            assert {s.worker: s.free for s in again.slots}["a"] == 0
            assert sum(s.free for s in again.slots) == 0
            for n, worker in pins.items():
                await m.wait(n, "PreCommit2", timeout=3600)
                assert ap_worker(m, n) == {worker}

    run(main)


def test_per_worker_pins_one_sector_to_each_worker_even_when_another_is_idler(
    tmp_path: Path,
) -> None:
    # `idle` has more free AP slots, so an unpinned AP would go there; the pin wins.
    specs = workers(tmp_path, busy={"AddPieceMax": 1}, idle={"AddPieceMax": 8})

    async def main() -> None:
        async with miner(tmp_path, workers=specs) as m:
            plan = await m.pledge_per_worker()
            assert plan.granted == {"busy": 1, "idle": 1}
            by_worker = {m.status(n).ap_worker: n for n in plan.sectors}
            for worker, n in by_worker.items():
                await m.wait(n, "PreCommit2", timeout=3600)
                assert ap_worker(m, n) == {worker}

    run(main)


def test_fill_stops_at_max_sealing_sectors_and_says_so(tmp_path: Path) -> None:
    specs = workers(tmp_path, a={"AddPieceMax": 3}, b={"AddPieceMax": 3})

    async def main() -> None:
        async with miner(tmp_path, workers=specs, config={"max_sealing_sectors": 4}) as m:
            await m.pledge()
            plan = await m.pledge_fill()
            assert len(plan.sectors) == 3
            assert plan.stopped.startswith("MaxSealingSectors (4) stopped it at 3 of 6")

    run(main)


def test_pin_survives_in_the_record_and_old_records_decode(tmp_path: Path) -> None:
    from sectorfsm.fsm.codec import RecordCodec
    from sectorfsm.sealing.events import ALL_EVENTS
    from sectorfsm.sealing.info import SectorInfo

    codec: RecordCodec[SectorInfo] = RecordCodec(SectorInfo, ALL_EVENTS)
    fields = codec.encode_state_fields(SectorInfo(number=7, ap_worker="a", auto_pledged=True))
    older = {k: v for k, v in fields.items() if k not in ("ap_worker", "auto_pledged")}
    back = codec.decode_state_fields(older)  # a record written before the pin existed
    assert (back.number, back.ap_worker, back.auto_pledged) == (7, "", False)
    specs = workers(tmp_path, a={"AddPieceMax": 1})

    async def main() -> None:
        async with miner(tmp_path, workers=specs) as m:
            [n] = (await m.pledge_per_worker()).sectors
        async with miner(tmp_path, workers=specs) as m:
            assert m.status(n).ap_worker == "a"
            await m.wait(n, "PreCommit2", timeout=3600)
            assert ap_worker(m, n) == {"a"}

    run(main)


# --- the CLI, against a running daemon -------------------------------------------------------

CONFIG = """\
[miner]
sealer = "sim"
block_time = 0.1

[sealing]
auto_pledge = true

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


def _cli(spawn: Spawner, repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SECTORFSM_REPO": str(repo), "COLUMNS": "200"}
    return spawn.run([sys.executable, "-m", "sectorfsm", *args], env=env)


def test_cli_fill_needs_an_engine_then_counts_and_pins(spawn: Spawner, tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(CONFIG)
    # PC1 held, so sector 1 leaves its AP slot and stays: the count below is deterministic.
    (tmp_path / "myscheduler.json").write_text(
        json.dumps({**OPEN, "AddPieceMax": 2, "PreCommit1Max": 0})
    )
    repo = tmp_path / "repo"
    init = _cli(spawn, repo, "init", "--config", str(config))
    assert init.returncode == 0, init.stderr
    refused = _cli(spawn, repo, "pledge", "--fill")
    assert refused.returncode != 0 and "start `sectors run` first" in refused.stderr
    assert "nothing was pledged" in refused.stderr
    assert _cli(spawn, repo, "pledge", "--fill", "--per-worker").returncode != 0

    env = {**os.environ, "SECTORFSM_REPO": str(repo), "COLUMNS": "200"}
    daemon = spawn.python("-m", "sectorfsm", "run", "--config", config, "--pledge", "1", env=env)
    try:
        daemon.wait_for_line(r"sector 1: .*-> PreCommit1\b", anywhere=True)
        dry = _cli(spawn, repo, "pledge", "--fill", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "w1: AddPieceMax 2, AP in use 0, free 2, pledge 2" in dry.stdout
        assert "dry run: would pledge 2 sector(s)" in dry.stdout
        once = _cli(spawn, repo, "pledge", "--per-worker", "--dry-run")
        assert "pledge 1" in once.stdout and "would pledge 1 sector(s)" in once.stdout
        done = _cli(spawn, repo, "pledge", "--fill", "--json")
        plan = json.loads(done.stdout)
        assert plan["granted"] == {"w1": 2} and plan["sectors"] == [2, 3]
        status = _cli(spawn, repo, "status", "2")
        assert "AddPiece on:\tw1 (pinned)" in status.stdout, status.stdout
        until(lambda: _workers(spawn, repo).get("caps"), "caps in the workers snapshot")
        w1 = _workers(spawn, repo)
        assert w1["caps"] == {"AP": 2, "PC1": 0, "PC2": None, "C2": None}
        assert w1["auto_pledge"] is None  # no AutoPledgeDiff
        daemon.interrupt()
        assert daemon.finish() == 0, daemon.describe()
    finally:
        daemon.kill_group()


def _workers(spawn: Spawner, repo: Path) -> dict[str, Any]:
    out = _cli(spawn, repo, "workers", "--json")
    [w1] = json.loads(out.stdout)["workers"]
    return w1  # type: ignore[no-any-return]
