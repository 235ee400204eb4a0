"""`sectors run`: the engine daemon (engine, scheduler, local workers and the devnet).

It resumes whatever the repo holds, executes commands other `sectors` processes write into
the repo, publishes scheduler snapshots for `sectors workers/jobs/sched-diag`, and shows live
progress (a rich view on a terminal, plain log lines otherwise). Ctrl-C stops it cleanly;
`kill -9` loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .common import DEFAULT_REPO, RepoOption, err_console, fail, repo_path, state_colour

if TYPE_CHECKING:
    from ..sealing.info import SectorInfo
    from ..sealing.miner import Miner
    from .runconfig import RunConfig

#: How often the view refreshes and snapshots are published (seconds, real time).
TICK = 0.5


class _Outcome(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def run(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML config (default: embedded defaults)."),
    ] = None,
    pledge: Annotated[
        int, typer.Option("--pledge", min=0, max=10_000, help="Pledge N CC sectors first.")
    ] = 0,
    until_proving: Annotated[
        bool,
        typer.Option(
            "--until-proving",
            help="Exit 0 once every sector is Proving (non-zero if one is stuck failed).",
        ),
    ] = False,
    repo: RepoOption = DEFAULT_REPO,
) -> None:
    """Run the sealing engine, scheduler, local workers and the simulated devnet."""
    from .runconfig import RunConfigError, load_run_config

    try:
        cfg = load_run_config(config.expanduser() if config is not None else None)
    except RunConfigError as exc:
        fail(str(exc))
    try:
        code = asyncio.run(_run(repo_path(repo), cfg, pledge, until_proving))
    except _Outcome as out:
        if out.code:
            fail(str(out), out.code)
        code = 0
    raise typer.Exit(code)


async def _run(repo: Path, cfg: RunConfig, pledge: int, until_proving: bool) -> int:
    from ..fsm import StoreError, StoreLockedError
    from ..sealing.miner import Miner, SealingError

    console = err_console()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with Miner.open(repo, **cfg.open_kwargs()) as miner:
            console.print(
                f"sectorfsm engine on {repo} ({cfg.source}): {cfg.sealer} sealer, "
                f"{cfg.sector_size} sectors, SIMULATED {cfg.chain} chain "
                f"({miner.chain.params.block_time:g}s epochs)"
            )
            for _ in range(pledge):
                n = await miner.pledge()
                console.print(f"Created CC sector: {n}")
            return await _supervise(miner, stop, until_proving)
    except StoreLockedError as exc:
        raise _Outcome(1, f"{exc}") from None
    except (StoreError, SealingError, ValueError, OSError) as exc:
        raise _Outcome(1, str(exc)) from None


async def _supervise(miner: Miner, stop: asyncio.Event, until_proving: bool) -> int:
    from ..sched.views import SNAPSHOT_KEY

    live = sys.stdout.isatty()
    view = _LiveView(miner) if live else _PlainLog(miner)
    tracked = _Tracked(miner, baseline=until_proving)
    quiet = 0
    with view:
        while not stop.is_set():
            settled = miner.settled()  # before this tick's snapshot is staged
            _publish(miner, SNAPSHOT_KEY)
            sectors = tracked.refresh()
            view.update(sectors)
            if until_proving:
                verdict = _verdict(sectors)
                if not sectors and tracked.proving_before:
                    verdict = (0, f"all {tracked.proving_before} sector(s) are Proving")
                # Settled twice in a row (half a second apart): nothing will move any more.
                quiet = quiet + 1 if verdict is None and sectors and settled else 0
                if quiet >= 2:
                    verdict = _settled_verdict(sectors)
                if verdict is not None:
                    await miner.idle()
                    _publish(miner, SNAPSHOT_KEY)
                    view.update(tracked.refresh())
                    code, message = verdict
                    view.final(message)
                    if code:
                        raise _Outcome(code, message)
                    return 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK)
    err_console().print("stopping: the engine state is saved; `sectors run` resumes it")
    return 0


class _Tracked:
    """The sectors worth showing: live ones, and those that went dormant while we watched.

    Reading only the live index each tick keeps the daemon's cost independent of how many
    Proving sectors the repo holds; a sector that leaves the live index is read once more,
    so its final state (Proving, FailedUnrecoverable, Removed) is still reported.
    """

    def __init__(self, miner: Miner, *, baseline: bool) -> None:
        from ..sealing.states import SectorState

        self.group = miner.group
        self.known: dict[int, SectorInfo] = {}
        #: Sectors live at the last refresh (only those can have gone dormant since).
        self.live: set[int] = set()
        #: With --until-proving: sectors already Proving when we started (counted, not kept).
        self.proving_before = 0
        if baseline:  # one full scan, so a sector parked by an earlier run is not missed
            for n, info in self.group.list():
                if info.state is SectorState.Proving:
                    self.proving_before += 1
                elif info.state is not SectorState.Removed:
                    self.known[int(n)] = info
                    self.live.add(int(n))

    def refresh(self) -> list[SectorInfo]:
        """Re-read the live sectors, and once more each sector that stopped being live."""
        live = {int(n): info for n, info in self.group.records.list_live()}
        for n in self.live - live.keys():
            info = self.group.get(n)
            if info is not None:
                self.known[n] = info
        self.known.update(live)
        self.live = set(live)
        return [self.known[n] for n in sorted(self.known)]


def _verdict(sectors: list[SectorInfo]) -> tuple[int, str] | None:
    from ..sealing.states import SectorState

    live = [s for s in sectors if s.state is not SectorState.Removed]
    stuck = [s for s in live if s.state is SectorState.FailedUnrecoverable]
    if stuck:
        s = stuck[0]
        return 1, f"sector {s.number} is FailedUnrecoverable: {s.last_err}"
    if live and all(s.state is SectorState.Proving for s in live):
        return 0, f"all {len(live)} sector(s) are Proving"
    return None


def _settled_verdict(sectors: list[SectorInfo]) -> tuple[int, str]:
    from ..sealing.states import SectorState

    waiting = [s for s in sectors if s.state not in (SectorState.Proving, SectorState.Removed)]
    if not waiting:
        return 1, "every sector was removed: none is Proving"
    shown = ", ".join(
        f"{s.number} in {s.state.value}" + (f" ({s.last_err})" if s.last_err else "")
        for s in waiting[:10]
    )
    return 1, f"nothing is running, but not every sector is Proving: {shown}"


def _publish(miner: Miner, key: bytes) -> None:
    from ..fsm.codec import packb

    # Staged in the engine's group commit, so publishing never blocks the event loop.
    miner.store.committer.put("meta", key, packb(miner.sched.snapshot()))


class _PlainLog:
    """One line per state change, for logs and pipes."""

    def __init__(self, miner: Miner) -> None:
        self.miner = miner
        self.seen: dict[int, str] = {}

    def __enter__(self) -> _PlainLog:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, sectors: list[SectorInfo]) -> None:
        stamp = time.strftime("%H:%M:%S")
        for s in sectors:
            state = s.state.value
            if self.seen.get(s.number) != state:
                before = self.seen.get(s.number, "-")
                self.seen[s.number] = state
                extra = f" ({s.last_err})" if s.last_err and state.endswith("Failed") else ""
                print(f"{stamp} sector {s.number}: {before} -> {state}{extra}", flush=True)

    def final(self, message: str) -> None:
        print(message, flush=True)


class _LiveView:
    """A rich live table: sector states, what each worker runs."""

    def __init__(self, miner: Miner) -> None:
        from rich.live import Live

        self.miner = miner
        self.live = Live(refresh_per_second=4, transient=False)

    def __enter__(self) -> _LiveView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.__exit__(*exc)

    def update(self, sectors: list[SectorInfo]) -> None:
        self.live.update(self._render(sectors))

    def final(self, message: str) -> None:
        self.live.console.print(message)

    def _render(self, sectors: list[SectorInfo]) -> Any:
        from rich.console import Group
        from rich.table import Table

        counts = Counter(s.state.value for s in sectors)
        summary = (
            "  ".join(f"[{state_colour(k)}]{k}[/] {v}" for k, v in sorted(counts.items()))
            or "no sectors yet: `sectors pledge` from another terminal"
        )
        table = Table("Sector", "State", "Last event", box=None)
        busy = [s for s in sectors if s.state.value != "Proving"][:15]
        for s in busy:
            last = s.log[-1].kind.removeprefix("event;") if s.log else ""
            table.add_row(str(s.number), f"[{state_colour(s.state.value)}]{s.state.value}[/]", last)
        workers = Table("Worker", "Running", "CPU", "GPU", box=None)
        for w in self.miner.sched.workers():
            tasks = " ".join(f"{k}:{v}" for k, v in w.tasks.items()) or "idle"
            workers.add_row(w.name, tasks, f"{w.cpus_used}/{w.cpus}", f"{w.gpus_used:g}/{w.gpus}")
        head = self.miner.chain.head()
        return Group(f"epoch {head}  {summary}", table, workers)


def register(app: typer.Typer) -> None:
    """Add `run` to `app`."""
    app.command("run")(run)
