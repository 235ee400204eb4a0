"""Config and `Miner.open` arguments: nonsense is refused naming the key, storage paths get a
directory, and every sector size on every chain reaches Proving with the sim sealer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from sealtools import miner, run

from sectorfsm.cli.runconfig import RunConfigError, load_run_config
from sectorfsm.sched import WorkerResources, WorkerSpec
from sectorfsm.sealing.chain import ChainParams
from sectorfsm.sealing.config import SealingConfig
from sectorfsm.sealing.miner import Miner
from sectorfsm.sealing.options import devnet_for

DAY = 86400.0
WORKER = '[[workers]]\nname = "w"\ncpus = 8\nmemory = "{memory}"\n{extra}\n'


def _worker(memory: str = "64GiB", extra: str = "") -> str:
    return WORKER.format(memory=memory, extra=extra)


# -------------------------------------------------------------------- the config file


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[miner]\nblock_time = nan", "[miner] block_time: must be a finite number, got nan"),
        ("[miner]\nblock_time = inf", "[miner] block_time: must be a finite number, got inf"),
        ("[miner]\nblock_time = 1e-300", "[miner] block_time: must be greater than or equal"),
        ("[miner]\nblock_time = true", "[miner] block_time: must be a valid number, got True"),
        ("[miner]\nblock_time = 0", "[miner] block_time: must be greater than or equal"),
        ("[miner]\nchain = 'mainnet'\nblock_time = 5.0", "only the devnet's can be chosen"),
        ("[miner]\nid = 99999999999999999999", "[miner] id: must be less than or equal to"),
        ("[miner]\nid = -1", "[miner] id: must be greater than or equal to 0, got -1"),
        (
            "[miner]\nsealer = 'fast'",
            "[miner] sealer: must be 'sim', 'reference', 'command' or 'dask'",
        ),
        ("[miner]\nsector_size = '3KiB'", "[miner] sector_size:"),
        ("[miner]\nnope = 1", "unknown [miner] key(s) nope"),
        ("miner = 3", "miner: must be a table, got 3"),
        ("[extra]\n", "unknown section(s) extra"),
        ("[sealing]\nwait_deals_delay = nan", "[sealing] wait_deals_delay: must be a finite"),
        ("[sealing]\nretry = 5", "[sealing] retry: must be a table, got 5"),
        ("[sealing]\nbatch_pre_commits = 'yes'", "batch_pre_commits: must be true or false"),
        ("[sealing]\nmax_sealing_sectors = -3", "[sealing] max_sealing_sectors: must be greater"),
        ("[sealing]\nmax_commit_batch = 2.5", "[sealing] max_commit_batch: must be a valid int"),
        ("[sealing]\nwait_deal_delay = 1", "unknown sealing option(s) wait_deal_delay"),
        ("[sealing.retry]\nbase = inf", "[sealing.retry] base: must be a finite number, got inf"),
        ("[sealing.retry]\nfactor = 0.5", "[sealing.retry] factor: must be greater than or equal"),
        ("[sealing.retry]\nbudget = -1", "[sealing.retry] budget: must be greater than or equal"),
        ("[sealing]\nmin_commit_batch = 9\nmax_commit_batch = 3", "min_commit_batch is larger"),
        (_worker(extra="tasks = []"), "workers[0] (w) tasks: a worker must run at least one task"),
        (_worker(memory="99999999999999999999GiB"), "workers[0] (w) memory: '99999999999999999999"),
        (_worker(memory="99999999999999999999"), "workers[0] (w) memory:"),
        (_worker(extra="heartbeat_grace = nan"), "heartbeat_grace: must be a finite number"),
        (_worker(extra="gpus = 'rtx'"), "workers[0] (w) gpus: must be a list"),
        (
            "[miner]\nsector_size = '32GiB'\n" + _worker(memory="8GiB", extra="tasks = ['PC1']"),
            "worker 'w' can never run PC1 on 32 GiB sectors: it needs",
        ),
        (
            _worker(extra="tasks = ['AP', 'PC1', 'C1', 'C2', 'FIN']"),
            "no worker runs PC2: sectors would wait there for ever",
        ),
        (
            _worker(extra="[[workers.paths]]\nid = 'a'\ncapacity = '1TiB'\nseal = 'yes'"),
            "workers[0] (w) paths[0] seal: must be true or false, got 'yes'",
        ),
        (
            _worker(extra="[[workers.paths]]\nid = 'a'\ncapacity = '1TiB'\npath = ''"),
            "workers[0] (w) paths[0] path:",
        ),
        (
            _worker(extra="[[workers.paths]]\nid = 'a'\ncapacity = '1TiB'\npath = 'x'")
            + "[sealer.storage]\na = 'y'\n",
            "storage path(s) a have a directory both in [sealer.storage] and in [[workers.paths]]",
        ),
        (
            "[miner]\nsealer = 'sim'\nsector_size = '32GiB'\nblock_time = 0.2",
            "[miner] block_time: 32 GiB sectors take ~3.9 h of PreCommit1+PreCommit2 with the "
            "sim sealer, but devnet tickets expire after 2880 epochs x 0.2 s",
        ),
    ],
)
def test_nonsense_config_is_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "sectors.toml"
    path.write_text(text)
    with pytest.raises(RunConfigError) as info:
        load_run_config(path)
    error = str(info.value)
    assert error.startswith(f"{path}: "), error
    assert message in error, error
    assert "\n" not in error and "pydantic" not in error and "errors.pydantic.dev" not in error


def test_a_good_config_converts_to_the_public_records(tmp_path: Path) -> None:
    path = tmp_path / "sectors.toml"
    path.write_text(
        "[miner]\nid = 1234\nsector_size = 2048\nblock_time = 2\n"
        "[sealing]\nbatch_pre_commits = false\nwait_deals_delay = 7\n"
        "[sealing.retry]\nbudget = 3\n" + _worker(extra="bandwidth = '1Gbit'")
    )
    cfg = load_run_config(path)
    assert (cfg.miner, cfg.sector_size, cfg.block_time) == (1234, "2048", 2.0)
    kwargs = cfg.open_kwargs()
    assert kwargs["chain"] == ChainParams.devnet(2.0)
    sealing = SealingConfig.from_dict(cfg.sealing)
    assert sealing.batch_pre_commits is False and sealing.wait_deals_delay == 7.0
    assert sealing.retry.budget == 3 and sealing.retry.base == 60.0
    assert cfg.workers is not None and cfg.workers[0].bandwidth == 125e6


# -------------------------------------------------------------------- Miner.open's arguments


def _bad_worker() -> list[WorkerSpec]:
    return [WorkerSpec("tiny", WorkerResources(cpus=4, mem_physical=1 << 30), frozenset())]


def _small_worker() -> list[WorkerSpec]:
    return [WorkerSpec("small", WorkerResources(cpus=4, mem_physical=8 << 30))]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"miner": -5}, "miner: must be an actor id"),
        ({"miner": 1 << 64}, "miner: must be an actor id"),
        ({"miner": True}, "miner: must be an actor id"),
        ({"sim_time_scale": -1.0}, "sim_time_scale: must be a finite number > 0, got -1.0"),
        ({"sim_time_scale": math.nan}, "sim_time_scale: must be a finite number > 0, got nan"),
        ({"sealer": "fast"}, "unknown sealer backend 'fast'"),
        ({"clock": "sundial"}, "clock: unknown clock 'sundial'"),
        ({"durability": "maybe"}, "durability: must be one of"),
        ({"sector_size": "3KiB"}, "sector_size:"),
        ({"chain": "testnet"}, "chain: unknown chain 'testnet'"),
        ({"chain": ChainParams.devnet(math.nan)}, "chain: block_time: must be a finite number"),
        ({"chain": ChainParams.devnet(1e-300)}, "chain: block_time: must be greater than"),
        ({"config": {"retry": {"base": math.inf}}}, "config: [sealing.retry] base: must be"),
        ({"config": {"retry": 5}}, "config: [sealing] retry: must be a table, got 5"),
        ({"config": SealingConfig(wait_deals_delay=math.nan)}, "config: [sealing] wait_deals"),
        ({"config": 7}, "config: must be a SealingConfig or a dict, got 7"),
        ({"sealer_options": ["x"]}, "sealer_options: must be a dict"),
        ({"workers": _bad_worker()}, "worker 'tiny' declares no tasks"),
        (
            {"workers": _small_worker(), "sector_size": "32GiB"},
            "worker 'small' can never run PC1 on 32 GiB sectors",
        ),
        (
            {"chain": ChainParams.devnet(1.0), "sector_size": "32GiB"},
            "chain: 32 GiB sectors take ~3.9 h of PreCommit1+PreCommit2 with the sim sealer, "
            "but devnet tickets expire after 2880 epochs x 1 s = 48 min: use the mainnet chain, "
            "the default devnet (its epochs grow with the sector size) or a block_time >= 9.9",
        ),
        (
            {"chain": "mainnet", "sector_size": "64GiB", "sim_time_scale": 10.0},
            "chain: 64 GiB sectors take ~78.3 h of PreCommit1+PreCommit2",
        ),
    ],
)
def test_bad_open_arguments_raise_naming_the_argument_and_create_nothing(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    kwargs = {"sealer": "sim", "clock": "virtual", **kwargs}

    async def body() -> None:
        async with Miner.open(tmp_path / "repo", **kwargs):
            pass

    with pytest.raises(ValueError) as info:
        run(body)
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "repo").exists()


# -------------------------------------------------------------------- storage path directories


def _storage_config(tmp_path: Path, path: str) -> Path:
    cfg = tmp_path / "conf" / "sectors.toml"
    cfg.parent.mkdir(exist_ok=True)
    cfg.write_text(
        '[miner]\nsealer = "reference"\n'
        + _worker(extra="")
        + f'[[workers.paths]]\nid = "nvme"\npath = "{path}"\ncapacity = "1TiB"\nstore = true\n'
    )
    return cfg


def test_a_storage_path_directory_gets_the_sector_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_run_config(_storage_config(tmp_path, "nvme-dir"))
    # Relative to the config file, not to the current directory.
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "conf" / "nvme-dir"
    assert cfg.sealer_options["storage"] == {"nvme": str(root)}

    async def body() -> None:
        async with miner(tmp_path, **cfg.open_kwargs()) as m:
            n = await m.pledge()
            await m.wait(n, "Proving", timeout=DAY)

    run(body)
    assert (root / "sealed" / "s-t01000-1").is_file()
    assert (root / "cache" / "s-t01000-1").is_dir()
    assert not (tmp_path / "nvme-dir").exists()


def test_a_storage_path_expands_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_run_config(_storage_config(tmp_path, "~/sectors"))
    assert cfg.sealer_options["storage"] == {"nvme": str(tmp_path / "home" / "sectors")}


def test_a_storage_path_without_a_directory_is_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "sectors.toml"
    path.write_text(
        '[miner]\nsealer = "reference"\n'
        + _worker()
        + '[[workers.paths]]\nid = "nvme"\ncapacity = "1TiB"\n'
    )
    cfg = load_run_config(path)

    async def body() -> None:
        async with miner(tmp_path, **cfg.open_kwargs()):
            pass

    with pytest.raises(ValueError, match=r"worker 'w': storage path 'nvme' has no directory: give"):
        run(body)
    assert not (tmp_path / "repo").exists()


def test_a_storage_directory_that_cannot_be_created_is_a_clear_error(tmp_path: Path) -> None:
    from sectorfsm.sealing.backends import StorageError

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "afile").write_text("not a directory")
    cfg = load_run_config(_storage_config(tmp_path, "afile/sub"))

    async def body() -> None:
        async with miner(tmp_path, **cfg.open_kwargs()):
            pass

    with pytest.raises(StorageError, match=r"storage path 'nvme' .*afile/sub.*not a directory"):
        run(body)


# -------------------------------------------------------------------- every size on every chain


SIZES = ["2KiB", "8MiB", "512MiB", "32GiB", "64GiB"]


@pytest.mark.parametrize("chain", ["devnet", "mainnet"])
@pytest.mark.parametrize("size", SIZES)
def test_every_sector_size_reaches_proving_on_every_chain(
    tmp_path: Path, size: str, chain: str
) -> None:
    async def body() -> float:
        async with miner(tmp_path, sealer="sim", sector_size=size, chain=chain) as m:
            numbers = [await m.pledge() for _ in range(2)]
            for n in numbers:
                info = await m.wait(n, "Proving", timeout=30 * DAY)
                assert info.retries == 0, info.last_err
            return m.chain.params.block_time

    block_time = run(body)
    assert block_time == {"devnet": 1.0, "mainnet": 30.0}[chain] or (
        chain == "devnet" and size in ("32GiB", "64GiB")
    )


def test_the_devnet_grows_its_epochs_for_big_sectors_only() -> None:
    assert devnet_for(2 << 10, "sim").block_time == 1.0
    assert devnet_for(32 << 30, "sim").block_time == pytest.approx(9.9)
    assert devnet_for(64 << 30, "sim").block_time == pytest.approx(19.8)
    # Real sealers' durations are not known: their devnet keeps the asked block time.
    assert devnet_for(32 << 30, "reference", block_time=0.2).block_time == 0.2
    # A faster simulation needs no longer epochs.
    assert devnet_for(32 << 30, "sim", time_scale=0.01).block_time == 1.0


def test_sectors_run_defaults_size_the_devnet_to_the_sim_sealer(tmp_path: Path) -> None:
    path = tmp_path / "sectors.toml"
    path.write_text("[miner]\nsealer = 'sim'\nsector_size = '32GiB'\n")
    chain = load_run_config(path).open_kwargs()["chain"]
    assert isinstance(chain, ChainParams) and chain.block_time == pytest.approx(9.9)
    path.write_text("[miner]\nsealer = 'sim'\n")
    assert load_run_config(path).open_kwargs()["chain"].block_time == 0.2


def test_status_and_list_do_not_import_the_schema_layer(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    async def seed() -> None:
        async with miner(tmp_path, sealer="sim") as m:
            await m.wait(await m.pledge(), "Proving", timeout=DAY)

    run(seed)
    for command in (["status", "1"], ["list"]):
        out = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "sectorfsm", *command],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "SECTORFSM_REPO": str(tmp_path / "repo")},
        )
        assert out.returncode == 0, out.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()}
        heavy = {"sectorfsm.validation", "sectorfsm.sealing.config", "sectorfsm.sched.config"}
        assert not heavy & imported, (command, heavy & imported)
