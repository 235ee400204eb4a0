"""The engine's collector thresholds: raised while an engine runs, put back after."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
from sealtools import miner, run

from sectorfsm.fsm.gctune import ENGINE_THRESHOLD0, engine_gc


@pytest.fixture
def thresholds() -> Iterator[None]:
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        yield
    finally:
        gc.set_threshold(*saved)


@pytest.mark.usefixtures("thresholds")
def test_raised_while_engines_run_and_put_back_after_the_last() -> None:
    with engine_gc():
        assert gc.get_threshold() == (ENGINE_THRESHOLD0, 10, 10)
        with engine_gc():
            assert gc.get_threshold() == (ENGINE_THRESHOLD0, 10, 10)
        assert gc.get_threshold() == (ENGINE_THRESHOLD0, 10, 10)  # (the outer one still runs)
    assert gc.get_threshold() == (700, 10, 10)


@pytest.mark.usefixtures("thresholds")
def test_higher_or_disabled_thresholds_are_left_alone() -> None:
    higher = ENGINE_THRESHOLD0 * 5
    gc.set_threshold(higher, 5, 5)
    with engine_gc():
        assert gc.get_threshold() == (higher, 5, 5)
    assert gc.get_threshold() == (higher, 5, 5)
    gc.set_threshold(0)
    with engine_gc():
        assert gc.get_threshold()[0] == 0
    assert gc.get_threshold()[0] == 0


@pytest.mark.usefixtures("thresholds")
def test_a_miner_runs_with_them(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, durability="nosync"):
            assert gc.get_threshold()[0] == ENGINE_THRESHOLD0

    run(body)
    assert gc.get_threshold() == (700, 10, 10)


@pytest.mark.usefixtures("thresholds")
def test_fifty_thousand_objects_kept_alive_cost_no_collection() -> None:
    """As many objects as ~5,000 sectors in flight keep (fsm/gctune.py): no young collection.

    Each would scan every one of them again (10,000 sectors spent 4.6 s of 40 s of CPU in
    185 young and 16 middle collections with a first threshold of 10,000).
    """
    collections: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.collect()
    with engine_gc():
        gc.callbacks.append(count)
        try:
            kept = [[i] for i in range(50_000)]
        finally:  # (before the old thresholds are back: they collect at once)
            gc.callbacks.remove(count)
    assert len(kept) == 50_000
    assert collections == []
