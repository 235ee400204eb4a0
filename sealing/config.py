"""Sealing configuration: Lotus's `[Sealing]` knobs, our retry policy, and proof types."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

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

    base: float = 60.0
    factor: float = 2.0
    cap: float = 3600.0
    budget: int = 16

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap < 0:
            raise ValueError("retry base and cap must not be negative")
        if self.factor < 1:
            raise ValueError("retry factor must be at least 1")
        if self.budget < 0:
            raise ValueError("retry budget must not be negative")

    def delay(self, retries: int) -> float:
        """Seconds to wait before retry number `retries` (0-based)."""
        if self.factor == 1 or retries == 0:
            return min(self.cap, self.base)
        return float(min(self.cap, self.base * self.factor ** min(retries, 64)))


@dataclass(frozen=True, slots=True)
class SealingConfig:
    """Lotus's `[Sealing]` section (v1.11.3 defaults), plus our retry policy."""

    #: Seal a deal sector this long after its first piece arrived (Lotus `WaitDealsDelay`).
    wait_deals_delay: float = 6 * 3600.0
    #: Refuse pledges while this many sectors are sealing (0: no limit; Lotus MaxSealingSectors).
    max_sealing_sectors: int = 0
    always_keep_unsealed_copy: bool = True
    finalize_early: bool = False

    batch_pre_commits: bool = True
    max_pre_commit_batch: int = 256
    pre_commit_batch_wait: float = 24 * 3600.0
    pre_commit_batch_slack: float = 3 * 3600.0

    aggregate_commits: bool = True
    min_commit_batch: int = 4
    max_commit_batch: int = 819
    commit_batch_wait: float = 24 * 3600.0
    commit_batch_slack: float = 3600.0
    #: Below this base fee (attoFIL) commits go one message each (Lotus AggregateAboveBaseFee).
    aggregate_above_base_fee: int = 150_000_000

    start_epoch_sealing_buffer: int = 480
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        for name in ("max_pre_commit_batch", "max_commit_batch", "min_commit_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"sealing.{name} must be at least 1")
        if self.min_commit_batch > self.max_commit_batch:
            raise ValueError("sealing.min_commit_batch is larger than max_commit_batch")
        for name in (
            "wait_deals_delay",
            "pre_commit_batch_wait",
            "pre_commit_batch_slack",
            "commit_batch_wait",
            "commit_batch_slack",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"sealing.{name} must not be negative")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SealingConfig:
        """Build from a config-file table; unknown keys are a clear error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown sealing option(s): {', '.join(unknown)}")
        values = dict(data)
        retry = values.pop("retry", None)
        if isinstance(retry, dict):
            retry_known = {f.name for f in fields(RetryPolicy)}
            bad = sorted(set(retry) - retry_known)
            if bad:
                raise ValueError(f"unknown sealing.retry option(s): {', '.join(bad)}")
            values["retry"] = RetryPolicy(**retry)
        elif retry is not None:
            values["retry"] = retry
        return replace(cls(), **values)
