"""What every `sectors` command shares: the repo option, errors, consoles and state colours.

Commands import the engine lazily: `sectors status` must answer in well under 300 ms.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

if TYPE_CHECKING:
    from rich.console import Console

    from ..fsm import LmdbStore

#: Where the CLI finds the repo unless `--repo` or SECTORFSM_REPO says otherwise.
DEFAULT_REPO = Path("~/.sectorfsm")
#: The environment variable naming the repo (`sectors --repo DIR CMD` sets it for CMD).
REPO_ENV = "SECTORFSM_REPO"
#: Sector numbers are stored as int64 (as Lotus's abi.SectorNumber is encoded on chain).
MAX_SECTOR = (1 << 63) - 1
#: A sector number argument: int64 (msgpack and LMDB keys), never negative.
SectorArg = Annotated[
    int,
    typer.Argument(
        min=0, max=MAX_SECTOR, metavar="SECTOR", help="The sector number.", show_default=False
    ),
]
#: Longest file name component most file systems accept (NAME_MAX).
_NAME_MAX = 255

RepoOption = Annotated[
    Path,
    typer.Option(
        "--repo",
        envvar=REPO_ENV,
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


#: The width of output that goes to a pipe or a file: wide enough never to cut a cell.
_UNBOUNDED = 10_000


def out_console() -> Console:
    """A console on stdout; piped or redirected, it never truncates (scripts read it)."""
    from rich.console import Console

    console = Console(soft_wrap=True)
    if not console.is_terminal:
        console = Console(soft_wrap=True, width=_UNBOUNDED)
    return console


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` on stderr and exit non-zero (no traceback)."""
    from rich.markup import escape

    err_console().print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def repo_path(repo: Path) -> Path:
    """The repo with `~` expanded; a one-line error for a path no repo can live at."""
    path = repo.expanduser()
    for part in path.parts:
        if len(os.fsencode(part)) > _NAME_MAX:
            fail(f"repo path component {part[:20]}… is over {_NAME_MAX} bytes long")
    if path.exists() and not path.is_dir():
        fail(f"repo {path} is a file, not a directory")
    return path


def missing_repo(repo: Path) -> str:
    """The error for a command that needs an existing repo."""
    return f"no repo at {repo}; create it with `sectors init` or `sectors run`"


def repo_exists(repo: Path) -> bool:
    """True if `repo` (already expanded) holds a sectorfsm store."""
    from ..sealing.store_view import store_path

    return (store_path(repo) / "data.mdb").is_file()


@contextlib.contextmanager
def open_repo(repo: Path, *, write: bool = False) -> Iterator[LmdbStore]:
    """Open an existing repo's store (never creates one); a clear error if there is none.

    A repo the user cannot write is opened read-only, so `status` and `list` still work;
    `write=True` (commands that send events) refuses it instead.
    """
    from ..fsm import LmdbStore, StoreError
    from ..sealing.store_view import store_path

    root = repo_path(repo)
    path = store_path(root)
    if not repo_exists(root):
        fail(missing_repo(root))
    readonly = not os.access(path, os.W_OK | os.X_OK)
    if readonly and write:
        fail(f"repo {root} is read-only: this command writes to it")
    try:
        store = LmdbStore(path, readonly=True) if readonly else LmdbStore(path)
    except StoreError as exc:
        fail(str(exc))
    try:
        yield store
    finally:
        store.close()


class _NoFlagType:
    """Help rows without a value placeholder for flags.

    Typer 0.26+ (which vendors click and no longer uses the installed one) prints every
    option's type in its rich help, so a flag read `--json <bool>` as if it took a value.
    An empty metavar is what its renderer shows instead of the type.
    """

    def get_params(self, ctx: Any) -> Any:
        """The command's parameters, flags given an empty metavar."""
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class Command(_NoFlagType, TyperCommand):
    """A typer command whose help shows flags as flags."""


class Group(_NoFlagType, TyperGroup):
    """A typer group whose help shows flags as flags."""


def engine_note(store: LmdbStore) -> str:
    """What happens to a command written to the inbox, depending on whether an engine runs."""
    if store.engine_locked_elsewhere():
        return "the running engine picks it up within a second"
    return "no engine is running: it waits in the repo and takes effect at the next `sectors run`"
