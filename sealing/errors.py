"""The sealing facade's errors, in one module so the engine and the offline CLI share them."""

from __future__ import annotations


class SealingError(Exception):
    """Base of the facade's errors."""


class UnknownSectorError(SealingError, LookupError):
    """No sector has this number."""


class NotFailedError(SealingError):
    """`retry` on a sector that is not in a failed state."""


class SectorStuckError(SealingError):
    """`wait` saw the sector settle in a state it will not leave on its own."""


class SealingLimitError(SealingError, ValueError):
    """Starting more sectors would pass MaxSealingSectors (a `ValueError` for the CLI too)."""
