"""Read sectors straight from a repo's store, with or without an engine running.

The CLI uses this for `status`, `list` and `statechart --sector`: no engine, no chain, no
scheduler, just the persisted records (LMDB readers never block the engine's writer).
"""

from __future__ import annotations

from pathlib import Path

from ..fsm import GroupRecords, LmdbStore, RecordCodec
from ..fsm.events import BUILTIN_EVENTS
from .info import SectorInfo
from .states import DORMANT_STATES, SectorState

#: The engine group that holds the sectors.
GROUP = "sectors"
#: Version of the SectorInfo record layout.
SCHEMA_VERSION = 1
#: What readers show for a sector whose record exists but whose first event (SectorStart or
#: SectorStartCC, sent by an offline `sectors pledge`) no engine has applied yet.
WAITING_FOR_ENGINE = "WaitingForEngine"


def display_state(info: SectorInfo) -> str:
    """The state name the CLI shows: the real one, or WaitingForEngine before the first event."""
    if info.state is SectorState.UndefinedSectorState:
        return WAITING_FOR_ENGINE
    return info.state.value


def state_key(info: SectorInfo) -> str:
    """The sectors' count key (`StateGroup(count_by=...)`): the stored state value."""
    return _VALUES[info.state]  # (`.value` is a Python property: this runs at every round)


_VALUES = {s: s.value for s in SectorState}


def store_path(repo: Path) -> Path:
    """Where a repo keeps its LMDB store."""
    return Path(repo) / "store"


def sector_codec(events: bool = True) -> RecordCodec[SectorInfo]:
    """The codec of sector records (and events), as the engine uses it."""
    if not events:
        return RecordCodec(SectorInfo, (), SCHEMA_VERSION)
    from .events import ALL_EVENTS  # 60 event classes: only writers need them

    return RecordCodec(SectorInfo, (*BUILTIN_EVENTS, *ALL_EVENTS), SCHEMA_VERSION)


def sector_records(store: LmdbStore, *, events: bool = True) -> GroupRecords[SectorInfo]:
    """The sectors' records in `store`; `events=False` for readers (imports less)."""
    codec = sector_codec(events)
    return GroupRecords(
        store, GROUP, codec, lambda info: info.state in DORMANT_STATES, count_by=state_key
    )


def read_sector(repo: Path, number: int) -> SectorInfo | None:
    """Sector `number` as persisted in `repo`, or None if the repo or the sector does not exist."""
    path = store_path(repo)
    if not (path / "data.mdb").exists():
        return None
    with LmdbStore(path) as store:
        records = sector_records(store, events=False)
        raw = records.raw(records.key(number))
        return None if raw is None else records.decode(raw, number)[0]
