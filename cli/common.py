"""What every `sectors` command shares: the repo option, errors, consoles and state colours.

Commands import the engine lazily: `sectors status` must answer in well under 300 ms.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from ..fsm import LmdbStore

#: Where the CLI finds the repo unless `--repo` or SECTORFSM_REPO says otherwise.
DEFAULT_REPO = Path("~/.sectorfsm")

RepoOption = Annotated[
    Path,
    typer.Option(
        "--repo",
        envvar="SECTORFSM_REPO",
        help="The sectorfsm repo (store, sector files, config).",
        show_default=True,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
ReallyOption = Annotated[
    bool, typer.Option("--really-do-it", help="Confirm this action (it cannot be undone).")
]

#: Lotus v1.11.3's state colours (cmd/lotus-miner/info.go `stateList`).
_BLUE = {"Empty", "WaitDeals", "AddPiece"}
_CYAN = {
    "Terminating",
    "TerminateWait",
    "TerminateFinality",
    "TerminateFailed",
    "Removing",
    "RemoveFailed",
    "Removed",
}
_RED = {
    "UndefinedSectorState",
    "",
    "FailedUnrecoverable",
    "AddPieceFailed",
    "SealPreCommit1Failed",
    "SealPreCommit2Failed",
    "PreCommitFailed",
    "ComputeProofFailed",
    "CommitFailed",
    "CommitFinalizeFailed",
    "PackingFailed",
    "FinalizeFailed",
    "DealsExpired",
    "RecoverDealIDs",
    "Faulty",
    "FaultReported",
    "FaultedFinal",
}


def state_colour(state: str) -> str:
    """The rich colour Lotus uses for a state."""
    if state == "Proving":
        return "green"
    if state in _BLUE:
        return "blue"
    if state in _CYAN:
        return "cyan"
    if state in _RED:
        return "red"
    return "yellow"


def err_console() -> Console:
    """A console on stderr."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def out_console() -> Console:
    """A console on stdout."""
    from rich.console import Console

    return Console(soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` on stderr and exit non-zero (no traceback)."""
    from rich.markup import escape

    err_console().print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def repo_path(repo: Path) -> Path:
    """The repo with `~` expanded."""
    return repo.expanduser()


@contextlib.contextmanager
def open_repo(repo: Path) -> Iterator[LmdbStore]:
    """Open an existing repo's store (never creates one); a clear error if there is none."""
    from ..fsm import LmdbStore, StoreError
    from ..sealing.store_view import store_path

    path = store_path(repo_path(repo))
    if not (path / "data.mdb").exists():
        fail(f"no sectorfsm repo at {repo_path(repo)} (start one with `sectors run`)")
    try:
        store = LmdbStore(path)
    except StoreError as exc:
        fail(str(exc))
    try:
        yield store
    finally:
        store.close()


def engine_note(store: LmdbStore) -> str:
    """What happens to a command written to the inbox, depending on whether an engine runs."""
    if store.engine_locked_elsewhere():
        return "the running engine picks it up within a second"
    return "no engine is running: it waits in the repo and takes effect at the next `sectors run`"
