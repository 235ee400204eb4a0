"""The `sectors` commands in-process (CliRunner): output, --json, and every bad input.

The repo is prepared with a virtual-clock Miner, then the CLI works on it with no engine
running; `test_cli_daemon.py` covers the same commands against a running `sectors run`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from sealtools import miner, run
from typer.testing import CliRunner

from sectorfsm.cli import run as runmod
from sectorfsm.cli.app import app
from sectorfsm.sealing import Miner, commp
from sectorfsm.sealing.store_view import read_sector

DAY = 86400.0


def invoke(repo: Path, *args: str) -> tuple[int, str]:
    """Run `sectors ARGS` on `repo`; returns (exit code, stdout+stderr)."""
    result = CliRunner().invoke(
        app, list(args), env={"SECTORFSM_REPO": str(repo), "COLUMNS": "200"}
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a bug: bad input must exit cleanly
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repo with sector 1 Proving and sector 2 FailedUnrecoverable (engine stopped)."""
    path = tmp_path_factory.mktemp("cli") / "repo"

    async def body() -> None:
        from sectorfsm.sched import TaskType

        cfg = {"retry": {"base": 10.0, "budget": 1}}
        async with Miner.open(path, clock="virtual", sealer="sim", config=cfg) as m:
            n = await m.pledge()
            await m.wait(n, "Proving", timeout=DAY)
            m.sealer.backend.faults.fail_tasks[TaskType.PRE_COMMIT1] = 10  # type: ignore[attr-defined]
            k = await m.pledge()
            await m.wait(k, "FailedUnrecoverable", timeout=DAY)
            await m.idle()

    run(body)
    return path


def test_status_prints_lotus_fields_and_log(repo: Path) -> None:
    code, out = invoke(repo, "status", "1")
    assert code == 0
    assert out.startswith("SectorID:\t1\nStatus:\t\tProving\nCIDcommD:\tbaga6ea4seaq")
    for field in ("CIDcommR:\tbagboea4b5abc", "TicketH:\t", "SeedH:\t\t", "Deals:\t\t[0]"):
        assert field in out
    code, out = invoke(repo, "status", "1", "--log")
    assert "--------\nEvent Log:\n0.\t" in out and "[event;SectorStartCC]" in out


def test_status_json_names(repo: Path) -> None:
    code, out = invoke(repo, "status", "1", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["number"] == 1 and data["state"] == "Proving"
    assert data["SectorID"] == 1 and data["CommR"].startswith("bagboea4b5abc")
    entry = data["log"][0]
    assert set(entry) == {"timestamp", "kind", "message", "trace"}
    assert entry["kind"] == "event;SectorStartCC"


def test_status_of_a_given_up_sector_says_why(repo: Path) -> None:
    code, out = invoke(repo, "status", "2")
    assert code == 0
    assert "Status:\t\tFailedUnrecoverable" in out
    assert "Last Error:" in out and "retry budget" in out
    assert "Gave up in:\tSealPreCommit1Failed" in out


def test_list_table_and_json(repo: Path) -> None:
    code, out = invoke(repo, "list")
    assert code == 0 and "Proving" in out and "FailedUnrecoverable" in out
    code, out = invoke(repo, "list", "--json")
    rows = json.loads(out)
    assert [(r["number"], r["state"]) for r in rows] == [(1, "Proving"), (2, "FailedUnrecoverable")]
    code, out = invoke(repo, "list", "--states", "Proving", "--json")
    assert [r["number"] for r in json.loads(out)] == [1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("status", "99"), "sector 99 not found"),
        (("status", "abc"), "valid integer"),
        (("status", "-1"), "-1"),
        (("list", "--states", "Sealing"), "not a valid sector state"),
        (("update-state", "1", "Bogus", "--really-do-it"), "valid states are"),
        (("update-state", "1", "Removing"), "--really-do-it"),
        (("remove", "1"), "--really-do-it"),
        (("terminate", "1"), "--really-do-it"),
        (("remove", "99", "--really-do-it"), "sector 99 not found"),
        (("retry", "1"), "not a failed state"),
        (("add-piece", "/nonexistent/piece.bin"), "does not exist"),
        (("run", "--config", "/nonexistent/sectors.toml"), "does not exist"),
        (("statechart", "--format", "gif"), "gif"),
    ],
)
def test_bad_input_exits_cleanly_and_changes_nothing(
    repo: Path, args: tuple[str, ...], message: str
) -> None:
    before = [read_sector(repo, n) for n in (1, 2)]
    code, out = invoke(repo, *args)
    assert code != 0
    assert message in out
    assert "Traceback" not in out
    assert [read_sector(repo, n) for n in (1, 2)] == before


def test_malformed_config_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    for text, message in [
        ("[miner\n", "not valid TOML"),
        ("[miner]\nsector_size = '3KiB'\n", "sector_size"),
        ("[miner]\nnope = 1\n", "unknown [miner] key"),
        ("[sealing]\nwait_deal_delay = 1\n", "unknown sealing option"),
        ("[[workers]]\nname = 'w'\ncpus = 'many'\n", "cpus"),
        ("[extra]\n", "unknown section"),
    ]:
        bad.write_text(text)
        code, out = invoke(tmp_path / "repo", "run", "--config", str(bad))
        assert code == 1 and message in out, (text, out)
    assert not (tmp_path / "repo").exists()


def test_commands_on_a_missing_repo(tmp_path: Path) -> None:
    code, out = invoke(tmp_path / "nowhere", "status", "1")
    assert code == 1 and "no sectorfsm repo" in out
    assert not (tmp_path / "nowhere").exists()


def test_offline_commands_wait_for_the_next_run(tmp_path: Path) -> None:
    path = tmp_path / "repo"

    async def seed() -> None:
        async with Miner.open(path, clock="virtual", sealer="sim") as m:
            n = await m.pledge()
            await m.wait(n, "Proving", timeout=DAY)

    run(seed)
    code, out = invoke(path, "pledge", "--count", "2")
    assert code == 0 and "Created CC sector: 2\nCreated CC sector: 3" in out
    assert "next `sectors run`" in out
    piece = tmp_path / "piece.bin"
    piece.write_bytes(b"deal data " * 30)
    code, out = invoke(path, "add-piece", str(piece))
    assert code == 0 and "queued" in out and commp.piece_cid(piece) in out
    code, out = invoke(path, "remove", "1", "--really-do-it")
    assert code == 0 and "next `sectors run`" in out
    assert read_sector(path, 1).state.value == "Proving"  # type: ignore[union-attr]

    async def resume() -> None:
        async with Miner.open(path, clock="virtual", sealer="sim") as m:
            for n in (2, 3):
                await m.wait(n, "Proving", timeout=DAY)
            await m.wait(1, "Removed", timeout=DAY)
            deal_sector = await _wait_for_deal_sector(m)
            info = await m.wait(deal_sector, "Proving", timeout=DAY)
            assert info.pieces[0].piece_cid == commp.piece_cid(piece)

    run(resume)


async def _wait_for_deal_sector(m: Miner) -> int:
    for _ in range(200):
        for info in m.list():
            if info.pieces and info.pieces[0].deal is not None:
                return info.number
        await m.idle()
        import asyncio

        await asyncio.sleep(0.05)
    raise AssertionError("the queued add-piece was never executed")


def test_statechart_with_a_sector_path(repo: Path) -> None:
    code, out = invoke(repo, "statechart", "--format", "json", "--sector", "1")
    assert code == 0
    data = json.loads(out)
    assert data["path"][0]["source"] == "UndefinedSectorState"
    code, out = invoke(repo, "statechart", "--sector", "77")
    assert code == 1 and "sector 77 not found" in out


def test_help_for_every_command(tmp_path: Path) -> None:
    for cmd in (
        "run",
        "pledge",
        "status",
        "list",
        "retry",
        "remove",
        "terminate",
        "update-state",
        "add-piece",
        "workers",
        "jobs",
        "sched-diag",
        "statechart",
    ):
        code, out = invoke(tmp_path, cmd, "--help")
        assert code == 0 and "--repo" in out, cmd


def test_a_bad_sealer_command_creates_nothing(tmp_path: Path) -> None:
    config = tmp_path / "cmd.toml"
    config.write_text(
        '[miner]\nsealer = "command"\n[sealer.commands]\nAP = ["/nonexistent/sealer"]\n'
    )
    code, out = invoke(tmp_path / "repo", "run", "--config", str(config))
    assert code == 1 and "/nonexistent/sealer" in out
    assert not (tmp_path / "repo").exists()


def test_until_proving_stops_when_nothing_can_move(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            a = await m.pledge()
            await m.wait(a, "Proving", timeout=DAY)
            b = await m.pledge()
            await m.wait(b, "WaitSeed", timeout=DAY)
            await m.terminate(b)  # precommitted only: Lotus pauses in TerminateFailed
            await m.wait(b, "TerminateFailed", timeout=DAY)
            await m.idle()
            with pytest.raises(runmod._Outcome, match=f"{b} in TerminateFailed"):
                await asyncio.wait_for(runmod._supervise(m, asyncio.Event(), True), 10)

    run(body)
