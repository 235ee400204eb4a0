"""The sealer-backend registry: one list of names, each backend checked before it is built."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from sectorfsm.cli.runconfig import RunConfigError, load_run_config
from sectorfsm.fsm import VirtualClock
from sectorfsm.sched import StoragePath, WorkerSpec, local_worker
from sectorfsm.sealing.backends import (
    REGISTRY,
    default_workers,
    make_backend,
    register,
    sealers,
)
from sectorfsm.sealing.backends.sim import SimBackend, sim_worker
from sectorfsm.sealing.miner import Miner
from sectorfsm.sealing.options import check_scalars


class Reached(Exception):
    """The fake backend's `check` ran: the name got past every argument check."""


class FakeFactory:
    """A backend registered by a test, that refuses to be built."""

    name = "fake"
    keeps_files = False

    def check(
        self, repo: Path, options: Mapping[str, Any], workers: Sequence[WorkerSpec] | None
    ) -> None:
        """Stop `Miner.open` here, before anything is created."""
        raise Reached(self.name)

    def create(self, **kw: Any) -> Any:
        """Never reached."""
        raise AssertionError("create without check")

    def default_workers(self, repo: Path) -> list[WorkerSpec]:
        """No workers."""
        return []


def _run_config(tmp_path: Path, sealer: str) -> Path:
    path = tmp_path / f"{sealer}.toml"
    path.write_text(f'[miner]\nsealer = "{sealer}"\n')
    return path


def _open(repo: Path, sealer: str) -> None:
    async def main() -> None:
        async with Miner.open(repo, sealer=sealer, clock="virtual"):
            pass

    asyncio.run(main())


def test_the_builtin_backends_are_registered_in_their_listed_order() -> None:
    assert sealers() == ("sim", "reference", "command", "dask")
    assert {name: f.keeps_files for name, f in REGISTRY.items()} == {
        "sim": False,
        "reference": True,
        "command": True,
        "dask": False,
    }


def test_every_registered_name_is_accepted_by_miner_open_and_sectors_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(REGISTRY, "fake", FakeFactory())
    for name in sealers():
        check_scalars(miner=1000, sim_time_scale=1.0, sealer=name)
        assert load_run_config(_run_config(tmp_path, name)).sealer == name
    # A registered name reaches its own factory: there is no second list to update.
    repo = tmp_path / "repo"
    with pytest.raises(Reached):
        _open(repo, "fake")
    assert not repo.exists()


def test_an_unknown_name_lists_exactly_the_registered_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(REGISTRY, "fake", FakeFactory())
    repo = tmp_path / "repo"
    with pytest.raises(ValueError) as err:
        _open(repo, "bogus")
    listed = ", ".join(sealers())
    assert str(err.value) == f"unknown sealer backend 'bogus' (available: {listed})"
    assert listed == "sim, reference, command, dask, fake"
    assert not repo.exists()
    with pytest.raises(RunConfigError) as bad:
        load_run_config(_run_config(tmp_path, "bogus"))
    assert str(bad.value).endswith(
        "[miner] sealer: must be 'sim', 'reference', 'command', 'dask' or 'fake', got 'bogus'"
    )
    for call in (lambda: default_workers("bogus", repo), lambda: _make("bogus", repo, {})):
        with pytest.raises(
            ValueError, match=rf"^unknown sealer backend 'bogus' \(available: {listed}\)$"
        ):
            call()


def test_a_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="'sim' is registered already"):
        register(REGISTRY["sim"])
    assert sealers() == ("sim", "reference", "command", "dask")


def _make(sealer: str, repo: Path, options: dict[str, Any], **kw: Any) -> Any:
    return make_backend(sealer, clock=VirtualClock(), miner=1000, repo=repo, options=options, **kw)


def test_sim_is_built_and_staffed_by_the_registry_like_the_others(tmp_path: Path) -> None:
    backend = _make("sim", tmp_path / "repo", {}, time_scale=0.5)
    assert isinstance(backend, SimBackend)
    assert backend.time_scale == 0.5
    assert default_workers("sim", tmp_path / "repo") == [sim_worker()]
    assert not (tmp_path / "repo").exists()  # the sim sealer keeps no files


def test_file_backends_check_options_and_workers_before_creating_anything(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    with pytest.raises(ValueError, match=r"unknown option\(s\) for the reference sealer: colour$"):
        _make("reference", repo, {"colour": "red"})
    with pytest.raises(ValueError, match=r"needs sealer_options\['commands'\]"):
        _make("command", repo, {})
    path = StoragePath("nvme", "w1", 1 << 40, can_seal=True, can_store=True)
    worker = local_worker("w1", paths=(path,))
    for sealer in ("reference", "command"):
        with pytest.raises(ValueError, match="storage path 'nvme' has no directory"):
            _make(sealer, repo, {}, workers=[worker])
    assert not repo.exists()
    backend = _make("reference", repo, {"storage": {"nvme": "fast"}}, workers=[worker])
    assert sorted(p.name for p in (repo / "fast").iterdir()) == ["cache", "sealed", "unsealed"]
    assert backend.name == "reference"


def test_files_union_is_the_flags_of_the_held_files() -> None:
    from sectorfsm.sched import FileType as F
    from sectorfsm.sealing.filesrecord import files_union

    assert files_union({}) is F.NONE
    both = files_union({F.UNSEALED: 1, F.CACHE: 2})
    assert both == F.UNSEALED | F.CACHE and isinstance(both, F)
    assert files_union({F.SEALED | F.CACHE: 1, F.UNSEALED: 0}) == F.SEALED | F.CACHE | F.UNSEALED


def test_files_bits_is_the_int_a_files_record_stores() -> None:
    from sectorfsm.sched import FileType as F
    from sectorfsm.sealing.filesrecord import files_bits

    assert files_bits({}) == 0
    bits = files_bits({F.UNSEALED: 1, F.SEALED | F.CACHE: 2})
    assert bits == int(F.UNSEALED | F.SEALED | F.CACHE) and type(bits) is int
