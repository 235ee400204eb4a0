"""A sector's files record, as the engine persists it: `{path id: [file types, bytes]}`.

One record per sector in the `sectorfiles` sub-database says where its files are and the
bytes they take on each path; the storage index is rebuilt from these at start.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from ..fsm.codec import unpackb
from ..sched import FileType, SectorRef, StorageIndex, space_needed
from ..sched.selectors import Selector, Verdict
from ..sched.workers import Worker


def files_union(held: Mapping[FileType, int]) -> FileType:
    """The file types of `held` as one flag set."""
    return FileType(files_bits(held))


def files_bits(held: Mapping[FileType, int]) -> int:
    """The file types of `held` as the int a files record stores (no flag built)."""
    # OR as plain ints: a flag's own `|` runs Python code per file.
    return functools.reduce(operator.or_, map(int, held), 0)


def split_bytes(files: int, nbytes: int, ref: SectorRef) -> dict[FileType, int]:
    """A persisted per-path byte total split back over its files.

    Exact for totals the index wrote from Lotus's sizes (sealing or finalized); any other
    total (sizes measured on disk) is shared in proportion to the sealing sizes.
    """
    kinds = list(FileType(files).each())
    for finalized in (False, True):
        sizes = {f: space_needed(f, ref.size, finalized=finalized) for f in kinds}
        if sum(sizes.values()) == nbytes:
            return sizes
    weights = {f: space_needed(f, ref.size) for f in kinds}
    total = sum(weights.values()) or 1
    out = {f: nbytes * w // total for f, w in weights.items()}
    if kinds:
        out[kinds[-1]] += nbytes - sum(out.values())
    return out


def parse_files_record(key: bytes, raw: bytes) -> tuple[int, dict[str, list[int]]]:
    """`(sector number, {path id: [file types, bytes]})` of a files record; ValueError names it."""
    what = f"sector files record {key!r}"
    try:
        number = int(key)
        record = unpackb(raw)
    except Exception as exc:
        raise ValueError(f"{what} is corrupt ({str(exc) or type(exc).__name__})") from None
    ok = isinstance(record, dict) and all(
        isinstance(pid, str)
        and isinstance(v, list)
        and len(v) == 2
        and all(isinstance(x, int) for x in v)
        for pid, v in record.items()
    )
    if not ok:
        raise ValueError(f"{what} is not a map of path ids to [file types, bytes]")
    return number, record


@dataclass(frozen=True, slots=True)
class AwaitingWorker:
    """A selector whose "no file anywhere" refusal says the files wait for their worker.

    After an engine restart, files records on a remote worker's paths apply only once that
    worker joins (`ScheduledSealer.worker_joined`); until then the sched-diag reason names
    the paths rather than suggesting the files are lost.
    """

    inner: Selector
    #: The sector's recorded paths whose worker has not joined yet (read at each check).
    waiting: Callable[[SectorRef], Collection[str]] = field(compare=False)

    def check(self, sector: SectorRef, worker: Worker, index: StorageIndex) -> Verdict:
        """The inner verdict, its "anywhere" refusal naming the paths still awaited."""
        verdict = self.inner.check(sector, worker, index)
        if isinstance(verdict, str) and verdict.endswith("anywhere"):
            paths = ", ".join(sorted(self.waiting(sector)))
            if paths:
                return f"{verdict} yet: recorded on path(s) {paths}, whose worker has not joined"
        return verdict

    def shape(self, sector: SectorRef) -> object | None:
        """As the inner selector's."""
        return self.inner.shape(sector)
