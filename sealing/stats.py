"""Lotus's SectorStats: sectors per state and per state group, from counts kept per commit.

The sectors group counts its machines by state name in the commit of every transition
(`StateGroup(count_by=store_view.state_key)`, fsm/counts.py), so these figures cost a few key reads
whatever the number of sectors. The groups follow Lotus's `toStatState`
(`extern/storage-sealing/sector_state.go@v1.11.3`): staging, sealing, failed and proving,
with the remove states reported on their own as `removed` (Lotus files them under proving;
like proving they never count as sealing). `cur_sealing` is Lotus's `curSealing`
(`extern/storage-sealing/stats.go@v1.11.3`), the figure MaxSealingSectors limits.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .graph import PROVING_STATES, REMOVED_STATES, SEALING_STATES, STAGING_STATES
from .states import SectorState

if TYPE_CHECKING:
    from ..fsm import GroupRecords
    from .info import SectorInfo


class StatGroup(enum.StrEnum):
    """A Lotus stat bucket (plus `removed`, split out of Lotus's proving)."""

    staging = "staging"
    sealing = "sealing"
    failed = "failed"
    proving = "proving"
    removed = "removed"


def stat_group(state: SectorState) -> StatGroup:
    """The group of a state; everything Lotus does not name is `failed`, as in Lotus."""
    if state in STAGING_STATES:
        return StatGroup.staging
    if state in SEALING_STATES:
        return StatGroup.sealing
    if state in PROVING_STATES:
        return StatGroup.proving
    if state in REMOVED_STATES:
        return StatGroup.removed
    return StatGroup.failed


_GROUP_OF = {s.name: stat_group(s) for s in SectorState}


@dataclass(frozen=True, slots=True)
class SectorStats:
    """Sectors per Lotus stat group, and in all."""

    staging: int
    sealing: int
    failed: int
    proving: int
    removed: int
    total: int

    @property
    def cur_sealing(self) -> int:
        """Lotus's curSealing (staging + sealing + failed): what MaxSealingSectors limits."""
        return self.staging + self.sealing + self.failed

    def as_dict(self) -> dict[str, int]:
        """The groups, `total` and `cur_sealing`, for JSON output."""
        return {
            "staging": self.staging,
            "sealing": self.sealing,
            "failed": self.failed,
            "proving": self.proving,
            "removed": self.removed,
            "total": self.total,
            "cur_sealing": self.cur_sealing,
        }


def sector_counts(records: GroupRecords[SectorInfo]) -> dict[str, int]:
    """Sectors per state name (every SectorState, by enum name, zeros included).

    Read from the stored counts; a store no engine has counted yet is scanned instead.
    """
    counts = records.counts
    if counts is None:
        raise ValueError("these sector records keep no counts (built without count_by)")
    stored = counts.read()
    by_value = stored if stored is not None else counts.scanned(records)
    out = {s.name: 0 for s in SectorState}
    for value, n in by_value.items():
        try:
            out[SectorState(value).name] += n
        except ValueError:
            out[value] = out.get(value, 0) + n  # a state this version does not know
    return out


def sector_stats(counts: Mapping[str, int]) -> SectorStats:
    """The groups of per-state `counts` (as `sector_counts` returns them)."""
    groups = dict.fromkeys(StatGroup, 0)
    for name, n in counts.items():
        groups[_GROUP_OF.get(name, StatGroup.failed)] += n
    return SectorStats(
        staging=groups[StatGroup.staging],
        sealing=groups[StatGroup.sealing],
        failed=groups[StatGroup.failed],
        proving=groups[StatGroup.proving],
        removed=groups[StatGroup.removed],
        total=sum(groups.values()),
    )
