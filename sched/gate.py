"""The operator policy's part of a verdict: each worker's policy, disk units and AllowDelay.

`PolicyGate` keeps the per-worker state the policy rules read besides the ledger (the disk
units counted from the storage index, cached until the files on the worker's paths change,
and when a task was last released, for `AllowDelay`) and answers for one worker in two
ways: `refusal`, in the words `sched-diag` shows, and `blocks`, a yes/no on what does not
depend on the sector, for the balanced cycle to skip a worker before any per-sector lookup
(`rules.policy_blocks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .filetypes import FileType
from .rules import (
    PolicyView,
    delay_blocks,
    delay_refusal,
    files_block,
    local_files_required,
    policy_blocks,
    policy_refusal,
    units_of_counts,
)
from .storage import SectorRef, StorageIndex
from .tasks import TaskType
from .workers import Worker


@dataclass(slots=True)
class PoolRules:
    """A pool of workers split by what their file-locality rules want for one task type.

    Built by `PolicyGate.pool_rules` and valid while no policy changes (one scheduling
    cycle): `PolicyGate.local_of` then filters the pool for a sector with one holder lookup
    per file set and no per-worker policy lookups.
    """

    #: The workers without a rule for the task, in pool order (any sector may go there).
    free: list[Worker]
    #: Per file set a rule wants local, the workers of that rule by name.
    ruled: dict[FileType, dict[str, Worker]]
    #: Each worker's position in the pool, to keep `local_of`'s answer in pool order.
    pos: dict[str, int]


class PolicyGate:
    """Per-worker policy state and the policy's refusals (see the module docstring)."""

    def __init__(self, index: StorageIndex) -> None:
        self.index = index
        #: Each worker's disk units, with the index's `files_version` they were counted at.
        self._units: dict[str, tuple[int, tuple[int, int]]] = {}
        #: When a task each worker held was last released: the start of its `AllowDelay`.
        self._released_at: dict[str, float] = {}

    def forget_units(self, name: str | None = None) -> None:
        """Count `name`'s disk units again at its next verdict (None: every worker's)."""
        if name is None:
            self._units.clear()
        else:
            self._units.pop(name, None)

    def released(self, name: str, now: float) -> None:
        """A task `name` held was released at `now`: its `AllowDelay` starts."""
        self._released_at[name] = now

    def view(self, w: Worker, sector_size: int) -> PolicyView:
        """What the rules see of `w` now."""
        version = self.index.files_version(w.name)
        cached = self._units.get(w.name)
        if cached is not None and cached[0] == version:
            units = cached[1]
        else:
            # The index records a cache once PC1 wrote it, so its SDR layers exist: 14 units.
            units = units_of_counts(self.index.file_counts(w.name))
            self._units[w.name] = (version, units)
        return PolicyView(w, self.index, units, sector_size)

    def refusal(self, w: Worker, task: TaskType, sector: SectorRef, now: float) -> str | None:
        """Why `w`'s policy refuses `task` for `sector` at `now`, in words; None = allowed."""
        if w.watcher is None:  # no policy file: no operator restrictions
            return None
        policy = w.policy
        refusal = policy_refusal(policy, task, sector, self.view(w, sector.size))
        if refusal is not None:
            if err := w.watcher.error:  # the operator may think their last edit is in force
                return f"{refusal} (policy file error, last good policy kept: {err})"
            return refusal
        return delay_refusal(policy, task, self._released_at.get(w.name), now)

    def blocks(self, w: Worker, task: TaskType, sector_size: int) -> bool:
        """True if `w`'s policy refuses `task` for any sector of this size (no words)."""
        if w.watcher is None:
            return False
        return policy_blocks(w.policy, task, self.view(w, sector_size))

    def delayed(self, w: Worker, task: TaskType, now: float) -> bool:
        """True if `AllowDelay` holds `task` off `w` at `now` (`delay_refusal`, no words)."""
        if w.watcher is None:
            return False
        return delay_blocks(w.policy, task, self._released_at.get(w.name), now)

    def files_block(self, w: Worker, task: TaskType, sector: SectorRef) -> bool:
        """True if a file-locality rule of `w`'s policy refuses `task` for `sector` (no words)."""
        if w.watcher is None:
            return False
        return files_block(w.policy, task, sector, self.view(w, sector.size))

    def local_enough(
        self, pool: Sequence[Worker], task: TaskType, sector: SectorRef
    ) -> list[Worker]:
        """The workers of `pool` whose file-locality rules do not refuse `task` for `sector`.

        `files_block` for a whole pool: one holder lookup per file set, not one per worker.
        """
        if task not in _LOCAL_RULED:
            return list(pool)
        held: dict[FileType, frozenset[str]] = {}
        out: list[Worker] = []
        for w in pool:
            if w.watcher is not None:
                files = local_files_required(w.policy, task)
                if files:
                    holders = held.get(files)
                    if holders is None:
                        holders = held[files] = self.index.holders(sector, files)
                    if w.name not in holders:
                        continue
            out.append(w)
        return out

    def pool_rules(self, pool: Sequence[Worker], task: TaskType) -> PoolRules:
        """`pool` split by the files each worker's rules want local for `task`."""
        free: list[Worker] = []
        ruled: dict[FileType, dict[str, Worker]] = {}
        for w in pool:
            files = FileType.NONE
            if task in _LOCAL_RULED and w.watcher is not None:
                files = local_files_required(w.policy, task)
            if files:
                ruled.setdefault(files, {})[w.name] = w
            else:
                free.append(w)
        return PoolRules(free, ruled, {w.name: i for i, w in enumerate(pool)})

    def local_of(self, rules: PoolRules, sector: SectorRef) -> list[Worker]:
        """`local_enough` of the pool `rules` was built from (do not change the list)."""
        if not rules.ruled:
            return rules.free
        matched: list[Worker] = []
        for files, by_name in rules.ruled.items():
            matched.extend(by_name[n] for n in self.index.holders(sector, files) if n in by_name)
        if not matched:
            return rules.free
        pos = rules.pos
        return sorted(rules.free + matched, key=lambda w: pos[w.name])


#: The task types a `Force*FromLocal*` rule can bind (`rules.local_files_required`).
_LOCAL_RULED = frozenset(
    {TaskType.PRE_COMMIT1, TaskType.PRE_COMMIT2, TaskType.COMMIT1, TaskType.COMMIT2}
)
