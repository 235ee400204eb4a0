"""The cyclic garbage collector's thresholds while an engine runs.

An engine with N machines in flight keeps their objects (machines, steps, futures, timers)
alive for hours of its clock: nearly everything survives the young collections, so with
CPython's defaults (700, 10, 10) every tenth collection of generation 1 is a full one over all
of them. Their number grows with the transitions and their cost with the machines in flight,
so the collector's share grows as N squared: 10,000 sectors through `bench/bench_scale.py`
spent 25 s of their 89 s of CPU in it (18 s in 39 full collections), 1,000 sectors 0.6 s of
5.5 s. A first generation of `ENGINE_THRESHOLD0` objects makes every collection that much
rarer, and holds back at most that many objects of cyclic garbage (a few MB). Reference
counting, which frees almost everything, is unaffected. What a young collection finds alive
it scans once more in each older generation it is promoted to, and a sector's objects live
for hours of engine time: a first generation of 10,000 still cost 10,000 sectors 4.6 s of
40 s of CPU (185 young collections of ~13 ms, 16 middle ones of ~100 ms, 2 full); with
100,000, 0.9 s (8 young ones, nothing older), and objects that die within the longer
window (a step's futures, a round's records) are never scanned at all.

`engine_gc()` applies it for as long as any engine of the process runs and puts back the
thresholds it found when the last one stops; thresholds already higher are left alone.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

#: Allocations (net of deallocations) between two young collections while an engine runs.
ENGINE_THRESHOLD0 = 100_000

_active = 0
_saved: tuple[int, int, int] | None = None


@contextlib.contextmanager
def engine_gc() -> Iterator[None]:
    """Raise the collector's first threshold while the block runs (nestable)."""
    global _active, _saved
    if _active == 0:
        _saved = gc.get_threshold()
        first, second, third = _saved
        if 0 < first < ENGINE_THRESHOLD0:  # (0: collection is off; keep it so)
            gc.set_threshold(ENGINE_THRESHOLD0, second, third)
    _active += 1
    try:
        yield
    finally:
        _active -= 1
        if _active == 0 and _saved is not None:
            if gc.get_threshold()[0] == ENGINE_THRESHOLD0:  # (unless someone changed it since)
                gc.set_threshold(*_saved)
            _saved = None
