"""Faults of a simulated cluster: workers that crash and come back, chain messages that fail.

Worker crashes follow an exponential law (mean `worker_mtbf_hours`, one stream per worker from
the seed): the scheduler stops giving the worker work, the sim sealer fails what was running
there at once (`SimBackend.lose_worker`), and `worker_repair_hours` later it is enabled again.

Message failures use the devnet's own fault knob, `Faults.message_exits` (per method, the exit
codes of the next messages, consumed in send order): each method gets a `_Draws` list that
decides, as each message is sent, whether it fails (out of gas, which the handlers retry), so
no hook in the chain is needed and the draws follow the send order, which is deterministic.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from ..sealing.backends.sim import SimBackend
from ..sealing.chain import ExitCode
from ..sealing.devnet import PRECOMMIT, PRECOMMIT_BATCH, PROVE_COMMIT, PROVE_COMMIT_AGGREGATE
from ..sealing.miner import Miner
from .config import FaultsConfig

__all__ = ["FaultLog", "FaultInjector"]

_METHODS = (PRECOMMIT, PRECOMMIT_BATCH, PROVE_COMMIT, PROVE_COMMIT_AGGREGATE)


@dataclass(slots=True)
class FaultLog:
    """What the faults did, for the summary."""

    #: Per worker: crashes, and hours down.
    crashes: dict[str, int] = field(default_factory=dict)
    down_hours: dict[str, float] = field(default_factory=dict)
    #: Per chain method: messages failed on purpose.
    failed_messages: dict[str, int] = field(default_factory=dict)


class _Draws(list[ExitCode]):
    """An always-pending list of exit codes: each look at it draws the next message's fate.

    DevnetChain reads `if exits:` then `exits.pop(0)` per message sent; here the test draws
    (and a success reads as empty, leaving the message to execute normally).
    """

    def __init__(self, rng: random.Random, rate: float, method: str, log: FaultLog) -> None:
        super().__init__()
        self.rng = rng
        self.rate = rate
        self.method = method
        self.log = log

    def __bool__(self) -> bool:
        if self.rng.random() >= self.rate:
            return False
        self.log.failed_messages[self.method] = self.log.failed_messages.get(self.method, 0) + 1
        return True

    def pop(self, index: object = -1) -> ExitCode:
        """The failure that `__bool__` just drew."""
        return ExitCode.SysErrOutOfGas


class FaultInjector:
    """Runs the configured faults against one miner until stopped."""

    def __init__(self, miner: Miner, faults: FaultsConfig, seed: int) -> None:
        self.miner = miner
        self.faults = faults
        self.seed = seed
        self.log = FaultLog()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Install the message draws and one crash loop per worker (when configured)."""
        if self.faults.message_failure_rate > 0:
            exits = self.miner.chain.faults.message_exits
            for method in _METHODS:
                rng = random.Random(f"{self.seed}/messages/{method}")
                exits[method] = _Draws(rng, self.faults.message_failure_rate, method, self.log)
        if self.faults.worker_mtbf_hours > 0:
            loop = asyncio.get_running_loop()
            for w in self.miner.sched.workers():
                self._tasks.append(loop.create_task(self._crashes(w.name)))

    async def stop(self) -> None:
        """Stop the crash loops."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _crashes(self, worker: str) -> None:
        rng = random.Random(f"{self.seed}/crashes/{worker}")
        clock, sched = self.miner.clock, self.miner.sched
        backend = self.miner.sealer.backend
        mtbf = self.faults.worker_mtbf_hours * 3600
        repair = self.faults.worker_repair_hours * 3600
        while True:
            await clock.sleep(rng.expovariate(1 / mtbf))
            sched.disable(worker, "simulated crash")
            if isinstance(backend, SimBackend):
                backend.lose_worker(worker)
            self.log.crashes[worker] = self.log.crashes.get(worker, 0) + 1
            down_from = clock.now()
            try:
                await clock.sleep(repair)
            finally:
                self.log.down_hours[worker] = round(
                    self.log.down_hours.get(worker, 0.0) + (clock.now() - down_from) / 3600, 3
                )
            sched.enable(worker)
