"""The `sectors` commands in-process (CliRunner): output, --json, and every bad input.

The repo is prepared with a virtual-clock Miner, then the CLI works on it with no engine
running; `test_cli_daemon.py` covers the same commands against a running `sectors run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest
from conftest import HANG_GUARD
from sealtools import kinds, miner, run
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
    assert data["CommR"].startswith("bagboea4b5abc")
    # One name per field: `number` and `state` as `list --json` has them, no Lotus twins.
    assert "State" not in data and "SectorID" not in data
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
        (("list", "--states", ","), "empty state name"),
        (("list", "--states", ""), "empty state name"),
        (("list", "--states", "Proving,"), "empty state name"),
        (("status", str(1 << 63)), "9223372036854775807"),
        (("retry", str(1 << 64)), "9223372036854775807"),
        (("remove", str(1 << 63), "--really-do-it"), "9223372036854775807"),
        (("terminate", str(1 << 63), "--really-do-it"), "9223372036854775807"),
        (("update-state", str(1 << 63), "Removing", "--really-do-it"), "9223372036854775807"),
        (("retry", "-5"), "-5"),
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


@pytest.mark.parametrize(
    "args",
    [
        ("status", "1"),
        ("list",),
        ("pledge",),
        ("retry", "1"),
        ("remove", "1", "--really-do-it"),
        ("update-state", "1", "Removing", "--really-do-it"),
        ("workers",),
    ],
)
def test_only_init_and_run_create_a_repo(tmp_path: Path, args: tuple[str, ...]) -> None:
    missing = tmp_path / "nonexistent" / "x"
    code, out = invoke(missing, *args)
    assert code == 1 and f"no repo at {missing}; create it with `sectors init`" in out
    assert not (tmp_path / "nonexistent").exists()


def test_add_piece_does_not_create_a_repo(tmp_path: Path) -> None:
    piece = tmp_path / "piece.bin"
    piece.write_bytes(b"data")
    code, out = invoke(tmp_path / "nowhere", "add-piece", str(piece))
    assert code == 1 and "no repo at" in out
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("args", [("status", "1"), ("list",), ("pledge",), ("run",), ("init",)])
def test_a_repo_path_no_repo_can_have_is_one_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a repo")
    code, out = invoke(a_file, *args)
    assert code == 1 and out == f"error: repo {a_file} is a file, not a directory\n"
    assert a_file.read_text() == "not a repo"
    long = tmp_path / ("x" * 256) / "repo"
    code, out = invoke(long, *args)
    assert code == 1 and "over 255 bytes long" in out and out.count("\n") == 1


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
    for _ in range(2400):  # a hang guard (two minutes or more), not a deadline
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
                await asyncio.wait_for(runmod._supervise(m, asyncio.Event(), True), HANG_GUARD)

    run(body)


def test_status_log_shortens_hex_blobs_and_json_keeps_them(repo: Path) -> None:
    code, out = invoke(repo, "status", "1", "--log")
    assert code == 0 and "[event;SectorPreCommit1]" in out
    assert not re.search(r"[0-9a-f]{40}", out.split("Event Log:", 1)[1])
    assert re.search(r"[0-9a-f]{8}…[0-9a-f]{8}", out)
    code, out = invoke(repo, "status", "1", "--json")
    messages = " ".join(e["message"] for e in json.loads(out)["log"])
    assert re.search(r"[0-9a-f]{100}", messages)  # --json is for scripts: nothing shortened


def test_an_offline_pledge_exists_at_once_for_every_command(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    code, out = invoke(path, "init")
    assert code == 0 and f"created repo {path}" in out
    code, out = invoke(path, "init")
    assert code == 1 and "already exists" in out
    code, out = invoke(path, "pledge", "--count", "2")
    assert code == 0 and "Created CC sector: 1\nCreated CC sector: 2\n" in out
    assert "queued" not in out
    code, out = invoke(path, "list")
    assert re.search(r"^\s*1\s+WaitingForEngine\s+CC", out, re.M), out
    assert re.search(r"^\s*2\s+WaitingForEngine\s+CC", out, re.M), out
    code, out = invoke(path, "status", "2")
    assert out.startswith("SectorID:\t2\nStatus:\t\tWaitingForEngine\n")
    code, out = invoke(path, "status", "2", "--json")
    assert (json.loads(out)["number"], json.loads(out)["state"]) == (2, "WaitingForEngine")
    code, out = invoke(path, "list", "--states", "WaitingForEngine", "--json")
    assert [r["number"] for r in json.loads(out)] == [1, 2]
    code, out = invoke(path, "retry", "2")
    assert code == 1 and "sector 2 is in WaitingForEngine, which is not a failed state" in out
    code, out = invoke(path, "remove", "2", "--really-do-it")
    assert code == 0 and "remove of sector 2 sent" in out

    async def resume() -> None:
        async with Miner.open(path, clock="virtual", sealer="sim") as m:
            view = runmod._PlainLog(m)
            view.update(list(m.list()))
            one = await m.wait(1, "Proving", timeout=DAY)
            two = await m.wait(2, "Removed", timeout=DAY)
            assert (one.number, two.number) == (1, 2)
            assert kinds(one).count("SectorStartCC") == 1

    out_lines: list[str] = []
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        run(resume)
    out_lines = buf.getvalue().splitlines()
    # The first lines of the run's log name both sectors as themselves, never a sector 0.
    assert [line.split(" ", 1)[1] for line in out_lines] == [
        "sector 1: - -> WaitingForEngine",
        "sector 2: - -> WaitingForEngine",
    ]


def test_an_offline_pledge_needs_a_repo_with_an_identity(tmp_path: Path) -> None:
    from sectorfsm.fsm import LmdbStore
    from sectorfsm.sealing.store_view import store_path

    LmdbStore(store_path(tmp_path / "repo")).close()  # a store no engine ever opened
    code, out = invoke(tmp_path / "repo", "pledge")
    assert code == 1 and "no miner identity yet" in out and "sectors init" in out


def test_a_pledge_without_an_answer_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sectorfsm.cli import sectors as sectors_cli
    from sectorfsm.sealing import requests

    assert invoke(tmp_path / "repo", "init")[0] == 0
    # As if an engine held the repo when we looked, then stopped before answering.
    monkeypatch.setattr(requests, "pledge_offline", lambda store, count: None)
    monkeypatch.setattr(sectors_cli, "RESULT_WAIT", 0.01)
    code, out = invoke(tmp_path / "repo", "pledge")
    assert code == 0 and "has not answered" not in out
    assert "the engine stopped before answering: the next `sectors run` executes it" in out


@pytest.fixture(scope="module")
def removed_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repo with sector 1 Removed and sector 2 Proving, whose last error is long."""
    path = tmp_path_factory.mktemp("removed") / "repo"

    async def body() -> None:
        async with Miner.open(path, clock="virtual", sealer="sim") as m:
            for _ in range(2):
                await m.wait(await m.pledge(), "Proving", timeout=DAY)
            await m.remove(1)
            await m.wait(1, "Removed", timeout=DAY)

    run(body)
    return path


def test_list_says_how_many_removed_sectors_it_hides(removed_repo: Path) -> None:
    code, out = invoke(removed_repo, "list")
    assert code == 0 and "1 removed sector(s) hidden; --all shows them" in out
    assert not re.search(r"^\s*1\s+Removed", out, re.M)
    for flag in ("--all", "--show-removed"):
        code, out = invoke(removed_repo, "list", flag)
        assert re.search(r"^\s*1\s+Removed", out, re.M) and "hidden" not in out


def test_list_piped_never_cuts_a_column(repo: Path) -> None:
    # CliRunner's stdout is not a terminal, as with a pipe; COLUMNS must not matter then.
    result = CliRunner().invoke(app, ["list"], env={"SECTORFSM_REPO": str(repo), "COLUMNS": "30"})
    row = next(line for line in result.output.splitlines() if line.strip().startswith("2 "))
    assert "FailedUnrecoverable" in row and "…" not in row
    last_err = read_sector(repo, 2).last_err  # type: ignore[union-attr]
    assert len(last_err) > 60 and last_err in row


def test_top_level_repo_option_and_its_precedence(repo: Path, tmp_path: Path) -> None:
    env, top, own = tmp_path / "env", tmp_path / "top", tmp_path / "own"
    before = os.environ.get("SECTORFSM_REPO")
    code, out = invoke(env, "--repo", str(repo), "list", "--json")
    assert code == 0 and [r["number"] for r in json.loads(out)] == [1, 2]
    assert invoke(env, "--repo", str(top), "status", "1")[1] == (
        f"error: no repo at {top}; create it with `sectors init` or `sectors run`\n"
    )
    code, out = invoke(env, "--repo", str(top), "status", "1", "--repo", str(own))
    assert f"no repo at {own};" in out
    assert f"no repo at {env};" in invoke(env, "status", "1")[1]
    assert os.environ.get("SECTORFSM_REPO") == before  # the override ends with the command


def test_a_read_only_repo_can_still_be_read(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from sectorfsm.cli import common

    copy = tmp_path / "ro"
    shutil.copytree(repo, copy, ignore=shutil.ignore_patterns("lock.mdb", "engine.lock"))
    store = copy / "store"
    if os.geteuid() == 0:  # root writes anywhere: make this process see the repo as others do
        real_access = os.access
        monkeypatch.setattr(
            common.os,
            "access",
            lambda p, mode: False if Path(p) == store else real_access(p, mode),
        )
    modes = {p: p.stat().st_mode for p in [copy, store, *store.iterdir()]}
    try:
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        code, out = invoke(copy, "status", "1")
        assert code == 0 and "Status:\t\tProving" in out
        code, out = invoke(copy, "list", "--json")
        assert code == 0 and [r["number"] for r in json.loads(out)] == [1, 2]
        code, out = invoke(copy, "retry", "2")
        assert code == 1 and f"repo {copy} is read-only" in out
        assert not (store / "lock.mdb").exists()  # reading left no trace
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def test_run_counts_every_sector_it_waits_for_and_logs_only_real_edges(tmp_path: Path) -> None:
    from sectorfsm.sealing import graph
    from sectorfsm.sealing.states import SectorState
    from sectorfsm.statecharts import path_from_log

    async def body() -> tuple[str, list[int]]:
        async with miner(tmp_path, sealer="sim") as m:
            early = [await m.pledge() for _ in range(2)]
            for n in early:
                await m.wait(n, "Proving", timeout=DAY)
            late = await m.pledge()  # Proving before the run: counted, not re-read
            with contextlib.redirect_stdout(io.StringIO()) as buf:
                code = await asyncio.wait_for(
                    runmod._supervise(m, asyncio.Event(), True), HANG_GUARD
                )
            assert code == 0
            return buf.getvalue(), [*early, late]

    out, numbers = run(body)
    assert out.rstrip().endswith("all 3 sector(s) are Proving"), out
    lines = [line.split(" ", 1)[1] for line in out.splitlines() if " sector " in line]
    mine = [line for line in lines if line.startswith(f"sector {numbers[2]}: ")]
    pairs = [tuple(line.split(": ", 1)[1].split(" -> ")) for line in mine[1:]]
    assert pairs, out
    for source, dest in pairs:  # each printed step is an edge of the graph
        src = SectorState(source)
        assert any(e.source is src and e.dest == SectorState(dest) for e in graph.EDGES), (
            source,
            dest,
        )
    info = read_sector(tmp_path / "repo", numbers[2])
    assert info is not None
    taken = [(a, b) for a, _, b in path_from_log(info.log)]
    assert pairs == taken[len(taken) - len(pairs) :]


def test_the_final_live_view_has_no_empty_table(tmp_path: Path) -> None:
    from rich.console import Console

    async def body() -> str:
        async with miner(tmp_path, sealer="sim") as m:
            await m.wait(await m.pledge(), "Proving", timeout=DAY)
            console = Console(record=True, width=120, file=io.StringIO())
            console.print(runmod._LiveView(m)._render(list(m.list())))
            # The summary is the repo's per-commit counts, not the sectors the view tracks
            # (a daemon tracks only live ones: a repo's Proving sectors are never re-read).
            console.print(runmod._LiveView(m)._render([]))
            return console.export_text()

    text = run(body)
    assert text.count("Proving 1") == 2 and "Worker" in text
    assert "Sector" not in text and "Last event" not in text
