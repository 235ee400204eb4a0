"""`Miner.open`'s arguments, checked before anything is created on disk.

Each bad value is a `ValueError` naming the argument. Two checks relate arguments:

* the chain's deadlines must cover the sealer's work. With the `sim` sealer the durations are
  known (`SimBackend.duration`), so `chain="devnet"` gets a block time long enough for a
  sector to reach Proving: twice its PreCommit1 + PreCommit2 fits in the ticket window
  (`MaxPreCommitRandomnessLookback - SealRandomnessLookback` epochs, 2880). Explicit chain
  parameters that cannot fit are refused, naming the conflict and the block time that works.
  The `reference` and `command` sealers run real code whose duration is not known here.
* declared workers must be able to run every pipeline task on the sector size
  (`sched.config.check_workers`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..fsm import Clock, RealClock, VirtualClock
from ..sched import TaskType
from ..validation import MAX_INT, ConfigError
from .chain import ChainParams
from .config import SealingConfig

DURABILITY = ("group", "sync", "nosync")
#: Block time of `chain="devnet"` when the sealer's work fits it.
DEVNET_BLOCK_TIME = 1.0
#: The ticket window holds this many times the sim sealer's PreCommit1 + PreCommit2: room
#: for queueing, batching and a retry.
TICKET_MARGIN = 2.0
#: Epochs of the ticket window that go to batching and message inclusion, not to sealing.
_WINDOW_OVERHEAD = 20


def check_scalars(*, miner: object, sim_time_scale: object, sealer: object) -> None:
    """The plain arguments: a ValueError naming the first bad one."""
    from .backends import factory

    factory(sealer)  # the sealers are the backend registry's
    if not isinstance(miner, int) or isinstance(miner, bool) or not 0 <= miner <= MAX_INT:
        raise ValueError(f"miner: must be an actor id from 0 to 2^63-1, got {miner!r}")
    if (
        not isinstance(sim_time_scale, int | float)
        or isinstance(sim_time_scale, bool)
        or not 0 < sim_time_scale < math.inf
    ):
        raise ValueError(f"sim_time_scale: must be a finite number > 0, got {sim_time_scale!r}")


def make_clock(clock: str | Clock) -> Clock:
    """`"real"`, `"virtual"`, or a clock object."""
    if clock == "real":
        return RealClock()
    if clock == "virtual":
        return VirtualClock()
    if isinstance(clock, str):
        raise ValueError(f"clock: unknown clock {clock!r} (use 'real' or 'virtual')")
    return clock


def sim_seal_seconds(sector_size: int, time_scale: float = 1.0) -> tuple[float, float]:
    """The sim sealer's (PreCommit1 + PreCommit2, Commit1 + Commit2) seconds for a size."""
    from .backends.sim import SimBackend

    sim = SimBackend(RealClock(), 0, time_scale=time_scale)
    return (
        sim.duration(TaskType.PRE_COMMIT1, sector_size)
        + sim.duration(TaskType.PRE_COMMIT2, sector_size),
        sim.duration(TaskType.COMMIT1, sector_size) + sim.duration(TaskType.COMMIT2, sector_size),
    )


def fitting_block_time(
    params: ChainParams, sector_size: int, time_scale: float = 1.0, margin: float = TICKET_MARGIN
) -> float:
    """The shortest block time at which `margin` x the sim sealer's work fits the deadlines."""
    precommit, commit = sim_seal_seconds(sector_size, time_scale)
    ticket = margin * precommit / (params.ticket_window() - _WINDOW_OVERHEAD)
    prove = margin * commit / (params.max_prove_commit_duration - _WINDOW_OVERHEAD)
    return max(ticket, prove)


def devnet_for(
    sector_size: int,
    sealer: str,
    *,
    block_time: float = DEVNET_BLOCK_TIME,
    time_scale: float = 1.0,
) -> ChainParams:
    """A devnet whose block time is `block_time`, or longer if the sim sealer needs it.

    With 32 GiB sectors the sim sealer's PreCommit1 takes 3.5 simulated hours, more than the
    devnet's 2880-epoch ticket window at 1 s epochs: the epochs grow (to about 10 s) so that
    a sector reaches Proving instead of FailedUnrecoverable.
    """
    params = ChainParams.devnet(block_time)
    if sealer == "sim":
        needed = fitting_block_time(params, sector_size, time_scale)
        if needed > block_time:
            # Rounded up to a tenth of a second: the figure shows in `sectors run`'s banner.
            params = ChainParams.devnet(math.ceil(needed * 10) / 10)
    return params


def chain_params(
    chain: str | ChainParams, *, sector_size: int, sealer: str, time_scale: float = 1.0
) -> ChainParams:
    """The chain for `Miner.open`: a name, or parameters that must fit the sealer's work."""
    if chain == "devnet":
        return devnet_for(sector_size, sealer, time_scale=time_scale)
    if chain == "mainnet":
        params = ChainParams.mainnet()
    elif isinstance(chain, ChainParams):
        params = chain.check()
    else:
        raise ValueError(f"chain: unknown chain {chain!r} (use 'devnet' or 'mainnet')")
    conflict = timing_conflict(params, sector_size, sealer, time_scale)
    if conflict:
        raise ValueError(conflict)
    return params


def timing_conflict(
    params: ChainParams, sector_size: int, sealer: str, time_scale: float = 1.0
) -> str | None:
    """Why sectors could never reach Proving on this chain with this sealer, or None."""
    if sealer != "sim" or fitting_block_time(params, sector_size, time_scale, 1.0) <= (
        params.block_time
    ):
        return None
    from ..sched.resources import describe_bytes

    precommit, _ = sim_seal_seconds(sector_size, time_scale)
    window = params.ticket_window()
    enough = math.ceil(fitting_block_time(params, sector_size, time_scale) * 10) / 10
    return (
        f"chain: {describe_bytes(sector_size)} sectors take ~{_human(precommit)} of "
        f"PreCommit1+PreCommit2 with the sim sealer, but {params.name} tickets expire after "
        f"{window} epochs x {params.block_time:g} s = {_human(window * params.block_time)}: "
        "use the mainnet chain, the default devnet (its epochs grow with the sector size) "
        f"or a block_time >= {enough:g}"
    )


def _human(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.1f} s"


def sealing_config(
    config: SealingConfig | Mapping[str, Any] | None, params: ChainParams
) -> SealingConfig:
    """The sealing knobs: given ones over the chain's defaults, every value checked."""
    base = devnet_config(params) if params.name == "devnet" else SealingConfig()
    try:
        if isinstance(config, SealingConfig):
            return config.check()
        if config is None:
            return base
        if not isinstance(config, Mapping):
            raise ConfigError(f"must be a SealingConfig or a dict, got {config!r}")
        return SealingConfig.from_dict(dict(config), base)
    except ValueError as exc:
        raise ValueError(f"config: {exc}") from None


def devnet_config(params: ChainParams) -> SealingConfig:
    """Lotus defaults with batch waits scaled to devnet blocks, so batches still form."""
    return SealingConfig(
        pre_commit_batch_wait=5 * params.block_time,
        pre_commit_batch_slack=0.0,
        commit_batch_wait=5 * params.block_time,
        commit_batch_slack=0.0,
        min_commit_batch=2,
        wait_deals_delay=60 * params.block_time,
    )


def check_sealer_options(sealer_options: object) -> dict[str, Any]:
    """`sealer_options` is a dict (or None); its contents are the backend's to check."""
    if sealer_options is None:
        return {}
    if not isinstance(sealer_options, Mapping):
        raise ValueError(f"sealer_options: must be a dict, got {sealer_options!r}")
    return dict(sealer_options)
