"""The sealer backends, by name: what `Miner.open(sealer=...)` and `[miner] sealer` accept.

Each backend module defines a small factory that the registry holds under the backend's name:

* `check(repo, options, workers)` refuses bad `sealer_options` (and declared workers whose
  storage paths it cannot serve) with a one-line `ValueError`, creating nothing on disk;
* `create(clock=, miner=, repo=, options=, time_scale=)` builds the backend (a file backend
  creates its storage directories here, once the options passed `check`);
* `default_workers(repo)` gives the workers a repo gets when none are declared;
* `keeps_files` says whether the backend writes sector files (their storage is then bound to
  the repo by owner markers, and scanned at start).

`sim` (`sim.py`) only takes time; `reference` (`reference.py`, on `sectorfile.py`'s format)
writes real sector files; `command` (`command.py`, with `joblock.py`) runs an operator's
executables; `dask` (`dask/sealer.py`) runs the reference sealer's work on remote `sectors
worker`s and needs `[cluster]`. The two file backends share `files.py`. A backend added later
registers its factory here; its module must import cheaply (heavy dependencies are imported in
`create`), since listing the names imports every factory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ...sched import WorkerSpec
from .command import CommandFactory
from .dask.sealer import DaskFactory
from .files import StorageError, StorageFullError, check_worker_paths
from .reference import ReferenceFactory
from .sim import SimFactory

if TYPE_CHECKING:
    from ...fsm import Clock
    from ..sealer import Backend

__all__ = [
    "REGISTRY",
    "BackendFactory",
    "StorageError",
    "StorageFullError",
    "check_worker_paths",
    "default_workers",
    "factory",
    "make_backend",
    "register",
    "sealers",
]


class BackendFactory(Protocol):
    """How the registry checks, builds and staffs one kind of sealer backend."""

    #: The `sealer=` name it is registered under.
    name: str
    #: Whether its backends write sector files.
    keeps_files: bool

    def check(
        self, repo: Path, options: Mapping[str, Any], workers: Sequence[WorkerSpec] | None
    ) -> None:
        """Refuse bad options, or declared workers it cannot serve; create nothing."""
        ...

    def create(
        self,
        *,
        clock: Clock,
        miner: int,
        repo: Path,
        options: Mapping[str, Any],
        time_scale: float,
    ) -> Backend:
        """The backend, for options that `check` accepted."""
        ...

    def default_workers(self, repo: Path) -> list[WorkerSpec]:
        """The workers a repo gets when it declares none."""
        ...


#: Name -> factory, in the order the names are listed to users. Add through `register`.
REGISTRY: dict[str, BackendFactory] = {}


def register(backend: BackendFactory) -> None:
    """Make `backend.name` a sealer that `Miner.open` and `sectors run` accept."""
    if backend.name in REGISTRY:
        raise ValueError(f"sealer backend {backend.name!r} is registered already")
    REGISTRY[backend.name] = backend


register(SimFactory())
register(ReferenceFactory())
register(CommandFactory())
register(DaskFactory())


def sealers() -> tuple[str, ...]:
    """The registered sealer names, in the order they are listed to users."""
    return tuple(REGISTRY)


def factory(sealer: object) -> BackendFactory:
    """The factory registered as `sealer`; a one-line ValueError listing them all if none is."""
    found = REGISTRY.get(sealer) if isinstance(sealer, str) else None
    if found is None:
        raise ValueError(f"unknown sealer backend {sealer!r} (available: {', '.join(REGISTRY)})")
    return found


def make_backend(
    sealer: str,
    *,
    clock: Clock,
    miner: int,
    repo: Path,
    options: Mapping[str, Any],
    time_scale: float = 1.0,
    workers: Sequence[WorkerSpec] | None = None,
) -> Backend:
    """The `sealer` backend; its options and `workers`' storage paths are checked first."""
    chosen = factory(sealer)
    chosen.check(repo, options, workers)
    return chosen.create(
        clock=clock, miner=miner, repo=repo, options=options, time_scale=time_scale
    )


def default_workers(sealer: str, repo: Path) -> list[WorkerSpec]:
    """The workers a repo sealing with `sealer` gets when it declares none."""
    return factory(sealer).default_workers(repo)
