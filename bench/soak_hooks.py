"""The soak's engine child: `sectors run` with two hooks installed (see bench/soak.py).

    python bench/soak_hooks.py CTL INC run --config soak.toml --repo REPO

* Every sealer task execution appends one JSON line to `CTL/execs.log`: the engine run
  (INC), the sector, the task, and the sector's state and applied-event count when it
  started. Two runs of one task on the same count in one engine run are doubled work.
* A task polls `CTL/faults/` for fault files (`*.json`), turns the DevnetChain knob each one
  names, and renames it `*.applied`: DevnetChain's knobs exist only inside the process.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def applied_events(log: list[Any]) -> int:
    """Events a sector's log shows as applied (rejected ones are followed by a PlanError)."""
    count = 0
    for i, entry in enumerate(log):
        nxt = log[i + 1].kind if i + 1 < len(log) else ""
        if entry.kind == "error;StepFailed":
            count += 1
        elif entry.kind.startswith("event;") and nxt != "error;PlanError":
            count += entry.kind != "event;SectorStartPacking"  # ignorable: no new attempt
    return count


class CountingBackend:
    """Wraps a sealer backend: one line per task execution in `execs.log`."""

    TASKS = ("add_piece", "pre_commit1", "pre_commit2", "commit1", "commit2", "finalize")

    def __init__(self, inner: Any, store: Any, log_path: Path, inc: int) -> None:
        from sectorfsm.sealing.store_view import sector_records

        self._inner = inner
        self._records = sector_records(store, events=False)
        self._fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._inc = inc
        self.name = inner.name
        for method in self.TASKS:
            setattr(self, method, self._wrap(method, getattr(inner, method)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _wrap(self, method: str, fn: Any) -> Any:
        async def run(job: Any, *args: Any) -> Any:
            # AddPiece runs once per piece and filler: where it writes tells them apart.
            self._note(job, str(sum(args[0])) if method == "add_piece" else "")
            return await fn(job, *args)

        return run

    def _note(self, job: Any, where: str) -> None:
        n = job.sector.number
        state, gen = "?", -1
        try:
            raw = self._records.raw(self._records.key(n))
            if raw is not None:
                info = self._records.decode(raw, n)[0]
                state, gen = info.state.value, applied_events(info.log)
        except Exception as exc:  # a corrupt record is the checker's business, not ours
            state = f"unreadable: {exc}"
        line = {"inc": self._inc, "sector": n, "task": job.task_type.short, "state": state}
        line.update(gen=gen, where=where, pid=os.getpid(), t=time.time())
        os.write(self._fd, (json.dumps(line) + "\n").encode())


def apply_fault(chain: Any, spec: dict[str, Any], expiries: list[tuple[float, int]]) -> None:
    """Turn one of DevnetChain's knobs as `spec` says."""
    from sectorfsm.sealing.chain import ExitCode

    kind = spec["kind"]
    if kind == "api_errors":
        chain.faults.api_errors += spec["n"]
    elif kind == "send_errors":
        chain.faults.send_errors += spec["n"]
    elif kind == "message_exit":
        codes = [ExitCode(c) for c in spec["codes"]]
        chain.faults.message_exits.setdefault(spec["method"], []).extend(codes)
    elif kind == "reject_proofs":
        chain.faults.reject_proofs.add(spec["sector"])
        expiries.append((time.monotonic() + spec["seconds"], spec["sector"]))
    elif kind == "reorg":
        head = int((chain.clock.now() - chain.epoch_time(0)) // chain.params.block_time)
        chain.reorg(max(0, head - spec["back"]))
    elif kind == "clear":
        chain.faults.api_errors = chain.faults.send_errors = 0
        chain.faults.message_exits.clear()
        chain.faults.reject_proofs.clear()
        expiries.clear()


async def fault_loop(chain: Any, where: Path) -> None:
    """Apply the fault files the soak drops into `where`, oldest first."""
    expiries: list[tuple[float, int]] = []
    while True:
        # A few tiny files, in the soak's harness only: not worth a thread.
        for path in sorted(where.glob("*.json")):  # noqa: ASYNC240
            apply_fault(chain, json.loads(path.read_text()), expiries)
            path.rename(path.with_suffix(".applied"))
        now = time.monotonic()
        for until, n in [e for e in expiries if e[0] <= now]:
            chain.faults.reject_proofs.discard(n)
            expiries.remove((until, n))
        await asyncio.sleep(0.05)


def engine_main(ctl: Path, inc: int, argv: list[str]) -> None:
    """Install the hooks, then run the real `sectors` CLI with `argv` in this process."""
    from sectorfsm.cli.app import main
    from sectorfsm.sealing import devnet, sealer

    sealer_init = sealer.ScheduledSealer.__init__
    chain_init = devnet.DevnetChain.__init__
    tasks: list[asyncio.Task[None]] = []

    def counted(self: Any, sched: Any, backend: Any, store: Any) -> None:
        sealer_init(self, sched, CountingBackend(backend, store, ctl / "execs.log", inc), store)

    def faulty(self: Any, *args: Any, **kwargs: Any) -> None:
        chain_init(self, *args, **kwargs)
        tasks.append(asyncio.get_running_loop().create_task(fault_loop(self, ctl / "faults")))

    sealer.ScheduledSealer.__init__ = counted  # type: ignore[method-assign]
    devnet.DevnetChain.__init__ = faulty  # type: ignore[method-assign]
    sys.argv = ["sectors", *argv]
    main()


if __name__ == "__main__":
    engine_main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
