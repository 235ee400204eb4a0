"""Sealing configuration: Lotus's `[Sealing]` knobs, our retry policy, and proof types."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from pydantic import ConfigDict

from ..validation import (
    RECORD,
    ConfigError,
    Count,
    Factor,
    Flag,
    PositiveCount,
    PositiveSeconds,
    Seconds,
    validate,
)

#: RegisteredSealProof (V1_1) per sector size, as Lotus numbers them.
SEAL_PROOFS: dict[int, int] = {
    2 << 10: 5,
    8 << 20: 6,
    512 << 20: 7,
    32 << 30: 8,
    64 << 30: 9,
}
_SIZE_OF_PROOF = {v: k for k, v in SEAL_PROOFS.items()}


def seal_proof_for(sector_size: int) -> int:
    """The V1_1 seal proof type of a sector size."""
    try:
        return SEAL_PROOFS[sector_size]
    except KeyError:
        raise ValueError(f"no seal proof for a sector size of {sector_size} bytes") from None


def sector_size_of(seal_proof: int) -> int:
    """The sector size of a seal proof type."""
    try:
        return _SIZE_OF_PROOF[seal_proof]
    except KeyError:
        raise ValueError(f"unknown seal proof type {seal_proof}") from None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How failed states retry: exponential backoff, timed from a stored timestamp.

    Lotus waits a flat minute (`MinRetryTime`) after the last log entry and retries forever.
    Here the n-th consecutive retry waits `min(cap, base * factor**n)`, and once `budget`
    retries are spent the sector goes to FailedUnrecoverable, keeping its data, until an
    operator runs `retry`. The count resets when the sector reaches Proving.
    """

    __pydantic_config__: ClassVar[ConfigDict] = RECORD

    base: PositiveSeconds = 60.0
    factor: Factor = 2.0
    cap: PositiveSeconds = 3600.0
    budget: Count = 16

    def __post_init__(self) -> None:
        # Checked here too, for a policy built in Python rather than read from a config.
        if not (0 < self.base < math.inf and 0 < self.cap < math.inf):
            raise ValueError("retry base and cap must be finite numbers > 0")
        if not 1 <= self.factor < math.inf:
            raise ValueError("retry factor must be a finite number >= 1")
        if self.budget < 0:
            raise ValueError("retry budget must not be negative")

    def delay(self, retries: int) -> float:
        """Seconds to wait before retry number `retries` (0-based)."""
        if self.factor == 1 or retries == 0:
            return min(self.cap, self.base)
        return float(min(self.cap, self.base * self.factor ** min(retries, 64)))


@dataclass(frozen=True, slots=True)
class SealingConfig:
    """Lotus's `[Sealing]` section (v1.11.3 defaults), plus our retry policy.

    The field types carry the constraints that `from_dict` and `check` enforce (finite
    seconds, whole counts, strict booleans); `__post_init__` keeps the checks that relate
    two fields.
    """

    __pydantic_config__: ClassVar[ConfigDict] = RECORD

    #: Seal a deal sector this long after its first piece arrived (Lotus `WaitDealsDelay`).
    wait_deals_delay: Seconds = 6 * 3600.0
    #: Refuse pledges while this many sectors are sealing (0: no limit; Lotus MaxSealingSectors).
    max_sealing_sectors: Count = 0
    always_keep_unsealed_copy: Flag = True
    finalize_early: Flag = False

    batch_pre_commits: Flag = True
    max_pre_commit_batch: PositiveCount = 256
    pre_commit_batch_wait: Seconds = 24 * 3600.0
    pre_commit_batch_slack: Seconds = 3 * 3600.0

    aggregate_commits: Flag = True
    min_commit_batch: PositiveCount = 4
    max_commit_batch: PositiveCount = 819
    commit_batch_wait: Seconds = 24 * 3600.0
    commit_batch_slack: Seconds = 3600.0
    #: Below this base fee (attoFIL) commits go one message each (Lotus AggregateAboveBaseFee).
    aggregate_above_base_fee: Count = 150_000_000

    start_epoch_sealing_buffer: Count = 480
    #: Auto-pledge for workers whose policy sets AutoPledgeDiff (`sealing/autopledge.py`).
    auto_pledge: Flag = True
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.min_commit_batch > self.max_commit_batch:
            raise ValueError("sealing.min_commit_batch is larger than max_commit_batch")

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: SealingConfig | None = None) -> SealingConfig:
        """Build from a config-file table over `base` (Lotus defaults); `ConfigError` names the key.

        The message reads `[sealing.retry] base: must be ...`; an unknown key is an
        `unknown sealing option(s) ...`.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"[sealing]: must be a table, got {data!r}")
        values = {**_as_dict(base or cls()), **data}
        retry = data.get("retry")
        if isinstance(retry, dict) and base is not None:
            values["retry"] = {**_as_dict(base.retry), **retry}
        return validate(cls, values, "", _NOUNS, ("sealing",))  # type: ignore[no-any-return]

    def check(self) -> SealingConfig:
        """This config, every field checked (for one built in Python); `ConfigError` if not."""
        return validate(SealingConfig, self, "", _NOUNS, ("sealing",))  # type: ignore[no-any-return]


_NOUNS = {"sealing": "sealing option", "sealing.retry": "sealing.retry option"}


def _as_dict(record: Any) -> dict[str, Any]:
    return {f.name: getattr(record, f.name) for f in fields(record)}
