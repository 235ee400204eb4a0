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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .common import (
    DEFAULT_REPO,
    RepoOption,
    err_console,
    fail,
    repo_exists,
    repo_path,
    state_colour,
)

if TYPE_CHECKING:
    from rich.console import Console

    from ..sealing.info import SectorInfo
    from ..sealing.metrics import MetricsServer
    from ..sealing.miner import Miner
    from .runconfig import ClusterConfig, RunConfig

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
    metrics: Annotated[
        str | None,
        typer.Option(
            "--metrics",
            metavar="HOST:PORT",
            help="Serve Prometheus metrics at http://HOST:PORT/metrics ([metrics] listen).",
        ),
    ] = None,
) -> None:
    """Run the sealing engine, scheduler, local workers and the simulated devnet."""
    cfg = _config(config)
    root = repo_path(repo)
    # Bound before the engine starts: a bad address or a taken port changes nothing.
    server = _metrics_server(metrics or cfg.metrics_listen)
    try:
        code = asyncio.run(_run(root, cfg, pledge, until_proving, server))
    except _Outcome as out:
        if out.code:
            fail(str(out), out.code)
        code = 0
    finally:
        if server is not None:
            server.close()
    raise typer.Exit(code)


def _metrics_server(listen: str | None) -> MetricsServer | None:
    """The Prometheus endpoint, listening already (nothing is served until a miner runs)."""
    if listen is None:
        return None
    from ..sealing.metrics import MetricsError, MetricsServer

    try:
        return MetricsServer(listen)
    except MetricsError as exc:
        fail(str(exc))


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config (default: embedded defaults)."),
]


def init(config: ConfigOption = None, repo: RepoOption = DEFAULT_REPO) -> None:
    """Create a repo (store, miner identity, storage) without starting to seal."""
    cfg = _config(config)
    root = repo_path(repo)
    if repo_exists(root):
        fail(f"repo {root} already exists")
    try:
        asyncio.run(_init(root, cfg))
    except _Outcome as out:
        fail(str(out), out.code)
    typer.echo(
        f"created repo {root}: miner f0{cfg.miner}, {cfg.sector_size} sectors, "
        f"{cfg.sealer} sealer; `sectors pledge` queues sectors, `sectors run` seals them"
    )


def _config(path: Path | None) -> RunConfig:
    from .runconfig import RunConfigError, load_run_config

    try:
        return load_run_config(path.expanduser() if path is not None else None)
    except RunConfigError as exc:
        fail(str(exc))


async def _init(repo: Path, cfg: RunConfig) -> None:
    from ..fsm import StoreError
    from ..sealing.backends import StorageError
    from ..sealing.miner import Miner, SealingError

    # Opening the miner once is what creates a repo exactly as `sectors run` would (identity,
    # store format, storage directories), with every check that run makes.
    try:
        async with Miner.open(repo, **cfg.open_kwargs()):
            pass
    except (StoreError, SealingError, StorageError, ValueError, OSError) as exc:
        raise _Outcome(1, str(exc)) from None


async def _run(
    repo: Path,
    cfg: RunConfig,
    pledge: int,
    until_proving: bool,
    server: MetricsServer | None = None,
) -> int:
    from ..fsm import StoreError, StoreLockedError
    from ..sealing.backends import StorageError
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
            _use_miner_policy(miner, repo, console)
            if server is not None:
                server.attach(miner.metrics.registry)
                console.print(f"metrics: http://{server.address}/metrics", markup=False)
            async with contextlib.AsyncExitStack() as stack:
                extra = None
                if cfg.cluster is not None:
                    extra = await _start_cluster(stack, miner, cfg.cluster, console)
                for _ in range(pledge):
                    n = await miner.pledge()
                    console.print(f"Created CC sector: {n}")
                return await _supervise(miner, stop, until_proving, extra)
    except StoreLockedError as exc:
        raise _Outcome(1, f"{exc}") from None
    except (StoreError, SealingError, StorageError, ValueError, OSError) as exc:
        raise _Outcome(1, str(exc)) from None


async def _start_cluster(
    stack: contextlib.AsyncExitStack, miner: Miner, cluster: ClusterConfig, console: Console
) -> Callable[[], dict[str, Any]]:
    """Run or join the Dask cluster for `[cluster]`; what to add to each published snapshot."""
    from ..sealing.backends.dask.certs import CertError
    from ..sealing.backends.dask.membership import open_cluster
    from ..sealing.backends.dask.security import engine_security

    if cluster.warning:
        console.print(f"warning: {cluster.warning}", style="yellow", markup=False)
    try:
        security = engine_security(cluster.certs) if cluster.certs is not None else None
    except CertError as exc:
        raise _Outcome(1, f"[cluster] certs: {exc}") from None
    miner.sched.remote_grace = cluster.heartbeat_grace
    if not cluster.local_worker:
        for w in miner.sched.workers():  # only the in-process workers exist yet
            miner.sched.remove_worker(w.name)
    try:
        joined = await stack.enter_async_context(
            open_cluster(
                miner.sched,
                listen=cluster.listen,
                scheduler=cluster.scheduler,
                security=security,
                worker_ttl=cluster.worker_ttl,
                say=lambda line: console.print(f"cluster: {line}", markup=False),
                on_join=miner.sealer.worker_joined,  # its files reconciled with the index
                # A rejoining worker's jobs of attempts the sealer moved past are killed.
                attempts=getattr(miner.sealer.backend, "attempt", None),
            )
        )
    except (OSError, TimeoutError) as exc:
        raise _Outcome(1, f"cluster: cannot start at {cluster.address}: {exc}") from None
    how = "running" if joined.scheduler is not None else "connected to"
    console.print(f"cluster: Dask scheduler {how} {joined.address}", markup=False)
    return joined.membership.snapshot


def _use_miner_policy(miner: Miner, repo: Path, console: Console) -> None:
    """Apply the repo's `testOpenSource.json` (if any, hot-reloaded) to workers without a file."""
    from ..sched.policy import MINER_POLICY_FILE

    watcher = miner.sched.use_miner_policy(repo / MINER_POLICY_FILE)
    covered = [w.name for w in miner.sched.enabled_workers() if w.spec.policy_file is None]
    if watcher.error:
        console.print(f"miner policy: {watcher.error}", style="yellow", markup=False)
    elif watcher.path.exists():
        names = ", ".join(covered) or "none yet"
        console.print(f"miner policy {watcher.path} applies to workers: {names}", markup=False)


def _publish(miner: Miner, extra: Callable[[], dict[str, Any]] | None) -> dict[str, Any]:
    """Publish the scheduler's snapshot, with the cluster's view of remote workers if any."""
    if extra is None:
        return miner.sched.publish(miner.store)
    from ..sched.views import publish_snapshot

    snapshot = {**miner.sched.snapshot(), "cluster": extra()}
    publish_snapshot(miner.store, snapshot)
    return snapshot


async def _supervise(
    miner: Miner,
    stop: asyncio.Event,
    until_proving: bool,
    extra: Callable[[], dict[str, Any]] | None = None,
) -> int:
    live = sys.stdout.isatty()
    view = _LiveView(miner) if live else _PlainLog(miner)
    tracked = _Tracked(miner, baseline=until_proving)
    quiet = 0
    refusal = RefusalWatch()
    with view:
        while not stop.is_set():
            settled = miner.settled()  # before this tick's snapshot is staged
            snapshot = _publish(miner, extra)
            sectors = tracked.refresh()
            view.update(sectors)
            note = refusal.update(snapshot)
            if note is not None:
                view.note(note)
            if until_proving:
                verdict = _verdict(sectors, tracked.proving_before)
                # Settled: no queued request is about to create a sector either.
                if verdict is None and not sectors and settled:
                    raise _Outcome(
                        1,
                        "--until-proving has nothing to wait for: this repo has no sectors "
                        "(pledge some with --pledge N or `sectors pledge`)",
                    )
                # Settled twice in a row (half a second apart): nothing will move any more.
                quiet = quiet + 1 if verdict is None and sectors and settled else 0
                if quiet >= 2:
                    verdict = _settled_verdict(sectors)
                if verdict is not None:
                    await miner.idle()
                    _publish(miner, extra)
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


def _verdict(sectors: list[SectorInfo], proving_before: int) -> tuple[int, str] | None:
    from ..sealing.states import SectorState

    live = [s for s in sectors if s.state is not SectorState.Removed]
    stuck = [s for s in live if s.state is SectorState.FailedUnrecoverable]
    if stuck:
        s = stuck[0]
        return 1, f"sector {s.number} is FailedUnrecoverable: {s.last_err}"
    if (live or proving_before) and all(s.state is SectorState.Proving for s in live):
        # Those Proving before the run count too (they are not re-read each tick).
        return 0, f"all {len(live) + proving_before} sector(s) are Proving"
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


class RefusalWatch:
    """Says when the scheduler refuses every queued task while nothing runs, and why.

    Then no sector can move until the operator changes something (a worker, a path, the
    policy file), which `sectors status N` alone would only show one sector at a time. A
    refusal is reported once it was seen on two ticks in a row (not in the instant between
    a job ending and the next one being placed), then again only when it changes.
    """

    def __init__(self) -> None:
        self.seen: str | None = None
        self.said: str | None = None

    def update(self, snapshot: dict[str, Any]) -> str | None:
        """The line to print for this tick's scheduler snapshot, if any."""
        now = _blocking_refusal(snapshot)
        previous, self.seen = self.seen, now
        if now is not None and now != previous:
            return None  # wait for a second tick
        if now == self.said:
            return None
        self.said = now
        return now if now is not None else "scheduler: tasks are being placed again"


def _blocking_refusal(snapshot: dict[str, Any]) -> str | None:
    if not snapshot["diag"] or any(j["worker"] is not None for j in snapshot["jobs"]):
        return None
    causes: dict[str, list[str]] = {}
    for task in snapshot["diag"]:
        reasons = task["reasons"]
        if not reasons:
            why = "no worker is registered"
        elif any(r == "could take it now" for r in reasons.values()):
            return None
        else:
            why = "; ".join(f"{w}: {r}" for w, r in sorted(reasons.items()))
        causes.setdefault(f"no worker can run {task['task']}: {why}", []).append(task["sector"])
    lines = [
        f"scheduler: {cause} ({len(waiting)} task(s) waiting)" for cause, waiting in causes.items()
    ]
    return "\n".join(lines)


class _PlainLog:
    """One line per transition, for logs and pipes.

    The transitions come from the sector's log, so steps taken between two ticks are each
    printed (never one merged `A -> C` that is not an edge). When the log cannot tell (it
    was truncated), the line says so: `A -> ... -> C`.
    """

    def __init__(self, miner: Miner) -> None:
        self.miner = miner
        #: Per sector: the state last printed, and how many of its transitions were printed.
        self.seen: dict[int, tuple[str, int]] = {}

    def __enter__(self) -> _PlainLog:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, sectors: list[SectorInfo]) -> None:
        from ..sealing.store_view import display_state
        from ..statecharts import path_from_log

        stamp = time.strftime("%H:%M:%S")
        for s in sectors:
            state = display_state(s)
            before = self.seen.get(s.number)
            if before is not None and before[0] == state:
                continue
            path = path_from_log(s.log)
            self.seen[s.number] = (state, len(path))
            extra = f" ({s.last_err})" if s.last_err and state.endswith("Failed") else ""
            if before is None:
                print(f"{stamp} sector {s.number}: - -> {state}{extra}", flush=True)
                continue
            steps = [(_shown(a), _shown(b)) for a, _, b in path[before[1] :]]
            chained = all(steps[i][1] == steps[i + 1][0] for i in range(len(steps) - 1))
            if not steps or not chained or (steps[0][0], steps[-1][1]) != (before[0], state):
                steps = [(before[0], f"... -> {state}")]
            for a, b in steps:
                print(f"{stamp} sector {s.number}: {a} -> {b}{extra if b == state else ''}")
        sys.stdout.flush()

    def note(self, message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)

    def final(self, message: str) -> None:
        print(message, flush=True)


def _shown(state: str) -> str:
    from ..sealing.store_view import WAITING_FOR_ENGINE

    # The graph names the state before the first event UndefinedSectorState (its value is "").
    return WAITING_FOR_ENGINE if state in ("", "UndefinedSectorState") else str(state)


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

    def note(self, message: str) -> None:
        self.live.console.print(message, markup=False)

    def final(self, message: str) -> None:
        self.live.console.print(message)

    def _render(self, sectors: list[SectorInfo]) -> Any:
        from rich.console import Group
        from rich.table import Table

        from ..sealing.store_view import display_state

        # The whole repo's counts, kept per commit (no scan however many sectors are Proving).
        counts: Counter[str] = Counter()
        for state, n in self.miner.sector_counts().items():
            if n:
                counts[_shown(state)] += n
        summary = (
            "  ".join(f"[{state_colour(k)}]{k}[/] {v}" for k, v in sorted(counts.items()))
            or "no sectors yet: `sectors pledge` from another terminal"
        )
        busy = [s for s in sectors if s.state.value != "Proving"][:15]
        parts: list[Any] = [f"epoch {self.miner.chain.head()}  {summary}"]
        if busy:  # an empty table under "all N are Proving" reads as if they had vanished
            table = Table("Sector", "State", "Last event", box=None)
            for s in busy:
                last = s.log[-1].kind.removeprefix("event;") if s.log else ""
                shown = display_state(s)
                table.add_row(str(s.number), f"[{state_colour(shown)}]{shown}[/]", last)
            parts.append(table)
        workers = Table("Worker", "Running", "CPU", "GPU", box=None)
        for w in self.miner.sched.workers():
            tasks = " ".join(f"{k}:{v}" for k, v in w.tasks.items()) or "idle"
            workers.add_row(w.name, tasks, f"{w.cpus_used}/{w.cpus}", f"{w.gpus_used:g}/{w.gpus}")
        parts.append(workers)
        return Group(*parts)


def register(app: typer.Typer) -> None:
    """Add `run` and `init` to `app`."""
    app.command("run")(run)
    app.command("init")(init)
