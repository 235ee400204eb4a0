"""Sector commands: status, list, pledge, add-piece, retry, remove, terminate, update-state.

They read the store directly and write their commands into the engine's durable inbox, so
they work whether or not `sectors run` is running (an engine picks them up within a second).
Output follows `lotus-miner sectors` (`cmd/lotus-miner/sectors.go@v1.11.3`).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .common import (
    DEFAULT_REPO,
    JsonOption,
    ReallyOption,
    RepoOption,
    SectorArg,
    engine_note,
    fail,
    open_repo,
    out_console,
    state_colour,
)

if TYPE_CHECKING:
    from ..fsm import LmdbStore
    from ..sealing.info import SectorInfo

#: Lotus's refusal without --really-do-it (remove, update-state).
ADVANCED = (
    "this is a command for advanced users, only use it if you are sure of what you are "
    "doing: pass --really-do-it"
)
#: How long a command waits for a running engine to execute a queued pledge/add-piece.
RESULT_WAIT = 5.0


def _read(store: LmdbStore, number: int) -> SectorInfo:
    from ..fsm import RecordError
    from ..sealing.store_view import sector_records

    records = sector_records(store, events=False)
    try:
        raw = records.raw(records.key(number))
        info = None if raw is None else records.decode(raw, number)[0]
    except RecordError as exc:
        info = None
        reason = str(exc)
    if info is None:
        from .quarantine import explain, find

        bad = find(store, number)
        if bad is not None:
            fail(explain(bad))
        if raw is not None:
            fail(reason)
        fail(f"sector {number} not found in {store.path.parent}")
    return info


def _hex(value: bytes) -> str:
    return value.hex()


#: Hex runs this long or longer (proofs, PC1 outputs) are shortened in `status --log`.
_LONG_HEX = re.compile(r"[0-9a-f]{40,}")


def short_blobs(text: str) -> str:
    """`text` with each long hex blob shortened to `prefix…suffix` (its full form: --json)."""
    return _LONG_HEX.sub(lambda m: f"{m[0][:8]}…{m[0][-8:]}", text)


def _go_time(ts: int) -> str:
    # Go's time.Time %s format, as Lotus prints log timestamps.
    return time.strftime("%Y-%m-%d %H:%M:%S %z %Z", time.localtime(ts))


def status_dict(info: SectorInfo) -> dict[str, Any]:
    """The `--json` form: `number` and `state` as `list --json` has them, Lotus's API fields."""
    from ..sealing.store_view import display_state

    deals = info.deal_ids()
    return {
        "number": info.number,
        "state": display_state(info),
        "CommD": info.comm_d,
        "CommR": info.comm_r,
        "Proof": _hex(info.proof),
        "Deals": deals,
        "Pieces": [
            {
                "Piece": {"Size": p.size, "PieceCID": p.piece_cid},
                "DealInfo": None
                if p.deal is None
                else {
                    "DealID": p.deal.deal_id,
                    "PublishCid": p.deal.publish_cid,
                    "DealSchedule": {
                        "StartEpoch": p.deal.start_epoch,
                        "EndEpoch": p.deal.end_epoch,
                    },
                    "KeepUnsealed": p.deal.keep_unsealed,
                },
            }
            for p in info.pieces
        ],
        "Ticket": {"Value": _hex(info.ticket_value), "Epoch": info.ticket_epoch},
        "Seed": {"Value": _hex(info.seed_value), "Epoch": info.seed_epoch},
        "PreCommitMsg": info.precommit_message,
        "CommitMsg": info.commit_message,
        "Retries": info.invalid_proofs,
        "LastErr": info.last_err,
        "retries_spent": info.retries,
        "retry_at": info.retry_at or None,
        "unrecoverable_from": info.unrecoverable_from or None,
        "ap_worker": info.ap_worker or None,
        "auto_pledged": info.auto_pledged,
        "log": [
            {"timestamp": e.timestamp, "kind": e.kind, "message": e.message, "trace": e.trace}
            for e in info.log
        ],
    }


def status(
    sector: SectorArg,
    log: Annotated[bool, typer.Option("--log", "-l", help="Show the event log.")] = False,
    as_json: JsonOption = False,
    repo: RepoOption = DEFAULT_REPO,
) -> None:
    """Show a sector's state and Lotus-style fields (and its event log with --log)."""
    from ..sealing.store_view import display_state

    with open_repo(repo) as store:
        info = _read(store, sector)
    if as_json:
        typer.echo(json.dumps(status_dict(info), indent=2))
        return
    nil = "<nil>"
    lines = [
        f"SectorID:\t{info.number}",
        f"Status:\t\t{display_state(info)}",
        f"CIDcommD:\t{info.comm_d or nil}",
        f"CIDcommR:\t{info.comm_r or nil}",
        f"Ticket:\t\t{_hex(info.ticket_value)}",
        f"TicketH:\t{info.ticket_epoch}",
        f"Seed:\t\t{_hex(info.seed_value)}",
        f"SeedH:\t\t{info.seed_epoch}",
        f"Precommit:\t{info.precommit_message or nil}",
        f"Commit:\t\t{info.commit_message or nil}",
        f"Deals:\t\t[{' '.join(str(d) for d in info.deal_ids())}]",
        f"Retries:\t{info.invalid_proofs}",
    ]
    if info.last_err:
        lines.append(f"Last Error:\t\t{info.last_err}")
    if info.retry_at:
        lines.append(f"Next retry:\t{_go_time(int(info.retry_at))} (retry {info.retries + 1})")
    if info.unrecoverable_from:
        lines.append(f"Gave up in:\t{info.unrecoverable_from} (`sectors retry` resumes it)")
    if info.auto_pledged:
        lines.append(f"Pledged:\tauto-pledge for worker {info.ap_worker}")
    elif info.ap_worker:
        lines.append(f"AddPiece on:\t{info.ap_worker} (pinned)")
    if log:
        lines.append("--------\nEvent Log:")
        for i, e in enumerate(info.log):
            message = short_blobs(e.message)
            lines.append(f"{i}.\t{_go_time(e.timestamp)}:\t[{e.kind}]\t{message}")
            if e.trace:
                lines.append(f"\t{e.trace}")
    typer.echo("\n".join(lines))


def _events(info: SectorInfo) -> int:
    return sum(1 for e in info.log if e.kind.startswith("event;"))


def _seal_time(info: SectorInfo) -> float | None:
    if not info.log:
        return None
    for e in info.log:
        if e.kind == "event;SectorProving":
            return float(e.timestamp - info.log[0].timestamp)
    return None


def _wanted_states(states: str) -> set[str]:
    """The state names of a `--states` filter; a one-line error for an empty or unknown one."""
    from ..sealing.states import parse_state
    from ..sealing.store_view import WAITING_FOR_ENGINE

    names = [s.strip() for s in states.split(",")]
    if not all(names):
        fail(
            f"--states {states!r} has an empty state name (give e.g. --states PreCommit1,WaitSeed)"
        )
    wanted = set()
    for name in names:
        if name == WAITING_FOR_ENGINE:
            wanted.add(name)
            continue
        try:
            wanted.add(parse_state(name).value)
        except ValueError as exc:
            fail(f"{exc}, {WAITING_FOR_ENGINE}")
    return wanted


def list_(
    states: Annotated[
        str | None,
        typer.Option("--states", help="Only these states, comma separated (shows Removed too)."),
    ] = None,
    show_all: Annotated[
        bool,
        typer.Option("--all", "--show-removed", help="Include Removed sectors."),
    ] = False,
    summary: Annotated[
        bool,
        typer.Option(
            "--summary", help="Only the counts per state and per Lotus state group (no scan)."
        ),
    ] = False,
    as_json: JsonOption = False,
    repo: RepoOption = DEFAULT_REPO,
) -> None:
    """List sectors by number, with state, deals, events and seal time."""
    from ..sealing.states import SectorState
    from ..sealing.store_view import display_state, sector_records

    if summary:
        if states is not None or show_all:
            fail("--summary counts every sector: it takes no --states or --all")
        from ..sealing.input import stored_limit
        from ..sealing.stats import sector_counts, sector_stats
        from ..sealing.store_view import WAITING_FOR_ENGINE

        with open_repo(repo) as store:
            counts = sector_counts(sector_records(store, events=False))
            limit = stored_limit(store)
        stats = sector_stats(counts)
        undefined = SectorState.UndefinedSectorState.name
        named = {WAITING_FOR_ENGINE if k == undefined else k: n for k, n in counts.items()}
        if as_json:
            doc = {"states": named, "groups": stats.as_dict(), "max_sealing_sectors": limit}
            typer.echo(json.dumps(doc, indent=2))
            return
        # Lotus's `lotus-miner info` "Sectors:" block: the total, then each state in use.
        typer.echo(f"Sectors:\n\tTotal: {stats.total}")
        for name, n in named.items():
            if n:
                typer.echo(f"\t{name}: {n}")
        typer.echo("Groups:")
        for name, n in stats.as_dict().items():
            if name not in ("total", "cur_sealing"):
                typer.echo(f"\t{name}: {n}")
        cap = f"max {limit}" if limit > 0 else "no MaxSealingSectors"
        typer.echo(f"\tcurSealing: {stats.cur_sealing} ({cap})")
        return
    wanted = None if states is None else _wanted_states(states)
    hidden = 0
    from .quarantine import corrupt_sectors, row

    with open_repo(repo) as store:
        rows = []
        # Unreadable records are listed as Corrupt (unless a state filter is given).
        corrupt = corrupt_sectors(store) if wanted is None else []
        for _, info in sector_records(store, events=False).list(on_error=lambda *_: None):
            if wanted is not None and display_state(info) not in wanted:
                continue
            if wanted is None and not show_all and info.state is SectorState.Removed:
                hidden += 1
                continue
            rows.append(info)
    if hidden:
        typer.echo(f"({hidden} removed sector(s) hidden; --all shows them)", err=True)
    if as_json:
        out = [
            {
                "number": i.number,
                "state": display_state(i),
                "deals": [d for d in i.deal_ids() if d],
                "events": _events(i),
                "seal_time_s": _seal_time(i),
                "retries": i.retries,
                "last_error": i.last_err or None,
            }
            for i in rows
        ]
        out = sorted(out + [row(c) for c in corrupt], key=lambda r: int(str(r["number"])))
        typer.echo(json.dumps(out, indent=2))
        return
    from rich.table import Table

    console = out_console()
    cut = 60 if console.is_terminal else None  # piped or redirected: scripts get it whole
    table = Table("ID", "State", "Deals", "Events", "SealTime", "Retries", "Error", box=None)
    for i in rows:
        deals = [d for d in i.deal_ids() if d]
        seal = _seal_time(i)
        shown = display_state(i)
        table.add_row(
            str(i.number),
            f"[{state_colour(shown)}]{shown}[/]",
            f"[green]{len(deals)}[/]" if deals else "[blue]CC[/]",
            str(_events(i)),
            "" if seal is None else f"{seal / 60:.1f}m",
            str(i.retries) if i.retries else "",
            (i.last_err[:cut] + "…") if cut and len(i.last_err) > cut else i.last_err,
        )
    for c in corrupt:  # `sectors status N` says what is wrong and how to recover
        reason = (c.reason[:60] + "…") if len(c.reason) > 60 else c.reason
        table.add_row(str(c.number), "[red]Corrupt[/]", "", "", "", "", reason)
    console.print(table)


def _send(store: LmdbStore, number: int, event: object) -> None:
    from ..sealing.store_view import sector_records

    records = sector_records(store)
    raw = records.codec.encode_event(event)
    for name in ("states", "live", "mailbox", "counters"):
        store.db(name)
    store.write(lambda txn: records.client_send(txn, number, raw, None))


def retry(sector: SectorArg, repo: RepoOption = DEFAULT_REPO) -> None:
    """Retry a failed sector now (skips the backoff; resumes a FailedUnrecoverable one)."""
    from ..sealing.events import SectorRetryNow
    from ..sealing.states import FAILED_STATES
    from ..sealing.store_view import display_state

    with open_repo(repo, write=True) as store:
        info = _read(store, sector)
        if info.state not in FAILED_STATES:
            fail(
                f"sector {sector} is in {display_state(info)}, which is not a failed state; "
                "retry only applies to failed sectors"
            )
        _send(store, sector, SectorRetryNow())
        typer.echo(f"retry of sector {sector} ({info.state.value}) sent; {engine_note(store)}")


def remove(
    sector: SectorArg, really: ReallyOption = False, repo: RepoOption = DEFAULT_REPO
) -> None:
    """Forcefully remove a sector (WARNING: loses power and collateral; see `terminate`)."""
    from ..sealing.events import SectorRemove

    if not really:
        fail(ADVANCED)
    with open_repo(repo, write=True) as store:
        _read(store, sector)
        _send(store, sector, SectorRemove())
        typer.echo(f"remove of sector {sector} sent; {engine_note(store)}")


def terminate(
    sector: SectorArg, really: ReallyOption = False, repo: RepoOption = DEFAULT_REPO
) -> None:
    """Terminate a sector on chain, then remove its data."""
    from ..sealing.events import SectorTerminate

    if not really:
        fail("pass --really-do-it to confirm this action")
    with open_repo(repo, write=True) as store:
        _read(store, sector)
        _send(store, sector, SectorTerminate())
        typer.echo(f"terminate of sector {sector} sent; {engine_note(store)}")


def update_state(
    sector: SectorArg,
    state: Annotated[str, typer.Argument(help="The state to force the sector into.")],
    really: ReallyOption = False,
    repo: RepoOption = DEFAULT_REPO,
) -> None:
    """Force a sector into a state (validated against the state graph)."""
    from ..sealing.events import SectorForceState
    from ..sealing.states import parse_state
    from ..sealing.store_view import display_state

    if not really:
        fail(ADVANCED)
    try:
        target = parse_state(state)
    except ValueError as exc:
        fail(str(exc))
    with open_repo(repo, write=True) as store:
        info = _read(store, sector)
        _send(store, sector, SectorForceState(target))
        typer.echo(
            f"sector {sector}: {display_state(info)} -> {target.value} sent; {engine_note(store)}"
        )


def _wait_result(store: LmdbStore, rid: bytes) -> dict[str, Any] | None:
    from ..sealing import requests

    deadline = time.monotonic() + RESULT_WAIT
    while time.monotonic() < deadline:
        result = requests.take_result(store, rid)
        if result is not None:
            return result
        time.sleep(0.05)
    return None


def _unanswered(store: LmdbStore) -> str:
    """Why a queued request has no result yet (said only after waiting RESULT_WAIT)."""
    if store.engine_locked_elsewhere():
        return f"the engine has not answered within {RESULT_WAIT:g}s; it executes it when it can"
    return "the engine stopped before answering: the next `sectors run` executes it"


#: `pledge --fill/--per-worker` count the engine's live scheduler: without one, nothing to count.
NEEDS_ENGINE = (
    "--fill and --per-worker count the running engine's free AddPiece slots: "
    "start `sectors run` first (nothing was pledged)"
)


def _print_plan(plan: dict[str, Any]) -> None:
    """What a fill/per-worker pledge counted per worker, what it created, and what stopped it."""
    for s in plan["slots"]:
        cap = "no cap" if s["cap"] is None else f"AddPieceMax {s['cap']}"
        wanted = plan["wanted"].get(s["worker"], 0)
        line = f"{s['worker']}: {cap}, AP in use {s['in_use']}, free {s['free']}, pledge {wanted}"
        typer.echo(line + (f" ({s['note']})" if s["note"] else ""))
    if plan["stopped"]:
        typer.echo(f"stopped: {plan['stopped']}")
    if plan["dry_run"]:
        typer.echo(f"dry run: would pledge {sum(plan['granted'].values())} sector(s)")
        return
    pins = [w for w, n in plan["granted"].items() for _ in range(n)]
    for n, worker in zip(plan["sectors"], pins, strict=True):
        typer.echo(f"Created CC sector: {n} (AddPiece pinned to {worker})")


def _pledge_plan(store: LmdbStore, mode: str, dry_run: bool, as_json: bool) -> None:
    """Queue a fill/per-worker pledge for the running engine and print its answer."""
    from ..sealing import requests

    if not store.engine_locked_elsewhere():
        fail(NEEDS_ENGINE)
    rid = requests.submit(store, {"op": "pledge_plan", "mode": mode, "dry_run": dry_run})
    result = _wait_result(store, rid)
    if result is None:
        typer.echo(f"queued a {mode} pledge; {_unanswered(store)}")
        return
    if "error" in result:
        fail(result["error"])
    if as_json:
        typer.echo(json.dumps(result["plan"], indent=2))
    else:
        _print_plan(result["plan"])


def pledge(
    count: Annotated[int, typer.Option("--count", "-n", min=1, max=10_000)] = 1,
    fill: Annotated[
        bool, typer.Option("--fill", help="One CC sector per free AP slot (mypledge).")
    ] = False,
    per_worker: Annotated[
        bool,
        typer.Option("--per-worker", help="One CC sector per AP worker, pinned (mypledgeonce)."),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With --fill/--per-worker: only print the count.")
    ] = False,
    as_json: JsonOption = False,
    repo: RepoOption = DEFAULT_REPO,
) -> None:
    """Create committed-capacity sectors (durable even when no engine is running).

    --fill and --per-worker need a running engine: they count its scheduler's free slots.
    """
    from ..fsm import StoreError
    from ..sealing import requests
    from ..sealing.store_view import WAITING_FOR_ENGINE

    if fill and per_worker:
        fail("--fill and --per-worker are exclusive: pick one")
    if dry_run and not (fill or per_worker):
        fail("--dry-run goes with --fill or --per-worker")
    if (fill or per_worker) and count != 1:
        fail("--count does not go with --fill/--per-worker: they count the sectors themselves")
    with open_repo(repo, write=True) as store:
        if fill or per_worker:
            _pledge_plan(store, "fill" if fill else "per-worker", dry_run, as_json)
            return
        try:
            numbers = requests.pledge_offline(store, count)
        except (ValueError, StoreError) as exc:  # StoreFullError: a full disk, nothing written
            fail(str(exc))
        if numbers is not None:
            for n in numbers:
                typer.echo(f"Created CC sector: {n}")
            typer.echo(f"({WAITING_FOR_ENGINE}: {engine_note(store)})", err=True)
            return
        # An engine holds the repo: it allocates the numbers.
        rid = requests.submit(store, {"op": "pledge", "count": count})
        result = _wait_result(store, rid)
        if result is None:
            typer.echo(f"queued a pledge of {count} sector(s); {_unanswered(store)}")
            return
        if "error" in result:
            fail(result["error"])
        for n in result["sectors"]:
            typer.echo(f"Created CC sector: {n}")


def add_piece(
    file: Annotated[Path, typer.Argument(help="The piece's data (raw bytes).")],
    repo: RepoOption = DEFAULT_REPO,
) -> None:
    """Add a deal piece from FILE: its CommP is computed and a devnet deal is published."""
    from ..sealing import commp, requests

    path = file.expanduser()
    if not path.is_file():
        fail(f"piece file {file} does not exist (or is not a regular file)")
    length = path.stat().st_size
    if length == 0:
        fail(f"piece file {file} is empty")
    size = 128
    while size * 127 // 128 < length:
        size *= 2
    with open_repo(repo, write=True) as store:
        ident = requests.identity(store)
        if ident is not None and size > ident[1]:
            fail(f"{file} ({length} bytes) does not fit a {ident[1]}-byte sector")
        try:
            cid = commp.piece_cid(path)
        except (OSError, ValueError) as exc:
            fail(f"cannot read {file}: {exc}")
        request = {
            "op": "add_piece",
            "piece_cid": cid,
            "size": size,
            "data_path": str(path.resolve()),
        }
        rid = requests.submit(store, request)
        typer.echo(f"piece {cid} ({size} bytes padded)")
        if not store.engine_locked_elsewhere():
            typer.echo(f"queued; {engine_note(store)}")
            return
        result = _wait_result(store, rid)
        if result is None:
            typer.echo(f"queued; {_unanswered(store)}")
            return
        if "error" in result:
            fail(result["error"])
        typer.echo(f"added to sector {result['sector']} (deal {result['deal']})")


def register(app: typer.Typer) -> None:
    """Add the sector commands to `app`."""
    app.command("status")(status)
    app.command("list")(list_)
    app.command("pledge")(pledge)
    app.command("add-piece")(add_piece)
    app.command("retry")(retry)
    app.command("remove")(remove)
    app.command("terminate")(terminate)
    app.command("update-state")(update_state)
