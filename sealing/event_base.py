"""The base of every sector event: `apply`, `apply_global`, and the form the log keeps."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from .info import SectorInfo


@dataclass(frozen=True, slots=True)
class SectorEvent:
    """Base of sector events: `apply` does nothing unless an event overrides it."""

    #: Lotus's `Ignorable`: skipped silently by a state with no edge for it.
    ignorable: ClassVar[bool] = False
    #: Global events are accepted in every state (Lotus's `globalMutator`,
    #: `extern/storage-sealing/fsm_events.go@v1.11.3`).
    is_global: ClassVar[bool] = False

    def apply(self, info: SectorInfo, now: float) -> None:
        """Mutate `info` as Lotus's `apply()` does (default: nothing)."""

    def apply_global(self, info: SectorInfo) -> bool:
        """Global events only: mutate `info`; True stops the batch."""
        raise TypeError(f"{type(self).__name__} is not a global event")

    @property
    def name(self) -> str:
        """The event's Lotus name, e.g. `SectorPacked`."""
        return type(self).__name__

    def describe(self) -> tuple[str, str]:
        """`(message, trace)` for the sector log: JSON of the fields, the error as trace."""
        fields: dict[str, Any] = {}
        trace = ""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "error":
                trace = str(value)
                continue
            fields[f.name] = _jsonable(value)
        return json.dumps({"User": fields}, separators=(",", ":"), sort_keys=True), trace


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value
