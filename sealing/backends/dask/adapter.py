"""The worker's side of the `dask` sealer: the reference sealer's tasks on worker paths.

The engine never sends a directory of its own machine: a job's spec names each sector file by
`[path id, kind, name]` (msgpack-able), and this module, imported by the job's child process
(or run as a small Dask task in the worker itself), turns the id into the worker's own
directory. `sectors worker` puts its `[[paths]]` in the `PATHS_ENV` environment variable
before it starts, so every child it spawns inherits them.

Results are what msgpack carries (str, bytes, lists): the engine's `DaskSealer` rebuilds its
records from them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import reference
from ..files import remove_files as _remove_files
from ..sectorfile import ReferenceSealerError

#: The environment variable that maps the worker's path ids to its directories (JSON).
PATHS_ENV = "SECTORFSM_WORKER_PATHS"

#: `[path id, kind ("unsealed" | "sealed" | "cache"), file name]`.
Loc = Sequence[str]


def export_roots(directories: Mapping[str, Path]) -> None:
    """Publish the worker's path ids and directories to this process and its children."""
    os.environ[PATHS_ENV] = json.dumps(
        {pid: str(Path(d).resolve()) for pid, d in directories.items()}
    )


def roots() -> dict[str, Path]:
    """The worker's path id -> directory map; a one-line error when it was never published."""
    raw = os.environ.get(PATHS_ENV)
    if not raw:
        raise ReferenceSealerError(
            f"{PATHS_ENV} is not set: sealing jobs run only on a `sectors worker`"
        )
    return {pid: Path(d) for pid, d in json.loads(raw).items()}


def resolve(loc: Loc) -> Path:
    """The worker-side file of `[path id, kind, name]` (its parent directory created)."""
    pid, kind, name = loc
    known = roots()
    if pid not in known:
        raise ReferenceSealerError(
            f"storage path {pid!r} is not one of this worker's ({', '.join(sorted(known))})"
        )
    if kind not in ("unsealed", "sealed", "cache") or not name or "/" in name or ".." in name:
        raise ReferenceSealerError(f"bad sector file location {list(loc)!r}")
    path = known[pid] / kind / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def add_piece(
    unsealed: Loc, sector_size: int, offset: int, size: int, data_path: str | None
) -> str:
    """AddPiece on the worker; the piece's CommP."""
    return reference.write_piece(resolve(unsealed), sector_size, offset, size, data_path)


def pre_commit1(
    unsealed: Loc, cache: Loc, sector_size: int, ticket: bytes, pieces: list[list[Any]]
) -> bytes:
    """PreCommit1 on the worker; its opaque output."""
    spec = [(str(cid), int(size)) for cid, size in pieces]
    return reference.pre_commit1(resolve(unsealed), resolve(cache), sector_size, ticket, spec)


def pre_commit2(
    miner: int, number: int, sector_size: int, pc1out: bytes, sealed: Loc, cache: Loc
) -> list[str]:
    """PreCommit2 on the worker; `[CommR, CommD]`."""
    comm_r, comm_d = reference.pre_commit2(
        miner, number, sector_size, pc1out, resolve(sealed), resolve(cache)
    )
    return [comm_r, comm_d]


def commit1(sealed: Loc, sector_size: int, ticket: bytes, seed: bytes) -> bytes:
    """Commit1 on the worker, from the sealed file found there."""
    return reference.commit1(resolve(sealed), sector_size, ticket, seed)


def commit2(miner: int, number: int, c1out: bytes) -> bytes:
    """Commit2 (no files)."""
    return reference.commit2(miner, number, c1out)


def finalize(cache: Loc, unsealed: Loc | None, keep_unsealed: bool) -> None:
    """Finalize on the worker: drop the cache scratch, and the unsealed file unless kept."""
    reference.finalize(
        resolve(cache), None if unsealed is None else resolve(unsealed), keep_unsealed
    )


def move_local(src: Loc, dst: Loc) -> None:
    """Move a sector file between two paths of this worker (a rename when on one disk)."""
    source, target = resolve(src), resolve(dst)
    if source == target:
        return
    if not os.path.lexists(source):
        if os.path.lexists(target):
            return  # moved already, by an attempt that ended before it could say so
        raise ReferenceSealerError(f"{source} does not exist")
    shutil.move(source, target)


def remove(locs: list[Loc]) -> None:
    """Delete these sector files (and any partial copy of them) on this worker."""
    paths = [resolve(loc) for loc in locs]
    _remove_files(paths + [p.with_name(p.name + ".part") for p in paths])
