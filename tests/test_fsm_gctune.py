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
    gc.set_threshold(50_000, 5, 5)
    with engine_gc():
        assert gc.get_threshold() == (50_000, 5, 5)
    assert gc.get_threshold() == (50_000, 5, 5)
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
