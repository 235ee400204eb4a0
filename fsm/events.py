"""Events that the engine itself delivers to planners."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Restart:
    """Delivered, after any pending events, to every live machine when its group starts.

    A planner should re-run the current state's step, as Lotus does for `SectorRestart`.
    """


@dataclass(frozen=True, slots=True)
class StepFailed:
    """Delivered when a step raised; the machine stays usable and the domain decides."""

    error: str
    trace: str = ""


BUILTIN_EVENTS: tuple[type, ...] = (Restart, StepFailed)
