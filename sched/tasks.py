"""Task types, their priority order, and the order of the request queue (Lotus `sealtasks`).

Names and strings are Lotus's, so operators recognise them; `order` is HEAD's (lower is more
urgent, negative types always go first). Lotus: `storage/sealer/sealtasks/task.go` and
`storage/sealer/request_queue.go`@b835fab70.
"""

from __future__ import annotations

import enum


class TaskType(enum.StrEnum):
    """A unit of sealing work, with Lotus's task-type string as its value."""

    REGEN_SECTOR_KEY = "seal/v0/regensectorkey"
    DATA_CID = "seal/v0/datacid"
    ADD_PIECE = "seal/v0/addpiece"
    REPLICA_UPDATE = "seal/v0/replicaupdate"
    PROVE_REPLICA_UPDATE2 = "seal/v0/provereplicaupdate/2"
    PROVE_REPLICA_UPDATE1 = "seal/v0/provereplicaupdate/1"
    PRE_COMMIT1 = "seal/v0/precommit/1"
    PRE_COMMIT2 = "seal/v0/precommit/2"
    COMMIT2 = "seal/v0/commit/2"
    COMMIT1 = "seal/v0/commit/1"
    UNSEAL = "seal/v0/unseal"
    FETCH = "seal/v0/fetch"
    READ_UNSEALED = "seal/v0/unsealread"
    DOWNLOAD_SECTOR = "seal/v0/download/sector"
    FINALIZE = "seal/v0/finalize"
    FINALIZE_UNSEALED = "seal/v0/finalizeunsealed"
    FINALIZE_REPLICA_UPDATE = "seal/v0/finalize/replicaupdate"
    GENERATE_WINDOW_POST = "post/v0/windowproof"
    GENERATE_WINNING_POST = "post/v0/winningproof"

    @property
    def short(self) -> str:
        """Lotus's short name (AP, PC1, ...), as used in env overrides and `sealing jobs`."""
        return _SHORT[self]

    @property
    def order(self) -> int:
        """Lotus HEAD's priority order: lower is more urgent; unknown types are 0."""
        return _ORDER.get(self, 0)

    @classmethod
    def parse(cls, text: str) -> TaskType:
        """A task type from its string, short name or enum name (case-insensitive short)."""
        if text in _BY_VALUE:
            return _BY_VALUE[text]
        found = _BY_SHORT.get(text.upper()) or cls.__members__.get(text.upper())
        if found is None:
            known = ", ".join(sorted(_BY_SHORT))
            raise ValueError(f"unknown task type {text!r} (known short names: {known})")
        return found


_SHORT: dict[TaskType, str] = {
    TaskType.REGEN_SECTOR_KEY: "GSK",
    TaskType.DATA_CID: "DC",
    TaskType.ADD_PIECE: "AP",
    TaskType.REPLICA_UPDATE: "RU",
    TaskType.PROVE_REPLICA_UPDATE2: "PR2",
    TaskType.PROVE_REPLICA_UPDATE1: "PR1",
    TaskType.PRE_COMMIT1: "PC1",
    TaskType.PRE_COMMIT2: "PC2",
    TaskType.COMMIT2: "C2",
    TaskType.COMMIT1: "C1",
    TaskType.UNSEAL: "UNS",
    TaskType.FETCH: "GET",
    TaskType.READ_UNSEALED: "RD",
    TaskType.DOWNLOAD_SECTOR: "DL",
    TaskType.FINALIZE: "FIN",
    TaskType.FINALIZE_UNSEALED: "FUS",
    TaskType.FINALIZE_REPLICA_UPDATE: "FRU",
    TaskType.GENERATE_WINDOW_POST: "WDP",
    TaskType.GENERATE_WINNING_POST: "WNP",
}
# HEAD's order map; FRU is missing there (so 0) and RD is v1.10's (same as GET).
_ORDER: dict[TaskType, int] = {
    TaskType.REGEN_SECTOR_KEY: 11,
    TaskType.DATA_CID: 10,
    TaskType.ADD_PIECE: 9,
    TaskType.REPLICA_UPDATE: 8,
    TaskType.PROVE_REPLICA_UPDATE2: 7,
    TaskType.PROVE_REPLICA_UPDATE1: 6,
    TaskType.PRE_COMMIT1: 5,
    TaskType.PRE_COMMIT2: 4,
    TaskType.COMMIT2: 3,
    TaskType.COMMIT1: 2,
    TaskType.UNSEAL: 1,
    TaskType.FETCH: -1,
    TaskType.READ_UNSEALED: -1,
    TaskType.DOWNLOAD_SECTOR: -2,
    TaskType.FINALIZE: -3,
    TaskType.FINALIZE_UNSEALED: -4,
    TaskType.GENERATE_WINDOW_POST: -5,
    TaskType.GENERATE_WINNING_POST: -6,
}
_BY_VALUE = {t.value: t for t in TaskType}
_BY_SHORT = {s: t for t, s in _SHORT.items()}

#: Priority of sectors holding deal data (Lotus `DealSectorPriority`); CC sectors use 0.
DEAL_SECTOR_PRIORITY = 1024


def queue_key(
    task_type: TaskType, priority: int, sector_number: int, seq: int
) -> tuple[int, int, int, int, int]:
    """The sort key of a queued request; smaller sorts first (Lotus `RequestQueue.Less`).

    Negative-order types (fetch, finalize, PoSt) always precede the rest; then higher
    priority; then task-type order; then lower sector number; `seq` keeps ties first-in,
    first-out.
    """
    return (0 if task_type.order < 0 else 1, -priority, task_type.order, sector_number, seq)
