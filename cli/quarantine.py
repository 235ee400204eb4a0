"""`sectors quarantine`: the records the engine set aside because it could not read them.

An unreadable sector record does not stop the engine: at start it moves the record's bytes
to the store's `quarantine` (with the reason) and runs every other sector. `sectors list`
shows such a sector as `Corrupt`, `sectors status N` says what is wrong, and these commands
recover: export the bytes, restore a repaired record, or drop the sector. Restore and drop
change records the engine owns, so they run only while no engine does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .common import (
    DEFAULT_REPO,
    Command,
    Group,
    JsonOption,
    ReallyOption,
    RepoOption,
    SectorArg,
    fail,
    open_repo,
)

if TYPE_CHECKING:
    from ..fsm import GroupRecords, LmdbStore, MachineId
    from ..sealing.info import SectorInfo

#: How `sectors list` shows a sector whose record cannot be read.
CORRUPT = "Corrupt"

app = typer.Typer(
    name="quarantine",
    help="Records set aside because they could not be read: list, export, restore, drop.",
    no_args_is_help=True,
    cls=Group,
)
FileArg = Annotated[Path, typer.Argument(metavar="FILE", help="The record's bytes.")]


@dataclass(frozen=True, slots=True)
class Corrupt:
    """A sector whose record cannot be read, in `states` still or set aside."""

    number: int
    reason: str
    raw: bytes
    quarantined: bool


def _records(store: LmdbStore) -> GroupRecords[SectorInfo]:
    from ..sealing.store_view import sector_records

    return sector_records(store, events=False)


def corrupt_sectors(store: LmdbStore) -> list[Corrupt]:
    """Every sector whose record cannot be read, by number."""
    from ..fsm import RecordError

    found: dict[int, Corrupt] = {}
    records = _records(store)

    def unreadable(mid: MachineId, raw: bytes, exc: RecordError) -> None:
        found[int(mid)] = Corrupt(int(mid), str(exc), raw, False)

    for _ in records.list(on_error=unreadable):
        pass
    for mid, why, raw in records.list_quarantined():
        found[int(mid)] = Corrupt(int(mid), why, raw, True)
    return [found[n] for n in sorted(found)]


def find(store: LmdbStore, number: int) -> Corrupt | None:
    """Sector `number` if its record cannot be read (set aside or not), else None."""
    from ..fsm import RecordError

    records = _records(store)
    aside = records.quarantined(number)
    if aside is not None:
        return Corrupt(number, aside[0], aside[1], True)
    raw = records.raw(records.key(number))
    if raw is None:
        return None
    try:
        records.decode(raw, number)
    except RecordError as exc:
        return Corrupt(number, str(exc), raw, False)
    return None


def explain(bad: Corrupt) -> str:
    """What is wrong with a corrupt sector and how to recover, on one line."""
    n = bad.number
    where = (
        "its bytes are kept in quarantine and the engine runs every other sector"
        if bad.quarantined
        else "the engine sets its bytes aside in quarantine at its next start"
    )
    return (
        f"sector {n} cannot be read ({bad.reason}); {where}. Recover with "
        f"`sectors quarantine export {n} FILE` (save the bytes), "
        f"`sectors quarantine restore {n} FILE --really-do-it` (put back a repaired record) "
        f"or `sectors quarantine drop {n} --really-do-it` (forget the sector; its files stay)"
    )


def row(bad: Corrupt) -> dict[str, Any]:
    """The `list --json` row of a corrupt sector."""
    return {
        "number": bad.number,
        "state": CORRUPT,
        "reason": bad.reason,
        "quarantined": bad.quarantined,
        "bytes": len(bad.raw),
    }


@app.command("list", cls=Command)
def list_(as_json: JsonOption = False, repo: RepoOption = DEFAULT_REPO) -> None:
    """Every quarantined record: unreadable sectors, inbox events and mailbox entries."""
    from ..fsm.codec import unpackb
    from ..fsm.records import STATES_QUARANTINE

    with open_repo(repo) as store:
        sectors = corrupt_sectors(store)
        prefix = STATES_QUARANTINE + _records(store).prefix
        others = []
        with store.read() as txn:
            for key, value in txn.cursor(db=store.db("quarantine")):
                if not key.startswith(prefix):
                    why, raw = unpackb(value)
                    others.append({"record": repr(key)[2:-1], "reason": why, "bytes": len(raw)})
    out = [row(s) for s in sectors]
    if as_json:
        typer.echo(json.dumps({"sectors": out, "other": others}, indent=2))
        return
    if not out and not others:
        typer.echo("nothing is in quarantine")
    for s in sectors:
        typer.echo(f"sector {s.number}: {s.reason}" + ("" if s.quarantined else " (not moved yet)"))
    for o in others:
        typer.echo(f"{o['record']}: {o['reason']}")


@app.command("export", cls=Command)
def export(sector: SectorArg, file: FileArg, repo: RepoOption = DEFAULT_REPO) -> None:
    """Write the unreadable record of SECTOR, byte for byte, to FILE."""
    with open_repo(repo) as store:
        bad = find(store, sector)
    if bad is None:
        fail(f"sector {sector} has no unreadable record (see `sectors quarantine list`)")
    try:
        file.expanduser().write_bytes(bad.raw)
    except OSError as exc:
        fail(f"cannot write {file}: {exc.strerror}")
    typer.echo(f"sector {sector}: {len(bad.raw)} bytes written to {file}")


def _offline(store: LmdbStore) -> None:
    if not store.lock_writer():
        fail("an engine runs on this repo: stop it first (it owns the sector records)")


@app.command("restore", cls=Command)
def restore(
    sector: SectorArg,
    file: FileArg,
    really: ReallyOption = False,
    repo: RepoOption = DEFAULT_REPO,
) -> None:
    """Put FILE back as SECTOR's record (it must be readable); the engine resumes it."""
    from ..fsm import RecordError

    if not really:
        fail("restoring a record replaces what the engine knows of the sector: pass --really-do-it")
    try:
        raw = file.expanduser().read_bytes()
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}")
    with open_repo(repo) as store:
        if find(store, sector) is None:
            fail(f"sector {sector} has no unreadable record (see `sectors quarantine list`)")
        records = _records(store)
        for name in ("states", "live", "quarantine"):
            store.db(name)
        _offline(store)
        try:
            store.write(lambda txn: records.restore(txn, sector, raw))
        except RecordError as exc:
            fail(f"{file} is not a readable record either, nothing was changed: {exc}")
        finally:
            store.unlock_writer()
    typer.echo(f"sector {sector} restored from {file}; the next `sectors run` resumes it")


@app.command("drop", cls=Command)
def drop(sector: SectorArg, really: ReallyOption = False, repo: RepoOption = DEFAULT_REPO) -> None:
    """Forget SECTOR's unreadable record and its pending events (its files stay on disk)."""
    from ..fsm.records import scan

    if not really:
        fail("dropping a record loses the sector's state for good: pass --really-do-it")
    with open_repo(repo) as store:
        if find(store, sector) is None:
            fail(f"sector {sector} has no unreadable record (see `sectors quarantine list`)")
        records = _records(store)
        key = records.key(sector)
        dbs = {name: store.db(name) for name in ("states", "live", "inbox", "quarantine")}

        def forget(txn: Any) -> None:
            for name in ("states", "live"):
                txn.delete(key, db=dbs[name])
            for inbox_key in list(scan(txn, dbs["inbox"], key, values=False)):
                txn.delete(inbox_key, db=dbs["inbox"])
            txn.delete(records.quarantine_key(sector), db=dbs["quarantine"])

        _offline(store)
        try:
            store.write(forget)
        finally:
            store.unlock_writer()
    typer.echo(f"sector {sector} dropped (its number is not reused; its files stay on disk)")


def register(root: typer.Typer) -> None:
    """Add `sectors quarantine` to `root`."""
    root.add_typer(app)
