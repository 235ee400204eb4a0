"""What a sealer offers the handlers (`Sealer`) and what it asks of its compute (`Backend`).

`Sealer` is Lotus's `SectorManager` as the v1.11.3 handlers call it
(`extern/sector-storage/manager.go@v1.11.3`); `ScheduledSealer` (`sealer.py`) implements it by
scheduling each call, and a `Backend` (`backends/`) does the work inside the scheduled job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..sched import Job, SectorRef
from .info import PendingPiece, Piece


@dataclass(frozen=True, slots=True)
class PreCommit2Out:
    """CommR and CommD, as CIDs."""

    sealed: str
    unsealed: str


class Sealer(Protocol):
    """What the handlers ask of a sealer (Lotus `SectorManager`, v1.11.3 calls)."""

    async def add_piece(
        self,
        sector: SectorRef,
        existing: list[int],
        size: int,
        piece: PendingPiece | None,
        *,
        worker: str = "",
    ) -> Piece:
        """Write a piece (None: zeros, a filler) after `existing` sizes, on `worker` if set."""
        ...

    async def seal_pre_commit1(
        self, sector: SectorRef, ticket: bytes, pieces: list[Piece], deals: bool
    ) -> bytes:
        """Run PreCommit1; returns its opaque output."""
        ...

    async def seal_pre_commit2(
        self, sector: SectorRef, pc1out: bytes, deals: bool
    ) -> PreCommit2Out:
        """Run PreCommit2; returns CommR and CommD."""
        ...

    async def seal_commit1(
        self,
        sector: SectorRef,
        ticket: bytes,
        seed: bytes,
        pieces: list[Piece],
        cids: PreCommit2Out,
        deals: bool,
    ) -> bytes:
        """Run Commit1; returns its opaque output."""
        ...

    async def seal_commit2(self, sector: SectorRef, c1out: bytes, deals: bool) -> bytes:
        """Run Commit2; returns the PoRep proof."""
        ...

    async def finalize_sector(self, sector: SectorRef, keep_unsealed: bool) -> None:
        """Drop the sealing scratch files; keep the unsealed copy if asked."""
        ...

    async def release_unsealed(self, sector: SectorRef) -> None:
        """Delete the unsealed copy."""
        ...

    async def remove(self, sector: SectorRef) -> None:
        """Delete every file of the sector."""
        ...


class Backend(Protocol):
    """The compute behind a `ScheduledSealer`; each call runs inside a scheduled job."""

    name: str

    async def add_piece(
        self, job: Job, existing: list[int], size: int, piece: PendingPiece | None
    ) -> Piece:
        """Write the piece; return it with its CommP."""
        ...

    async def pre_commit1(self, job: Job, ticket: bytes, pieces: list[Piece]) -> bytes:
        """PreCommit1."""
        ...

    async def pre_commit2(self, job: Job, pc1out: bytes) -> PreCommit2Out:
        """PreCommit2."""
        ...

    async def commit1(
        self, job: Job, ticket: bytes, seed: bytes, pieces: list[Piece], cids: PreCommit2Out
    ) -> bytes:
        """Commit1."""
        ...

    async def commit2(self, job: Job, c1out: bytes) -> bytes:
        """Commit2."""
        ...

    async def finalize(self, job: Job, keep_unsealed: bool) -> None:
        """Finalize."""
        ...

    async def release_unsealed(self, sector: SectorRef) -> None:
        """Delete the unsealed file (no scheduling needed: it is a delete)."""
        ...

    async def remove(self, sector: SectorRef) -> None:
        """Delete every file of the sector."""
        ...
